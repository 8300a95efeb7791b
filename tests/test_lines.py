"""numpy reductions of every row or column in helper processes (engine/lines.py, map): exactly the
values numpy gives for each line alone (and loompy 3.0.8's map), the same as on threads, whatever
the axis, selection, dtype or shape; the lines a failed helper did not give are reduced here;
damaged chunks are errors."""

from __future__ import annotations

import contextlib
import importlib
import os
import zlib

import h5py
import numpy as np
import pytest

import loompy
from loompy.engine import codecs

from .conftest import helpers_dying_in

processes = importlib.import_module("loompy.engine.processes")
lines_module = importlib.import_module("loompy.engine.lines")
read_module = importlib.import_module("loompy.engine.read")

FUNCTIONS = [np.mean, np.std, np.var, np.sum, np.max, np.nanmean, np.count_nonzero]


def _matrix(path, shape, dtype, fill=0, seed=3):
    """A Loom file whose matrix has chunks never written (two chunk columns of the fill value) and a
    partial last chunk row and column; returns the values it holds."""
    rng = np.random.default_rng(seed)
    m = (rng.random(shape) * 200 - (0 if np.dtype(dtype).kind == "u" else 60)).astype(dtype)
    m[rng.random(shape) < 0.6] = 0
    loompy.create(path, np.zeros((shape[0], 1), dtype), {"g": np.arange(shape[0])}, {"c": [0]}).close()
    with h5py.File(path, "r+") as f:
        del f["matrix"]
        d = f.create_dataset("matrix", shape=shape, dtype=dtype, chunks=(64, 64), compression="gzip",
                             maxshape=(shape[0], None), fillvalue=fill)
        d[:, :64] = m[:, :64]
        if shape[1] > 192:
            d[:, 192:] = m[:, 192:]
            m[:, 64:192] = fill  # never written
        else:
            d[:, 64:] = m[:, 64:]
        del f["col_attrs/c"]
        f["col_attrs/c"] = np.arange(shape[1])
    return m


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16, np.float16])
def test_line_reductions_in_children_are_numpys_values_exactly(tmp_path, children, dtype, axis, monkeypatch):
    path = tmp_path / "m.loom"
    m = _matrix(path, (300, 700), dtype, fill=3)
    n = m.shape[1 - axis]
    picks = {"all": None, "run": np.arange(n) >= 150, "scattered": np.arange(n) % 7 == 2}
    for name, selection in picks.items():
        others = np.arange(n) if selection is None else np.flatnonzero(selection)
        functions = FUNCTIONS if dtype != np.float16 else [np.mean, np.sum, np.max]
        with loompy.connect(path, "r") as ds:
            got = ds.map(functions, axis=axis, selection=selection)
        lines = [m[k, others] if axis == 0 else m[others, k] for k in range(m.shape[axis])]
        for values, f in zip(got, functions):
            expected = [f(line) for line in lines]
            assert values.dtype == np.result_type(np.float64, np.asarray(expected).dtype), (name, f)
            np.testing.assert_array_equal(values, np.asarray(expected).astype(values.dtype), err_msg=f"{name} {f}")
    assert len(children) == 2 * len(picks) and children.left == 0  # (two helpers for each map, which did it all)


@pytest.mark.parametrize("axis", [0, 1])
def test_children_threads_and_strips_give_the_same_values(tmp_path, children, monkeypatch, axis):
    """The same values from helper processes, from threads (small matrices) and from strips read
    through HDF5 (where chunks cannot be read directly), numpy's for each line alone."""
    path = tmp_path / "m.loom"
    m = _matrix(path, (1000, 400), np.float32)
    with loompy.connect(path, "r") as ds:
        here = ds.map([np.mean, np.std, np.sum], axis=axis)
        assert len(children) == 2 and children.left == 0
        monkeypatch.setattr(processes, "MIN_CHUNKS", 10 ** 12)
        threads = ds.map([np.mean, np.std, np.sum], axis=axis)
        assert children.left == 2  # (both parts of the job, on threads)
        monkeypatch.setattr(read_module, "direct_reads", lambda d: contextlib.nullcontext(None))
        strips = ds.map([np.mean, np.std, np.sum], axis=axis, chunksize=150)
        mixed = ds.map([np.mean, np.std, lambda x: 0], axis=axis, chunksize=150)  # (not all numpy's: batches)
    assert len(children) == 2
    lines = m if axis == 0 else m.T
    for a, b, c, d, f in zip(here, threads, strips, mixed, [np.mean, np.std, np.sum]):
        np.testing.assert_array_equal(a, [f(line) for line in lines])
        for other in (b, c, d) if f is not np.sum else (b, c):
            np.testing.assert_array_equal(a, other)


