"""Every selection on a Loom matrix equals numpy's outer indexing on the same dense matrix."""

from __future__ import annotations

import numpy as np
import pytest

import loompy
from loompy.indexing import select, select_axis, values_for_unique


@pytest.fixture(scope="module")
def matrix_file(tmp_path_factory):
    rng = np.random.default_rng(7)
    m = rng.integers(0, 50, size=(150, 210)).astype(np.float32)
    m[rng.random(m.shape) < 0.6] = 0
    path = tmp_path_factory.mktemp("idx") / "m.loom"
    loompy.create(path, m, {"G": np.arange(150)}, {"C": np.arange(210)}).close()
    return path, m


def numpy_outer(m, key):
    """The numpy expectation: ints drop axes, everything else selects orthogonally (np.ix_)."""
    if not isinstance(key, tuple):
        key = (key,)
    if len(key) == 0 or (len(key) == 1 and key[0] is Ellipsis):
        key = (slice(None), slice(None))
    if key[0] is Ellipsis and len(key) == 2:
        key = (slice(None), key[1])
    elif key[-1] is Ellipsis:
        key = key[:-1]
    if len(key) == 1:
        key = (key[0], slice(None))
    r, c = key
    rows = np.arange(m.shape[0])[r]
    cols = np.arange(m.shape[1])[c]
    out = m[np.ix_(np.atleast_1d(rows), np.atleast_1d(cols))]
    if np.ndim(rows) == 0:
        out = out[0]
        return out[0] if np.ndim(cols) == 0 else out
    return out[:, 0] if np.ndim(cols) == 0 else out


KEYS = [
    (slice(None), slice(None)),
    (5, slice(None)),
    (slice(None), 7),
    (-1, -1),
    (3, 4),
    (slice(10, 90, 3), slice(None, None, -1)),
    (slice(None, None, -7), slice(200, 3, -13)),
    ([5, 1, 1, 149, 0], slice(None)),
    (slice(None), [209, 0, 64, 64, 63, 65]),
    ([3, 3, 100, 2], [199, 5, 5, 130]),
    (np.array([-1, -150]), np.array([-210, 10])),
    ([], slice(None)),
    (slice(None), []),
    (slice(5, 5), slice(None)),
    (Ellipsis, 3),
    (4, Ellipsis),
    (),
    (Ellipsis,),
    7,
    [8, 2],
    (np.int64(3), np.uint8(9)),
    (range(0, 150, 40), range(10)),
]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k)[:40] for k in KEYS])
def test_selection_equals_numpy(matrix_file, key):
    path, m = matrix_file
    with loompy.connect(path, "r") as ds:
        got = ds[key]
        expected = numpy_outer(m, key)
        assert np.shape(got) == np.shape(expected)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(ds.layers[""][key], expected)


def test_boolean_masks_on_both_axes(matrix_file):
    path, m = matrix_file
    rng = np.random.default_rng(1)
    rmask, cmask = rng.random(150) < 0.3, rng.random(210) < 0.2
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[rmask, cmask], m[np.ix_(rmask, cmask)])
        np.testing.assert_array_equal(ds[rmask, :], m[rmask])
        np.testing.assert_array_equal(ds[:, cmask], m[:, cmask])
        np.testing.assert_array_equal(ds[ds.ra.G % 7 == 0, 3], m[np.arange(150) % 7 == 0, 3])


def test_random_fancy_selections(matrix_file):
    path, m = matrix_file
    rng = np.random.default_rng(11)
    with loompy.connect(path, "r") as ds:
        for _ in range(25):
            r = rng.integers(-150, 150, size=rng.integers(0, 40))
            c = rng.integers(-210, 210, size=rng.integers(0, 40))
            np.testing.assert_array_equal(ds[r, c], m[np.ix_(r, c)])


@pytest.mark.parametrize("key", [(150, 0), (0, 210), (-151, 0), ([0, 150], 0), (0, [-211])])
def test_out_of_bounds_raises_index_error(matrix_file, key):
    path, _ = matrix_file
    with loompy.connect(path, "r") as ds, pytest.raises(IndexError) as info:
        ds[key]
    assert isinstance(info.value, loompy.LoomError)


def test_unsigned_indices_past_int64_are_out_of_bounds_not_wrapped(tmp_path):
    """np.uint64 2**64 - 1 read as int64 is -1: it selected, and wrote, the last row."""
    m = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = tmp_path / "u.loom"
    loompy.create(path, m, {"g": np.arange(4)}, {"c": np.arange(3)}).close()
    with loompy.connect(path) as ds:
        for big in (2**64 - 1, 2**63):
            key = np.array([1, big], dtype=np.uint64)
            with pytest.raises(loompy.LoomIndexError, match=f"row index {big} is out of bounds for 4 rows"):
                ds[key, :] = -1
            with pytest.raises(loompy.LoomIndexError, match=f"column index {big} is out"):
                ds[:, key]
            with pytest.raises(loompy.LoomIndexError, match=f"index {big} is out"):
                ds.ca[key]
        assert ds[:, :].tolist() == m.tolist()
        assert ds[np.array([3, 0], np.uint64), :].tolist() == m[[3, 0]].tolist()


