"""scan, batch_scan, map, aggregate, export and change tracking, checked against numpy on the same matrix."""

from __future__ import annotations

import json
import time
import tracemalloc

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy
from loompy import operations


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(21)
    m = rng.poisson(1.0, size=(130, 300)).astype(np.float32)
    spliced = rng.integers(0, 5, size=m.shape).astype(np.int16)
    ra = {"Gene": np.array([f"g{i}" for i in range(130)]), "Order": rng.permutation(130)}
    ca = {"CellID": np.array([f"c{i}" for i in range(300)]), "Clusters": rng.integers(0, 4, 300),
          "Batch": np.array(["x", "y"])[np.arange(300) % 2], "Rank": rng.permutation(300)}
    path = tmp_path_factory.mktemp("ops") / "ops.loom"
    with loompy.create(path, {"": m, "spliced": spliced}, ra, ca) as ds:
        ds.col_graphs["knn"] = sp.coo_matrix((np.ones(3), ([0, 5, 299], [5, 0, 1])), shape=(300, 300))
    return path, m, spliced, ra, ca


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("batch_size", [1, 64, 100, 1000])
def test_scan_yields_every_item_once_in_file_order(dataset, axis, batch_size):
    path, m, spliced, ra, ca = dataset
    seen = []
    with loompy.connect(path, "r") as ds:
        for ix, selection, view in ds.scan(axis=axis, batch_size=batch_size):
            assert ix <= selection[0] < ix + batch_size
            seen.extend(selection.tolist())
            expected = m[selection] if axis == 0 else m[:, selection]
            np.testing.assert_array_equal(view[:, :], expected)
            np.testing.assert_array_equal(view.layers["spliced"][:, :],
                                          spliced[selection] if axis == 0 else spliced[:, selection])
            attrs = view.ra if axis == 0 else view.ca
            np.testing.assert_array_equal(attrs["Gene" if axis == 0 else "CellID"],
                                          (ra["Gene"] if axis == 0 else ca["CellID"])[selection])
    assert seen == list(range(m.shape[axis]))


def test_scan_items_key_layers_and_what(dataset):
    path, m, _, ra, ca = dataset
    mask = ca["Clusters"] == 2
    order = np.argsort(ra["Order"])  # rows sorted by the key attribute
    with loompy.connect(path, "r") as ds:
        seen = []
        for _, selection, view in ds.scan(items=mask, axis=1, key="Order", layers=["spliced"], what=["layers"]):
            seen.extend(selection.tolist())
            assert view.layers.keys() == ["spliced"] and view.ca.keys() == []
        assert seen == list(np.flatnonzero(mask))
        _, sel, view = next(ds.scan(items=[5, 3], axis=1, key="Order", what=["layers", "row_attrs"]))
        np.testing.assert_array_equal(view[:, :], m[np.ix_(order, [5, 3])])  # (in the order given)
        assert sel.tolist() == [5, 3]
        assert list(view.ra.Order[:3]) == [0, 1, 2]
        with pytest.raises(ValueError):
            next(ds.scan(axis=2))
        with pytest.raises(KeyError):
            next(ds.scan(axis=0, layers=["missing"]))


@pytest.mark.parametrize("axis", [0, 1])
def test_batch_scan_and_layers(dataset, axis):
    path, m, spliced, _, _ = dataset
    genes = np.arange(0, 130, 3)
    cells = np.arange(300) % 5 == 0
    with loompy.connect(path, "r") as ds:
        pieces, seen = [], []
        for ix, selection, values in ds.batch_scan(cells=cells, genes=genes, axis=axis, batch_size=50):
            assert ix % 50 == 0 and np.all((selection >= ix) & (selection < ix + 50))
            seen.extend(selection)
            pieces.append(values)
        got = np.concatenate(pieces, axis=axis)
        np.testing.assert_array_equal(got, m[np.ix_(genes, cells)])
        assert seen == list(genes if axis == 0 else np.flatnonzero(cells))
        for _, selection, values in ds.batch_scan_layers(axis=axis, batch_size=128, layers=["", "spliced"]):
            np.testing.assert_array_equal(values["spliced"], spliced[selection] if axis == 0 else spliced[:, selection])
        for _, _selection, values in ds.batch_scan(axis=axis, batch_size=128, layer="spliced"):
            assert values.dtype == np.int16


