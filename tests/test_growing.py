"""add_columns, add_loom, combine, permute, repack: values against numpy, files intact on bad input."""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import stat
import time
import warnings

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def make(path, m, genes=None, cells=None, extra=None):
    n, k = m.shape
    genes = [f"g{i}" for i in range(n)] if genes is None else genes
    cells = [f"c{i}" for i in range(k)] if cells is None else cells
    layers = {"": m, "x": (m * 2).astype(np.int32)} if extra is None else extra
    with loompy.create(path, layers, {"Gene": genes, "Score": np.arange(n) * 1.5},
                       {"CellID": cells, "N": np.arange(k)}) as ds:
        ds.col_graphs["knn"] = sp.coo_matrix((np.ones(2), ([0, 1], [1, 0])), shape=(k, k))
    return path


def test_add_columns_dense_sparse_and_fill_values(tmp_path):
    rng = np.random.default_rng(1)
    m = rng.integers(0, 5, size=(70, 90)).astype(np.float32)
    path = make(tmp_path / "a.loom", m)
    new = rng.integers(0, 5, size=(70, 40)).astype(np.float32)
    with loompy.connect(path) as ds:
        ds.add_columns({"": new, "x": sp.csr_matrix((new * 2).astype(np.int32))},
                       {"CellID": [f"n{i}" for i in range(40)], "N": np.arange(40) + 1000})
        assert ds.shape == (70, 130)
        ds.add_columns({"": np.ones((70, 3), np.float32), "x": np.ones((70, 3), np.int32)},
                       {"CellID": ["p", "q", "r"]}, fill_values="auto")
        ds.add_columns({"": np.ones((70, 1), np.float32), "x": np.ones((70, 1), np.int32)}, {"CellID": ["s"]},
                       fill_values={"N": -1}, row_attrs={"Extra": np.arange(70)})
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (70, 134)
        np.testing.assert_array_equal(ds[:, :130], np.hstack([m, new]))
        np.testing.assert_array_equal(ds["x"][:, :130], np.hstack([m, new]).astype(np.int32) * 2)
        assert list(ds.ca.N[-6:]) == [1038, 1039, 0, 0, 0, -1]
        assert list(ds.ca.CellID[-4:]) == ["p", "q", "r", "s"] and list(ds.ra.Extra) == list(range(70))
        assert ds.col_graphs["knn"].shape == (134, 134)
    assert loompy.LoomValidator().validate(path)


def test_add_columns_rejects_bad_input_leaving_file_identical(tmp_path):
    m = np.ones((10, 5), np.float32)
    path = make(tmp_path / "b.loom", m)
    before = digest(path)
    good = {"": np.ones((10, 2), np.float32), "x": np.ones((10, 2), np.int32)}
    bad_calls = [
        ({"": np.ones((10, 2), np.float32)}, {"CellID": ["a", "b"], "N": [1, 2]}, None),  # missing layer x
        ({**good, "y": np.ones((10, 2))}, {"CellID": ["a", "b"], "N": [1, 2]}, None),  # unknown layer
        ({"": np.ones((9, 2), np.float32), "x": np.ones((9, 2), np.int32)}, {"CellID": ["a", "b"], "N": [1, 2]}, None),
        (good, {"CellID": ["a", "b"]}, {"Other": 0}),  # N missing and no fill value for it
        (good, {"CellID": ["a"], "N": [1, 2]}, None),  # wrong length
        (good, {"CellID": [1, 2], "N": [1, 2]}, None),  # numbers for a text attribute
        ({"": np.ones((10, 2), np.float32), "x": np.full((10, 2), 0.5)}, {"CellID": ["a", "b"], "N": [1, 2]}, None),
        (good, {"N": [1, 2]}, {"CellID": 0}),  # a number to fill a text attribute
        (good, {"CellID": ["a", "b"]}, {"N": "none"}),  # text to fill a numeric one
        (good, {"CellID": ["a", "b"]}, {"N": 0.5}),  # a fill the attribute's integers cannot hold
    ]
    for layers, attrs, fill in bad_calls:
        with loompy.connect(path) as ds, pytest.raises(loompy.LoomError):
            ds.add_columns(layers, attrs, fill_values=fill)
        assert digest(path) == before


def test_add_loom_is_one_append_all_or_nothing(tmp_path, monkeypatch):
    """Values found not to fit in a late batch are found before anything is written; a batch
    failing while written takes the file back to its old columns."""
    counts = np.arange(20, dtype=np.int32).reshape(5, 4)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    other = np.ones((5, 30))
    other[0, 27] = 0.5  # in the last batch
    make(tmp_path / "b.loom", other, extra={"": other})
    before = digest(path)
    for batch_size in (1000, 4):
        with loompy.connect(path) as ds, pytest.raises(loompy.LoomValueError, match="int32"):
            ds.add_loom(tmp_path / "b.loom", batch_size=batch_size)
        assert digest(path) == before
    other[0, 27] = 1
    make(tmp_path / "b.loom", other, extra={"": other})
    import importlib

    growing = importlib.import_module("loompy.growing")
    real, calls = growing.engine.write_matrix, []

    def fail_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(growing.engine, "write_matrix", fail_third)
    with loompy.connect(path) as ds:
        with pytest.raises(OSError, match="disk full"):
            ds.add_loom(tmp_path / "b.loom", batch_size=4)
        assert ds.shape == (5, 4) and len(ds.ca.CellID) == 4
    monkeypatch.undo()
    with loompy.connect(path, "r") as ds:  # no journal left behind: opens read-only
        np.testing.assert_array_equal(ds[:, :], counts)
        assert ds.shape == (5, 4) and list(ds.ca.N) == [0, 1, 2, 3]
    with loompy.connect(path) as ds:
        ds.add_loom(tmp_path / "b.loom", batch_size=4)
        np.testing.assert_array_equal(ds[:, :], np.hstack([counts, other.astype(np.int32)]))


def test_add_columns_failing_while_written_takes_file_and_connection_back(tmp_path, monkeypatch):
    counts = np.arange(20, dtype=np.float32).reshape(5, 4)
    path = make(tmp_path / "a.loom", counts)
    import importlib

    growing = importlib.import_module("loompy.growing")
    real, calls = growing.engine.write_matrix, []

    def interrupt_second(*args, **kwargs):  # the second layer: the first is written already
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(growing.engine, "write_matrix", interrupt_second)
    with loompy.connect(path) as ds:
        with pytest.raises(KeyboardInterrupt):
            ds.add_columns({"": np.ones((5, 3), np.float32), "x": np.ones((5, 3), np.int32)},
                           {"CellID": ["a", "b", "c"], "N": [7, 8, 9]})
        assert ds.shape == (5, 4) and ds[:, :].shape == (5, 4) and len(ds.ca.N) == 4
    monkeypatch.undo()
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], counts)
        np.testing.assert_array_equal(ds.layers["x"][:, :], (counts * 2).astype(np.int32))


@pytest.mark.parametrize("how", ["add_columns", "add_loom", "killed"])
def test_the_first_columns_of_an_empty_file_are_one_journalled_append(tmp_path, monkeypatch, how):
    """Interrupted (or killed) while writing an empty file's first columns, the file is empty again
    and the connection says so; a retry then writes exactly what it is given."""
    import importlib

    growing = importlib.import_module("loompy.growing")
    counts = np.arange(12, dtype=np.float32).reshape(3, 4)
    layers = {"": counts, "spliced": np.ones((3, 4), np.float32)}
    cells, genes = {"cell": np.arange(4)}, {"gene": np.array(["a", "b", "c"])}
    other = make(tmp_path / "other.loom", counts)
    path = tmp_path / "new.loom"
    loompy.new(path).close()
    real, calls = growing.engine.write_matrix, []

    def interrupt(*args, **kwargs):  # the second layer (add_columns), or the second batch (add_loom)
        calls.append(1)
        if len(calls) == (2 if how == "add_columns" else 3):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with loompy.connect(path) as ds:
        if how == "killed":  # the process dies before the append is committed: the next r+ open undoes it
            monkeypatch.setattr(importlib.import_module("loompy.journal"), "commit", lambda f: None)
            ds.add_columns(layers, cells, row_attrs=genes)
        else:
            monkeypatch.setattr(growing.engine, "write_matrix", interrupt)
            with pytest.raises(KeyboardInterrupt):
                if how == "add_columns":
                    ds.add_columns(layers, cells, row_attrs=genes)
                else:
                    ds.add_loom(other, batch_size=2)
            assert ds.shape == (0, 0) and ds.layers.keys() == [] and ds.ca.keys() == [] and ds.ra.keys() == []
    monkeypatch.undo()
    with loompy.connect(path) as ds:
        assert ds.shape == (0, 0) and ds.layers.keys() == [] and ds.ca.keys() == [] and ds.ra.keys() == []
        ds.add_columns(layers, cells, row_attrs=genes)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], counts)
        np.testing.assert_array_equal(ds.layers["spliced"][:, :], layers["spliced"])
        assert ds.ca.cell.tolist() == [0, 1, 2, 3] and ds.ra.gene.tolist() == ["a", "b", "c"]