@pytest.mark.parametrize("part_chunks", [64, 16])
def test_narrow_matrices_go_several_bands_to_a_part(tmp_path, children, monkeypatch, part_chunks):
    """A part holds at most PART_CHUNKS chunks: with 2 chunk columns, 32 bands a part (8 for 16), as
    this process decides: the children are told, whatever their own PART_CHUNKS."""
    path = tmp_path / "narrow.loom"
    m = _matrix(path, (5000, 100), np.float32)
    monkeypatch.setattr(lines_module, "PART_CHUNKS", part_chunks)
    plans, begin = [], processes.ChildJob.begin
    monkeypatch.setattr(processes.ChildJob, "begin", lambda job, plan, *a: plans.append(plan) or begin(job, plan, *a))
    with loompy.connect(path, "r") as ds:
        mean, top = ds.map([np.mean, np.max], axis=0)
    assert (plans[0].bands_per_part, plans[0].parts) == ((32, 3) if part_chunks == 64 else (8, 10))  # 79 bands
    assert children.left == 0
    np.testing.assert_array_equal(mean, np.mean(m, axis=1).astype(np.float64))
    np.testing.assert_array_equal(top, np.max(m, axis=1))


def test_the_rows_of_a_child_that_dies_are_reduced_here(tmp_path, children, monkeypatch):
    path = tmp_path / "m.loom"
    m = _matrix(path, (1000, 4200), np.float32)  # 16 bands, one a part
    here = helpers_dying_in(monkeypatch, "lines", "LineReducer", "reduce", (3, 11))  # (parts reduced here)
    with loompy.connect(path, "r") as ds:
        mean, std = ds.map([np.mean, np.std], axis=0)
    # one died on part 3, the other on 11 (each once its frames were out)
    assert [c.returncode for c in children] == [5, 5]
    assert sorted(here) == [3, 11, 12, 13, 14, 15] and children.left == 6
    np.testing.assert_array_equal(mean, np.mean(m, axis=1).astype(np.float64))
    np.testing.assert_array_equal(std, np.std(m, axis=1).astype(np.float64))


def test_children_that_cannot_start_leave_it_all_to_threads(tmp_path, children, monkeypatch):
    path = tmp_path / "m.loom"
    m = _matrix(path, (300, 700), np.float32)
    monkeypatch.setattr(processes, "_BOOT", "import sys; sys.exit(3)\n")
    with loompy.connect(path, "r") as ds:
        total = ds.map(np.sum, axis=0)
    assert [c.returncode for c in children] == [3, 3] and children.left == 1
    np.testing.assert_array_equal(total, np.sum(m, axis=1))


def test_only_numpys_own_reductions_go_to_children(tmp_path, children):
    path = tmp_path / "m.loom"
    m = _matrix(path, (300, 700), np.float32)
    with loompy.connect(path, "r") as ds:
        (custom,) = ds.map([lambda x: float(x.max())], axis=0)  # not vectorised at all
        top = ds.map(np.amax, axis=0)  # numpy's, under its own name
    assert len(children) == 2 and children.left == 0
    np.testing.assert_array_equal(custom, m.max(axis=1))
    np.testing.assert_array_equal(top, m.max(axis=1))
    assert lines_module.numpy_name(np.amax) == "amax" and lines_module.numpy_name(lambda x: x) is None


def test_children_see_what_this_connection_wrote(tmp_path, children):
    """Writes still in HDF5's chunk cache reach the file before helpers read it."""
    path = tmp_path / "m.loom"
    m = _matrix(path, (300, 700), np.float32)
    with loompy.connect(path) as ds:
        ds[:, 10:20] = np.full((300, 10), 7, np.float32)
        m[:, 10:20] = 7
        total = ds.map(np.sum, axis=0)
    assert len(children) == 2 and children.left == 0
    np.testing.assert_array_equal(total, np.sum(m, axis=1))