@pytest.mark.parametrize("axis", [0, 1])
def test_map_matches_numpy(dataset, axis):
    path, m, *_ = dataset
    with loompy.connect(path, "r") as ds:
        mean, std, custom = ds.map([np.mean, np.std, lambda x: float((x > 1).sum())], axis=axis, chunksize=37)
        np.testing.assert_allclose(mean, m.mean(axis=1 - axis), rtol=1e-6)
        np.testing.assert_allclose(std, m.std(axis=1 - axis), rtol=1e-5)
        np.testing.assert_array_equal(custom, (m > 1).sum(axis=1 - axis))
        single = ds.map(np.max, axis=axis)
        np.testing.assert_array_equal(single, m.max(axis=1 - axis))
        sel = np.arange(m.shape[1 - axis]) % 3 == 0
        (sums,) = ds.map([np.sum], axis, 64, sel)  # positional, as in the seed
        expected = m[:, sel].sum(axis=1) if axis == 0 else m[sel].sum(axis=0)
        np.testing.assert_allclose(sums, expected, rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_map_returns_float64_whatever_the_first_batch_gives(tmp_path, axis):
    """As loompy 3: numbers come back as float64, so a function giving ints for the first batch
    and fractions later loses nothing; np.mean of float32 values is float64 too."""
    m = np.zeros((200, 130), np.float32)
    m[100:, 70:] = 0.5
    path = tmp_path / "half.loom"
    loompy.create(path, m, {"g": np.arange(200)}, {"c": np.arange(130)}).close()
    lines = m if axis == 0 else m.T
    with loompy.connect(path, "r") as ds:
        custom, mean = ds.map([lambda x: 0 if not x.any() else float(x.mean()), np.mean], axis=axis, chunksize=64)
        assert custom.dtype == np.float64 and mean.dtype == np.float64
        np.testing.assert_array_equal(custom, [float(line.mean()) for line in lines])
        np.testing.assert_array_equal(mean, [np.mean(line) for line in lines])
        names = ds.map(lambda x: "some" if x.any() else "none", axis=axis, chunksize=64)
        assert names.dtype == object and list(names) == ["some" if line.any() else "none" for line in lines]


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("chunksize", [5, 100, 150])
def test_map_with_numpy_reductions_in_many_batches(dataset, axis, chunksize):
    """Reductions numpy does on a whole batch (into two buffers that take turns, batches rounded to
    whole chunks) give what numpy gives line by line."""
    path, m, *_ = dataset
    lines = m if axis == 0 else m.T
    with loompy.connect(path, "r") as ds:
        total, top, spread = ds.map([np.sum, np.max, np.std], axis=axis, chunksize=chunksize)
        np.testing.assert_array_equal(total, [np.sum(line) for line in lines])  # small counts: exact
        np.testing.assert_array_equal(top, [np.max(line) for line in lines])
        np.testing.assert_allclose(spread, [np.std(line) for line in lines], rtol=1e-6)
        sel = np.arange(m.shape[1 - axis]) % 4 == 1
        picked = m[:, sel] if axis == 0 else m[sel].T
        np.testing.assert_array_equal(ds.map(np.sum, axis=axis, chunksize=chunksize, selection=sel),
                                      [np.sum(line) for line in picked])


def test_map_memory_stays_flat(tmp_path):
    """Peak memory of map/scan is about one batch, independent of the number of batches."""
    rng = np.random.default_rng(0)
    path = tmp_path / "long.loom"
    m = sp.random(200, 20000, density=0.05, random_state=1, format="csc", dtype=np.float32)
    loompy.create(path, m, {}, {"x": rng.random(20000)}).close()
    with loompy.connect(path, "r") as ds:
        peaks = []
        for n_cols in (2000, 20000):
            tracemalloc.start()
            ds.map([np.sum], axis=1, chunksize=500, selection=None) if n_cols == 20000 else \
                [v for v in ds.batch_scan(cells=np.arange(n_cols), axis=1, batch_size=500)]
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    batch_bytes = 200 * 500 * 4
    assert peaks[1] < 8 * batch_bytes + 1_000_000  # not the 16 MB of the whole matrix
    assert peaks[1] < 3 * peaks[0] + 1_000_000


@pytest.mark.parametrize("how", ["sum", "mean", "median", "min", "max", "count", "first", "nansum", "mode"])
def test_aggregate_matches_numpy(dataset, how, tmp_path):
    path, m, _, _, ca = dataset
    labels = ca["Clusters"]
    groups = np.unique(labels)
    numpy_funcs = {"sum": np.sum, "mean": np.mean, "median": np.median, "min": np.min, "max": np.max,
                   "nansum": np.nansum, "first": lambda v, axis: np.take(v, 0, axis=axis),
                   "count": lambda v, axis: np.full(v.shape[0], v.shape[1])}
    with loompy.connect(path, "r") as ds:
        got = ds.aggregate(group_by="Clusters", aggr_by=how)
        for j, g in enumerate(groups):
            part = m[:, labels == g]
            if how == "mode":
                expected = np.array([np.unique(row, return_counts=True) for row in part], dtype=object)
                expected = np.array([u[np.argmax(c)] for u, c in expected])
            else:
                expected = numpy_funcs[how](part, axis=1)
            np.testing.assert_allclose(got[:, j], expected, rtol=1e-6)


def test_aggregate_of_float32_sums_and_averages_in_float64(tmp_path):
    """float32 counts summed in float32 lose units past 2**24; loompy 3 gives float64 results."""
    m = np.full((2, 6), 16777216.0, dtype=np.float32)
    m[:, 1::2] = 1.0
    path = tmp_path / "a.loom"
    loompy.create(path, m, {"g": np.arange(2)}, {"Clusters": np.zeros(6, int)}).close()
    exact = m.astype(np.float64)
    with loompy.connect(path, "r") as ds:
        for how, expected in (("sum", exact.sum(axis=1)), ("mean", exact.mean(axis=1)),
                              ("median", np.median(exact, axis=1)), ("nansum", exact.sum(axis=1))):
            got = ds.aggregate(group_by="Clusters", aggr_by=how)
            assert got.dtype == np.float64 and got[:, 0].tolist() == expected.tolist(), how


def test_aggregate_with_a_function_keeps_every_value_whatever_the_first_gives(tmp_path, monkeypatch):
    """A function giving 0 for the first rows and halves later: every value kept, within a batch
    and across batches (numpy's apply_along_axis gives all of a batch the first value's dtype)."""
    m = np.arange(24, dtype=np.int32).reshape(6, 4)
    path = tmp_path / "f.loom"
    loompy.create(path, m, {"g": np.arange(6)}, {"Clusters": np.array([0, 0, 1, 1])}).close()

    def half_unless_small(values):
        return 0 if values.max() < 4 else values.sum() / 2

    expected = np.array([[half_unless_small(row[:2]), half_unless_small(row[2:])] for row in m])
    assert expected.dtype == np.float64 and expected[0, 0] == 0 and expected[1, 0] == 4.5
    for batch_bytes in (64 << 20, 8 * 4):  # one batch; batches of one row each
        monkeypatch.setattr(operations, "AGGREGATE_BATCH_BYTES", batch_bytes)
        with loompy.connect(path, "r") as ds:
            got = ds.aggregate(group_by="Clusters", aggr_by=half_unless_small)
        assert got.tolist() == expected.tolist(), batch_bytes


def test_aggregate_writes_a_file(dataset, tmp_path):
    path, m, _, ra, ca = dataset
    out = tmp_path / "agg.loom"
    keep = ca["Rank"] < 200
    with loompy.connect(path, "r") as ds:
        mat = ds.aggregate(out, select=keep, group_by="Clusters", aggr_by="sum",
                           aggr_ca_by={"Rank": "max", "Batch": "join"}, return_matrix=True)
        again = ds.aggregate(tmp_path / "agg2.loom", keep, "Clusters", "sum")  # as loompy 3: the matrix
        np.testing.assert_array_equal(again, mat)
        with pytest.raises(ValueError):
            ds.aggregate(aggr_by="bogus")
        with pytest.raises(KeyError):
            ds.aggregate(group_by="Nope")
        with pytest.raises(loompy.LoomValueError, match="one label per column"):
            ds.aggregate(group_by=np.zeros((300, 2)))
    labels = ca["Clusters"][keep]
    expected = np.stack([m[:, keep][:, labels == g].sum(axis=1) for g in np.unique(labels)], axis=1)
    np.testing.assert_allclose(mat, expected)
    with loompy.connect(out, "r") as agg:
        assert agg.shape == (130, 4) and list(agg.ca.Clusters) == [0, 1, 2, 3]
        assert list(agg.ra.Gene) == list(ra["Gene"])


def test_export_tab(dataset, tmp_path):
    path, m, _, ra, ca = dataset
    out = tmp_path / "m.tab"
    with loompy.connect(path, "r") as ds:
        ds.export(out)
        with pytest.raises(ValueError):
            ds.export(out, format="xlsx")
    lines = out.read_text().splitlines()
    n_ca, n_ra = 4, 2
    header = {line.split("\t")[n_ra]: line.split("\t")[n_ra + 1:] for line in lines[:n_ca]}
    assert set(header) == set(ca) and header["CellID"][:2] == ["c0", "c1"]
    assert all(line.split("\t")[:n_ra] == ["", ""] for line in lines[:n_ca])
    assert lines[n_ca].split("\t")[:n_ra] == ["Gene", "Order"]
    first = lines[n_ca + 1].split("\t")
    assert first[0] == "g0" and [float(v) for v in first[n_ra + 1:-1]] == m[0].tolist() and first[-1] == ""
    assert len({len(line.split("\t")) for line in lines}) == 1  # the same number of fields on every line
    assert len(lines) == n_ca + 1 + 130


def test_export_with_a_two_dimensional_column_attribute(tmp_path):
    path = tmp_path / "e.loom"
    loompy.create(path, np.ones((2, 3), np.float32), {"G": ["a", "b"]}, {"XY": np.arange(6.0).reshape(3, 2)}).close()
    with loompy.connect(path, "r") as ds:
        ds.export(tmp_path / "e.tab")
    assert (tmp_path / "e.tab").read_text().splitlines()[0] == "\tXY\t[0. 1.]\t[2. 3.]\t[4. 5.]\t"  # as loompy 3


def test_scan_of_one_layer_by_name(dataset):
    """layers="" (a single name) is the main matrix alone, as in loompy 3."""
    path, m, *_ = dataset
    seen = []
    with loompy.connect(path, "r") as ds:
        for _, selection, view in ds.scan(axis=1, layers="", batch_size=100):
            assert view.layers.keys() == [""]
            np.testing.assert_array_equal(view[:, :], m[:, selection])
            seen.append(selection)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(m.shape[1]))


