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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loompy  # noqa: E402
from loompy import codecs, engine  # noqa: E402


def floor(path: str, threads: int) -> float:
    """Seconds to read and decompress every stored chunk of /matrix.

    With threads > 1, batches of raw chunks read on this thread are inflated on worker threads
    (the engine's own scheme), so the floor counts the parallel inflating the engine can use.
    """
    with h5py.File(path, "r") as f:
        dataset = f["matrix"]
        layout = engine.chunk_layout(dataset)
        if layout is None:
            raise SystemExit(f"{path}: /matrix uses a filter pipeline the engine does not decode itself")
        c0, c1 = layout.chunks
        n, m = dataset.shape
        coords = [(r, c) for r in range(0, n, c0) for c in range(0, m, c1)]

        def inflate(raws: list) -> None:
            for mask, data in raws:
                codecs.decompress(data, layout.nbytes, layout.compressed and not (mask & 1))

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for i in range(0, len(coords), engine.READ_BATCH):
                raws = [raw for r, c in coords[i:i + engine.READ_BATCH]
                        if (raw := engine._raw_chunk(dataset, r, c)) is not None]
                share = -(-len(raws) // threads) or 1
                list(pool.map(inflate, [raws[k:k + share] for k in range(0, len(raws), share)]))
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
    rows = {"floor, 1 thread: read + inflate every chunk": [floor(args.file, 1) for _ in range(args.repeats)],
            f"floor, {engine.THREADS} threads": [floor(args.file, engine.THREADS) for _ in range(args.repeats)]}
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
    base = statistics.median(rows[f"floor, {engine.THREADS} threads"])
    print(f"\n{args.file}: median of {args.repeats}\n")
    print(f"| what | seconds | x floor ({engine.THREADS} threads) |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