@pytest.mark.parametrize("dies", [False, True])
def test_an_undone_append_restores_column_attributes_it_rewrote(tmp_path, monkeypatch, dies):
    """An append that widens a column attribute's dtype rewrites it; undone (by the failing call,
    or by the next r+ open after the writer died), the old one comes back as it was."""
    import importlib

    growing = importlib.import_module("loompy.growing")
    counts = np.ones((5, 4), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    with loompy.connect(path) as ds:
        ds.ca["Id"] = np.arange(4, dtype=np.int32)
    real = growing._append_attr

    def fail_after_id(group, name, *args):  # Id is rewritten (int32 to int64), then N fails
        real(group, name, *args)
        if name == "N":
            raise OSError("disk full")

    monkeypatch.setattr(growing, "_append_attr", fail_after_id)
    if dies:  # nothing undone by the call itself: as if the process had been killed there
        monkeypatch.setattr(growing, "_roll_back", lambda ds: None)
    with loompy.connect(path) as ds:
        with pytest.raises(OSError, match="disk full"):
            ds.add_columns({"": np.ones((5, 2), np.float32)}, {"Id": np.array([2**40, 5]), "CellID": ["x", "y"],
                                                                "N": [4, 5]})
    monkeypatch.undo()
    with loompy.connect(path) as ds:  # r+: rolls back what a dead writer left
        assert ds.shape == (5, 4) and ds.ca.Id.dtype == np.int32 and list(ds.ca.Id) == [0, 1, 2, 3]
        assert sorted(ds._file) == sorted(["attrs", "col_attrs", "col_graphs", "layers", "matrix", "row_attrs",
                                           "row_graphs"])


def test_an_undone_append_removes_column_attributes_it_created(tmp_path, monkeypatch):
    import importlib

    growing = importlib.import_module("loompy.growing")
    counts = np.ones((5, 4), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    real = growing._append_attr

    def fail_after_batch(group, name, *args):
        real(group, name, *args)
        if name == "batch":
            raise KeyboardInterrupt

    monkeypatch.setattr(growing, "_append_attr", fail_after_batch)
    with loompy.connect(path) as ds:
        with pytest.raises(KeyboardInterrupt):
            ds.add_columns({"": np.ones((5, 2), np.float32)}, {"batch": [2, 2], "CellID": ["x", "y"], "N": [4, 5]},
                           fill_values={"batch": 1})
        assert "batch" not in ds.ca.keys()
    monkeypatch.undo()
    with loompy.connect(path, "r") as ds:
        assert sorted(ds.ca.keys()) == ["CellID", "N"] and ds.shape == (5, 4)


def test_appends_keep_stored_values_and_check_everything_first(tmp_path):
    counts = np.ones((5, 2), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    with loompy.connect(path) as ds:
        ds.ca["Big"] = np.array([2**53 + 1, 7], np.int64)
        ds.ca["F"] = np.array([1.5, 2.5], np.float32)
    before = digest(path)
    cols = {"CellID": ["x"], "N": [3], "F": [0.5]}
    bad = [({"Big": np.array([2**63], np.uint64), **cols}, None, {}),  # int64 + uint64 would be float64
           ({"Big": [1.5], **cols}, None, {}),
           ({"Big": [1], **cols}, None, {"bad/name": np.arange(5)}),  # a row attribute's name
           ({"Big": [1], **cols}, "complex", {})]  # complex values: the imaginary part would be lost
    for attrs, layer, row_attrs in bad:
        values = np.ones((5, 1), np.complex128) if layer else np.ones((5, 1), np.float32)
        with loompy.connect(path) as ds, pytest.raises(loompy.LoomValueError):
            ds.add_columns({"": values}, attrs, row_attrs=row_attrs)
        assert digest(path) == before
    with loompy.connect(path) as ds:
        ds.add_columns({"": np.ones((5, 1), np.float32)}, {"Big": np.array([9], np.uint64), **cols},
                       fill_values={"F": np.nan})
        assert ds.ca.Big.dtype == np.int64 and ds.ca.Big.tolist() == [2**53 + 1, 7, 9]
        ds.add_columns({"": np.ones((5, 1), np.float32)}, {"Big": [10], "CellID": ["y"], "N": [4]},
                       fill_values={"F": 0.1})  # rounds into float32, as a write would
        assert ds.ca.F[-1] == np.float32(0.1)


def test_a_writer_killed_after_its_commit_leaves_nothing_behind(tmp_path, monkeypatch):
    """Killed after the journal is gone but before what the append kept aside is dropped: the next
    r+ open drops it, and the append stands."""
    import importlib

    growing, journal = importlib.import_module("loompy.growing"), importlib.import_module("loompy.journal")
    counts = np.ones((5, 2), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    with loompy.connect(path) as ds:
        ds.ca["Small"] = np.array([1, 2], np.int16)

    def commit_then_die(f):
        del f.attrs[loompy.format.APPEND_JOURNAL]
        f.flush()
        raise SystemExit  # stands in for the kill: nothing after this runs

    monkeypatch.setattr(journal, "commit", commit_then_die)
    monkeypatch.setattr(growing, "_roll_back", lambda ds: None)  # a killed process undoes nothing
    with loompy.connect(path) as ds, pytest.raises(SystemExit):
        ds.add_columns({"": np.ones((5, 1), np.float32)}, {"Small": [100000], "CellID": ["x"], "N": [3]})
    monkeypatch.undo()
    with h5py.File(path, "r") as f:
        assert journal.BEFORE_APPEND in f  # left behind by the "kill"
    with loompy.connect(path) as ds:
        assert ds.shape == (5, 3) and ds.ca.Small.tolist() == [1, 2, 100000]
        assert journal.BEFORE_APPEND not in ds._file


def _dump(path) -> dict:
    """Every dataset's dtype, shape and values, and every HDF5 attribute, of the file at ``path``."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            attrs = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
            out[name] = (attrs, obj.dtype.str, obj.shape, np.asarray(obj[()]).tolist()) \
                if isinstance(obj, h5py.Dataset) else (attrs,)
        f.visititems(visit)
        out["/"] = ({k: np.asarray(v).tolist() for k, v in f.attrs.items()},)
    return out


def test_a_users_group_named_as_the_append_keeps_things_aside_is_never_touched(tmp_path):
    """A root group '/loompy_before_append' that loompy did not make was deleted by any r+ open (taken
    for what a finished append left behind). It is the user's: kept, and an append is refused."""
    path = make(tmp_path / "a.loom", np.ones((5, 2), np.float32))
    with h5py.File(path, "r+") as f:
        f.create_group("loompy_before_append")["mine"] = np.arange(10)
    before = _dump(path)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomFileError, match="a.loom.*loompy_before_append.*rename"):
            ds.add_columns({k: np.ones((5, 1), np.float32) for k in ds.layers.keys()},
                           {k: ds.ca[k][:1] for k in ds.ca.keys()})
        assert ds.shape == (5, 2)
    assert _dump(path) == before
    with h5py.File(path, "r") as f:
        assert f["loompy_before_append/mine"][:].tolist() == list(range(10))


@pytest.mark.parametrize("junk", ["junk", 3.7, -1, [2, 3]])
def test_a_journal_that_is_not_a_column_count_is_an_error_naming_it(tmp_path, junk):
    path = make(tmp_path / "a.loom", np.ones((5, 2), np.float32))
    with h5py.File(path, "r+") as f:
        f.attrs[loompy.format.APPEND_JOURNAL] = junk
    before = _dump(path)
    for mode in ("r+", "r"):
        with pytest.raises(loompy.LoomFileError, match="a.loom.*loompy_append_from_columns.* is not the column count"):
            loompy.connect(path, mode)
    assert _dump(path) == before


@pytest.mark.parametrize("at", ["begin", "commit"])
def test_ctrl_c_as_an_append_starts_or_commits_leaves_file_and_connection_agreeing(tmp_path, monkeypatch, at):
    """Interrupted while its journal is written (begin) the append is undone; interrupted as it is
    committed (the journal gone, the rest not yet) it stands. Either way the connection says what
    the file holds, the file opens read-only, and later writes are kept."""
    import importlib

    journal = importlib.import_module("loompy.journal")
    counts = np.ones((5, 2), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    real = getattr(journal, at)

    def interrupted(f, *args, **kwargs):
        real(f, *args, **kwargs) if at == "commit" else f.attrs.__setitem__(loompy.format.APPEND_JOURNAL, 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(journal, at, interrupted)
    with loompy.connect(path) as ds:
        with pytest.raises(KeyboardInterrupt):
            ds.add_columns({"": np.full((5, 1), 7, np.float32)}, {"CellID": ["x"], "N": [3]})
        monkeypatch.undo()
        width = 2 if at == "begin" else 3
        assert ds.shape == (5, width) and ds[:, :].shape == (5, width) and len(ds.ca.N) == width
        ds.ca["later"] = np.arange(width)
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (5, width) and ds.ca.later.tolist() == list(range(width))
    with loompy.connect(path) as ds:
        assert ds.shape == (5, width) and ds.ca.later.tolist() == list(range(width))


def test_convert_attrs_makes_differing_file_attributes_column_attributes(tmp_path):
    """As in loompy 3: a file attribute that differs between the inputs becomes a column attribute
    (one value per column, from its file); equal ones stay file attributes. Text on one side and
    numbers on the other is text on both, in combine and add_loom alike."""
    m = np.ones((4, 3), np.float32)
    a = make(tmp_path / "a.loom", m, cells=["a0", "a1", "a2"])
    b = make(tmp_path / "b.loom", m[:, :2], cells=["b0", "b1"])
    for path, sample, dose, batch in ((a, "s1", 1.5, [1.0, 2.0, 3.0]), (b, "s2", 3, ["x", "y"])):
        with loompy.connect(path) as ds:
            ds.attrs.SampleID, ds.attrs.Dose, ds.attrs.Same = sample, dose, "kept"
            ds.ca.Batch = np.array(batch)
    out = tmp_path / "ab.loom"
    loompy.combine([a, b], out, convert_attrs=True)
    with loompy.connect(out, "r") as ds:
        assert list(ds.ca.SampleID) == ["s1"] * 3 + ["s2"] * 2 and list(ds.ca.Dose) == [1.5] * 3 + [3.0] * 2
        assert list(ds.ca.Batch) == ["1.0", "2.0", "3.0", "x", "y"]
        assert ds.attrs.Same == "kept" and "SampleID" not in ds.attrs
    with loompy.connect(a) as ds:
        ds.add_loom(b, convert_attrs=True)
        assert list(ds.ca.SampleID) == ["s1"] * 3 + ["s2"] * 2 and list(ds.ca.Batch) == ["1.0", "2.0", "3.0", "x", "y"]
        assert ds.attrs.Same == "kept" and "SampleID" not in ds.attrs


def test_joining_column_attributes_never_changes_a_value(tmp_path):
    m = np.ones((4, 2), np.float32)
    a = make(tmp_path / "a.loom", m, cells=["a0", "a1"])
    b = make(tmp_path / "b.loom", m, cells=["b0", "b1"])
    with loompy.connect(a) as ds:
        ds.ca.X = np.array([2**60 + 1, 5], np.int64)
        ds.ca.C = np.array([(2**60 + 1, 0.5)] * 2, dtype=[("a", "i8"), ("b", "f8")])
    with loompy.connect(b) as ds:
        ds.ca.X = np.array([0.5, 1.5])
        ds.ca.C = np.array([(1.5, 0.5)] * 2, dtype=[("a", "f8"), ("b", "f8")])
    before = digest(a)
    with pytest.raises(loompy.LoomValueError, match="would change them"):  # 2**60 + 1 would round
        loompy.combine([a, b], tmp_path / "ab.loom")
    for attrs in ({"X": np.array([2**63 + 5, 1], np.uint64)}, {"C": np.array([(1.5, 0.5)] * 2,
                                                                               dtype=[("a", "f8"), ("b", "f8")])}):
        with loompy.connect(a) as ds, pytest.raises(loompy.LoomValueError):
            ds.add_columns({"": m, "x": m.astype(np.int32)}, {"CellID": ["c0", "c1"], "N": [2, 3], **attrs},
                           fill_values="auto")
        assert digest(a) == before
    with h5py.File(a, "r+") as f:  # a flag as h5py stores numpy bool
        f.create_dataset("col_attrs/Flag", data=np.array([True, False]), maxshape=(None,))
    with loompy.connect(a) as ds:
        ds.add_columns({"": m, "x": m.astype(np.int32)}, {"CellID": ["c0", "c1"], "N": [2, 3], "Flag": [0, 1]},
                       fill_values="auto")
        assert ds.ca.Flag.tolist() == [True, False, False, True] and ds.ca.X.tolist()[:2] == [2**60 + 1, 5]


def test_joined_float_attributes_are_not_rounded(tmp_path):
    """A float32 attribute followed by float64 values becomes float64: no value is rounded."""
    m = np.ones((4, 2), np.float32)
    a = make(tmp_path / "a.loom", m, cells=["a0", "a1"])
    b = make(tmp_path / "b.loom", m, cells=["b0", "b1"])
    with loompy.connect(a) as ds:
        ds.ca.X = np.array([0.5, 1.5], np.float32)
    with loompy.connect(b) as ds:
        ds.ca.X = np.array([0.1, 16777217.0])
    loompy.combine([a, b], tmp_path / "ab.loom")
    with loompy.connect(tmp_path / "ab.loom", "r") as ds:
        assert ds.ca.X.dtype == np.float64 and ds.ca.X.tolist() == [0.5, 1.5, 0.1, 16777217.0]
    with loompy.connect(a) as ds:
        ds.add_loom(b)
        assert ds.ca.X.dtype == np.float64 and ds.ca.X.tolist() == [0.5, 1.5, 0.1, 16777217.0]


def test_convert_attrs_chains_and_keeps_a_files_own_columns(tmp_path):
    m = np.ones((4, 2), np.float32)
    paths = [make(tmp_path / f"{x}.loom", m, cells=[f"{x}0", f"{x}1"]) for x in "abc"]
    for path, title in zip(paths, "ABC"):
        with loompy.connect(path) as ds:
            ds.attrs.title, ds.attrs.n = title, 1 if title == "A" else 1.0  # 1 and 1.0 are the same value
    with loompy.connect(paths[1]) as ds:
        ds.ca.title = np.array(["b0", "b1"])  # b's own column values win over its file attribute
    out = tmp_path / "abc.loom"
    loompy.combine(paths, out, convert_attrs=True)
    with loompy.connect(out, "r") as ds:
        assert list(ds.ca.title) == ["A", "A", "b0", "b1", "C", "C"] and ds.attrs.n == 1 and "n" not in ds.ca
    with loompy.connect(paths[0]) as ds:  # one file after another: the column attribute grows each time
        ds.add_loom(paths[2], convert_attrs=True)
        ds.add_loom(paths[1], convert_attrs=True)
        assert list(ds.ca.title) == ["A", "A", "C", "C", "b0", "b1"] and "title" not in ds.attrs
    empty = tmp_path / "new.loom"
    with loompy.new(empty) as ds:  # an empty file takes the other's rows
        ds.add_loom(paths[2])
        assert ds.shape == (4, 2)


def test_auto_fill_of_a_compound_column_attribute(tmp_path):
    counts = np.ones((5, 3), np.float32)
    path = make(tmp_path / "a.loom", counts, extra={"": counts})
    with loompy.connect(path) as ds:
        xy = np.zeros(3, dtype=[("x", "f8"), ("y", "f8")])
        xy["x"] = [1, 2, 3]
        ds.ca["Embedding"] = xy
        ds.add_columns({"": np.ones((5, 2), np.float32)}, {"CellID": ["x", "y"], "N": [3, 4]}, fill_values="auto")
        assert ds.ca.Embedding["x"].tolist() == [1, 2, 3, 0, 0] and ds.ca.Embedding.dtype == xy.dtype
        with pytest.raises(loompy.LoomValueError, match="Embedding"):
            ds.add_columns({"": np.ones((5, 1), np.float32)}, {"CellID": ["z"], "N": [5]},
                           fill_values={"Embedding": "none"})


def test_combine_refuses_column_attributes_that_differ_in_kind(tmp_path):
    m = np.ones((4, 3), np.float32)
    a, b = (make(tmp_path / f"{x}.loom", m, cells=[f"{x}{j}" for j in range(3)]) for x in "ab")
    for path, fields in ((a, ("x", "y")), (b, ("x", "z"))):
        with loompy.connect(path) as ds:
            ds.ca["E"] = np.zeros(3, dtype=[(fields[0], "f8"), (fields[1], "f8")])
    with pytest.raises(loompy.LoomValueError, match="'E'"):
        loompy.combine([a, b], tmp_path / "ab.loom")
    assert not (tmp_path / "ab.loom").exists()
    before = digest(a)
    with loompy.connect(a) as ds, pytest.raises(loompy.LoomValueError, match="'E'"):
        ds.add_loom(b)
    assert digest(a) == before


def test_first_add_columns_on_new_file_defines_rows(tmp_path):
    path = tmp_path / "n.loom"
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    with loompy.new(path) as ds:
        ds.add_columns(m, {"CellID": list("abcd")}, row_attrs={"Gene": ["x", "y", "z"]})
        ds.add_columns(m + 1, {"CellID": list("efgh")})
        assert ds.shape == (3, 8)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m + 1]))
        assert list(ds.ra.Gene) == ["x", "y", "z"] and "".join(ds.ca.CellID) == "abcdefgh"

@pytest.mark.parametrize("write", ["ca", "ra", "ca empty", "ca set"])
def test_attributes_before_the_first_columns_are_refused(tmp_path, write):
    """A file from new() has no rows or columns yet: attributes set then had no length to agree with,
    left a file connect refused, or one whose first columns did not match them. Refused, file unchanged."""
    path = tmp_path / "n.loom"
    loompy.new(path).close()
    before = digest(path)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match=r"n\.loom: column attribute 'X'.*no matrix yet"
                           if write != "ra" else r"n\.loom: row attribute 'X'.*no matrix yet"):
            if write == "ca":
                ds.ca.X = np.arange(5)
            elif write == "ra":
                ds.ra["X"] = np.arange(3)
            elif write == "ca empty":
                ds.ca.X = []
            else:
                ds.ca.set("X", np.arange(7), dtype="int64")
        assert ds.shape == (0, 0) and "X" not in ds.ca and "X" not in ds.ra
    assert digest(path) == before
    with loompy.connect(path) as ds:  # still an empty Loom file; its first columns define everything
        ds.add_columns(np.ones((3, 7), np.float32), {"Y": np.arange(7)}, row_attrs={"g": np.arange(3)})
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (3, 7) and list(ds.ca.keys()) == ["Y"] and ds.ra.g.tolist() == [0, 1, 2]



def test_add_loom_aligns_rows_by_key_and_carries_graphs(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.random((6, 5)).astype(np.float32)
    b = rng.random((6, 3)).astype(np.float32)
    genes = [f"g{i}" for i in range(6)]
    perm = np.array([3, 0, 5, 1, 4, 2])
    pa = make(tmp_path / "a.loom", a, genes=genes)
    pb = make(tmp_path / "b.loom", b[perm], genes=[genes[i] for i in perm], cells=["x", "y", "z"],
              extra={"": b[perm], "x": (b[perm] * 2).astype(np.int32)})
    with loompy.connect(pa) as ds:
        ds.add_loom(pb, key="Gene", batch_size=2, include_graphs=True)
        np.testing.assert_array_equal(ds[:, :], np.hstack([a, b]))
        assert list(ds.ca.CellID[-3:]) == ["x", "y", "z"]
        g = ds.col_graphs["knn"].toarray()
        assert g[0, 1] == 1 and g[5, 6] == 1 and g.sum() == 4
        with pytest.raises(ValueError):
            ds.add_loom(make(tmp_path / "c.loom", np.ones((4, 2), np.float32)))


def test_combine_matches_numpy_and_reference_size(tmp_path):
    rng = np.random.default_rng(8)
    mats = [rng.poisson(0.3, size=(200, k)).astype(np.float32) for k in (150, 90, 60)]
    paths = [make(tmp_path / f"in{i}.loom", m, cells=[f"f{i}c{j}" for j in range(m.shape[1])])
             for i, m in enumerate(mats)]
    out = tmp_path / "all.loom"
    loompy.combine(paths, out, key="Gene", file_attrs={"title": "all"})
    with loompy.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack(mats))
        assert ds.shape == (200, 300) and ds.attrs.title == "all"
        assert list(ds.ca.CellID[:2]) == ["f0c0", "f0c1"] and ds.ca.N[-1] == 59
        assert ds.layers["x"].dtype == np.int32
    assert out.stat().st_size <= sum(p.stat().st_size for p in paths)
    sel_out = tmp_path / "sel.loom"
    loompy.combine_faster(paths[:2], sel_out, selections=[np.arange(150) < 10, [0, 5]], skip_attrs=["N"])
    with loompy.connect(sel_out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack([mats[0][:, :10], mats[1][:, [0, 5]]]))
        assert "N" not in ds.ca
    with pytest.raises(ValueError):
        loompy.combine([paths[0], make(tmp_path / "odd.loom", np.ones((5, 2), np.float32))], tmp_path / "x.loom")
    assert not (tmp_path / "x.loom").exists()


def test_combine_keeps_the_first_files_attributes_under_file_attrs(tmp_path):
    """combine (as loompy 3's) sets file_attrs over the first file's global attributes;
    combine_faster (as loompy 3's) takes file_attrs alone."""
    paths = [make(tmp_path / f"{n}.loom", np.ones((4, 3), np.float32)) for n in "ab"]
    for path, description in zip(paths, ("first", "second")):
        with loompy.connect(path) as ds:
            ds.attrs.title, ds.attrs.description = "old", description
    with h5py.File(paths[0], "r+") as f:  # (a date no new file gets)
        f["attrs/CreationDate"][()] = b"20171005T094012.123456Z"
    loompy.combine(paths, tmp_path / "c.loom", file_attrs={"title": "combined"})
    with loompy.connect(tmp_path / "c.loom", "r") as ds:
        assert (ds.attrs.title, ds.attrs.description) == ("combined", "first")
        assert ds.attrs.CreationDate == "20171005T094012.123456Z"  # (loompy 3 copies the first file)
    loompy.combine_faster(paths, tmp_path / "f.loom", file_attrs={"title": "combined"})
    with loompy.connect(tmp_path / "f.loom", "r") as ds:
        assert ds.attrs.title == "combined" and "description" not in ds.attrs
        assert ds.attrs.CreationDate != "20171005T094012.123456Z"  # (a new file, as loompy 3's new())


def test_combine_output_reads_zero_where_chunks_are_never_written(tmp_path):
    """A first input stored with fill_time='never' is not copied as it is: the output's unwritten
    (all-zero) chunks must read as 0 in any reader, including HDF5 reading into a used buffer."""
    a = np.arange(70 * 64, dtype=np.float32).reshape(70, 64) + 1
    b = np.zeros((70, 128), np.float32)
    b[:, 100] = 1
    paths = [make(tmp_path / "a.loom", a), make(tmp_path / "b.loom", b)]
    with h5py.File(paths[0], "r+") as f:  # the same values, stored by a writer that never fills
        del f["matrix"]
        f.create_dataset("matrix", data=a, chunks=(64, 64), maxshape=(70, None), compression="gzip",
                         compression_opts=2, fillvalue=0, fill_time="never")
    loompy.combine(paths, tmp_path / "out.loom")
    with h5py.File(tmp_path / "out.loom", "r") as f:
        buffer = np.full(f["matrix"].shape, 123, np.float32)
        f["matrix"].read_direct(buffer)
    np.testing.assert_array_equal(buffer, np.hstack([a, b]))


def test_combine_files_without_rows(tmp_path):
    """Inputs of 0 rows (widths that do not line up with the chunks) combine to 0 rows."""
    paths = [make(tmp_path / f"{k}.loom", np.zeros((0, k), np.float32), genes=[]) for k in (10, 70)]
    loompy.combine(paths, tmp_path / "out.loom")
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        assert ds.shape == (0, 80) and ds.layers["x"].shape == (0, 80)


def test_combine_keeps_64_bit_integers_exact(tmp_path):
    """int64 with uint64 (numpy: float64) must not round integers past 2**53: an integer dtype that
    holds the values is used, or the combination is refused; small values keep numpy's dtype."""
    big = np.full((4, 3), 2**62 + 1, dtype=np.int64)
    unsigned = np.arange(12, dtype=np.uint64).reshape(4, 3)
    layers = [{"": big, "x": big}, {"": unsigned, "x": unsigned}]
    paths = [make(tmp_path / f"{k}.loom", m[""], extra=m) for k, m in enumerate(layers)]
    loompy.combine(paths, tmp_path / "out.loom")
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        assert ds.layers[""].dtype == np.int64
        np.testing.assert_array_equal(ds[:, :], np.hstack([big, unsigned.astype(np.int64)]))
    fractions = np.full((4, 3), 0.5)
    mixed = make(tmp_path / "f.loom", fractions, extra={"": fractions, "x": fractions})
    with pytest.raises(loompy.LoomValueError, match="layer '.*': no dtype holds every input's values exactly"):
        loompy.combine([paths[0], mixed], tmp_path / "bad.loom")
    assert not (tmp_path / "bad.loom").exists()
    small = make(tmp_path / "s.loom", np.ones((4, 3), np.int64), extra={"": np.ones((4, 3), np.int64),
                                                                      "x": np.ones((4, 3), np.int64)})
    loompy.combine([small, mixed], tmp_path / "fine.loom")  # integers a float64 holds exactly: float64
    with loompy.connect(tmp_path / "fine.loom", "r") as ds:
        assert ds.layers[""].dtype == np.float64 and ds[0, :].tolist() == [1, 1, 1, 0.5, 0.5, 0.5]


def test_combine_keeps_every_input_value_when_dtypes_differ(tmp_path):
    """Each output layer takes the dtype numpy would concatenate the inputs in; nothing is cut."""
    rng = np.random.default_rng(12)
    counts = rng.integers(0, 60000, size=(70, 40)).astype(np.uint16)
    fractions = rng.random((70, 30)) * 10
    paths = [make(tmp_path / "u16.loom", counts, cells=[f"a{j}" for j in range(40)]),
             make(tmp_path / "f64.loom", fractions, cells=[f"b{j}" for j in range(30)])]
    out = tmp_path / "mixed.loom"
    loompy.combine(paths, out)
    with loompy.connect(out, "r") as ds:
        assert ds.layers[""].dtype == np.float64 and ds.layers["x"].dtype == np.int32
        np.testing.assert_array_equal(ds[:, :], np.hstack([counts, fractions]))
    loompy.combine(paths[::-1], out)  # the first input is no longer the widest type
    with loompy.connect(out, "r") as ds:
        assert ds.layers[""].dtype == np.float64
        np.testing.assert_array_equal(ds[:, :], np.hstack([fractions, counts]))


def test_combine_starts_from_a_copy_of_a_first_input_stored_alike(tmp_path, monkeypatch):
    """HDF5 copies the first input's chunks itself when it is stored as the output will be; an
    input stored otherwise (another gzip level, other chunks) is rewritten in the output's layout."""
    import importlib

    combine_module = importlib.import_module("loompy.combine")
    held = []
    concatenate = combine_module._concatenate_layer

    def spy(dst, sources, already=0, second=None):
        held.append(already)  # the leading columns already in place: the copy of the first input's
        return concatenate(dst, sources, already, second)

    monkeypatch.setattr(combine_module, "_concatenate_layer", spy)
    rng = np.random.default_rng(9)
    mats = [rng.poisson(0.3, size=(150, k)).astype(np.float32) for k in (100, 70)]
    paths = [make(tmp_path / f"in{i}.loom", m, cells=[f"f{i}c{j}" for j in range(m.shape[1])])
             for i, m in enumerate(mats)]
    with h5py.File(paths[0], "r+") as f:
        f["matrix"].attrs["stray"] = "not for the output"
    odd = tmp_path / "odd.loom"  # the same values, stored with other chunks and another gzip level
    with h5py.File(paths[0], "r") as src, h5py.File(odd, "w") as dst:
        for key in src:
            src.copy(src[key], dst, name=key)
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        del dst["matrix"]
        dst.create_dataset("matrix", data=mats[0], chunks=(32, 32), compression="gzip", compression_opts=5,
                           maxshape=(150, None))
    for first, expect_held in ((paths[0], 100), (odd, 0)):
        held.clear()
        loompy.combine([first, paths[1]], tmp_path / "out.loom")
        assert held[0] == expect_held  # the main matrix
        with loompy.connect(tmp_path / "out.loom", "r") as ds:
            np.testing.assert_array_equal(ds[:, :], np.hstack(mats))
            np.testing.assert_array_equal(ds["x"][:, :], (np.hstack(mats) * 2).astype(np.int32))
        with h5py.File(tmp_path / "out.loom", "r") as f:
            assert f["matrix"].chunks == (64, 64) and f["matrix"].compression_opts == 2
            assert f["matrix"].maxshape == (150, None) and set(f["matrix"].attrs) == {"last_modified"}
        os.remove(tmp_path / "out.loom")


def test_combine_reads_a_first_file_open_for_writing_through_hdf5(tmp_path):
    """A first input open for writing in this process (its bytes on disk may lag what HDF5 holds:
    here, a value not yet flushed) gives the output what HDF5 reads, that value included."""
    rng = np.random.default_rng(5)
    m = rng.poisson(0.3, size=(150, 100)).astype(np.float32)
    second = make(tmp_path / "second.loom", m)
    writing = make(tmp_path / "writing.loom", m)
    with h5py.File(writing, "r+") as f:
        f["matrix"][0, 0] = 42.0  # not flushed yet
        loompy.combine([writing, second], tmp_path / "out.loom")
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        assert ds[0, 0] == 42.0 and ds.shape == (150, 200)


def test_permute_keeps_what_else_the_layers_group_holds(tmp_path):
    """Objects in the layers group that are not layers (a subgroup, an attribute) are kept as they are."""
    m = np.arange(40, dtype=np.float32).reshape(4, 10)
    path = make(tmp_path / "p.loom", m)
    with h5py.File(path, "r+") as f:
        f["layers"].create_group("sub")["x"] = np.arange(3)
        f["layers"].attrs["note"] = "kept"
    with loompy.connect(path) as ds:
        assert ds.layers.keys() == ["", "x"]
        ds.permute(np.arange(10)[::-1], axis=1)
        np.testing.assert_array_equal(ds[:, :], m[:, ::-1])
    with h5py.File(path, "r") as f:
        assert list(f["layers/sub/x"][:]) == [0, 1, 2] and f["layers"].attrs["note"] == "kept"


def test_create_append(tmp_path):
    path = tmp_path / "ca.loom"
    m = np.ones((3, 2), np.float32)
    loompy.create_append(path, m, {"Gene": list("abc")}, {"CellID": ["1", "2"]})
    loompy.create_append(path, m * 2, {"Gene": list("abc")}, {"CellID": ["3", "4"]})
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m * 2]))


