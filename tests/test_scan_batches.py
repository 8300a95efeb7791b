"""A scan's batches filled by the engine's helper processes in shared memory (engine/batches.py,
engine/scans.py): numpy's values on the same matrix, whatever the dtype, batch size or axis; batches
the caller keeps are never written over; a write during the scan, a helper that dies and a scan
left early all still give the file's values (or end the helpers); damaged chunks are errors."""

from __future__ import annotations

import gc
import importlib
import os
import time

import h5py
import numpy as np
import pytest

import loompy

from .conftest import helpers_dying_in
from .test_picks import _matrix

scans = importlib.import_module("loompy.engine.scans")
processes = importlib.import_module("loompy.engine.processes")

SHAPE = (700, 650)  # (partial last chunk row and column; chunk columns 1 and 2 never written)


@pytest.fixture
def handed(monkeypatch, children):
    """Which batches the helpers filled, as (axis, batch number) in order (None: read here)."""
    seen, real = [], scans.BatchReads.batch

    def spy(reader, number):
        got = real(reader, number)
        seen.append((reader.plan.axis, number) if got is not None else None)
        return got

    monkeypatch.setattr(scans.BatchReads, "batch", spy)
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16, np.float16, ">f4"])
@pytest.mark.parametrize("batch_size", [64, 100, 512, 1000])
def test_scan_batches_from_helpers_are_numpys(tmp_path, handed, dtype, batch_size):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, dtype, fill=3)
    with loompy.connect(path, "r") as ds:
        for axis in (0, 1):
            got, expected_batches = [], -(-SHAPE[axis] // batch_size)
            for ix, selection, view in ds.scan(axis=axis, batch_size=batch_size):
                values = view[""][:, :]
                assert values.dtype == m.dtype and values.flags.c_contiguous
                np.testing.assert_array_equal(selection, np.arange(ix, min(ix + batch_size, SHAPE[axis])))
                got.append(values)
            np.testing.assert_array_equal(np.concatenate(got, axis=axis), m, err_msg=f"axis {axis}")
            assert handed[-expected_batches:] == [(axis, k) for k in range(expected_batches)]


def test_batch_scan_from_helpers(tmp_path, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        for axis in (0, 1):
            parts = [values.copy() for _, _, values in ds.batch_scan(axis=axis, batch_size=128)]
            np.testing.assert_array_equal(np.concatenate(parts, axis=axis), m)
            layered = [values[""] for _, _, values in ds.batch_scan_layers(axis=axis, batch_size=300)]
            np.testing.assert_array_equal(np.concatenate(layered, axis=axis), m)
    assert None not in handed and len(handed) == 2 * (6 + 3)


def test_only_whole_scans_of_one_layer_use_helpers(tmp_path, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path) as ds:
        ds.ca["order"] = np.arange(SHAPE[1])[::-1].copy()
        for kwargs in ({"items": np.arange(0, 700, 2)}, {"key": "order"}, {"what": ["row_attrs"]}):
            for _, _, view in ds.scan(axis=0, batch_size=128, **kwargs):
                if "key" in kwargs:
                    np.testing.assert_array_equal(view[""][:, :], m[view.ra.g][:, ::-1])
        assert handed == []
        ds.layers["more"] = m * 2
        for _, selection, view in ds.scan(axis=0, batch_size=128):  # (two layers: read here)
            np.testing.assert_array_equal(view.layers["more"][:, :], m[selection] * 2)
        assert handed == []
        for _, selection, view in ds.scan(axis=0, batch_size=128, layers=["more"]):
            np.testing.assert_array_equal(view.layers["more"][:, :], m[selection] * 2)
        assert handed == [(0, k) for k in range(6)]


def test_kept_batches_are_never_written_over(tmp_path, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        kept = [view for _, _, view in ds.scan(axis=0, batch_size=64)]  # (every view kept: 11 slots)
        pieces = []
        for k, (_, _, view) in enumerate(ds.scan(axis=1, batch_size=64)):
            if k % 3 == 0:
                pieces.append(view[""][10:20, 5:9])  # (a small view of the batch keeps all of it)
    np.testing.assert_array_equal(np.concatenate([v[""][:, :] for v in kept]), m)
    for k, piece in enumerate(pieces):
        np.testing.assert_array_equal(piece, m[10:20, 3 * k * 64 + 5:3 * k * 64 + 9])
    assert None not in handed


def test_a_write_during_the_scan_stops_the_helpers(tmp_path, handed):
    """Batches after a write are read here, after it (the helpers read chunks as they were listed)."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path) as ds:
        for ix, selection, view in ds.scan(axis=0, batch_size=128):
            np.testing.assert_array_equal(view[""][:, :], m[selection])
            if ix == 128:
                m[500:700] = 7
                ds[500:700, :] = m[500:700]  # (rows of batches the helpers may have filled already)
    # (batch 2, filled ahead while the loop wrote, is read again here, as are the rest)
    assert handed[:2] == [(0, 0), (0, 1)] and handed[-4:] == [None] * 4


def test_parts_a_dying_helper_did_not_give_are_read_here(tmp_path, monkeypatch, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    helpers_dying_in(monkeypatch, "batches", "BatchFiller", "frame", (5,))
    with loompy.connect(path, "r") as ds:
        got = [view[""][:, :] for _, _, view in ds.scan(axis=0, batch_size=128)]
    np.testing.assert_array_equal(np.concatenate(got), m)
    assert handed[0] == (0, 0) and None in handed  # (part 5 is in batch 2 or before: read here from then on)


def test_a_scan_left_early_ends_its_helpers(tmp_path, children, handed):
    path = tmp_path / "m.loom"
    _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        scan = ds.scan(axis=0, batch_size=64)
        next(scan)
        assert len(children) == 2 and all(child.poll() is None for child in children)  # (waiting for slots)
        scan.close()
        assert all(child.poll() is not None for child in children)
        del scan
        gc.collect()


def test_helpers_of_an_abandoned_scan_end_with_their_parent(tmp_path):
    """A child waiting for a slot whose parent has gone ends (here: a parent killed mid-scan)."""
    import subprocess
    import sys

    path = tmp_path / "m.loom"
    _matrix(path, SHAPE, np.float32)
    spy = ("import os, loompy\nfrom loompy.engine import processes\nprocesses.MIN_CHUNKS, started = 0, []\n"
           "start = processes.ChildJob._start_children\n"
           "def spy(job):\n    start(job)\n    started.extend(c.pid for c in job.children if c)\n"
           "processes.ChildJob._start_children = spy\n")
    script = (f"ds = loompy.connect({str(path)!r}, 'r')\nscan = ds.scan(axis=0, batch_size=64)\nnext(scan)\n"
              "print(' '.join(str(p) for p in started), flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", spy + script], capture_output=True, text=True, timeout=60,
                         cwd=str(tmp_path))
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, out.stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_damaged_chunk_in_a_scan_from_helpers_is_an_error(tmp_path, handed):
    path = tmp_path / "m.loom"
    _matrix(path, SHAPE, np.float32)
    with h5py.File(path, "r+") as f:
        info = f["matrix"].id.get_chunk_info_by_coord((320, 0))
    with open(path, "r+b") as raw:
        raw.seek(info.byte_offset + 2)
        raw.write(b"\xff" * 16)
    with loompy.connect(path, "r") as ds, pytest.raises(loompy.LoomFileError, match="m.loom.*damaged"):
        for _ in ds.scan(axis=0, batch_size=64):
            pass
    assert handed[:5] == [(0, k) for k in range(5)]


@pytest.mark.parametrize("chunks", [(50, 30), (7, 64), (64, 7), (700, 1)])
def test_scan_batches_of_any_chunk_shape(tmp_path, handed, chunks):
    """Chunks of any shape, batches cutting through them anywhere: every value in its place."""
    path = tmp_path / "m.loom"
    rng = np.random.default_rng(3)
    m = rng.random(SHAPE).astype(np.float32)
    loompy.create(path, np.zeros((SHAPE[0], 1), "f4"), {"g": np.arange(SHAPE[0])}, {"c": [0]}).close()
    with h5py.File(path, "r+") as f:
        del f["matrix"], f["col_attrs/c"]
        f.create_dataset("matrix", data=m, chunks=chunks, compression="gzip", maxshape=(SHAPE[0], None))
        f["col_attrs/c"] = np.arange(SHAPE[1])
    with loompy.connect(path, "r") as ds:
        for axis in (0, 1):
            for batch_size in (45, 128):
                got = [view[""][:, :] for _, _, view in ds.scan(axis=axis, batch_size=batch_size)]
                np.testing.assert_array_equal(np.concatenate(got, axis=axis), m, err_msg=f"{axis}, {batch_size}")
    assert None not in handed and len(handed) == sum(-(-n // b) for n in SHAPE for b in (45, 128))


def test_a_caller_keeping_many_batches_gets_the_rest_from_the_threads(tmp_path, monkeypatch, handed):
    """The ring stops at MOST_SLOTS slots (each holds a file descriptor): kept batches stay whole."""
    monkeypatch.setattr(scans, "MOST_SLOTS", 4)
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        kept = [values for _, _, values in ds.batch_scan(axis=0, batch_size=32)]
    np.testing.assert_array_equal(np.concatenate(kept), m)
    assert handed[:3] == [(0, 0), (0, 1), (0, 2)] and handed[-10:] == [None] * 10


def test_a_ring_that_cannot_grow_falls_back_to_the_threads(tmp_path, monkeypatch, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    real = scans.os.ftruncate
    grown = []

    def full(fd, size):  # (the second slot finds no memory)
        grown.append(size)
        if len(grown) > 2:
            raise OSError(28, "No space left on device")
        real(fd, size)

    monkeypatch.setattr(scans.os, "ftruncate", full)
    with loompy.connect(path, "r") as ds:
        kept = [view[""][:, :] for _, _, view in ds.scan(axis=1, batch_size=64)]
    np.testing.assert_array_equal(np.concatenate(kept, axis=1), m)
    assert handed[0] == (1, 0) and handed[-5:] == [None] * 5


def _in_a_fork(work) -> int:
    """Run ``work()`` (True: it went as it should) in a process forked from this one; its exit status."""
    pid = os.fork()
    if pid == 0:  # (the forked process never returns into pytest)
        try:
            os._exit(0 if work() else 1)
        except BaseException:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_while_batches_are_kept_has_its_own_copies(tmp_path, handed):
    """As with any array: what one side changes after the fork, the other does not see, and batches
    the helpers fill later do not land in the forked process's batches."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        scan = ds.batch_scan(axis=0, batch_size=100)
        kept = [next(scan)[2], next(scan)[2]]
        let_go = [next(scan)[2]]  # (the parent lets go of it after the fork)
        before = [batch.copy() for batch in kept]

        def changes_its_own() -> bool:
            kept[0][:] = -1
            time.sleep(0.5)  # (meanwhile the parent writes into the other batch and goes on scanning)
            return (kept[0] == -1).all() and np.array_equal(kept[1], before[1]) \
                and np.array_equal(let_go[0], m[200:300])

        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if changes_its_own() else 1)
            except BaseException:
                os._exit(2)
        kept[1][:] = -2
        let_go.clear()
        rest = [values.copy() for _, _, values in scan]  # (the slot let go of is filled again)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        np.testing.assert_array_equal(kept[0], before[0])
        assert (kept[1] == -2).all()
        np.testing.assert_array_equal(np.concatenate(rest), m[300:])
    assert None not in handed and len(handed) == 7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_scan_continued_in_a_forked_process_leaves_the_helpers_to_its_parent(tmp_path, handed):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path, "r") as ds:
        scan = ds.batch_scan(axis=0, batch_size=100)
        got = [next(scan)[2].copy()]

        def continues() -> bool:  # (read there on its own threads; closing the scan ends nothing of the parent's)
            ok = np.array_equal(next(scan)[2], m[100:200])
            scan.close()
            return ok

        assert _in_a_fork(continues) == 0
        got += [values.copy() for _, _, values in scan]
    np.testing.assert_array_equal(np.concatenate(got), m)
    assert None not in handed and len(handed) == 7