def test_a_damaged_chunk_read_by_a_child_is_an_error_naming_the_file(tmp_path, children):
    path = tmp_path / "m.loom"
    _matrix(path, (300, 700), np.float32)
    with h5py.File(path, "r") as f:
        info = f["matrix"].id.get_chunk_info_by_coord((128, 320))
    data = bytearray(path.read_bytes())
    data[info.byte_offset + 5:info.byte_offset + 40] = b"\xff" * 35
    path.write_bytes(bytes(data))
    with loompy.connect(path, "r") as ds, pytest.raises(loompy.LoomFileError, match="m.loom.*damaged"):
        ds.map([np.mean], axis=0)
    assert len(children) == 2


@pytest.mark.parametrize("axis", [0, 1])
def test_a_plan_crosses_to_a_child_unchanged(axis):
    rng = np.random.default_rng(0)
    grid = (5, 7)
    plan = lines_module.LinePlan(chunks=(64, 32), shape=(300, 220), axis=axis, dtype="<f4", compressed=True,
                                 source_fill=-1.5, functions=["mean", "std"], result_dtypes=["<f8", "<f8"],
                                 others=np.array([0, 3, 70, 200]), offset=rng.integers(-1, 10 ** 9, grid),
                                 size=rng.integers(0, 999, grid), mask=rng.integers(0, 2, grid))
    back = lines_module.LinePlan.from_bytes(plan.to_bytes())
    for name in ("chunks", "shape", "axis", "dtype", "compressed", "source_fill", "functions", "result_dtypes",
                 "bands_per_part"):
        assert getattr(back, name) == getattr(plan, name)
    for name in ("others", "offset", "size", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    if axis == 0:  # rows: chunk columns 0, 2 and 6 hold the columns; 5 bands of 64 rows, one part
        assert back.needed.tolist() == [0, 2, 6] and back.parts == 1 and back.part_lines(0) == range(300)
    else:  # columns: chunk rows 0, 1 and 3 hold the rows; 7 bands of 32 columns, one part
        assert back.needed.tolist() == [0, 1, 3] and back.bands == 7 and back.part_lines(0) == range(220)
        np.testing.assert_array_equal(back.index[0], plan.offset.T)


def test_map_gives_what_the_reference_gives_exactly(tmp_path, reference, children, monkeypatch):
    """loompy 3.0.8 applies each function to each row or column alone: so does map, in helper
    processes and on threads, over rows and columns (a column summed down its rows in one pass
    would differ in the last digits)."""
    path = tmp_path / "m.loom"
    rng = np.random.default_rng(8)
    m = (rng.random((700, 300)) * 10).astype(np.float32)  # (floats with fractions: sums that round)
    loompy.create(path, m, {"g": np.arange(700)}, {"c": np.arange(300)}).close()
    theirs = reference.run("""
        import sys, json, numpy as np, loompy
        with loompy.connect(sys.argv[1], "r") as ds:
            out = [[v.tolist() for v in ds.map([np.mean, np.std, np.sum], axis=a)] for a in (0, 1)]
        print(json.dumps(out))
    """, str(path))
    for where in ("helpers", "threads"):
        with loompy.connect(path, "r") as ds:
            ours = [ds.map([np.mean, np.std, np.sum], axis=a) for a in (0, 1)]
        assert (len(children), children.left) == ((4, 0) if where == "helpers" else (4, 2))  # (one part each)
        for axis in (0, 1):
            for got, expected in zip(ours[axis], theirs[axis]):
                np.testing.assert_array_equal(got, expected, err_msg=f"axis {axis}, {where}")
        monkeypatch.setattr(processes, "MIN_CHUNKS", 10 ** 12)


def _chunk_blob(tmp_path):
    """Seven 8 x 8 chunks in a file: back to back but for a gap before the fourth, the fifth stored
    raw (filter mask bit 0), the sixth never written (offset -1, and a size that must not count)."""
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 4, (8, 8)).astype(np.float32) for _ in range(7)]
    stored = [zlib.compress(c.tobytes(), 2) for c in chunks]
    stored[4] = chunks[4].tobytes()
    blob, offsets = bytearray(b"x" * 10), []
    for k, data in enumerate(stored):
        if k == 3:
            blob += b"gap"
        offsets.append(len(blob))
        blob += data
    offsets[5] = -1
    path = tmp_path / "blob"
    path.write_bytes(bytes(blob))
    expected = np.stack(chunks)
    expected[5] = 9
    return path, (offsets, [len(s) for s in stored], [0, 0, 0, 0, 1, 0, 0]), expected