@pytest.mark.parametrize("axis", [0, 1])
def test_permute_everything_consistently(tmp_path, axis):
    rng = np.random.default_rng(9)
    m = rng.random((80, 70)).astype(np.float32)
    path = make(tmp_path / "p.loom", m)
    with loompy.connect(path) as ds:
        ds.row_graphs["net"] = sp.coo_matrix((np.array([7.0]), ([0], [79])), shape=(80, 80))
        order = rng.permutation(m.shape[axis])
        before_graph = (ds.row_graphs if axis == 0 else ds.col_graphs)["net" if axis == 0 else "knn"].toarray()
        ds.permute(order, axis=axis)
        expected = m[order] if axis == 0 else m[:, order]
        np.testing.assert_array_equal(ds[:, :], expected)
        np.testing.assert_array_equal(ds["x"][:, :], (expected * 2).astype(np.int32))
        attrs = ds.ra if axis == 0 else ds.ca
        name = "Gene" if axis == 0 else "CellID"
        np.testing.assert_array_equal(attrs[name], np.array([f"{name[0].lower()}{i}" for i in order]))
        graph = (ds.row_graphs if axis == 0 else ds.col_graphs)["net" if axis == 0 else "knn"].toarray()
        np.testing.assert_array_equal(graph, before_graph[np.ix_(order, order)])
        with pytest.raises(ValueError):
            ds.permute(np.zeros(m.shape[axis], dtype=int), axis=axis)
        with pytest.raises(ValueError):
            ds.permute(order[:-1], axis=axis)
    assert loompy.LoomValidator().validate(path)


