"""A few rows (or columns) from each of many chunk rows (columns), read in helper processes
(engine/picks.py): numpy's values on the same matrix, whatever the dtype, selection or axis; the
same as on threads; parts a failed helper did not give are read here; damaged chunks are errors."""

from __future__ import annotations

import importlib

import h5py
import numpy as np
import pytest

import loompy

from .conftest import helpers_dying_in

processes = importlib.import_module("loompy.engine.processes")
picks = importlib.import_module("loompy.engine.picks")
read_module = importlib.import_module("loompy.engine.read")


def _matrix(path, shape, dtype, fill=0, seed=5):
    """A Loom file whose matrix has chunks never written (chunk columns 1 and 2 hold the fill value)
    and a partial last chunk row and column; returns the values it holds."""
    rng = np.random.default_rng(seed)
    m = (rng.random(shape) * 200 - (0 if np.dtype(dtype).kind == "u" else 60)).astype(dtype)
    m[rng.random(shape) < 0.6] = 0
    loompy.create(path, np.zeros((shape[0], 1), "f4"), {"g": np.arange(shape[0])}, {"c": [0]}).close()
    with h5py.File(path, "r+") as f:
        del f["matrix"]
        d = f.create_dataset("matrix", shape=shape, dtype=dtype, chunks=(64, 64), compression="gzip",
                             maxshape=(shape[0], None), fillvalue=fill)
        d[:, :64] = m[:, :64]
        d[:, 192:] = m[:, 192:]
        m[:, 64:192] = fill  # never written
        del f["col_attrs/c"]
        f["col_attrs/c"] = np.arange(shape[1])
    return m


def _spied_plans(monkeypatch) -> list:
    plans, begin = [], processes.ChildJob.begin
    monkeypatch.setattr(processes.ChildJob, "begin", lambda job, plan, *a: plans.append(plan) or begin(job, plan, *a))
    return plans


SHAPE = (700, 650)


def _selections(n: int, depth: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {"one per band": np.arange(3, n, depth), "random": np.sort(rng.choice(n, n // 10, replace=False)),
            "last lines": np.array([0, n - 2, n - 1])}


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16, np.float16, ">f4"])
def test_rows_and_columns_picked_in_children_are_numpys(tmp_path, children, monkeypatch, dtype):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, dtype, fill=3)
    plans = _spied_plans(monkeypatch)
    others = {"all": slice(None), "run": slice(100, 420), "scattered": np.arange(0, 650, 3)}  # (a third: not picked)
    with loompy.connect(path, "r") as ds:
        for axis in (0, 1):
            for name, lines in _selections(SHAPE[axis]).items():
                for kind, other in others.items():
                    key = (lines, other) if axis == 0 else (other, lines)
                    got = ds[key]
                    expected = m[np.ix_(*(np.arange(n)[k] for n, k in zip(SHAPE, key)))]
                    assert got.dtype == m.dtype, (axis, name, kind)
                    np.testing.assert_array_equal(got, expected, err_msg=f"axis {axis}, {name}, {kind}")
                    assert plans[-1].axis == axis and plans[-1].lines.tolist() == lines.tolist()
    assert len(plans) == 18 and len(children) == 36 and children.left == 0  # (helpers did it all)


def test_picked_rows_in_any_order_masks_views_and_layers(tmp_path, children, monkeypatch):
    """What reaches the engine sorted and unique comes back in the caller's order, with repeats."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    plans = _spied_plans(monkeypatch)
    rows = [600, 5, 5, 333, 70]
    mask = np.zeros(SHAPE[1], bool)
    mask[[7, 100, 640, 641]] = True
    with loompy.connect(path) as ds:
        ds.layers["twice"] = m * 2
        np.testing.assert_array_equal(ds[rows, :], m[rows])
        np.testing.assert_array_equal(ds[:, mask], m[:, mask])
        np.testing.assert_array_equal(ds.layers["twice"][rows, ::-3], (m * 2)[rows, ::-3])
        np.testing.assert_array_equal(ds.view[rows, :][:, :], m[rows])
        np.testing.assert_array_equal(ds[ds.ra.g % 97 == 0, :], m[::97])
    assert [p.axis for p in plans] == [0, 1, 0, 0, 0, 0] and children.left == 0  # (a view reads both layers)


def test_children_and_threads_give_the_same_rows(tmp_path, children, monkeypatch):
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    rows = np.arange(1, 700, 13)
    with loompy.connect(path, "r") as ds:
        here = ds[rows, 10:600]
        assert len(children) == 2
        monkeypatch.setattr(processes, "MIN_CHUNKS", 10 ** 12)  # (the engine's threads)
        threads = ds[rows, 10:600]
        assert len(children) == 2
    np.testing.assert_array_equal(here, threads)
    np.testing.assert_array_equal(here, m[rows, 10:600])


def test_many_lines_stay_on_threads(tmp_path, children, monkeypatch):
    """Children send back all they pick: past a quarter of a band's lines the threads are faster."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    plans = _spied_plans(monkeypatch)
    dense = np.flatnonzero(np.arange(700) % 3 == 0)  # a third of every band
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[dense, :], m[dense])
        np.testing.assert_array_equal(ds[:, :], m)
    assert plans == [] and children == []