def test_batch_scan_of_one_layer_by_name(tmp_path):
    """A single name is that layer alone in batch_scan_layers too (not a list of its letters)."""
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "one.loom"
    loompy.create(path, {"": m, "sp": m * 2}, {"g": np.arange(3)}, {"c": np.arange(4)}).close()
    seen = []
    with loompy.connect(path, "r") as ds:
        for _, selection, values in ds.batch_scan_layers(axis=0, layers="sp", batch_size=2):
            assert list(values) == ["sp"]
            np.testing.assert_array_equal(values["sp"], m[selection] * 2)
            seen.append(selection)
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(3))


def test_changes_with_stamps_other_writers_store_as_bytes(tmp_path):
    path = tmp_path / "b.loom"
    loompy.create(path, np.ones((3, 2)), {"G": np.arange(3)}, {"C": np.arange(2)}).close()
    with h5py.File(path, "r+") as f:
        for name in ("matrix", "row_attrs/G"):
            f[name].attrs["last_modified"] = np.bytes_("20000101T000000.000000Z")
    with loompy.connect(path, "r") as ds:
        changes = ds.get_changes_since("20100101T000000.000000Z")
        assert changes["layers"] == [] and changes["row_attrs"] == []


def test_export_holds_a_few_million_texts_at_most(tmp_path):
    """export held a text object for every value of 1,000 rows, zeros included (np.full makes one
    per value): 650 MB to export an 80 MB layer of 4,000 columns."""
    path = tmp_path / "e.loom"
    m = sp.random(600, 4000, density=0.01, random_state=1, format="csr", dtype=np.float32)
    loompy.create(path, m, {"g": np.arange(600)}, {"c": np.arange(4000)}).close()
    with loompy.connect(path, "r") as ds:
        tracemalloc.start()
        ds.export(tmp_path / "e.tab")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 30e6, peak  # (texts of 2.4 million values, one each: 150 MB)
    lines = (tmp_path / "e.tab").read_text().splitlines()
    dense = m.toarray()
    for i in (0, 299, 599):
        np.testing.assert_array_equal(np.array(lines[2 + i].split("\t")[2:-1], dtype=np.float32), dense[i])


def test_export_writes_float32_as_numpy_prints_it(tmp_path):
    m = np.array([[0.1, 1 / 3], [2.5, 0.7]], np.float32)
    path = tmp_path / "f.loom"
    loompy.create(path, m, {"Gene": ["a", "b"]}, {"Weight": np.array([0.1, 0.2], np.float32)}).close()
    with loompy.connect(path, "r") as ds:
        ds.export(tmp_path / "f.tab")
    lines = (tmp_path / "f.tab").read_text().splitlines()
    assert lines[0] == "\tWeight\t0.1\t0.2\t"  # every cell followed by a tab, as in loompy 3
    assert lines[2].split("\t") == ["a", "", "0.1", "0.33333334", ""]
    assert [np.float32(v) for v in lines[3].split("\t")[2:-1]] == m[1].tolist()


def test_change_tracking(dataset, tmp_path):
    path, *_ = dataset
    copy = tmp_path / "c.loom"
    copy.write_bytes(path.read_bytes())
    with loompy.connect(copy) as ds:
        before = ds.last_modified()
        time.sleep(0.01)
        stamp = loompy.timestamp()
        time.sleep(0.01)
        ds.ra["New"] = np.arange(130)
        ds.layers["fresh"] = np.zeros(ds.shape, dtype=np.float32)
        ds.attrs["note"] = "x"
        changes = ds.get_changes_since(stamp)
        assert changes["row_attrs"] == ["New"] and changes["layers"] == ["fresh"]
        assert changes["col_attrs"] == [] and changes["attrs"] == ["note"]
        assert ds.last_modified() > before
        assert ds.last_modified("New") > stamp > ds.last_modified("CellID", axis=1)
        with pytest.raises(KeyError):
            ds.last_modified("Nope")
        stamp = loompy.timestamp()
        time.sleep(0.01)
        ds.permute(np.arange(300)[::-1], axis=1)  # rewrites the column graphs too (vertices renumbered)
        changes = ds.get_changes_since(stamp)
        assert changes["col_graphs"] == ["knn"] and changes["row_graphs"] == []
        assert sorted(changes["col_attrs"]) == sorted(["CellID", "Clusters", "Batch", "Rank"])