@pytest.mark.parametrize("axis", [0, 1])
def test_permute_in_many_strips(tmp_path, monkeypatch, axis):
    """Write tasks small enough that both workers read, gather and compress at once, each in its own
    reused buffers."""
    from loompy.engine import write

    monkeypatch.setattr(write, "TASK_BYTES", 64 * 300 * 4)  # one chunk row or column per task
    monkeypatch.setattr(importlib.import_module("loompy.engine.processes"), "MIN_CHUNKS", 10 ** 12)  # (threads)
    compressor, slowed = write.codecs.compressor, []

    def slow_compressor(level):  # workers lag behind, so a buffer reused too early would show
        deflate = compressor(level)
        return lambda raw: slowed.append(1) or time.sleep(0.002) or deflate(raw)

    monkeypatch.setattr(write.codecs, "compressor", slow_compressor)
    rng = np.random.default_rng(11)
    m = ((rng.random((300, 330)) < 0.2) * rng.integers(1, 50, (300, 330))).astype(np.float32)
    m[:, 128:192] = 0  # whole chunks of zeros, to be left unallocated
    path = make(tmp_path / "s.loom", m)
    order = rng.permutation(m.shape[axis])
    with loompy.connect(path) as ds:
        ds.permute(order, axis=axis)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m[order] if axis == 0 else m[:, order])
        np.testing.assert_array_equal(ds["x"][:, :], ((m[order] if axis == 0 else m[:, order]) * 2).astype(np.int32))
    assert len(slowed) > 20


def test_combine_in_many_strips(tmp_path, monkeypatch):
    """Unaligned inputs are gathered by both workers at once, each into its own reused buffer."""
    from loompy.engine import write

    monkeypatch.setattr(write, "TASK_BYTES", 64 * 300 * 4)  # one chunk column per task
    tiles = write._tiles

    def slow_tiles(*args):  # workers lag behind, so a buffer reused too early would show
        time.sleep(0.02)
        return tiles(*args)

    monkeypatch.setattr(write, "_tiles", slow_tiles)
    rng = np.random.default_rng(12)
    parts = [((rng.random((300, n)) < 0.2) * rng.integers(1, 50, (300, n))).astype(np.float32) for n in (100, 230)]
    paths = [make(tmp_path / f"in{k}.loom", m, cells=[f"c{k}_{i}" for i in range(m.shape[1])])
             for k, m in enumerate(parts)]
    loompy.combine(paths, tmp_path / "out.loom")
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack(parts))


def test_overwrites_then_repack_reclaims_space(tmp_path):
    m = np.random.default_rng(2).random((300, 300)).astype(np.float32)
    path = make(tmp_path / "r.loom", m)
    for i in range(5):  # HDF5 forgets freed space when the file closes: each session leaks it
        with loompy.connect(path) as ds:
            ds.layers[f"tmp{i}"] = m.astype(np.float64) + i
            ds.ra[f"after{i}"] = np.arange(300)  # written after the layer: its space is not at the end
        with loompy.connect(path) as ds:
            del ds.layers[f"tmp{i}"]
    grown = path.stat().st_size
    with h5py.File(path, "r") as f:
        before = {k: f[k][()] for k in ("matrix", "layers/x", "row_attrs/Gene")}
    loompy.repack(path)
    assert path.stat().st_size < grown * 0.6
    with h5py.File(path, "r") as f:
        for k, v in before.items():
            np.testing.assert_array_equal(f[k][()], v)
    assert loompy.LoomValidator().validate(path)


def test_whole_file_writes_give_ordinary_permissions(tmp_path):
    """The temporary file behind an atomic write must not leave its private 0600 mode on the result."""
    old = os.umask(0o022)
    try:
        m = np.arange(12, dtype=np.float32).reshape(3, 4)
        path = make(tmp_path / "mode.loom", m)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        loompy.combine([path, path], tmp_path / "both.loom")
        assert stat.S_IMODE((tmp_path / "both.loom").stat().st_mode) == 0o644
        path.chmod(0o640)  # rewriting an existing file keeps the mode its owner chose
        with loompy.connect(path) as ds:
            ds.permute([1, 0, 2], axis=0)
        loompy.repack(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_combine_mixed_attribute_types_needs_convert_attrs(tmp_path):
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    a = make(tmp_path / "a.loom", m, cells=["x", "y", "z", "w"])
    b = tmp_path / "b.loom"
    loompy.create(b, {"": m, "x": (m * 2).astype(np.int32)}, {"Gene": ["g0", "g1", "g2"]},
                  {"CellID": [1, 2, 3, 4], "N": np.arange(4)}).close()
    with pytest.raises(ValueError, match="CellID.*convert_attrs"):
        loompy.combine([a, b], tmp_path / "ab.loom")
    assert not (tmp_path / "ab.loom").exists()
    loompy.combine([a, b], tmp_path / "ab.loom", convert_attrs=True)
    with loompy.connect(tmp_path / "ab.loom", "r") as ds:
        assert list(ds.ca.CellID) == ["x", "y", "z", "w", "1", "2", "3", "4"]
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m]))


def test_appended_column_attributes_are_not_read_again_unless_they_must_be_rewritten(tmp_path, monkeypatch):
    """Values that fit after the stored ones are appended without reading those (an add_loom in
    batches read them all for every batch: 80,000 columns took 1.5 s, 320,000 about 24 s); values
    that change the stored dtype rewrite the attribute, every value kept."""
    rng = np.random.default_rng(8)
    m = rng.integers(0, 5, size=(20, 30)).astype(np.float32)
    path = make(tmp_path / "a.loom", m)
    encoding, growing = importlib.import_module("loompy.encoding"), importlib.import_module("loompy.growing")
    reads, read_values, stored_values = [], encoding.read_values, growing._stored_values
    monkeypatch.setattr(encoding, "read_values", lambda d, *a: reads.append(d.name) or read_values(d, *a))
    def spy(ds, dataset, count=None):
        if count is None:  # (a one-value sample is not a read of them all)
            reads.append(dataset.name)
        return stored_values(ds, dataset, count)

    monkeypatch.setattr(growing, "_stored_values", spy)
    with loompy.connect(path) as ds:
        ds.add_columns({"": m[:, :5], "x": m[:, :5].astype(np.int32)},
                       {"CellID": [f"n{i}" for i in range(5)], "N": np.arange(5, dtype=np.int16)})
        assert not [r for r in reads if r.startswith("/col_attrs")]
        ds.add_columns({"": m[:, :2], "x": m[:, :2].astype(np.int32)},
                       {"CellID": ["p0", "p1"], "N": np.array([0.5, 2 ** 60])})  # float64: N is rewritten
        assert "/col_attrs/N" in reads and "/col_attrs/CellID" not in reads
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID.tolist() == [f"c{i}" for i in range(30)] + [f"n{i}" for i in range(5)] + ["p0", "p1"]
        assert ds.ca.N.dtype == np.float64
        assert ds.ca.N.tolist() == [*range(30), *range(5), 0.5, 2.0 ** 60]
        assert ds.ca.N.size == ds.shape[1] == 37


def test_columns_added_to_a_file_without_column_attributes_or_with_a_short_one(tmp_path):
    """No col_attrs group at all (valid Loom): columns go in. A column attribute shorter than the
    matrix (a damaged file opened with validate=False): refused, nothing written."""
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "a.loom"
    loompy.create(path, m, {"Gene": ["a", "b", "c"]}, {"N": np.arange(4)}).close()
    with h5py.File(path, "r+") as f:
        del f["col_attrs"]
    with loompy.connect(path) as ds:
        ds.add_columns(m[:, :2], {})
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m[:, :2]]))
    loompy.create(path, m, {"Gene": ["a", "b", "c"]}, {"N": np.arange(4)}).close()
    with h5py.File(path, "r+") as f:
        f["col_attrs/N"].resize((3,))
    before = digest(path)
    with loompy.connect(path, validate=False) as ds:
        with pytest.raises(loompy.LoomFormatError, match="column attribute 'N' has 3 values for 4 columns"):
            ds.add_columns(m[:, :2], {"N": [7, 8]})
    assert digest(path) == before


def test_a_new_file_takes_the_other_file_s_rows_whole(tmp_path):
    """new() then add_loom(other): the rows came without their attributes (no Gene) and graphs."""
    m = np.arange(24, dtype=np.float32).reshape(4, 6)
    other = make(tmp_path / "other.loom", m, genes=["a", "b", "c", "d"])
    with loompy.connect(other) as ds:
        ds.row_graphs["net"] = sp.coo_matrix(([1.0, 2.0], ([0, 3], [1, 2])), shape=(4, 4))
    with loompy.new(tmp_path / "new.loom") as ds:
        ds.add_loom(other, batch_size=4)  # (two batches: the rows come with the first)
    with loompy.connect(tmp_path / "new.loom", "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        assert list(ds.ra.Gene) == ["a", "b", "c", "d"] and ds.row_graphs["net"].nnz == 2
        assert list(ds.ca.CellID) == [f"c{i}" for i in range(6)]
    with loompy.create(tmp_path / "none.loom", np.zeros((4, 0), np.float32), {"Gene": list("abcd")}, {}) as ds:
        ds.row_graphs["net"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(4, 4))
    with loompy.new(tmp_path / "still.loom") as ds:  # no columns to take: the file stays empty (it failed)
        ds.add_loom(tmp_path / "none.loom")
        assert ds.shape == (0, 0) and ds.row_graphs.keys() == []


def test_combine_keeps_every_input_s_column_graphs(tmp_path):
    """combine dropped column graphs (loompy 3 kept the first file's): each input's graph now lands
    on its columns in the output, renumbered for selections; one graph per name."""
    a = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))  # knn: 0 -> 1, 1 -> 0
    b = make(tmp_path / "b.loom", np.ones((3, 3), np.float32), cells=["x", "y", "z"])
    with loompy.connect(b) as ds:
        ds.col_graphs["knn"] = sp.coo_matrix(([5.0, 6.0], ([0, 2], [2, 1])), shape=(3, 3))
        ds.col_graphs["only_b"] = sp.coo_matrix(([7.0], ([1], [2])), shape=(3, 3))
    loompy.combine([a, b], tmp_path / "ab.loom")
    with loompy.connect(tmp_path / "ab.loom", "r") as ds:
        knn = ds.col_graphs["knn"]
        assert sorted(zip(knn.row.tolist(), knn.col.tolist(), knn.data.tolist())) == \
            [(0, 1, 1.0), (1, 0, 1.0), (4, 6, 5.0), (6, 5, 6.0)]
        only = ds.col_graphs["only_b"]
        assert knn.shape == only.shape == (7, 7) and list(zip(only.row, only.col)) == [(5, 6)]
    loompy.combine_faster([a, b], tmp_path / "sel.loom", selections=[[1, 0], [2, 1]])  # (in the order given)
    with loompy.connect(tmp_path / "sel.loom", "r") as ds:
        knn = ds.col_graphs["knn"]
        assert sorted(zip(knn.row.tolist(), knn.col.tolist())) == [(0, 1), (1, 0), (2, 3)]


def test_combine_fills_layers_a_file_lacks_with_zeros(tmp_path):
    """loompy 3's combine_faster documents zeros for "values in layers missing from one or more
    files"; ours refused such files. Each layer is in the output; a file without it gives zeros."""
    m1 = np.arange(12, dtype=np.float32).reshape(3, 4)
    m2 = np.arange(9, dtype=np.float32).reshape(3, 3) + 100
    a = make(tmp_path / "a.loom", m1, extra={"": m1, "x": (m1 * 2).astype(np.int32)})
    b = make(tmp_path / "b.loom", m2, cells=["x", "y", "z"], extra={"": m2, "y": m2 + 0.5})
    for combine in (loompy.combine, loompy.combine_faster):
        out = tmp_path / f"{combine.__name__}.loom"
        combine([a, b], out)
        with loompy.connect(out, "r") as ds:
            assert sorted(ds.layers.keys()) == ["", "x", "y"]
            np.testing.assert_array_equal(ds[:, :], np.hstack([m1, m2]))
            np.testing.assert_array_equal(ds.layers["x"][:, :], np.hstack([m1 * 2, np.zeros((3, 3))]))
            np.testing.assert_array_equal(ds.layers["y"][:, :], np.hstack([np.zeros((3, 4)), m2 + 0.5]))
            assert ds.layers["x"].dtype == np.int32 and ds.layers["y"].dtype == np.float32
    loompy.combine_faster([b, a], tmp_path / "ba.loom", selections=[[2, 0], None])
    with loompy.connect(tmp_path / "ba.loom", "r") as ds:
        np.testing.assert_array_equal(ds.layers["x"][:, :], np.hstack([np.zeros((3, 2)), m1 * 2]))