def test_worth_picking_counts_the_bands_that_hold_the_lines():
    assert picks.worth_picking(np.array([0, 64, 128]), 64)  # 3 of 192 lines
    assert picks.worth_picking(np.arange(16), 64)  # a quarter of one band
    assert not picks.worth_picking(np.arange(17), 64)
    assert not picks.worth_picking(np.arange(0, 640, 3), 64)  # 214 of 640
    assert not picks.worth_picking(np.zeros(0, dtype=np.int64), 64)  # (nothing to read)


def test_column_parts_hold_about_part_columns_columns(tmp_path, children, monkeypatch):
    """Each part of columns is placed in the result's rows at once: parts hold whole bands until they
    have PART_COLUMNS columns (11 bands, one column each: 4 parts at 3 bands, the last of 2)."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    monkeypatch.setattr(picks, "PART_COLUMNS", 3)
    monkeypatch.setattr(picks, "MIN_PART_CHUNKS", 1)
    monkeypatch.setattr(picks, "MIN_PARTS", 1)
    plans = _spied_plans(monkeypatch)
    cols = np.arange(5, 650, 64)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, cols], m[:, cols])
    assert (plans[0].bands_per_part, plans[0].parts) == (3, 4)
    assert [plans[0].part_lines(k) for k in range(4)] == [range(0, 3), range(3, 6), range(6, 9), range(9, 11)]
    assert children.left == 0  # (the children took the parts as this process cut them)


def test_a_read_has_parts_enough_for_every_helper(tmp_path, children, monkeypatch):
    """11 bands holding one column each made one part of 64 columns' worth: one helper did it all
    while the other waited. At least MIN_PARTS parts (here 6 of 2 bands, the last of 1)."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    plans = _spied_plans(monkeypatch)
    cols = np.arange(5, 650, 64)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, cols], m[:, cols])
    assert (plans[0].bands_per_part, plans[0].parts) == (2, 6) and children.left == 0


def test_the_parts_of_a_child_that_dies_are_read_here(tmp_path, children, monkeypatch):
    path = tmp_path / "m.loom"
    m = _matrix(path, (1300, 650), np.float32)  # 21 bands holding rows, one a part
    monkeypatch.setattr(picks, "MIN_PART_CHUNKS", 1)
    here = helpers_dying_in(monkeypatch, "picks", "LinePicker", "pick", (3, 11))  # (parts picked here)
    rows = np.arange(2, 1300, 64)
    with loompy.connect(path, "r") as ds:
        got = ds[rows, :]
    assert [c.returncode for c in children] == [5, 5]
    assert sorted(here)[:2] == [3, 11] and children.left == len(here)
    np.testing.assert_array_equal(got, m[rows])