def test_recycler_reuses_only_memory_nothing_refers_to():
    from loompy.engine import Recycler

    r = Recycler()
    a = r.get((4, 5), np.float32)
    owner = id(a.base)
    del a
    assert id(r.get((5, 4), np.float32).base) == owner  # let go of: taken again
    kept = r.get((4, 5), np.float32)
    kept[...] = 7
    part = r.get((4, 5), np.float32)[1:]  # a view of a view still refers to the owner
    part[...] = 3
    for _ in range(5):
        b = r.get((4, 5), np.float32)
        assert not np.shares_memory(b, kept) and not np.shares_memory(b, part)
        b[...] = -1
    assert (kept == 7).all() and (part == 3).all()
    assert r.get((8, 8), np.float32).size == 64 and r.get((2, 2), np.int64).dtype == np.int64


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("mode", ["r", "r+"])
def test_scan_batches_kept_or_let_go(dataset, axis, mode):
    """Views kept by the caller keep their values; a loop that lets go of them reuses two buffers,
    or three (the next batch is read ahead, before or after the caller lets go of the last)."""
    import weakref

    path, m, spliced, _, _ = dataset
    with loompy.connect(path, mode) as ds:
        kept = list(ds.scan(axis=axis, batch_size=20))
        for _, selection, view in kept:
            np.testing.assert_array_equal(view[:, :], m[selection] if axis == 0 else m[:, selection])
            np.testing.assert_array_equal(view.layers["spliced"][:, :],
                                          spliced[selection] if axis == 0 else spliced[:, selection])
        owners: list[weakref.ref] = []
        for _, _, view in ds.scan(axis=axis, batch_size=20):
            owner = view.layers[""].values.base
            if not any(ref() is owner for ref in owners):
                owners.append(weakref.ref(owner))
            del owner
        assert 2 <= len(owners) <= 3
        batches = list(ds.batch_scan_layers(axis=axis, batch_size=20))
        for _, selection, values in batches:
            np.testing.assert_array_equal(values[""], m[selection] if axis == 0 else m[:, selection])
        seen = []
        for ix, _, _ in ds.scan(axis=axis, batch_size=20):
            seen.append(ix)
            if len(seen) == 3:
                break  # stopping early is fine with a batch being read ahead
        assert seen == [0, 20, 40]


@pytest.mark.parametrize("scan", ["scan", "batch_scan"])
def test_scan_sees_writes_made_during_it(tmp_path, scan):
    """Writes the loop makes to later batches show in them (the batch read ahead meanwhile is read again)."""
    m = np.arange(64 * 150, dtype=np.float32).reshape(64, 150)
    path = tmp_path / "w.loom"
    loompy.create(path, m, {"Gene": np.arange(64)}, {"CellID": np.arange(150)}).close()
    with loompy.connect(path) as ds:
        batches = ds.scan(axis=1, batch_size=10) if scan == "scan" else ds.batch_scan(axis=1, batch_size=10)
        for _, selection, values in batches:
            values = values[:, :] if scan == "scan" else values
            expected = -m[:, selection] if selection[0] else m[:, selection]
            np.testing.assert_array_equal(values, expected)
            ds[:, selection[-1] + 1:selection[-1] + 11] = -m[:, selection[-1] + 1:selection[-1] + 11]


@pytest.mark.parametrize("axis", [0, 1])
def test_map_sees_what_its_function_wrote(tmp_path, monkeypatch, axis):
    """map read the next batch ahead in a file open for writing too: a function writing to later
    lines had them summed as they were before (rows 64-127 gave 8 for 40)."""
    import threading

    path = tmp_path / "w.loom"
    m = np.ones((256, 256), np.float32)
    loompy.create(path, m, {"g": np.arange(256)}, {"c": np.arange(256)}).close()
    real, reads, second_read = operations.read_strip, [], threading.Event()

    def counted(*args, **kwargs):
        block = real(*args, **kwargs)
        reads.append(1)
        if len(reads) == 2:
            second_read.set()
        return block

    monkeypatch.setattr(operations, "read_strip", counted)
    with loompy.connect(path) as ds:
        calls = []

        def sum_writing_once(line):
            if not calls:
                second_read.wait(10)  # (the next batch read ahead: the write comes after it)
                ds[64:, 64:] = 5
            calls.append(1)
            return float(line.sum())

        sums = ds.map([sum_writing_once], axis=axis, chunksize=64)[0]
    assert second_read.is_set()
    np.testing.assert_array_equal(sums[64:], np.full(192, 64 + 5 * 192.0))


