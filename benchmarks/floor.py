"""The floor for whole-matrix work on one file: every raw chunk read and inflated, nothing assembled.

Compares it with this loompy's full read, sparse(), scan and map on the same file, so the ratio to
the floor shows how much is left above decompression.

    python benchmarks/floor.py FILE.loom [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loompy  # noqa: E402
from loompy import codecs, engine  # noqa: E402


def floor(path: str) -> float:
    """Seconds to read and decompress every stored chunk of /matrix."""
    with h5py.File(path, "r") as f:
        dataset = f["matrix"]
        layout = engine.chunk_layout(dataset)
        if layout is None:
            raise SystemExit(f"{path}: /matrix uses a filter pipeline the engine does not decode itself")
        c0, c1 = layout.chunks
        n, m = dataset.shape
        start = time.perf_counter()
        for r in range(0, n, c0):
            for c in range(0, m, c1):
                try:
                    mask, data = dataset.id.read_direct_chunk((r, c))
                except (MemoryError, OSError, KeyError, RuntimeError):
                    continue
                codecs.decompress(data, layout.nbytes, layout.compressed and not (mask & 1))
        return time.perf_counter() - start


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"floor: read + inflate every chunk": [floor(args.file) for _ in range(args.repeats)]}
    with loompy.connect(args.file, "r") as ds:
        actions = {
            "ds[:, :]": lambda: ds[:, :],
            "sparse()": lambda: ds.sparse(),
            "scan rows (512)": lambda: [None for _ in ds.scan(axis=0, batch_size=512, what=["layers"])],
            "scan columns (512)": lambda: [None for _ in ds.scan(axis=1, batch_size=512, what=["layers"])],
            "map([np.mean, np.std])": lambda: ds.map([np.mean, np.std], axis=0),
        }
        for name, action in actions.items():
            rows[name] = [timed(action) for _ in range(args.repeats)]
    base = statistics.median(rows["floor: read + inflate every chunk"])
    print(f"\n{args.file}: median of {args.repeats}\n")
    print("| what | seconds | x floor |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
