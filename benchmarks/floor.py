"""The floor for whole-matrix work on one file: every raw chunk read and inflated, nothing assembled.

Compares it with this loompy's full read, sparse(), scan and map on the same file, each on a
connection of its own (its chunk index listed within its time, as the floor's is), so the ratio to
the floor shows how much is left above decompression.

    python benchmarks/floor.py FILE.loom [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loompy  # noqa: E402
from loompy import engine  # noqa: E402
from loompy.engine import codecs, storage  # noqa: E402


def floor(path: str, threads: int) -> float:
    """Seconds to read and decompress every stored chunk of /matrix, nothing assembled.

    The engine's fastest scheme: the chunk index is listed once, then ``threads`` workers each read
    (``os.pread``) and inflate a share of the chunks, a chunk row at a time.
    """
    with h5py.File(path, "r") as f:
        dataset = f["matrix"]
        layout = storage.chunk_layout(dataset)
        if layout is None:
            raise SystemExit(f"{path}: /matrix uses a filter pipeline the engine does not decode itself")
        start = time.perf_counter()
        index = storage.build_index(dataset)
        if index is None:
            raise SystemExit(f"{path}: chunks cannot be read from the file directly")
        fd = index.open()

        def inflate(chunk_row: int) -> None:
            for o, s, k in zip(index.offset[chunk_row].tolist(), index.size[chunk_row].tolist(),
                               index.mask[chunk_row].tolist()):
                if o >= 0:
                    layout.decode(codecs.read_stored(fd, o, s), k)

        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(inflate, range(index.offset.shape[0])))
        finally:
            os.close(fd)
        return time.perf_counter() - start


def timed(path: str, action) -> float:
    """Seconds ``action(ds)`` takes on a connection opened for it alone: its chunk index is listed
    within the time, as the floor's is (a connection keeps the index it built for later reads)."""
    with loompy.connect(path, "r") as ds:
        start = time.perf_counter()
        action(ds)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = {"floor, 1 thread: read + inflate every chunk": [floor(args.file, 1) for _ in range(args.repeats)],
            f"floor, {engine.THREADS} threads": [floor(args.file, engine.THREADS) for _ in range(args.repeats)]}
    actions = {
        "ds[:, :]": lambda ds: ds[:, :],
        "sparse()": lambda ds: ds.sparse(),
        "scan rows (512)": lambda ds: [None for _ in ds.scan(axis=0, batch_size=512, what=["layers"])],
        "scan columns (512)": lambda ds: [None for _ in ds.scan(axis=1, batch_size=512, what=["layers"])],
        "map([np.mean, np.std])": lambda ds: ds.map([np.mean, np.std], axis=0),
        "map over columns": lambda ds: ds.map([np.mean, np.std], axis=1),
    }
    for name, action in actions.items():
        rows[name] = [timed(args.file, action) for _ in range(args.repeats)]
    base = statistics.median(rows[f"floor, {engine.THREADS} threads"])
    print(f"\n{args.file}: median of {args.repeats}\n")
    print(f"| what | seconds | x floor ({engine.THREADS} threads) |")
    print("|---|---:|---:|")
    for name, times in rows.items():
        t = statistics.median(times)
        print(f"| {name} | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