@pytest.mark.parametrize("scan", ["scan", "batch_scan", "map"])
def test_a_loop_that_replaces_a_layer_in_two_steps_gets_the_new_one(tmp_path, scan):
    """A layer deleted, then made again, by the loop: the batch read ahead in between failed (the layer
    did not exist) and the scan raised (20 of 20 scans); batch_scan and map read the deleted layer's
    dataset to the end. Each batch now holds the layer as it is when handed over."""
    path = tmp_path / "w.loom"
    m = np.ones((256, 16), np.float32)
    loompy.create(path, {"": m, "x": m}, {"g": np.arange(256)}, {"c": np.arange(16)}).close()
    with loompy.connect(path) as ds:
        seen = []

        def replace(k):
            del ds.layers["x"]
            ds.layers["x"] = m * (k + 2)

        if scan == "map":
            lines = []

            def summing(line):
                lines.append(1)
                if len(lines) % 64 == 1:
                    replace(len(lines) // 64)
                return float(line.sum())

            sums = ds.layers["x"].map([summing], axis=0, chunksize=64)[0]
            assert sums[64:].tolist() == [16.0 * (k // 64 + 1) for k in range(64, 256)]
            return
        batches = ds.scan(axis=0, batch_size=64, layers=["x"]) if scan == "scan" else \
            ds.batch_scan(axis=0, batch_size=64, layer="x")
        for k, (_, _, values) in enumerate(batches):
            seen.append(float((values.layers["x"][:, :] if scan == "scan" else values)[0, 0]))
            replace(k)
    assert seen == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("scan", ["scan", "batch_scan", "map"])
@pytest.mark.parametrize("change", ["permute", "add_columns"])
def test_a_scan_or_map_whose_file_was_permuted_or_grew_meanwhile_says_so(tmp_path, scan, change):
    """A function given to map that permuted the file got h5py's RuntimeError ("Unable to synchronously
    get dataspace"); columns appended during a scan were left out of its later batches without a word.
    Both now end the pass with a LoomFileError that says why."""
    path = tmp_path / "w.loom"
    loompy.create(path, np.ones((256, 16), np.float32), {"g": np.arange(256)}, {"c": np.arange(16)}).close()
    with loompy.connect(path) as ds:

        def change_the_file():
            if change == "permute":
                ds.permute(np.arange(256)[::-1], axis=0)
            else:
                ds.add_columns(np.ones((256, 2), np.float32), {"c": np.arange(2)})

        expected = "permuted since it began" if change == "permute" else "16 when it began"
        with pytest.raises(loompy.LoomFileError, match=expected):
            if scan == "map":
                lines = []
                ds.map([lambda line: (lines.append(1), len(lines) == 70 and change_the_file(), 0.0)[-1]],
                       axis=0, chunksize=64)
            else:
                batches = ds.scan(axis=0, batch_size=64) if scan == "scan" else ds.batch_scan(axis=0, batch_size=64)
                for k, _ in enumerate(batches):
                    if k == 1:
                        change_the_file()


@pytest.mark.parametrize("scan", ["scan", "batch_scan", "map"])
def test_a_pass_given_its_columns_goes_on_when_columns_are_appended(tmp_path, scan):
    """A scan of chosen columns (or map at chosen columns) misses none when columns are appended:
    it was refused like a scan of them all."""
    path = tmp_path / "w.loom"
    m = np.arange(256 * 16, dtype=np.float32).reshape(256, 16)
    loompy.create(path, m, {"g": np.arange(256)}, {"c": np.arange(16)}).close()
    with loompy.connect(path) as ds, loompy.connect(path) as other:
        def append():
            other.add_columns(np.ones((256, 2), np.float32), {"c": np.arange(2)})

        chosen = np.arange(2, 12)
        if scan == "map":
            lines = []
            sums = ds.map([lambda line: (lines.append(1), len(lines) == 70 and append(), float(line.sum()))[-1]],
                          axis=0, chunksize=64, selection=chosen)[0]
            np.testing.assert_array_equal(sums, m[:, chosen].sum(axis=1))
            return
        batches = ds.scan(axis=1, items=chosen, batch_size=4) if scan == "scan" else \
            ds.batch_scan(axis=1, cells=chosen, batch_size=4)
        seen = []
        for k, (_, selection, _) in enumerate(batches):
            seen += selection.tolist()
            if k == 0:
                append()
        assert seen == chosen.tolist()
        with pytest.raises(loompy.LoomFileError, match="when it began"):  # (from a position on: to the end)
            for k, _ in enumerate(ds.scan(axis=1, items=2, batch_size=4) if scan == "scan" else
                                  ds.batch_scan(axis=1, cells=slice(2, None), batch_size=4)):
                if k == 0:
                    append()


def test_batch_scan_of_an_empty_file_gives_no_batches(tmp_path):
    """batch_scan of a file from new() raised "layer '' does not exist", where scan gives nothing."""
    path = tmp_path / "e.loom"
    loompy.new(path).close()
    with loompy.connect(path) as ds:
        assert list(ds.batch_scan(axis=0)) == [] and list(ds.scan(axis=0)) == []


def test_a_scan_reads_global_attributes_and_graphs_again_only_after_a_write_to_them(tmp_path, monkeypatch):
    """Each view carries the global attributes and graphs, read again (and copied) only after a
    write to them: a loop writing the matrix had them read again for every batch."""
    path = tmp_path / "w.loom"
    loompy.create(path, np.ones((256, 16), np.float32), {"g": np.arange(256)}, {"c": np.arange(16)}).close()
    calls = []
    real = operations.whole_parts
    monkeypatch.setattr(operations, "whole_parts", lambda *a, **k: calls.append(1) or real(*a, **k))
    with loompy.connect(path) as ds:
        for k, (_, selection, view) in enumerate(ds.scan(axis=0, batch_size=32)):
            ds[selection, :] = 2  # (the matrix: not what the views share)
            assert view.attrs.get("title") == (None if k < 3 else "t")
            if k == 2:
                ds.attrs.title = "t"
    assert len(calls) == 2


@pytest.mark.parametrize("scan", ["scan", "batch_scan", "map"])
def test_a_loop_writing_every_batch_has_each_read_about_once(tmp_path, monkeypatch, scan):
    """Read ahead, every batch of a loop that writes as it goes would be read twice (the one read
    ahead meanwhile, then again after the write): after a write the next batch is read when asked."""
    path = tmp_path / "w.loom"
    m = np.ones((640, 16), np.float32)
    loompy.create(path, m, {"g": np.arange(640)}, {"c": np.arange(16)}).close()
    real, reads = (operations.make_view if scan == "scan" else operations.read_strip), []
    monkeypatch.setattr(operations, "make_view" if scan == "scan" else "read_strip",
                        lambda *args, **kwargs: reads.append(1) or real(*args, **kwargs))
    with loompy.connect(path) as ds:
        if scan == "map":
            done = []

            def doubling(line):  # (each batch's first line writes the batch, read before)
                done.append(1)
                if len(done) % 64 == 1:
                    ds[len(done) - 1:len(done) + 63, :] = m[:64] * 2
                return float(line.sum())

            assert ds.map([doubling], axis=0, chunksize=64)[0].tolist() == [16.0] * 640
        else:
            batches = ds.scan(axis=0, batch_size=64) if scan == "scan" else ds.batch_scan(axis=0, batch_size=64)
            for _, selection, values in batches:
                assert float((values[:, :] if scan == "scan" else values).sum()) == 64 * 16
                ds[selection.min():selection.max() + 1, :] = m[selection] * 2
            np.testing.assert_array_equal(ds[:, :], m * 2)
    assert len(reads) <= 10 + 1


@pytest.mark.parametrize("scan", ["scan", "batch_scan", "map"])
def test_a_batch_read_ahead_as_another_thread_wrote_is_read_again(tmp_path, monkeypatch, scan):
    """Another thread's write that ended while the next batch was read ahead shows in that batch."""
    import threading

    path = tmp_path / "w.loom"
    m = np.ones((128, 16), np.float32)
    loompy.create(path, m, {"g": np.arange(128)}, {"c": np.arange(16)}).close()
    real, built_ahead, written = operations.read_strip if scan != "scan" else operations.make_view, [], []

    def writing_meanwhile(*args, **kwargs):
        built = real(*args, **kwargs)
        if threading.current_thread() is not threading.main_thread():
            built_ahead.append(1)
            if len(built_ahead) == 2:  # (the second batch, read ahead)
                writer = threading.Thread(target=lambda: ds.__setitem__((slice(64, 128), slice(None)), 3))
                writer.start()
                writer.join()
                written.append(1)
        return built

    monkeypatch.setattr(operations, "read_strip" if scan != "scan" else "make_view", writing_meanwhile)
    with loompy.connect(path) as ds:
        if scan == "map":
            sums = ds.map([lambda line: float(line.sum())], axis=0, chunksize=64)[0]
            assert written and sums[64:].tolist() == [48.0] * 64
            return
        batches = ds.scan(axis=0, batch_size=64) if scan == "scan" else ds.batch_scan(axis=0, batch_size=64)
        seen = [float((values[:, :] if scan == "scan" else values).sum()) for _, _, values in batches]
    assert written and seen == [64 * 16, 64 * 16 * 3]


def test_a_scan_reads_global_attributes_and_graphs_once(tmp_path, monkeypatch):
    """Each view carries the file's global attributes and renumbered graphs: read once per scan,
    not once per batch (a scan of thousands of small batches re-read them all every time)."""
    import importlib

    fmt = importlib.import_module("loompy.format")
    graphs = importlib.import_module("loompy.graphs")
    m = np.arange(40 * 6, dtype=np.float32).reshape(40, 6)
    path = tmp_path / "a.loom"
    with loompy.create(path, m, {"g": np.arange(40)}, {"c": np.arange(6)},
                       file_attrs={f"fa{k}": f"v{k}" for k in range(5)}) as ds:
        ds.row_graphs["knn"] = sp.coo_matrix((np.ones(3), ([0, 5, 39], [1, 6, 0])), shape=(40, 40))
    counts = {"globals": 0, "graphs": 0}
    read_global, read_edges = fmt.read_global, graphs.read_edges

    def counted(kind, real):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fmt, "read_global", counted("globals", read_global))
    monkeypatch.setattr(graphs, "read_edges", counted("graphs", read_edges))
    with loompy.connect(path, "r") as ds:
        names = ds.attrs.keys()  # the five, with the creation date and spec version
        views = [(ix, view) for ix, _, view in ds.scan(axis=0, batch_size=4)]
    assert len(views) == 10 and counts == {"globals": len(names), "graphs": 1}
    ix, last = views[-1]
    assert last.attrs["fa3"] == "v3" and last.row_graphs["knn"].nnz == 0  # the edge 39 -> 0 leaves the batch
    ix, first = views[1]
    assert ix == 4 and first.row_graphs["knn"].row.tolist() == [1]  # 5 -> 6, renumbered in the batch 4..7


def test_a_scan_in_a_writable_file_sees_attributes_and_graphs_written_during_it(tmp_path):
    m = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
    path = tmp_path / "a.loom"
    with loompy.create(path, m, {"g": np.arange(12)}, {"c": np.arange(3)}, file_attrs={"vec": [1.0, 2.0]}) as ds:
        ds.row_graphs["knn"] = sp.coo_matrix((np.ones(2), ([0, 4], [1, 5])), shape=(12, 12))
    with loompy.connect(path) as ds:
        seen = []
        for ix, _, view in ds.scan(axis=0, batch_size=4):
            seen.append((ix, view.attrs["title"] if "title" in view.attrs else None, view.row_graphs["knn"].nnz,
                         view.attrs["vec"][0]))
            view.attrs["vec"][0] = -1  # a view's values are its own
            if ix == 0:
                ds.attrs.title = "changed"
                ds.row_graphs["knn"] = sp.coo_matrix((np.ones(1), ([8], [9])), shape=(12, 12))
    assert seen == [(0, None, 1, 1.0), (4, "changed", 0, 1.0), (8, "changed", 1, 1.0)]


def test_the_mean_of_a_float_column_attribute_keeps_its_dtype(tmp_path):
    """As in loompy 3: float32 means stay float32 (here computed in float64, then rounded once);
    means of integers are float64."""
    path, out = tmp_path / "a.loom", tmp_path / "agg.loom"
    f = np.array([0.1, 0.2, 0.3, 0.7, 1e8, 1.0], np.float32)
    loompy.create(path, np.ones((3, 6), np.float32), {"Gene": ["a", "b", "c"]},
                  {"Clusters": [0, 0, 0, 1, 1, 1], "F": f, "I": np.array([1, 2, 4, 5, 6, 8], np.int32)}).close()
    with loompy.connect(path) as ds:
        ds.layers["twice"] = ds[:, :] * 2
        ds.aggregate(out, aggr_ca_by={"F": "mean", "I": "mean"})
        # loompy 3's order of arguments: the layer is the sixth
        np.testing.assert_array_equal(ds.aggregate(None, None, "Clusters", "sum", None, "twice"), np.full((3, 2), 6.0))
    with loompy.connect(out, "r") as agg:
        assert agg.ca.F.dtype == np.float32 and agg.ca.I.dtype == np.float64
        expected = [np.float32(np.mean(f[:3].astype(np.float64))), np.float32(np.mean(f[3:].astype(np.float64)))]
        assert agg.ca.F.tolist() == expected and agg.ca.I.tolist() == [7 / 3, 19 / 3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16, np.float16])
def test_map_of_mean_std_and_var_over_rows_gives_numpys_values_exactly(tmp_path, dtype):
    """np.std and np.var reuse np.mean's values when all are asked for: the very same numbers."""
    rng = np.random.default_rng(4)
    scale = 3 if dtype == np.float16 else 300  # (float16's variance of larger values overflows, in numpy too)
    m = (rng.random((150, 700)) * scale - (0 if np.dtype(dtype).kind == "u" else scale / 3)).astype(dtype)
    path = tmp_path / "m.loom"
    loompy.create(path, m, {"Gene": np.arange(150)}, {"CellID": np.arange(700)}).close()
    with loompy.connect(path, "r") as ds:
        mean, std, var, total = ds.map([np.mean, np.std, np.var, np.sum], axis=0)
        std_first = ds.map([np.std, np.sum, np.mean], axis=0)  # (any order: the mean is taken first)
    for got, f in ((mean, np.mean), (std, np.std), (var, np.var), (total, np.sum)):
        np.testing.assert_array_equal(got, f(m, axis=1).astype(got.dtype))
    for got, expected in zip(std_first, (std, total, mean)):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("path_taken", ["threads", "strips", "batches"])
def test_map_over_columns_of_a_tall_matrix_holds_a_strip_not_the_matrix(tmp_path, monkeypatch, path_taken):
    """Columns are reduced a few at a time from their chunks (threads), from strips of whole chunk
    columns (strips), or from batches with a non-numpy function among numpy's (batches): never the
    whole matrix, nor a transposed copy of a batch."""
    import contextlib
    import importlib

    path = tmp_path / "tall.loom"
    m = np.random.default_rng(3).random((40000, 200)).astype(np.float32)  # 32 MB
    loompy.create(path, m, {"g": np.arange(40000)}, {"c": np.arange(200)}).close()
    monkeypatch.setattr(importlib.import_module("loompy.engine.processes"), "MIN_CHUNKS", 10 ** 12)
    if path_taken == "strips":
        monkeypatch.setattr(importlib.import_module("loompy.engine.read"), "direct_reads",
                            lambda d: contextlib.nullcontext(None))
    functions = [np.mean, np.std] + ([lambda x: float(x[0])] if path_taken == "batches" else [])
    with loompy.connect(path, "r") as ds:
        tracemalloc.start()
        got = ds.map(functions, axis=1, chunksize=64)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    np.testing.assert_array_equal(got[1], [np.std(m[:, c]) for c in range(200)])
    assert peak < 2.5 * 40000 * 64 * 4  # one strip of 64 columns (10 MB) and change; the matrix is 32 MB


def test_a_named_layer_maps_as_the_main_matrix_does(tmp_path):
    """``ds.layers[name].map(...)``, as in loompy 3: the layer's values, not the main matrix's."""
    path = tmp_path / "l.loom"
    m = np.arange(300 * 130, dtype=np.float32).reshape(300, 130) % 17
    loompy.create(path, {"": m, "twice": 2 * m}, {"g": np.arange(300)}, {"c": np.arange(130)}).close()
    with loompy.connect(path, "r") as ds:
        layer = ds.layers["twice"]
        for axis in (0, 1):
            total, custom = ds.layers["twice"].map([np.sum, lambda x: float(x.max())], axis=axis, chunksize=64)
            np.testing.assert_array_equal(total, (2 * m).sum(axis=1 - axis))
            np.testing.assert_array_equal(custom, (2 * m).max(axis=1 - axis))
            np.testing.assert_array_equal(ds.layers[""].map(np.sum, axis=axis), ds.map(np.sum, axis=axis))
    for closed in (lambda: layer.map(np.sum), lambda: ds.map(np.sum)):
        with pytest.raises(loompy.LoomFileError, match="l.loom.*closed"):
            closed()


def test_map_keeps_numbers_next_to_text_and_refuses_batches_of_no_lines(tmp_path):
    path = tmp_path / "t.loom"
    m = np.zeros((100, 70), np.float32)
    m[50:] = 1
    loompy.create(path, m, {"g": np.arange(100)}, {"c": np.arange(70)}).close()
    with loompy.connect(path, "r") as ds:
        got = ds.map(lambda x: "some" if x.any() else 0.5, axis=0, chunksize=64)
        assert got.dtype == object and got[:50].tolist() == [0.5] * 50 and got[50:].tolist() == ["some"] * 50
        for functions in ([np.sum], [np.sum, lambda x: 0]):
            for chunksize in (0, -5):
                with pytest.raises(loompy.LoomValueError, match=r"t\.loom.*chunksize"):
                    ds.map(functions, chunksize=chunksize)


def test_map_takes_an_axis_given_as_any_number(tmp_path):
    """As loompy 3: axis=1.0 and np.int64(0) are axes; 2, True and '0' are not."""
    path = tmp_path / "a.loom"
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    loompy.create(path, m, {"g": np.arange(3)}, {"c": np.arange(4)}).close()
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds.map(np.sum, axis=1.0), m.sum(axis=0))
        np.testing.assert_array_equal(ds.map([np.sum, lambda x: 0], axis=np.int64(0))[0], m.sum(axis=1))
        for axis in (2, True, "0"):
            with pytest.raises(loompy.LoomValueError, match=r"a\.loom.*axis"):
                ds.map(np.sum, axis=axis)


