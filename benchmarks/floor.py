"""The floor for whole-matrix work on one file: every raw chunk read and inflated, nothing assembled.

Compares it with this loompy's full read, sparse(), scan and map on the same file, each on a
connection of its own (its chunk index listed within its time, as the floor's is), so the ratio to
the floor shows how much is left above decompression; and measures what fresh memory the size of a
full read's result costs here, which ``ds[:, :]`` pays and the floor does not. The floor is measured
on threads (the engine's scheme for reads) and in child processes (as its helper processes work),
which share no GIL.

    python benchmarks/floor.py FILE.loom [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import loompy  # noqa: E402
from loompy import engine  # noqa: E402
from loompy.engine import codecs, memory, storage, workers  # noqa: E402


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


_CHILD = """import sys, types
sys.path[:] = {path_list!r}
for name, folder in (("loompy", {package!r}), ("loompy.engine", {engine!r})):
    module = types.ModuleType(name); module.__path__ = [folder]; sys.modules[name] = module
import os
import numpy as np
from loompy.engine.child import inflate_band
from loompy.engine.codecs import fill_bytes
sys.stdin.buffer.read()  # the parent closes stdin once the index is written
index = np.load({index!r})
arrays = (index["offset"], index["size"], index["mask"])
fd = os.open({path!r}, os.O_RDONLY)
into = np.empty((arrays[0].shape[1], *{chunks!r}), dtype={dtype!r})
fill = fill_bytes({chunks!r}, np.array({fill!r}).astype({dtype!r})[()], {dtype!r})  # (from text: nan, inf)
for band in range({first}, arrays[0].shape[0], {count}):
    inflate_band(into, fd, arrays, band, slice(None), {compressed!r}, fill)
"""


def floor_in_processes(path: str, count: int, folder: str) -> float:
    """Seconds for ``count`` child processes to read and inflate every stored chunk of /matrix (each
    every ``count``-th chunk row), nothing assembled, as the engine's helper processes work: started
    before this process lists the chunk index (in the time), loading numpy and the codecs only.

    Where threads hand the GIL over at every inflate call, processes share nothing: on this
    machine they came nearer to two cores' worth.
    """
    with h5py.File(path, "r") as f:
        dataset = f["matrix"]
        layout = storage.chunk_layout(dataset)
        engine = str(Path(storage.__file__).parent)
        start = time.perf_counter()
        index_file = os.path.join(folder, "floor-index.npz")
        children = [subprocess.Popen([sys.executable, "-I", "-c", _CHILD.format(
            path_list=[p for p in sys.path if p], package=str(Path(engine).parent), engine=engine,
            index=index_file, path=path, chunks=layout.chunks, dtype=layout.dtype.str, compressed=layout.compressed,
            fill=str(np.asarray(layout.fill).item()), first=k, count=count)],
            stdin=subprocess.PIPE) for k in range(count)]
        index = storage.build_index(dataset)
        np.savez(index_file, offset=index.offset, size=index.size, mask=index.mask)
        for child in children:
            child.stdin.close()
        for child in children:
            if child.wait() != 0:
                raise SystemExit(f"a child inflating {path} failed")
        return time.perf_counter() - start


def fresh_pages(nbytes: int, threads: int, ahead: bool) -> float:
    """Seconds to get ``nbytes`` of new memory, as a full read's result gets it, and touch every page of
    it on ``threads`` threads: what any whole-matrix read pays on top of the floor, as the kernel maps
    (and, in a virtual machine, the host backs) each page when it is first written. ``ahead``: each
    thread first faults its share in with one call, as the engine does (``memory.populate``)."""
    start = time.perf_counter()
    pages = memory.fresh(nbytes, np.uint8)
    step = mmap.PAGESIZE
    bounds = np.linspace(0, nbytes, threads + 1).astype(int) // step * step

    def touch(k: int) -> None:
        if ahead:
            memory.populate(pages[bounds[k]:bounds[k + 1]])
        pages[bounds[k]:bounds[k + 1]:step] = 1  # (numpy lets go of the GIL for the fill)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(touch, range(threads)))
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
    with h5py.File(args.file, "r") as f:
        result_bytes = f["matrix"].size * f["matrix"].dtype.itemsize
    two = f"floor, {workers.THREADS} threads"
    children = f"floor, {workers.THREADS} processes"
    folder = tempfile.mkdtemp(prefix="loompy-floor-")
    measures = {
        "floor, 1 thread: read + inflate every chunk": lambda: floor(args.file, 1),
        two: lambda: floor(args.file, workers.THREADS),
        children: lambda: floor_in_processes(args.file, workers.THREADS, folder),
        f"fresh pages: {result_bytes / 1e9:.1f} GB touched on {workers.THREADS} threads, nothing read":
            lambda: fresh_pages(result_bytes, workers.THREADS, ahead=False),
        "fresh pages, faulted in ahead (as ds[:, :] does)":
            lambda: fresh_pages(result_bytes, workers.THREADS, ahead=True),
    }
    kept: list[np.ndarray] = []  # one result's memory, faulted in once, outside every round's time

    def into_kept(ds: loompy.LoomConnection) -> None:
        """ds[:, :] into memory faulted in before: the engine's own work, without the fresh pages."""
        dataset = ds.layers[""]._dataset
        if not kept:
            kept.append(np.ones(dataset.shape, dataset.dtype))
        engine.read_block(dataset, np.arange(dataset.shape[0]), np.arange(dataset.shape[1]), out=kept[0])

    actions = {
        "ds[:, :]": lambda ds: ds[:, :],
        "ds[:, :] into memory already faulted in": into_kept,
        "sparse()": lambda ds: ds.sparse(),
        "scan rows (512)": lambda ds: [None for _ in ds.scan(axis=0, batch_size=512, what=["layers"])],
        "scan columns (512)": lambda ds: [None for _ in ds.scan(axis=1, batch_size=512, what=["layers"])],
        "map([np.mean, np.std])": lambda ds: ds.map([np.mean, np.std], axis=0),
        "map over columns": lambda ds: ds.map([np.mean, np.std], axis=1),
    }
    measures.update({name: functools.partial(timed, args.file, action) for name, action in actions.items()})
    # each round measures the floor and then everything else, so that a slow spell of this shared
    # machine weighs on a round's floor as on its operations; the ratio is each round's, then the median
    times: dict[str, list[float]] = {name: [] for name in measures}
    try:
        for _ in range(args.repeats):
            for name, measure in measures.items():
                times[name].append(measure())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{args.file}: median of {args.repeats} rounds\n")
    print(f"| what | seconds | x floor ({workers.THREADS} threads) | x floor ({workers.THREADS} processes) |")
    print("|---|---:|---:|---:|")
    for name, seconds in times.items():
        ratios = [statistics.median(t / f for t, f in zip(seconds, times[base])) for base in (two, children)]
        print(f"| {name} | {statistics.median(seconds):.3f} | {ratios[0]:.2f} | {ratios[1]:.2f} |")


if __name__ == "__main__":
    main()
