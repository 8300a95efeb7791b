"""Deflate libraries on Loom chunks: zlib, libdeflate (the ``deflate`` package) and ISA-L (``isal``).

Times compressing and inflating the same chunks with each library, on one thread and on two, and
reports microseconds per chunk and stored bytes per chunk. The engine's choice of library for each
direction (see ``loompy/engine/codecs.py``) rests on these figures.

    python benchmarks/deflate_libraries.py                 # seeded 64 x 64 float32 chunks, 7% non-zero counts
    python benchmarks/deflate_libraries.py FILE.loom       # the stored chunks of FILE's /matrix (up to 20,000)
"""

from __future__ import annotations

import argparse
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import deflate
import h5py
import numpy as np
from isal import isal_zlib

LEVEL = 2  # what Loom files use


def sample_chunks(path: str | None, count: int) -> list[bytes]:
    if path is None:
        rng = np.random.default_rng(0)
        counts = (rng.random((count, 64, 64)) < 0.07) * rng.integers(1, 30, size=(count, 64, 64))
        return [c.astype(np.float32).tobytes() for c in counts]
    out = []
    with h5py.File(path, "r") as f:
        d = f["matrix"]
        h, w = d.chunks
        for r in range(0, d.shape[0], h):
            for c in range(0, d.shape[1], w):
                try:
                    mask, data = d.id.read_direct_chunk((r, c))
                except (MemoryError, OSError, KeyError, RuntimeError):
                    continue
                out.append(zlib.decompress(data))
                if len(out) == count:
                    return out
    return out


def timed(work: Callable[[list], object], items: list, threads: int) -> float:
    start = time.perf_counter()
    if threads == 1:
        work(items)
    else:
        share = -(-len(items) // threads)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(work, [items[i:i + share] for i in range(0, len(items), share)]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", nargs="?")
    parser.add_argument("--chunks", type=int, default=20000)
    args = parser.parse_args()
    raw = sample_chunks(args.file, args.chunks)
    size = len(raw[0])
    libraries = {
        "zlib": (lambda b: zlib.compress(b, LEVEL), zlib.decompress),
        "libdeflate": (lambda b: deflate.zlib_compress(b, LEVEL), lambda b: deflate.zlib_decompress(b, size)),
        "isal": (lambda b: isal_zlib.compress(b, LEVEL), isal_zlib.decompress),
    }
    print(f"\n{len(raw)} chunks of {size} bytes, gzip level {LEVEL}; microseconds per chunk\n")
    print("| library | compress, 1 thread | compress, 2 threads | bytes per chunk | inflate, 1 thread "
          "| inflate, 2 threads |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (pack, unpack) in libraries.items():
        packed = [pack(b) for b in raw]
        assert zlib.decompress(packed[0]) == raw[0]  # standard zlib streams: any HDF5 reader decodes them
        row = [timed(lambda xs, pack=pack: [pack(x) for x in xs], raw, t) for t in (1, 2)]
        row += [timed(lambda xs, unpack=unpack: [unpack(x) for x in xs], packed, t) for t in (1, 2)]
        per = [seconds / len(raw) * 1e6 for seconds in row]
        print(f"| {name} | {per[0]:.1f} | {per[1]:.1f} | {sum(map(len, packed)) / len(packed):.0f} "
              f"| {per[2]:.1f} | {per[3]:.1f} |")


if __name__ == "__main__":
    main()