def test_aggregate_checks_where_it_writes_before_reading_the_matrix(tmp_path, monkeypatch):
    """Never over the file it reads (loompy 3 refuses that too), nor into a missing folder, nor with
    column attributes that cannot be aggregated: each refused before the pass over the matrix,
    leaving the file as it was."""
    import importlib

    path = tmp_path / "a.loom"
    m = np.arange(24, dtype=np.float32).reshape(4, 6)
    loompy.create(path, m, {"g": np.arange(4)}, {"Clusters": [0, 0, 1, 1, 2, 2], "Name": list("abcdef")}).close()
    before = path.read_bytes()
    operations = importlib.import_module("loompy.operations")
    monkeypatch.setattr(operations.engine, "read_block", None)  # (any read of the matrix would fail)
    with loompy.connect(path, "r") as ds:
        with pytest.raises(loompy.LoomFileError, match="a.loom: is the file being aggregated"):
            ds.aggregate(path)
        with pytest.raises(loompy.LoomFileError, match="a.loom: is the file being aggregated"):
            ds.aggregate(tmp_path / "." / "a.loom")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            ds.aggregate(tmp_path / "missing" / "out.loom")
        with pytest.raises(loompy.LoomError, match="a.loom.*Name"):
            ds.aggregate(tmp_path / "out.loom", aggr_ca_by={"Name": "mean"})
    assert path.read_bytes() == before and not (tmp_path / "out.loom").exists()