@pytest.mark.parametrize("run_bytes", [4 << 20, 100])
def test_inflate_into_reads_runs_of_chunks_as_one_chunk_at_a_time_would(tmp_path, monkeypatch, run_bytes):
    """Back-to-back chunks are read together (runs no longer than about RUN_BYTES); gaps, chunks
    never written and chunks stored raw each read as they must."""
    path, stored, expected = _chunk_blob(tmp_path)
    monkeypatch.setattr(codecs, "RUN_BYTES", run_bytes)
    reads, pread = [], os.pread
    monkeypatch.setattr(codecs.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    target = np.zeros((7, 8, 8), np.float32)
    fill = np.full((8, 8), 9, np.float32).tobytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        codecs.inflate_into(memoryview(target.reshape(-1).view(np.uint8)), fd, stored, 256, True, fill)
        codecs.inflate_into(memoryview(target.reshape(-1).view(np.uint8)), fd, ([], [], []), 256, True, fill)
    finally:
        os.close(fd)
    np.testing.assert_array_equal(target, expected)
    largest = max(stored[1])
    assert len(reads) == 3 if run_bytes > 1000 else len(reads) > 3  # (three runs: before the gap, after, the last)
    assert max(reads) <= run_bytes + largest
    assert sum(reads) == sum(size for o, size in zip(*stored[:2]) if o >= 0)


def test_inflate_into_names_the_chunk_a_truncated_file_cuts(tmp_path):
    path, stored, _ = _chunk_blob(tmp_path)
    offsets, sizes, _ = stored
    path.write_bytes(path.read_bytes()[:offsets[2] + 3])  # the third chunk of the first run is cut
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(codecs.DamagedChunk, match=f"the chunk at byte {offsets[2]} is cut short"):
            codecs.inflate_into(memoryview(np.zeros(7 * 256, np.uint8)), fd, stored, 256, True, b"\0" * 256)
    finally:
        os.close(fd)


def test_inflate_into_never_joins_a_chunk_never_written_to_the_next(tmp_path):
    """An unwritten chunk's size must not matter, even one that would seem to end where the next begins."""
    path, (offsets, sizes, masks), expected = _chunk_blob(tmp_path)
    target = np.zeros((2, 8, 8), np.float32)
    fd = os.open(path, os.O_RDONLY)
    try:
        codecs.inflate_into(memoryview(target.reshape(-1).view(np.uint8)), fd,
                            ([-1, offsets[0]], [offsets[0] + 1, sizes[0]], [0, 0]), 256, True,
                            np.full((8, 8), 9, np.float32).tobytes())
    finally:
        os.close(fd)
    np.testing.assert_array_equal(target, [np.full((8, 8), 9), expected[0]])


@pytest.mark.parametrize("axis", [0, 1])
def test_a_selection_is_taken_in_its_order_with_its_repeats(tmp_path, children, monkeypatch, axis):
    """As loompy 3 takes ``row[selection]``: an index selection keeps its order and repeats, in
    helper processes, on threads and in batches (a non-numpy function among numpy's)."""
    path = tmp_path / "m.loom"
    m = _matrix(path, (300, 700), np.float32)
    selection = [30, 2, 2, 17, 150, 149]
    lines = [(m[k] if axis == 0 else m[:, k])[selection] for k in range(m.shape[axis])]
    first = lambda x: float(x[0])  # noqa: E731
    monkeypatch.setattr(importlib.import_module("loompy.engine.picks"), "MOST_PICKED", 0)  # (batches: threads)
    for where in ("helpers", "threads"):
        with loompy.connect(path, "r") as ds:
            total, std = ds.map([np.sum, np.std], axis=axis, selection=selection)
            also, heads = ds.map([np.sum, first], axis=axis, selection=selection)
        np.testing.assert_array_equal(total, [np.sum(line) for line in lines], err_msg=where)
        np.testing.assert_array_equal(std, [np.std(line) for line in lines], err_msg=where)
        np.testing.assert_array_equal(also, total)
        np.testing.assert_array_equal(heads, [line[0] for line in lines])
        monkeypatch.setattr(processes, "MIN_CHUNKS", 10 ** 12)
    assert len(children) == 2 and children.left == 1  # (numpy-only maps: helpers, then one part on threads)