def test_a_new_column_attribute_without_fill_names_the_columns_that_lack_it(tmp_path):
    """The message said the *new* columns had no values, when the file's existing ones lack them."""
    path = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    before = digest(path)
    with loompy.connect(path) as ds, pytest.raises(loompy.LoomValueError,
                                                   match="'Batch' has no values for the file's existing columns"):
        ds.add_columns({"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)},
                       {"CellID": ["n"], "N": [9], "Batch": ["b2"]}, fill_values={"Other": 0})
    assert digest(path) == before
    with loompy.connect(path) as ds:
        ds.add_columns({"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)},
                       {"CellID": ["n"], "N": [9], "Batch": ["b2"]}, fill_values={"Batch": "b1"})
        assert list(ds.ca.Batch) == ["b1"] * 4 + ["b2"]


@pytest.mark.reference
def test_convert_attrs_keeps_numbers_numbers_as_the_reference(tmp_path, reference):
    """A numeric file attribute only some inputs have became text ('3.5', ''); loompy 3 makes it a
    number column, 0 where a file had none."""
    for i, extra in enumerate([{"score": 3.5, "t": "a"}, {"t": "b"}]):
        loompy.create(tmp_path / f"in{i}.loom", np.ones((2, 2), np.float32), {"g": [1, 2]}, {"c": [1, 2]},
                      file_attrs=extra).close()
    inputs = [str(tmp_path / "in0.loom"), str(tmp_path / "in1.loom")]
    copies = [shutil.copy(p, p + ".ref.loom") for p in inputs]  # (loompy 3 opens inputs r+ and writes to them)
    theirs = reference.run("""
        import sys, json, loompy
        loompy.combine(sys.argv[1:3], sys.argv[3], convert_attrs=True)
        with loompy.connect(sys.argv[3], "r") as ds:
            print(json.dumps({"score": ds.ca.score.tolist(), "kind": ds.ca.score.dtype.kind, "t": list(ds.ca.t)}))
    """, *copies, str(tmp_path / "theirs.loom"))
    loompy.combine(inputs, tmp_path / "ours.loom", convert_attrs=True)
    with loompy.connect(tmp_path / "ours.loom", "r") as ds:
        assert {"score": ds.ca.score.tolist(), "kind": ds.ca.score.dtype.kind, "t": list(ds.ca.t)} == theirs
    assert theirs["score"] == [3.5, 3.5, 0.0, 0.0]


@pytest.mark.reference
def test_convert_attrs_fills_a_zero_of_the_values_own_type_as_the_reference(tmp_path, reference):
    """A missing numeric file attribute was filled with a plain 0, which widened the column: uint64
    2**64-1 became float64 (its value lost), float32 float64, int8 int64."""
    values = {"big": np.uint64(2**64 - 1), "f": np.float32(1.5), "small": np.int8(-3)}
    loompy.create(tmp_path / "in0.loom", np.ones((2, 2), np.float32), {"g": [1, 2]}, {"c": [1, 2]},
                  file_attrs=values).close()
    loompy.create(tmp_path / "in1.loom", np.ones((2, 3), np.float32), {"g": [1, 2]}, {"c": [3, 4, 5]}).close()
    inputs = [str(tmp_path / "in0.loom"), str(tmp_path / "in1.loom")]
    copies = [shutil.copy(p, p + ".ref.loom") for p in inputs]  # (loompy 3 opens inputs r+ and writes to them)
    theirs = reference.run("""
        import sys, json, loompy
        loompy.combine(sys.argv[1:3], sys.argv[3], convert_attrs=True)
        with loompy.connect(sys.argv[3], "r") as ds:
            print(json.dumps({k: [str(ds.ca[k].dtype), [str(v) for v in ds.ca[k]]] for k in ("big", "f", "small")}))
    """, *copies, str(tmp_path / "theirs.loom"))
    assert theirs["big"] == ["uint64", [str(2**64 - 1)] * 2 + ["0"] * 3]
    loompy.combine(inputs, tmp_path / "ours.loom", convert_attrs=True)
    with loompy.connect(tmp_path / "ours.loom", "r") as ds:
        assert {k: [str(ds.ca[k].dtype), [str(v) for v in ds.ca[k]]] for k in ("big", "f", "small")} == theirs
    with loompy.connect(tmp_path / "in1.loom") as ds:  # add_loom shares the conversion
        ds.add_loom(inputs[0], convert_attrs=True)
        assert str(ds.ca.big.dtype) == "uint64" and ds.ca.big.tolist() == [0] * 3 + [2**64 - 1] * 2
        assert str(ds.ca.f.dtype) == "float32" and str(ds.ca.small.dtype) == "int8"


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_add_loom_and_combine_refuse_a_batch_size_that_is_not_a_positive_count(tmp_path, size):
    """add_loom(batch_size=-1) added nothing and returned; 0 raised range()'s bare message."""
    a = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    b = make(tmp_path / "b.loom", np.ones((3, 2), np.float32))
    before = digest(a)
    with loompy.connect(a) as ds, pytest.raises(loompy.LoomValueError, match=r"a\.loom: add_loom\(batch_size"):
        ds.add_loom(b, batch_size=size)
    assert digest(a) == before
    with pytest.raises(loompy.LoomValueError, match=r"ab\.loom: combine\(batch_size"):
        loompy.combine([a, b], tmp_path / "ab.loom", batch_size=size)
    assert not (tmp_path / "ab.loom").exists()


@pytest.mark.parametrize("axis", [0, 1])
def test_permute_and_rewrites_keep_the_users_hdf5_attributes_and_graph_storage(tmp_path, axis):
    """permute dropped HDF5 attributes users put on the permuted axis's attributes and graphs (and
    what else a graph group held), and stored graphs contiguous and unable to grow; replacing a graph,
    or an attribute with values of another dtype, dropped the old one's HDF5 attributes."""
    m = np.arange(24, dtype=np.float32).reshape(4, 6)
    path = make(tmp_path / "p.loom", m)
    n = m.shape[axis]
    attr_group, graph_group = ("row_attrs", "row_graphs") if axis == 0 else ("col_attrs", "col_graphs")
    name = "Gene" if axis == 0 else "CellID"
    with loompy.connect(path) as ds:
        (ds.row_graphs if axis == 0 else ds.col_graphs)["net"] = sp.coo_matrix(([2.0, 3.0], ([0, 1], [n - 1, 0])),
                                                                                shape=(n, n))
    with h5py.File(path, "r+") as f:
        f[f"{attr_group}/{name}"].attrs["unit"] = "HGNC"
        f[f"{graph_group}/net"].attrs["k"] = 10
        f[f"{graph_group}/net/w"].attrs["kind"] = "distance"
        f[f"{graph_group}/net"]["meta"] = np.arange(3)
        f[graph_group].attrs["note"] = "graphs"
        f[graph_group]["loose"] = np.arange(2)
    order = np.arange(n)[::-1]
    with loompy.connect(path) as ds:
        ds.permute(order, axis=axis)
        graph = (ds.row_graphs if axis == 0 else ds.col_graphs)["net"]
        expected = np.zeros((n, n))
        expected[n - 1, 0], expected[n - 2, n - 1] = 2.0, 3.0
        np.testing.assert_array_equal(graph.toarray(), expected)
    with h5py.File(path, "r") as f:
        assert f[f"{attr_group}/{name}"].attrs["unit"] == "HGNC"
        assert f[f"{graph_group}/net"].attrs["k"] == 10 and f[f"{graph_group}/net/w"].attrs["kind"] == "distance"
        assert list(f[f"{graph_group}/net/meta"][:]) == [0, 1, 2] and list(f[f"{graph_group}/loose"][:]) == [0, 1]
        assert f[graph_group].attrs["note"] == "graphs"
        for part in "abw":
            stored = f[f"{graph_group}/net/{part}"]
            assert stored.chunks and stored.compression == "gzip" and stored.maxshape == (None,)
    with loompy.connect(path) as ds:  # replaced: a graph, an attribute with values of another dtype
        (ds.row_graphs if axis == 0 else ds.col_graphs)["net"] = sp.coo_matrix(np.eye(n))
        (ds.ra if axis == 0 else ds.ca)[name] = np.arange(n)
    with h5py.File(path, "r") as f:
        assert f[f"{graph_group}/net"].attrs["k"] == 10 and f[f"{graph_group}/net/w"].attrs["kind"] == "distance"
        assert f[f"{attr_group}/{name}"].attrs["unit"] == "HGNC" and f[f"{attr_group}/{name}"].dtype.kind == "i"
    assert loompy.LoomValidator().validate(path)


def test_a_graph_replacement_that_fails_leaves_the_old_graph(tmp_path, monkeypatch):
    """The old graph was deleted before the new one was written: a failure in between lost it."""
    path = make(tmp_path / "g.loom", np.ones((3, 4), np.float32))
    with loompy.connect(path) as ds:
        old = ds.col_graphs["knn"].toarray()
        real = loompy.graphs.store_graph

        def failing(parent, name, graph, like=None):
            real(parent, name, graph, like)
            raise OSError("disk full")

        monkeypatch.setattr(loompy.graphs, "store_graph", failing)
        with pytest.raises(OSError, match="disk full"):
            ds.col_graphs["knn"] = sp.coo_matrix(np.eye(4))
        monkeypatch.undo()
        np.testing.assert_array_equal(ds.col_graphs["knn"].toarray(), old)
    with h5py.File(path, "r") as f:
        assert set(f) == {"matrix", "layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs", "attrs"}


@pytest.mark.parametrize("key", [None, "Gene"])
def test_combine_faster_takes_index_selections_in_their_order_with_repeats(tmp_path, key):
    """Index selections were sorted and made unique: [0, 0, 1] and [3, 1] gave a0 a1 b1 b3."""
    rng = np.random.default_rng(5)
    m1, m2 = rng.random((5, 4)).astype(np.float32), rng.random((5, 6)).astype(np.float32)
    a = make(tmp_path / "a.loom", m1)
    genes = ["g3", "g0", "g4", "g1", "g2"]  # (rows of b in another order: aligned by key)
    b = make(tmp_path / "b.loom", m2, genes=genes, cells=[f"b{i}" for i in range(6)])
    selections = [[0, 0, 1], [3, 1, 5, 1]]
    out = tmp_path / "out.loom"
    loompy.combine_faster([a, b], out, selections=selections, key=key)
    aligned = m2[np.argsort(genes)] if key else m2
    with loompy.connect(out, "r") as ds:
        expected = np.hstack([m1[:, selections[0]], aligned[:, selections[1]]])
        np.testing.assert_array_equal(ds[:, :], expected)
        np.testing.assert_array_equal(ds.layers["x"][:, :], (expected * 2).astype(np.int32))
        assert list(ds.ca.CellID) == ["c0", "c0", "c1", "b3", "b1", "b5", "b1"]
    with pytest.raises(loompy.LoomValueError, match="out2.loom: combine_faster got 1 selections for 2 files"):
        loompy.combine_faster([a, b], tmp_path / "out2.loom", selections=[None])
    assert not (tmp_path / "out2.loom").exists()


@pytest.mark.reference
def test_fill_values_none_drops_attributes_one_side_lacks_as_the_reference(tmp_path, reference):
    """The seed documents fill_values=None as "drop missing attrs" (loompy 3: the file's attribute
    the new columns lack is removed, theirs the file lacks ignored); ours refused the call."""
    a = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    with loompy.connect(a) as ds:
        ds.ca["Batch"] = ["b1"] * 4
    b = make(tmp_path / "b.loom", np.full((3, 2), 2, np.float32), cells=["y0", "y1"])
    with loompy.connect(b) as ds:
        ds.ca["Tissue"] = ["t", "t"]
    copies = [shutil.copy(p, tmp_path / f"ref-{p.name}") for p in (a, b)]
    theirs = reference.run("""
        import sys, json, loompy, numpy as np
        with loompy.connect(sys.argv[1]) as ds:
            ds.add_loom(sys.argv[2])
            print(json.dumps({"ca": sorted(ds.ca.keys()), "CellID": list(ds.ca.CellID), "sum": float(ds[:, :].sum())}))
    """, *map(str, copies))
    assert theirs == {"ca": ["CellID", "N"], "CellID": ["c0", "c1", "c2", "c3", "y0", "y1"], "sum": 24.0}
    with loompy.connect(a) as ds, pytest.warns(UserWarning) as warned:
        ds.add_loom(b)
        ours = {"ca": sorted(ds.ca.keys()), "CellID": list(ds.ca.CellID), "sum": float(ds[:, :].sum())}
    assert ours == theirs
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2 and "a.loom: column attributes ['Batch'] removed" in messages[0]
    assert "a.loom: column attributes ['Tissue'] of the new columns ignored" in messages[1]
    with loompy.connect(a) as ds, pytest.warns(UserWarning, match=r"\['N'\] removed"):  # add_columns alike
        ds.add_columns({"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)}, {"CellID": ["z"]})
        assert ds.ca.keys() == ["CellID"] and list(ds.ca.CellID)[-1] == "z"


def test_attributes_dropped_by_an_append_that_fails_come_back(tmp_path, monkeypatch):
    path = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    with loompy.connect(path) as ds:
        values = ds.ca.N.copy()

        def failing(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(loompy.journal, "commit", failing)
        with pytest.raises(OSError, match="disk full"), warnings.catch_warnings():
            warnings.simplefilter("error")  # (nothing was dropped: nothing to say)
            ds.add_columns({"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)}, {"CellID": ["z"]})
        monkeypatch.undo()
    with loompy.connect(path) as ds:
        assert ds.shape == (3, 4) and ds.ca.keys() == ["CellID", "N"]
        np.testing.assert_array_equal(ds.ca.N, values)


def test_row_attrs_of_new_columns_add_row_attributes_and_keep_the_files(tmp_path):
    """On a file with columns, add_columns(row_attrs=...) overwrote its row attributes (loompy 3
    uses them only for an empty file): a scan loop copying another file's rows relabelled them."""
    path = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    columns = {"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)}
    with loompy.connect(path) as ds:
        ds.add_columns(columns, {"CellID": ["n"], "N": [9]}, row_attrs={"Gene": ["g0", "g1", "g2"], "Kind": [1, 2, 3]})
        assert list(ds.ra.Gene) == ["g0", "g1", "g2"] and list(ds.ra.Kind) == [1, 2, 3]
        with pytest.warns(UserWarning, match=r"row attributes \['Gene'\] given with the new columns differ"):
            ds.add_columns(columns, {"CellID": ["m"], "N": [8]}, row_attrs={"Gene": ["x", "y", "z"]})
        assert list(ds.ra.Gene) == ["g0", "g1", "g2"] and ds.shape == (3, 6)
        with warnings.catch_warnings():  # (the file's own values given back, of any text or number dtype)
            warnings.simplefilter("error")
            for same in ({"Gene": ds.ra.Gene}, {"Gene": np.array(["g0", "g1", "g2"])}, {"Kind": np.array([1., 2, 3])}):
                ds.add_columns(columns, {"CellID": ["o"], "N": [7]}, row_attrs=same)
        with pytest.warns(UserWarning, match=r"row attributes \['Gene'\] given with the new columns differ"):
            ds.add_columns(columns, {"CellID": ["p"], "N": [6]}, row_attrs={"Gene": np.array(["g0", "g1", "gX"])})
        assert list(ds.ra.Gene) == ["g0", "g1", "g2"] and list(ds.ra.Kind) == [1, 2, 3] and ds.shape == (3, 10)


def test_permute_stores_graph_vertices_as_integers_whatever_the_writer_used(tmp_path):
    """R writers store vertex indices as floats; a rewrite stores integers (what the spec and loompy
    3's validator ask), keeping an integer dtype that was there."""
    path = make(tmp_path / "p.loom", np.ones((3, 4), np.float32))
    with h5py.File(path, "r+") as f:
        g = f["col_graphs"].create_group("r")
        g["a"], g["b"], g["w"] = np.array([0.0, 3.0]), np.array([1.0, 2.0]), np.array([1.0, 2.0])
        del f["col_graphs/knn/a"]
        f["col_graphs/knn/a"] = np.array([0, 1], dtype=np.int64)  # (another writer's int64)
    with loompy.connect(path) as ds:
        ds.permute([3, 2, 1, 0], axis=1)
        assert sorted(zip(ds.col_graphs.r.row.tolist(), ds.col_graphs.r.col.tolist())) == [(0, 1), (3, 2)]
    with h5py.File(path, "r") as f:
        assert f["col_graphs/r/a"].dtype == np.int32 and f["col_graphs/knn/a"].dtype == np.int64


def test_rewrites_keep_links_as_links_and_leave_references_behind(tmp_path):
    """A graph group holding a soft link to nothing or an external link to a missing file made
    graph replacement and permute fail (a raw KeyError); HDF5 attributes holding object references
    were carried into permute's new file, where they point at garbage."""
    path = make(tmp_path / "l.loom", np.ones((3, 4), np.float32))
    with h5py.File(path, "r+") as f:
        g = f["col_graphs/knn"]
        g["dangling"] = h5py.SoftLink("/nowhere")
        g["outside"] = h5py.ExternalLink("missing.h5", "/x")
        g["same"] = f["col_attrs/CellID"]  # (a hard link: another name of that dataset)
        f["col_graphs"]["loose"] = h5py.SoftLink("/nowhere/either")
        f["col_attrs/CellID"].attrs["ref"] = f["row_attrs/Gene"].ref
        f["col_attrs/CellID"].attrs["note"] = "kept"
    graph = sp.coo_matrix(([2.0], ([3], [0])), shape=(4, 4))
    with loompy.connect(path) as ds:
        ds.col_graphs["knn"] = graph
        ds.permute([3, 2, 1, 0], axis=1)
        assert list(zip(ds.col_graphs.knn.row, ds.col_graphs.knn.col)) == [(0, 3)]
    with h5py.File(path, "r") as f:
        g = f["col_graphs/knn"]
        assert g.get("dangling", getlink=True).path == "/nowhere"
        assert g.get("outside", getlink=True).filename == "missing.h5"
        assert list(g["same"].asstr()[:]) == ["c0", "c1", "c2", "c3"]  # (copied as it was)
        assert f["col_graphs"].get("loose", getlink=True).path == "/nowhere/either"
        assert "ref" not in f["col_attrs/CellID"].attrs and f["col_attrs/CellID"].attrs["note"] == "kept"


def test_add_loom_of_a_file_without_columns_drops_nothing_and_says_nothing(tmp_path):
    path = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    empty = tmp_path / "e.loom"
    loompy.create(empty, {"": np.zeros((3, 0), np.float32), "x": np.zeros((3, 0), np.int32)},
                  {"Gene": ["g0", "g1", "g2"]}, {"Other": np.zeros(0)}).close()
    with loompy.connect(path) as ds, warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.add_loom(empty)
        assert ds.shape == (3, 4) and ds.ca.keys() == ["CellID", "N"]


@pytest.mark.parametrize("how", ["permute", "repack"])
def test_rewrites_into_a_new_file_leave_object_references_behind(tmp_path, how):
    """permute and repack copied attributes holding object references (dimension scales') into the
    new file, where they pointed at garbage or at another object; they are left behind."""
    path = make(tmp_path / "r.loom", np.ones((3, 4), np.float32))
    with h5py.File(path, "r+") as f:
        f["col_attrs/N"].make_scale("N")
        f["matrix"].dims[1].attach_scale(f["col_attrs/N"])
        f.attrs["main"] = f["matrix"].ref
        f["layers"].attrs["main"] = f["matrix"].ref
        f["layers"].attrs["note"] = "kept"
    if how == "permute":
        with loompy.connect(path) as ds:
            ds.permute([3, 2, 1, 0], axis=1)
    else:
        loompy.repack(path)
    with h5py.File(path, "r") as f:
        assert "main" not in f.attrs and "main" not in f["layers"].attrs and f["layers"].attrs["note"] == "kept"
        assert [list(d) for d in f["matrix"].dims] == [[], []]
        assert "CLASS" not in f["col_attrs/N"].attrs and "REFERENCE_LIST" not in f["col_attrs/N"].attrs
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (3, 4)


def test_row_attributes_added_with_columns_are_part_of_the_append(tmp_path, monkeypatch):
    """They were written after the append committed: a failure (or kill) there kept them for
    columns that were rolled back, or lost them for columns that were added."""
    path = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    columns = {"": np.ones((3, 1), np.float32), "x": np.ones((3, 1), np.int32)}

    real = loompy.format.write_values

    def failing(group, name, *args, **kwargs):
        if name == "Kind":
            raise OSError("disk full")
        return real(group, name, *args, **kwargs)

    with loompy.connect(path) as ds:
        monkeypatch.setattr(loompy.format, "write_values", failing)
        with pytest.raises(OSError, match="disk full"):  # (the columns go too)
            ds.add_columns(columns, {"CellID": ["n"], "N": [9]}, row_attrs={"Kind": [1, 2, 3]})
        monkeypatch.undo()
        assert ds.shape == (3, 4) and "Kind" not in ds.ra
    with loompy.connect(path) as ds:
        assert ds.ra.keys() == ["Gene", "Score"]
        ds.add_columns(columns, {"CellID": ["n"], "N": [9]}, row_attrs={"Kind": [1, 2, 3]})
        assert ds.shape == (3, 5) and list(ds.ra.Kind) == [1, 2, 3]
    with h5py.File(path, "r") as f:
        assert "loompy_before_append" not in f and list(f["row_attrs/Kind"][:]) == [1, 2, 3]


def test_combine_leaves_out_attributes_not_every_input_has_as_the_reference(tmp_path, reference):
    """loompy 3's combine leaves out a column attribute some inputs lack, whichever file has it; ours
    used to refuse it when the first file had it and drop it silently when a later one did. Now it
    is left out in both orders, with a warning naming it; combine_faster refuses it in both orders."""
    a = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    b = make(tmp_path / "b.loom", np.full((3, 2), 2, np.float32), cells=["y0", "y1"])
    with loompy.connect(a) as ds:
        ds.ca["Batch"] = ["b1"] * 4
    for order in ([a, b], [b, a]):
        out = tmp_path / f"out-{order[0].stem}.loom"
        theirs = reference.run("""
            import sys, json, loompy
            loompy.combine(sys.argv[1:3], sys.argv[3])
            with loompy.connect(sys.argv[3], "r") as ds:
                print(json.dumps({"ca": sorted(ds.ca.keys()), "CellID": list(ds.ca.CellID)}))
        """, *map(str, order), str(tmp_path / f"ref-{order[0].stem}.loom"))
        with pytest.warns(UserWarning, match=r"column attributes \['Batch'\] are left out.*Batch not in .*b\.loom"):
            loompy.combine(order, out)
        with loompy.connect(out, "r") as ds:
            assert {"ca": sorted(ds.ca.keys()), "CellID": list(ds.ca.CellID)} == theirs
            assert theirs["ca"] == ["CellID", "N"]
        faster = tmp_path / f"faster-{order[0].stem}.loom"
        with pytest.raises(loompy.LoomValueError, match=r"column attribute 'Batch' is not in .*b\.loom.*skip_attrs"):
            loompy.combine_faster(order, faster)
        assert not faster.exists()
        loompy.combine_faster(order, faster, skip_attrs=["Batch"])
        with loompy.connect(faster, "r") as ds:
            assert sorted(ds.ca.keys()) == ["CellID", "N"] and ds.shape == (3, 6)


def test_attributes_that_cannot_join_are_described_in_words(tmp_path):
    path = tmp_path / "a.loom"
    loompy.create(path, np.zeros((2, 2), np.float32), {"g": np.arange(2)},
                  {"A": np.array(["x", "y"]), "E": np.zeros((2, 3))}).close()
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match=r"'A' holds text, one per column, and the new columns' "
                                                        r"values are uint8 values, one per column: .*"
                                                        r"ds.ca\['A'\] = ds.ca\['A'\].astype\(str\)"):
            ds.add_columns(np.ones((2, 1), np.float32), {"A": np.array([5], np.uint8), "E": np.zeros((1, 3))})
        with pytest.raises(loompy.LoomValueError, match=r"'E' holds float64 values, 3 per column, and the new "
                                                        r"columns' values are text"):
            ds.add_columns(np.ones((2, 1), np.float32), {"A": np.array(["z"]), "E": np.array(["q"])})
        ds.ca["E2"] = np.arange(2)
        ds.ca["E2"] = ds.ca["E2"].astype(str)  # (the way out the message gives)
        ds.add_columns(np.ones((2, 1), np.float32), {"A": np.array(["z"]), "E": np.zeros((1, 3)), "E2": ["w"]})
        assert list(ds.ca.E2) == ["0", "1", "w"]
        with pytest.raises(loompy.LoomValueError, match=r"'E': .*\(float64 values, one per column\).*"
                                                        r"\(float64 values, 3 per column\)"):
            ds.add_columns(np.ones((2, 1), np.float32), {"A": np.array(["z"]), "E": np.zeros(1), "E2": ["v"]})
        assert ds.shape == (2, 3)


def test_skip_attrs_takes_one_name_as_a_string(tmp_path):
    a = make(tmp_path / "a.loom", np.ones((3, 4), np.float32))
    b = make(tmp_path / "b.loom", np.ones((3, 2), np.float32), cells=["y0", "y1"])
    with loompy.connect(a) as ds:
        ds.ca["X"] = np.arange(4)
        ds.ca["Xenium"] = np.arange(4)
    with pytest.raises(loompy.LoomValueError, match="'X' is not in"):  # (a string was split into letters,
        loompy.combine_faster([a, b], tmp_path / "o.loom", skip_attrs="Xenium")  # skipping X, not Xenium)
    loompy.combine_faster([a, b], tmp_path / "o.loom", skip_attrs=["Xenium", "X"])
    with loompy.connect(tmp_path / "o.loom", "r") as ds:
        assert sorted(ds.ca.keys()) == ["CellID", "N"]


@pytest.mark.parametrize("shape", [(150, 0), (0, 70)])
def test_permute_of_a_matrix_with_no_rows_or_no_columns(tmp_path, shape):
    path = tmp_path / "empty.loom"
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        f.create_dataset("matrix", shape=shape, dtype="float32", chunks=(64, 64), compression="gzip",
                         maxshape=(None, None))
        f.create_dataset("layers/x", shape=shape, dtype="int32", chunks=(64, 64), compression="gzip",
                         maxshape=(None, None))
        f.create_dataset("row_attrs/Gene", data=np.array([f"g{i}" for i in range(shape[0])], dtype="S"))
        f.create_dataset("col_attrs/CellID", data=np.array([f"c{i}" for i in range(shape[1])], dtype="S"))
        for g in ("row_graphs", "col_graphs"):
            f.create_group(g)
    for axis in (0, 1):
        order = np.arange(shape[axis])[::-1]
        with loompy.connect(path) as ds:
            ds.permute(order, axis=axis)
            assert ds.shape == shape and ds.layers["x"][:, :].shape == shape
            names = ds.ra.Gene if axis == 0 else ds.ca.CellID
            assert list(names) == [f"{'gc'[axis]}{i}" for i in order]
            ds.permute(order, axis=axis)  # (back)


def test_a_read_during_add_columns_in_another_thread_sees_all_of_it_or_none(tmp_path, monkeypatch):
    """add_columns resizes a layer, then writes its new columns: a read from another thread in between
    got the new width with the new columns all zero (5-10 reads in 200, beside 25 appends)."""
    import threading

    from loompy import engine

    path = tmp_path / "a.loom"
    m = np.ones((200, 150), np.float32)
    loompy.create(path, m, {"g": np.arange(200)}, {"c": np.arange(150)}).close()
    resized, go = threading.Event(), threading.Event()
    real = engine.write_matrix

    def write_after_a_pause(dataset, matrix, col_offset=0):
        resized.set()
        go.wait(60)
        real(dataset, matrix, col_offset=col_offset)

    monkeypatch.setattr(engine, "write_matrix", write_after_a_pause)
    got = []
    with loompy.connect(path) as ds:
        writer = threading.Thread(target=ds.add_columns, args=(np.full((200, 40), 5, np.float32), {"c": np.arange(40)}))
        writer.start()
        assert resized.wait(60)
        reader = threading.Thread(target=lambda: got.append(ds.layers[""][:, :]))
        reader.start()
        reader.join(1.0)  # (it waits for the append; before, it read the new width at once)
        go.set()
        reader.join(60)
        writer.join(60)
    expected = np.hstack([m, np.full((200, 40), 5, np.float32)])
    assert got[0].shape in ((200, 150), (200, 190))
    np.testing.assert_array_equal(got[0], expected[:, :got[0].shape[1]])
    assert got[0].shape == (200, 190)  # (it waited: the read began after the resize)


def _slowed_matrix_writes(monkeypatch):
    """Have engine.write_matrix set the event returned, then pause 0.5 s: another thread acts then."""
    import threading

    from loompy import engine

    writing, real = threading.Event(), engine.write_matrix

    def write_slowly(dataset, matrix, col_offset=0):
        writing.set()
        time.sleep(0.5)
        real(dataset, matrix, col_offset=col_offset)

    monkeypatch.setattr(engine, "write_matrix", write_slowly)
    return writing


def test_a_connection_made_during_another_threads_permute_is_to_the_new_file(tmp_path, monkeypatch):
    """connect(r+) as another thread permuted waited for it, then gave a connection to the replaced
    file: its writes went into a deleted file, without a word. It now opens the new one."""
    import threading

    from loompy import engine

    path = tmp_path / "p.loom"
    loompy.create(path, np.arange(70 * 30, dtype=np.float32).reshape(70, 30), {"g": np.arange(70)},
                  {"c": np.arange(30)}).close()
    permuting = threading.Event()
    real = engine.reorder_columns

    def reorder_slowly(src, dst, order):
        permuting.set()
        time.sleep(0.5)  # (the other thread connects now)
        return real(src, dst, order)

    monkeypatch.setattr(engine, "reorder_columns", reorder_slowly)
    with loompy.connect(path) as ds:
        worker = threading.Thread(target=ds.permute, args=(np.arange(30)[::-1],), kwargs={"axis": 1})
        worker.start()
        assert permuting.wait(60)
        with loompy.connect(path) as other:
            assert other.ca.c.tolist() == list(range(30))[::-1]
            other.ra.Written = np.ones(70)
        worker.join(60)
    with loompy.connect(path, "r") as ds:
        assert "Written" in ds.ra and ds.ca.c[0] == 29


def test_a_connection_made_as_another_threads_permute_renames_its_file_is_to_the_new_one(tmp_path, monkeypatch):
    """Between permute closing the old file and renaming the new one over it (the new file's sync),
    a connect(r+) opened the old file afresh, under a write gate nobody held: its writes went into
    the file about to be unlinked. It now waits for the rename."""
    import threading

    from loompy import files

    path = tmp_path / "p.loom"
    loompy.create(path, np.arange(70 * 30, dtype=np.float32).reshape(70, 30), {"g": np.arange(70)},
                  {"c": np.arange(30)}).close()
    syncing, real = threading.Event(), files._EarlyFlush.sync

    def sync_slowly(flusher):
        syncing.set()
        time.sleep(0.5)  # (the other thread connects now)
        return real(flusher)

    monkeypatch.setattr(files._EarlyFlush, "sync", sync_slowly)
    with loompy.connect(path) as ds:
        worker = threading.Thread(target=ds.permute, args=(np.arange(30)[::-1],), kwargs={"axis": 1})
        worker.start()
        assert syncing.wait(60)
        with loompy.connect(path) as other:
            assert other.ca.c[0] == 29
            other.ra.Written = np.ones(70)
        worker.join(60)
    with loompy.connect(path, "r") as ds:
        assert "Written" in ds.ra and ds.ca.c[0] == 29


def test_connections_made_while_another_thread_appends_all_open(tmp_path, monkeypatch):
    """connect(r+) checked the file's structure after the writes of other threads it waited for: an
    append begun meanwhile left column attributes short of the matrix, and 90 of 1,172 connects in
    10 s were refused as "not a valid Loom file". Each now checks the file before other writes go on."""
    import threading

    path = tmp_path / "a.loom"
    loompy.create(path, np.ones((2000, 20), np.float32), {"g": np.arange(2000)},
                  {"c": np.array([f"c{i}" for i in range(20)]), "k": np.zeros(20, int)}).close()
    stop, errors, opened = time.time() + 2, [], [0]
    connection = importlib.import_module("loompy.connection")
    real = connection.check_structure
    monkeypatch.setattr(connection, "check_structure", lambda f: time.sleep(0.02) or real(f))  # (a wider window)

    def appending():
        with loompy.connect(path) as ds:
            while time.time() < stop:
                ds.add_columns(np.ones((2000, 50), np.float32), {"c": np.array([f"a{i}" for i in range(50)]),
                                                                 "k": np.zeros(50, int)})

    worker = threading.Thread(target=appending)
    worker.start()
    while time.time() < stop:
        try:
            with loompy.connect(path):
                opened[0] += 1
        except loompy.LoomError as error:
            errors.append(str(error))
    worker.join(60)
    assert errors == [] and opened[0] > 0


def test_a_connection_made_during_another_threads_layer_replacement_leaves_it_be(tmp_path, monkeypatch):
    """connect(r+) settled another thread's replacement under way as an interrupted one (h5py's
    "Unable to move link" for the replacing thread, 90 of 200 connects). It now waits for it."""
    import threading


    path = tmp_path / "r.loom"
    m = np.ones((70, 30), np.float32)
    loompy.create(path, {"": m, "x": m}, {"g": np.arange(70)}, {"c": np.arange(30.0)}).close()
    writing, errors = _slowed_matrix_writes(monkeypatch), []
    with loompy.connect(path) as ds:

        def replace():
            try:
                ds.layers["x"] = m.astype(np.float64) * 3  # (another dtype: written beside, then swapped in)
            except Exception as error:  # (the test's to report)
                errors.append(error)

        replacing = threading.Thread(target=replace)
        replacing.start()
        assert writing.wait(60)
        with loompy.connect(path) as other:
            other.layers.keys()
        replacing.join(60)
        assert errors == []
    with loompy.connect(path, "r") as ds:
        assert ds.layers["x"].dtype == np.float64 and (ds.layers["x"][:, :] == 3).all()


def test_a_connection_made_during_another_threads_append_leaves_the_append_whole(tmp_path, monkeypatch):
    """connect(r+) rolled back an append under way in another thread as if it were an interrupted one:
    the appender returned without error, its columns gone (4000 x 200 for 4000 x 20200), and connect
    raised. Now connect waits for the writes under way to the file, then finds nothing to undo."""
    import threading


    path = tmp_path / "a.loom"
    loompy.create(path, np.ones((70, 30), np.float32), {"g": np.arange(70)}, {"c": np.arange(30.0)}).close()
    writing, connected = _slowed_matrix_writes(monkeypatch), []
    with loompy.connect(path) as ds:
        appending = threading.Thread(target=ds.add_columns,
                                     args=({"": np.full((70, 40), 5, np.float32)}, {"c": np.arange(40.0)}))
        appending.start()
        assert writing.wait(60)
        with loompy.connect(path) as other:
            connected.append(other.shape)
        appending.join(60)
        assert ds.shape == (70, 70) and connected == [(70, 70)]
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (70, 70) and ds.ca.c.tolist() == list(range(30)) + list(range(40))
        assert (ds[:, 30:] == 5).all() and (ds[:, :30] == 1).all()


@pytest.mark.parametrize("write", ["layer", "attribute", "attribute of another dtype"])
def test_a_write_from_another_thread_during_add_columns_waits_for_it(tmp_path, monkeypatch, write):
    """Writes ran beside an append: a layer replaced meanwhile was swapped in at the old width (the
    next append left 50-100 of its columns zero), a column attribute replaced meanwhile was put back
    short (the file then failed to open). Now they wait for the append, then are checked at the new
    width (and refused here, being made for the old one): the file holds the append whole."""
    import threading

    from loompy import engine

    path = tmp_path / "w.loom"
    m = np.ones((200, 150), np.float32)
    loompy.create(path, {"": m, "L": m}, {"g": np.arange(200)}, {"c": np.arange(150.0)}).close()
    resized, go = threading.Event(), threading.Event()
    real = engine.write_matrix

    def write_after_a_pause(dataset, matrix, col_offset=0):
        if threading.current_thread().name == "appending":
            resized.set()
            go.wait(60)
        real(dataset, matrix, col_offset=col_offset)

    monkeypatch.setattr(engine, "write_matrix", write_after_a_pause)
    errors = []

    def old_width_write(ds):
        try:
            if write == "layer":
                ds.layers["L"] = np.full((200, 150), 3, np.float32)
            else:
                ds.ca["c"] = np.arange(150, dtype=np.float64 if write == "attribute" else np.int16)
        except loompy.LoomValueError as error:
            errors.append(str(error))

    new = np.full((200, 40), 5, np.float32)
    with loompy.connect(path) as ds:
        appending = threading.Thread(target=ds.add_columns, args=({"": new, "L": new}, {"c": np.arange(40.0)}),
                                     name="appending")
        appending.start()
        assert resized.wait(60)
        other = threading.Thread(target=old_width_write, args=(ds,))
        other.start()
        other.join(1.0)
        waited = other.is_alive()  # (it waits for the append)
        go.set()
        appending.join(60)
        other.join(60)
    assert waited
    assert len(errors) == 1 and "w.loom" in errors[0] and ("190" in errors[0]), errors
    with loompy.connect(path, "r") as ds:
        expected = np.hstack([m, new])
        np.testing.assert_array_equal(ds.layers["L"][:, :], expected)
        np.testing.assert_array_equal(ds[:, :], expected)
        assert ds.ca["c"].tolist() == list(range(150)) + list(range(40))


@pytest.mark.parametrize("how", ["scan", "batch_scan"])
def test_a_scan_left_suspended_across_a_permute_of_its_connection_is_refused(tmp_path, how):
    """A scan suspended after its first batch went on over the permuted file: 100 rows came twice
    and 100 never, with no error (loompy 3 does the same). Now its next batch is refused."""
    n = 600
    m = np.repeat(np.arange(n, dtype=np.float32)[:, None], 5, axis=1)  # row i holds i
    path = tmp_path / "s.loom"
    loompy.create(path, m, {"ri": np.arange(n)}, {"c": np.arange(5)}).close()
    with loompy.connect(path) as ds:
        batches = ds.scan(axis=0, batch_size=100) if how == "scan" else ds.batch_scan(axis=0, batch_size=100)
        first = next(batches)
        assert first[0] == 0
        ds.permute(np.arange(n)[::-1], axis=0)
        with pytest.raises(loompy.LoomFileError, match=rf"s.loom: {how}: the file was permuted since it began"):
            next(batches)
        assert [v[:, 0].tolist() for _, _, v in ds.scan(axis=0, batch_size=300)] == \
            [list(range(599, 299, -1)), list(range(299, -1, -1))]


def _paused_permutes(monkeypatch):
    """Have the next permute stop once, after it has copied the layers (before the attributes),
    until ``go`` is set; returns the events (paused, go)."""
    import sys
    import threading

    combine = sys.modules["loompy.combine"]
    paused, go = threading.Event(), threading.Event()
    real = combine._copy_extras

    def copy_then_pause(*args, **kwargs):
        real(*args, **kwargs)
        if not paused.is_set():
            paused.set()
            go.wait(60)

    monkeypatch.setattr(combine, "_copy_extras", copy_then_pause)
    return paused, go


def _beside_a_permute(monkeypatch, ds, order, action):
    """Permute ``ds``'s columns into ``order`` in another thread, stopped once after it has copied the
    layers (before the attributes), and run ``action(ds)`` in a third thread meanwhile (given a
    second to finish before the permute goes on)."""
    import threading

    paused, go = _paused_permutes(monkeypatch)
    permuting = threading.Thread(target=ds.permute, args=(order, 1))
    permuting.start()
    assert paused.wait(60)
    other = threading.Thread(target=action, args=(ds,))
    other.start()
    other.join(1.0)  # (it waits for the permute, or is done)
    go.set()
    permuting.join(60)
    other.join(60)


@pytest.mark.parametrize("write", ["matrix", "attribute", "layer", "graph"])
def test_a_write_from_another_thread_during_permute_is_refused_not_lost(tmp_path, monkeypatch, write):
    """permute copies the file, then renames the copy into place: a write another thread made after
    the copy had passed it went to the old file and was lost, though the call returned normally."""

    path = tmp_path / "p.loom"
    m = np.arange(200 * 150, dtype=np.float32).reshape(200, 150)
    loompy.create(path, m, {"g": np.arange(200)}, {"c": np.arange(150)}).close()
    outcome = []
    writes = {"matrix": lambda ds: ds.__setitem__((0, 0), -5.0),
              "attribute": lambda ds: setattr(ds.ca, "New", np.arange(150)),
              "layer": lambda ds: ds.layers.__setitem__("x", m),
              "graph": lambda ds: ds.col_graphs.__setitem__("knn", sp.eye(150))}

    def try_to_write(ds):
        try:
            writes[write](ds)
            outcome.append("written")
        except loompy.LoomFileError as error:
            outcome.append(str(error))

    order = np.arange(150)[::-1]
    with loompy.connect(path) as ds:
        _beside_a_permute(monkeypatch, ds, order, try_to_write)
        np.testing.assert_array_equal(ds[:, :], m[:, order])
        assert "New" not in ds.ca and list(ds.layers.keys()) == [""] and "knn" not in ds.col_graphs
    assert outcome and "the file was replaced by permute (or the connection closed) in another thread while this " \
        "write waited for it; nothing was written" in outcome[0], outcome


def test_reads_from_other_threads_during_permute_give_the_old_order_the_new_or_a_clear_error(tmp_path, monkeypatch):

    path = tmp_path / "p.loom"
    m = np.arange(200 * 150, dtype=np.float32).reshape(200, 150)
    loompy.create(path, m, {"g": np.arange(200)}, {"c": np.arange(150)}).close()
    order = np.arange(150)[::-1]
    said = []

    def read(ds):
        try:
            said.append(ds[:, :])
        except loompy.LoomError as error:
            said.append(str(error))

    with loompy.connect(path) as ds:
        _beside_a_permute(monkeypatch, ds, order, read)
        np.testing.assert_array_equal(ds[:, :], m[:, order])
    got = said[0]
    if isinstance(got, str):  # (it waited for the layers, which permute then replaced)
        assert "the file was replaced by permute (or the connection closed) in another thread while this read " \
            "waited for it; read again" in got
    else:
        assert np.array_equal(got, m) or np.array_equal(got, m[:, order])


def test_close_waits_for_a_write_under_way_in_another_thread(tmp_path, monkeypatch):
    """close() in one thread while another wrote: the write met a closed file mid-way (h5py's raw
    ValueError) and its values were lost. close now lets it finish first."""
    import threading

    from loompy import engine

    path = tmp_path / "c.loom"
    loompy.create(path, np.zeros((100, 80), np.float32), {"g": np.arange(100)}, {"c": np.arange(80)}).close()
    started, go = threading.Event(), threading.Event()
    real = engine.write_block

    def slow_write_block(*args, **kwargs):
        started.set()
        go.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "write_block", slow_write_block)
    outcome = []
    ds = loompy.connect(path)
    writer = threading.Thread(target=lambda: outcome.append(ds.__setitem__((slice(0, 10), slice(0, 10)), 3.0)))
    writer.start()
    assert started.wait(60)
    closing = threading.Thread(target=ds.close)
    closing.start()
    closing.join(1.0)
    assert closing.is_alive()  # (waiting for the write)
    go.set()
    writer.join(60)
    closing.join(60)
    assert outcome == [None] and ds.closed
    with loompy.connect(path, "r") as again:
        np.testing.assert_array_equal(again[:10, :10], np.full((10, 10), 3.0, np.float32))


def test_a_write_from_inside_a_read_that_a_permute_waits_for_is_refused_not_a_deadlock(tmp_path):
    """A thread holding a read of a layer (as aggregate did around its function) whose write waited
    for a permute in another thread, itself waiting for that read to end: both hung (3 of 3 runs)."""
    import threading
    import time

    from loompy import engine, handles

    path = tmp_path / "a.loom"
    m = np.arange(100 * 60, dtype=np.float32).reshape(100, 60)
    loompy.create(path, m, {"g": np.arange(100)}, {"c": np.arange(60)}).close()
    with loompy.connect(path) as ds:
        permuting = threading.Thread(target=ds.permute, args=(np.arange(60)[::-1], 1))
        with engine.held_index(ds.layers[""]._dataset):
            gate = handles._gate(ds._file)
            permuting.start()
            for _ in range(600):  # (until the permute waits for this read)
                if gate.waiting or gate.owner is not None:
                    break
                time.sleep(0.01)
            with pytest.raises(loompy.LoomFileError, match="this thread is inside a read of the file"):
                ds.ra["note"] = np.zeros(100)
        permuting.join(60)
        assert not permuting.is_alive()
        np.testing.assert_array_equal(ds[:, :], m[:, ::-1])


def test_a_function_given_to_aggregate_may_write_while_another_thread_permutes(tmp_path, monkeypatch):
    """aggregate no longer holds its read while the function runs: the function's write waits for
    the permute and is refused as any write meant for the old order is. (The permute is held
    mid-way until the write waits: a permute done before the write began made this test pass or
    fail by the threads' timing.)"""
    import threading

    paused, go = _paused_permutes(monkeypatch)
    path = tmp_path / "a.loom"
    m = np.arange(100 * 60, dtype=np.float32).reshape(100, 60)
    loompy.create(path, m, {"g": np.arange(100)}, {"c": np.arange(60), "k": np.arange(60) % 3}).close()
    said, threads = [], []
    with loompy.connect(path) as ds:
        def sum_and_write(values):
            if not threads:
                threads.append(threading.Thread(target=ds.permute, args=(np.arange(60)[::-1], 1)))
                threads[0].start()
                assert paused.wait(60)
                threading.Timer(0.5, go.set).start()  # (the write below waits for the permute meanwhile)
                try:
                    ds.ra["note"] = np.zeros(100)
                except loompy.LoomFileError as error:
                    said.append(str(error))
            return values.sum()

        try:
            ds.aggregate(None, None, "k", sum_and_write)
        except loompy.LoomFileError as error:  # (its next read, once the permute replaced the file)
            said.append(str(error))
        threads[0].join(60)
        assert not threads[0].is_alive()
        np.testing.assert_array_equal(ds[:, :], m[:, ::-1])
        assert "note" not in ds.ra
    assert said and "permute" in said[0], said


@pytest.mark.parametrize("rewrite", ["close", "permute"])
def test_close_and_permute_are_not_held_off_by_a_steady_stream_of_writes(tmp_path, rewrite):
    """New writes kept getting in while close or permute waited for the writes under way (they
    returned only when the writing loops stopped, 14,000 writes later)."""
    import threading
    import time

    path = tmp_path / "s.loom"
    loompy.create(path, np.zeros((50, 40), np.float32), {"g": np.arange(50)}, {"c": np.arange(40)}).close()
    ds = loompy.connect(path)
    stop, running = threading.Event(), []

    def keep_writing():
        end, k = time.monotonic() + 20, 0
        while not stop.is_set() and time.monotonic() < end:
            try:
                ds.ca["k"] = np.full(40, k)
            except loompy.LoomFileError as error:
                if "the connection is closed" in str(error):
                    break
            k += 1
        running.append(time.monotonic() < end)  # (it stopped before its 20 s were up)

    writers = [threading.Thread(target=keep_writing)]
    for writer in writers:
        writer.start()
    time.sleep(0.2)
    try:
        if rewrite == "close":
            ds.close()
        else:
            ds.permute(np.arange(40)[::-1], 1)
        stopped_early = [writer.is_alive() for writer in writers]
    finally:
        stop.set()
        for writer in writers:
            writer.join(60)
        ds.close()
    assert any(stopped_early) or rewrite == "close" and all(running)  # (back while they still wrote)


def test_write_gates_go_with_the_files_nobody_writes(tmp_path):
    """The table of write gates grew by one for every file written and dropped without close()."""
    import gc

    from loompy import handles

    path = tmp_path / "g.loom"
    loompy.create(path, np.zeros((10, 8), np.float32), {"g": np.arange(10)}, {"c": np.arange(8)}).close()
    for k in range(20):
        ds = loompy.connect(path)
        ds.ca["x"] = np.arange(8) + k
        number = ds._file.id.fileno
        del ds
        gc.collect()
        assert number not in handles._gates
    with loompy.connect(path, "r") as ds:
        assert list(ds.ca.x) == list(np.arange(8) + 19)


def _finish_together(*actions):
    """Run each action in a thread of its own; (what each returned or raised), None for one still running
    after a minute (a deadlock)."""
    import threading

    results = [None] * len(actions)

    def run(k):
        try:
            results[k] = ("ok", actions[k]())
        except Exception as error:
            results[k] = ("error", error)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def _two_files(folder):
    """1.loom and 2.loom: 30 genes (the same) x 20 cells each (their own), values 1 and 2."""
    paths = []
    for k in (1, 2):
        paths.append(folder / f"{k}.loom")
        loompy.create(paths[-1], np.full((30, 20), k, np.float32), {"Gene": [f"g{i}" for i in range(30)]},
                      {"CellID": [f"f{k}c{j}" for j in range(20)]}).close()
    return paths


def test_two_files_each_appended_to_the_other_at_once(tmp_path):
    """add_loom holds its file's write gate and closes its read-only connection to the other file;
    that close waited for the other file's gate, held by the other thread doing the same (both hung)."""
    paths = _two_files(tmp_path)
    one, two = loompy.connect(paths[0]), loompy.connect(paths[1])
    try:
        results = _finish_together(lambda: one.add_loom(paths[1], key="Gene"),
                                   lambda: two.add_loom(paths[0], key="Gene"))
        assert None not in results, results  # (both finished)
        # each is done, or refused for reading the other file in the middle of its append (whole or nothing)
        for (outcome, error), mine in zip(results, (one, two)):
            assert outcome == "ok" or re.search("an append is unfinished|is appending to it", str(error)), results
            assert mine.shape[1] in ((40, 60) if outcome == "ok" else (20,))
        assert "ok" in [r[0] for r in results]
    finally:
        one.close()
        two.close()


def test_functions_given_to_aggregate_in_two_threads_may_write_the_layer_they_aggregate(tmp_path):
    """aggregate held its read of the layer while calling the function: two of them whose functions
    wrote to that layer each waited for the other's read to end (both hung; loompy 3.0.8's code too)."""
    path = tmp_path / "a.loom"
    m = np.arange(120 * 30, dtype=np.float32).reshape(120, 30)
    loompy.create(path, m, {"g": np.arange(120)}, {"c": np.arange(30), "k": np.arange(30) % 3}).close()
    with loompy.connect(path) as ds:
        def summing_and_writing(values):
            ds[0, 0] = 0.0
            return values.sum()

        results = _finish_together(lambda: ds.aggregate(None, None, "k", summing_and_writing),
                                   lambda: ds.aggregate(None, None, "k", summing_and_writing))
        assert all(r is not None and r[0] == "ok" for r in results), results


def test_add_loom_of_a_file_another_thread_begins_appending_to_as_it_reads_is_refused(tmp_path, monkeypatch):
    """add_loom read the other file's width and its column attributes at different moments: when
    an append to that file (another thread's, through a connection sharing its opening) began in
    between, it saw 40 columns and 20 cell ids and failed saying its own file's attribute was
    wrong; connect's check could likewise call the file invalid. Both now say an append is unfinished
    (add_loom: under way in another connection, not interrupted, so it does not say to roll it back)."""
    from loompy import attributes, engine, journal

    paths = _two_files(tmp_path)
    one, two = loompy.connect(paths[0]), loompy.connect(paths[1])
    to_dict = attributes.AttributeManager.to_dict

    def an_append_begins_meanwhile(self):
        values = to_dict(self)
        if self.axis == 1 and self._file.filename == str(paths[0]) and journal.pending_append(one._file) is None:
            journal.begin(one._file, 20)
            engine.resize(one._file["matrix"], 40, axis=1)
        return values

    try:
        monkeypatch.setattr(attributes.AttributeManager, "to_dict", an_append_begins_meanwhile)
        with pytest.raises(loompy.LoomFileError, match="1.loom: another connection of this process is appending"):
            two.add_loom(paths[0], key="Gene")
        monkeypatch.undo()
        assert two.shape == (30, 20) and two.ca.CellID.size == 20
    finally:
        two.close()
        one.close()
    with loompy.connect(paths[0]) as ds:  # (the half-begun append is rolled back)
        assert ds.shape == (30, 20)


@pytest.mark.parametrize("manager, good, bad", [
    ("ca", {"Val": np.zeros(3)}, {"B": np.ones(4)}),
    ("ra", {"Val": np.zeros(5)}, {"B": np.ones(4)}),
    ("attrs", {"title": "new"}, {"B": None}),
    ("layers", {"": np.full((5, 3), 7, np.float32), "L": np.ones((5, 3))}, {"B": np.ones((5, 4))}),
    ("col_graphs", {"G": np.eye(3)}, {"B": np.eye(4)}),
    ("row_graphs", {"G": np.eye(5)}, {"B": np.array([[0, 1], [1, 0]])}),
])
def test_an_update_with_one_bad_item_writes_none_of_them(tmp_path, manager, good, bad):
    """MutableMapping's update wrote the items before a bad one (an attribute overwritten, then an
    error): every item is now checked first."""
    path = make(tmp_path / "a.loom", np.arange(15, dtype=np.float32).reshape(5, 3))
    with loompy.connect(path) as ds:
        ds.ca.Val, ds.ra.Val, ds.attrs.title = np.arange(3.0), np.arange(5.0), "old"
    before = _dump(path)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomError, match=r"a\.loom: .*'B'"):
            getattr(ds, manager).update({**good, **bad})
        with pytest.raises(loompy.LoomError, match=r"a\.loom: .*'B'"):
            getattr(ds, manager).update(list(good.items()), **bad)  # (pairs, and keywords)
        assert ds.ca.Val.tolist() == [0, 1, 2] and ds.attrs.title == "old"
    assert _dump(path) == before
    with loompy.connect(path) as ds:  # all good: all written, as MutableMapping's update did
        getattr(ds, manager).update(good)
        for name, value in good.items():
            got = getattr(ds, manager)[name]
            got = got.toarray() if hasattr(got, "toarray") else got[:, :] if manager == "layers" else got
            assert np.array_equal(got, value)


def test_an_update_of_a_new_files_layers_takes_the_main_matrix_first(tmp_path):
    path = tmp_path / "n.loom"
    with loompy.new(path) as ds:
        with pytest.raises(loompy.LoomValueError, match=r"layer 'a': shape \(2, 3\) .* \(2, 2\)"):
            ds.layers.update({"a": np.ones((2, 3)), "": np.ones((2, 2), np.float32)})
        assert ds.shape == (0, 0) and list(ds.layers.keys()) == []
        ds.layers.update({"a": np.ones((2, 2)), "": np.full((2, 2), 3, np.float32)})
        assert ds.shape == (2, 2) and ds[:, :].tolist() == [[3, 3], [3, 3]] and ds.layers["a"][0, 0] == 1


def test_combine_names_the_files_where_a_column_attribute_is_text_and_where_numbers(tmp_path):
    a = make(tmp_path / "a.loom", np.ones((3, 2), np.float32))
    b = make(tmp_path / "b.loom", np.ones((3, 2), np.float32), cells=["y0", "y1"])
    c = make(tmp_path / "c.loom", np.ones((3, 2), np.float32), cells=["z0", "z1"])
    with loompy.connect(b) as ds:
        ds.ca.N = np.array(["p", "q"])
    out = tmp_path / "abc.loom"
    with pytest.raises(loompy.LoomValueError, match=r"'N' is text in .*b\.loom and numbers in .*a\.loom, .*c\.loom "
                                                    r"\(pass convert_attrs=True"):
        loompy.combine([a, b, c], out)
    assert not out.exists()


def test_combine_takes_an_input_without_columns_whatever_its_attributes_dtypes(tmp_path):
    """A file of no columns whose CellID is an empty float64 array (as np.array([]) gives) has no
    value that could clash with the text of the others: it was refused as text against numbers."""
    a = make(tmp_path / "a.loom", np.arange(6, dtype=np.float32).reshape(3, 2))
    empty = tmp_path / "e.loom"
    loompy.create(empty, np.zeros((3, 0), np.float32), {"Gene": [f"g{i}" for i in range(3)],
                                                         "Score": np.arange(3) * 1.5},
                  {"CellID": np.array([]), "N": np.array([], dtype=np.float64)}).close()
    out = tmp_path / "ae.loom"
    loompy.combine([empty, a], out, key="Gene")
    with loompy.connect(out, "r") as ds:
        assert ds.shape == (3, 2) and list(ds.ca.CellID) == ["c0", "c1"] and ds.ca.N.tolist() == [0, 1]
        assert ds[:, :].tolist() == [[0, 1], [2, 3], [4, 5]]


def test_add_columns_of_no_columns_takes_empty_values_of_any_dtype(tmp_path):
    path = make(tmp_path / "a.loom", np.ones((3, 2), np.float32))
    with loompy.connect(path) as ds:
        ds.add_columns({"": np.ones((3, 0), np.float32), "x": np.ones((3, 0), np.int32)},
                       {"CellID": np.array([]), "N": np.array([], dtype=np.float64)})
        assert ds.shape == (3, 2) and list(ds.ca.CellID) == ["c0", "c1"] and ds.ca.N.tolist() == [0, 1]