@pytest.mark.reference
def test_scans_take_items_in_their_order_with_repeats_as_the_reference(tmp_path, reference):
    """loompy 3 gives each window of batch_size positions the items in it in the order given, repeats
    kept (scan items=[10, 2, 5] yields columns 10, 2, 5); we sorted them and dropped repeats."""
    path = tmp_path / "s.loom"
    m = np.arange(72, dtype=np.float32).reshape(6, 12)
    loompy.create(path, m, {"g": np.arange(6) * 10}, {"c": np.arange(12) * 100}).close()
    scans = [(1, [10, 2, 5], 512), (1, [3, 3, 1], 512), (1, [10, 2, 5, 3, 3], 4), (0, [4, 1, 1], 3), (1, 7, 4)]
    batch_scans = [([5, 1, 1], [3, 0], 0, 2), ([5, 1, 1], [3, 0], 1, 4)]
    theirs = reference.run("""
        import sys, json, numpy as np, loompy
        scans, batch_scans = json.loads(sys.argv[2]), json.loads(sys.argv[3])
        out = []
        with loompy.connect(sys.argv[1], "r") as ds:
            for axis, items, size in scans:
                items = items if isinstance(items, int) else np.array(items)
                out.append([[ix, sel.tolist(), view[:, :].tolist(), view.ra.g.tolist(), view.ca.c.tolist()]
                            for ix, sel, view in ds.scan(items=items, axis=axis, batch_size=size,
                                                         what=["layers", "row_attrs", "col_attrs"])])
            for cells, genes, axis, size in batch_scans:
                out.append([[ix, sel.tolist(), vals.tolist()] for ix, sel, vals in
                            ds.batch_scan(cells=np.array(cells), genes=np.array(genes), axis=axis, batch_size=size)])
        print(json.dumps(out))
    """, str(path), json.dumps(scans), json.dumps(batch_scans))
    ours = []
    with loompy.connect(path, "r") as ds:
        for axis, items, size in scans:
            ours.append([[ix, sel.tolist(), view[:, :].tolist(), view.ra.g.tolist(), view.ca.c.tolist()]
                         for ix, sel, view in ds.scan(items=items if isinstance(items, int) else np.array(items),
                                                      axis=axis, batch_size=size)])
        for cells, genes, axis, size in batch_scans:
            ours.append([[ix, sel.tolist(), vals.tolist()] for ix, sel, vals in
                         ds.batch_scan(cells=np.array(cells), genes=np.array(genes), axis=axis, batch_size=size)])
    assert ours == theirs
    assert ours[0][0][1] == [10, 2, 5] and ours[0][0][2][0] == [10.0, 2.0, 5.0]  # (what the reference gives)