@pytest.mark.parametrize("key", [(0, 0, 0), (..., 0, ...), (np.ones(3, bool), 0), ([0.5], 0), (None, 0)])
def test_invalid_keys_are_rejected(matrix_file, key):
    path, _ = matrix_file
    with loompy.connect(path, "r") as ds, pytest.raises((IndexError, TypeError)):
        ds[key]


@pytest.mark.parametrize("key", [2.0, np.float64(2), "2"])
def test_a_scalar_that_is_not_an_integer_is_named_as_such(matrix_file, key):
    path, _ = matrix_file
    with loompy.connect(path, "r") as ds, pytest.raises(IndexError, match="index must be an integer") as info:
        ds[key, :]
    assert repr(key) in str(info.value)


def test_select_helpers():
    sel = select_axis([3, 1, 3, 2], 5, 0)
    np.testing.assert_array_equal(sel.unique, [1, 2, 3])
    np.testing.assert_array_equal(sel.unique[sel.inverse], [3, 1, 3, 2])
    # for writes, the last value given for a repeated index wins (as in numpy)
    np.testing.assert_array_equal(sel.last_occurrence, [1, 3, 2])
    rows, cols = select((slice(None), 2), (4, 5))
    assert cols.drop and not rows.drop and rows.unique.tolist() == [0, 1, 2, 3]
    vals = values_for_unique([[1, 2], [3, 4]], select_axis([1, 1], 3, 0), select_axis([0, 2], 3, 1), np.dtype(int), "t")
    np.testing.assert_array_equal(vals, [[3, 4]])


def test_assignment_equals_numpy(tmp_path):
    rng = np.random.default_rng(3)
    m = rng.random((70, 90)).astype(np.float64)
    path = tmp_path / "w.loom"
    loompy.create(path, m.copy(), {}, {}).close()
    expected = m.copy()
    keys = [
        (5, slice(None)),
        (slice(None), 80),
        ([3, 3, 60], [1, 89, 1]),
        (slice(10, 70, 9), slice(None, None, -4)),
        (rng.random(70) < 0.2, [0, 65]),
        (-1, -1),
    ]
    with loompy.connect(path) as ds:
        for key in keys:
            values = rng.random(np.shape(numpy_outer(expected, key)))
            ds[key] = values
            r, c = key
            rr = np.arange(70)[r]
            cc = np.arange(90)[c]
            expected[np.ix_(np.atleast_1d(rr), np.atleast_1d(cc))] = np.reshape(values, (np.size(rr), np.size(cc)))
        ds[0:2, 0:2] = 7.0  # broadcasting a scalar
        expected[0:2, 0:2] = 7.0
        np.testing.assert_array_equal(ds[:, :], expected)
        with pytest.raises(ValueError):  # (as numpy: could not broadcast)
            ds[0:3, 0:3] = np.zeros((2, 2))


REVERSED_KEYS = [np.s_[::-1, :], np.s_[:, ::-2], np.s_[140:3:-3, 200:0:-7], np.s_[5, ::-1], np.s_[::-1, 7],
                 np.s_[::-1, [3, 1, 2]], np.s_[[9, 2, 2], ::-1], np.s_[np.arange(40)[::-1], 10:20]]


@pytest.mark.parametrize("stored", ["chunked", "without chunks"])
def test_reversed_selections_read_backwards_into_place(matrix_file, tmp_path, stored):
    """A reversed read was read in order, then copied backwards: twice the result's memory (2.04x
    for ds[:, ::-2] of the benchmark file). It is now placed backwards as it is read."""
    import tracemalloc

    import h5py

    path, m = matrix_file
    if stored == "without chunks":
        path = tmp_path / "plain.loom"
        loompy.create(path, m, {"G": np.arange(150)}, {"C": np.arange(210)}).close()
        with h5py.File(path, "r+") as f:
            del f["matrix"]
            f.create_dataset("matrix", data=m)
    with loompy.connect(path, "r") as ds:
        for key in REVERSED_KEYS:
            np.testing.assert_array_equal(ds[key], numpy_outer(m, key), err_msg=str(key))
    big = np.tile(m, (10, 5))  # (6 MB: the scratch buffers weigh little beside it)
    path = tmp_path / "big.loom"
    loompy.create(path, big, {}, {}).close()
    if stored == "without chunks":
        with h5py.File(path, "r+") as f:
            del f["matrix"]
            f.create_dataset("matrix", data=big)
    peaks = {}
    with loompy.connect(path, "r") as ds:
        for key in (np.s_[:, :], np.s_[::-1, ::-1], np.s_[:, :], np.s_[::-1, ::-1]):
            tracemalloc.start()
            result = ds[key]
            peaks[str(key)] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            np.testing.assert_array_equal(result, big[key])
    forward, backward = peaks[str(np.s_[:, :])], peaks[str(np.s_[::-1, ::-1])]
    assert backward < forward + 0.25 * big.nbytes, (backward, forward, big.nbytes)