def test_children_see_what_this_connection_wrote(tmp_path, children):
    """Writes still in HDF5's chunk cache reach the file before helpers read it."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    with loompy.connect(path) as ds:
        ds[:, 10:20] = np.full((700, 10), 7, np.float32)
        m[:, 10:20] = 7
        got = ds[::50, :]
    assert len(children) == 2 and children.left == 0
    np.testing.assert_array_equal(got, m[::50])


def test_a_damaged_chunk_picked_by_a_child_is_an_error_naming_the_file(tmp_path, children, monkeypatch):
    path = tmp_path / "m.loom"
    _matrix(path, SHAPE, np.float32)
    with h5py.File(path, "r") as f:
        info = f["matrix"].id.get_chunk_info_by_coord((128, 320))
    data = bytearray(path.read_bytes())
    data[info.byte_offset + 5:info.byte_offset + 40] = b"\xff" * 35
    path.write_bytes(bytes(data))
    here, pick = [], picks.LinePicker.pick  # (parts picked in this process: none, a child met the damage)
    monkeypatch.setattr(picks.LinePicker, "pick", lambda self, part: here.append(part) or pick(self, part))
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[[1, 65], :].shape, (2, 650))  # (rows of other bands read)
        with pytest.raises(loompy.LoomFileError, match="m.loom.*damaged"):
            ds[[1, 130], :]
    assert len(children) == 4 and here == []


@pytest.mark.parametrize("axis", [0, 1])
def test_a_plan_crosses_to_a_child_unchanged(axis):
    rng = np.random.default_rng(0)
    grid = (5, 7)
    plan = picks.PickPlan(chunks=(64, 32), shape=(300, 220), axis=axis, dtype=">f4", compressed=True,
                          source_fill=-1.5, lines=np.array([1, 2, 90, 299]) if axis == 0 else np.array([3, 219]),
                          others=np.array([0, 3, 70, 200]), offset=rng.integers(-1, 10 ** 9, grid),
                          size=rng.integers(0, 999, grid), mask=rng.integers(0, 2, grid), bands_per_part=5)
    back = picks.PickPlan.from_bytes(plan.to_bytes())
    for name in ("chunks", "shape", "axis", "dtype", "compressed", "source_fill", "bands_per_part"):
        assert getattr(back, name) == getattr(plan, name)
    for name in ("lines", "others", "offset", "size", "mask"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    if axis == 0:  # rows 1, 2 in band 0, 90 in band 1, 299 in band 4; columns in chunk columns 0, 2, 6
        assert back.needed.tolist() == [0, 2, 6] and back.bands.tolist() == [0, 1, 4]
        assert back.bands_per_part == 5 and back.part_lines(0) == range(4)
    else:  # columns 3 (band 0) and 219 (band 6); rows in chunk rows 0, 1 and 3
        assert back.needed.tolist() == [0, 1, 3] and back.bands.tolist() == [0, 6]
        assert back.bands_per_part == 5 and back.part_lines(0) == range(2)
        np.testing.assert_array_equal(back.index[0], plan.offset.T)


def test_an_interrupt_between_two_starts_ends_the_child_started(monkeypatch):
    """A Ctrl-C as the second helper started left the first waiting on its stdin for as long as
    this process ran (and more with each interrupt): now every child started is ended."""
    import subprocess

    started, real = [], subprocess.Popen

    def popen(*args, **kwargs):
        if started:
            raise KeyboardInterrupt
        started.append(real(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(processes, "MIN_CHUNKS", 0)
    monkeypatch.setattr(processes.subprocess, "Popen", popen)
    if not processes._can_start_children():
        pytest.skip("no helper processes here")
    with pytest.raises(KeyboardInterrupt):
        processes.PickJob(1)
    assert len(started) == 1 and started[0].returncode is not None  # (ended, not left waiting)
    assert started[0].stdin.closed and started[0].stdout.closed


def test_an_interrupt_as_one_child_is_ended_still_ends_the_others(monkeypatch):
    monkeypatch.setattr(processes, "MIN_CHUNKS", 0)
    if not processes._can_start_children():
        pytest.skip("no helper processes here")
    job = processes.PickJob(1)
    children = list(job.children)
    assert len(children) == 2
    kill = children[0].kill
    monkeypatch.setattr(children[0], "kill", lambda: (kill(), (_ for _ in ()).throw(KeyboardInterrupt)))
    with pytest.raises(KeyboardInterrupt):
        job.close()
    children[0].wait()
    assert children[1].returncode is not None and job.children == [] and job.shared is None


def test_a_large_picked_result_is_faulted_in_while_the_children_read(tmp_path, children, monkeypatch):
    """This process only waits while the helpers pick: it faults the whole result in meanwhile."""
    path = tmp_path / "m.loom"
    m = _matrix(path, SHAPE, np.float32)
    monkeypatch.setattr(processes, "POPULATE_FROM", 0)
    populated = []
    monkeypatch.setattr(processes, "populate", lambda array: populated.append((array.ctypes.data, array.shape)))
    rows, cols = np.arange(3, 700, 64), np.arange(0, 650, 50)
    with loompy.connect(path, "r") as ds:
        got = ds[rows, :]
        np.testing.assert_array_equal(got, m[rows])
        assert populated == [(got.ctypes.data, got.shape)]
        populated.clear()
        got = ds[:, cols]
        np.testing.assert_array_equal(got, m[:, cols])
        assert populated == [(got.ctypes.data, got.shape)]
    assert len(children) == 4 and children.left == 0