@pytest.mark.reference
def test_aggregate_takes_every_function_loompy3_took(tmp_path, reference):
    """loompy 3 hands aggr_by to numpy-groupies, so std, var, prod, any, nanmean... and functions
    such as np.sum worked; we took nine names. The values agree (ours in float64 where averaged)."""
    path = tmp_path / "a.loom"
    rng = np.random.default_rng(5)
    m = rng.integers(0, 4, (30, 12)).astype(np.float32)
    loompy.create(path, m, {"g": np.arange(30)}, {"Clusters": np.arange(12) % 3, "X": rng.random(12)}).close()
    names = ["std", "var", "prod", "any", "nanmean", "last", "nanmax"]
    theirs = reference.run("""
        import sys, json, numpy as np, loompy
        with loompy.connect(sys.argv[1], "r") as ds:
            out = {n: ds.aggregate(aggr_by=n).tolist() for n in json.loads(sys.argv[2])}
            out["np.sum"] = ds.aggregate(aggr_by=np.sum).tolist()
        print(json.dumps(out))
    """, str(path), json.dumps(names))
    groups = [m[:, np.arange(12) % 3 == g] for g in range(3)]
    with loompy.connect(path, "r") as ds:
        for name in names:
            np.testing.assert_allclose(ds.aggregate(aggr_by=name), np.array(theirs[name], dtype=float), rtol=1e-6,
                                       err_msg=name)
        np.testing.assert_allclose(ds.aggregate(aggr_by=np.sum), theirs["np.sum"], rtol=1e-6)
        np.testing.assert_allclose(ds.aggregate(aggr_by=np.std)[:, 1], groups[1].std(axis=1), rtol=1e-6)
        spread = ds.aggregate(aggr_by=lambda v: v.max() - v.min())  # any function of a group's values
        np.testing.assert_array_equal(spread[:, 2], np.ptp(groups[2], axis=1))
        with pytest.raises(loompy.LoomValueError, match="a.loom: aggregate: unknown aggregation 'average'"):
            ds.aggregate(aggr_by="average")


@pytest.mark.reference
def test_aggregate_tallies_a_column_attribute_as_the_reference(tmp_path, reference):
    """loompy 3 documents aggr_ca_by={name: "tally"}: one count column per value (name_value, with
    '/' and '.' in text values replaced); ours refused it as an unknown aggregation."""
    path = tmp_path / "a.loom"
    m = np.arange(24, dtype=np.float32).reshape(2, 12)
    tissue = np.array(["brain", "gut", "a/b.c", "brain"] * 3, dtype=object)
    loompy.create(path, m, {"g": np.arange(2)}, {"Clusters": np.arange(12) % 3, "Tissue": tissue,
                                                 "Age": np.arange(12) % 2}).close()
    theirs = reference.run("""
        import sys, json, loompy
        with loompy.connect(sys.argv[1], "r") as ds:
            ds.aggregate(sys.argv[2], aggr_ca_by={"Tissue": "tally", "Age": "tally"})
        with loompy.connect(sys.argv[2], "r") as out:
            print(json.dumps({k: out.ca[k].tolist() for k in out.ca.keys()}))
    """, str(path), str(tmp_path / "theirs.loom"))
    assert sorted(theirs) == ["Age_0", "Age_1", "Tissue_a-b_c", "Tissue_brain", "Tissue_gut"]
    assert theirs["Tissue_brain"] == [2, 2, 2] and theirs["Age_1"] == [2, 2, 2]
    with loompy.connect(path, "r") as ds:
        ds.aggregate(tmp_path / "ours.loom", aggr_ca_by={"Tissue": "tally", "Age": "tally"})
    with loompy.connect(tmp_path / "ours.loom", "r") as out:  # (and the groups' labels, as ours always has)
        assert {k: out.ca[k].tolist() for k in out.ca.keys()} == {**theirs, "Clusters": [0, 1, 2]}


def test_map_keeps_each_lines_array_result_as_an_object(dataset):
    """A function giving several values per line (np.percentile(x, [10, 90])) failed with numpy's
    'could not broadcast'; the README says such results come back as objects."""
    path, m = dataset[:2]
    with loompy.connect(path, "r") as ds:
        both = ds.map([lambda x: np.percentile(x, [10, 90]), np.sum], axis=1)
    assert both[0].dtype == object and len(both[0]) == m.shape[1]
    for j in (0, m.shape[1] // 2, m.shape[1] - 1):
        np.testing.assert_array_equal(both[0][j], np.percentile(m[:, j], [10, 90]))
    np.testing.assert_allclose(both[1], m.sum(axis=0), rtol=1e-5)


def test_sparse_in_another_dtype_holds_little_more_than_its_result(tmp_path):
    rng = np.random.default_rng(8)
    m = (rng.random((2000, 2000)) < 0.4) * rng.integers(1, 50, (2000, 2000)).astype(np.float32)
    loompy.create(tmp_path / "s.loom", sp.coo_matrix(m), {"Gene": np.arange(2000)}, {"CellID": np.arange(2000)}
                  ).close()
    with loompy.connect(tmp_path / "s.loom", "r") as ds:
        peaks = []
        for dtype in (None, None, "float64"):  # (the first builds the chunk index: not counted)
            tracemalloc.start()
            got = ds.layers[""].sparse(dtype=dtype)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            if dtype is None:
                del got
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got.toarray(), m)
    # the float64 values come on top of the stored-dtype result; scipy's astype copied the indices too
    assert peaks[2] - peaks[1] < 1.5 * got.data.nbytes, (peaks, got.data.nbytes)


@pytest.mark.parametrize("items", [[0, 1, 2, 3], [2]])
def test_a_batch_that_fails_because_the_connection_closed_says_so(items):
    """h5py's own error, met by a batch being built as another thread closes the connection,
    escaped scan and batch_scan raw (1.5% of closes in a review's loop): it now says the connection
    was closed, and other errors stay as they are."""
    from loompy.operations import _one_ahead

    closed = []

    def check():
        if closed:
            raise loompy.LoomFileError("f.loom: the connection is closed")

    def build(item):
        if item == 2:
            closed.append(True)
            raise ValueError("Not a location (invalid object ID)")
        return item

    with pytest.raises(loompy.LoomFileError, match="connection is closed"):
        list(_one_ahead(items, build, check, (0, 0)))
    closed.clear()
    with pytest.raises(ZeroDivisionError):
        list(_one_ahead(items[:2], lambda item: 1 / 0, check, (0, 0)))
