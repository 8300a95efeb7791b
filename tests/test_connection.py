"""The connection API: managers, aliases, display, errors, read-only mode, files left intact on bad input."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import time

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy
from loompy import format as fmt

from .conftest import REAL, held_for_writing, held_in_another_thread


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def small(tmp_path):
    m = np.arange(40, dtype=np.float32).reshape(5, 8)
    ra = {"Gene": np.array(["Actb", "Gapdh", "Sox2", "Ménage", "中文"]), "Score": np.linspace(0, 1, 5)}
    ca = {"CellID": np.array([f"c{i}" for i in range(8)]), "Age": np.arange(8) * 2, "Keep": np.arange(8) % 2 == 0}
    path = tmp_path / "small.loom"
    loompy.create(path, m, ra, ca, file_attrs={"title": "Small <test>"}).close()
    return path, m, ra, ca


def test_create_returns_open_connection_usable_in_with(small, tmp_path):
    path, m, _, _ = small
    ds = loompy.create(tmp_path / "x.loom", m, {}, {})
    assert isinstance(ds, loompy.LoomConnection) and ds.mode == "r+" and not ds.closed
    ds.close()
    assert ds.closed
    with loompy.create(tmp_path / "y.loom", matrix=m, row_attrs={}, col_attrs={}, dtype="int16") as ds2:
        assert ds2.layers[""].dtype == np.int16
        np.testing.assert_array_equal(ds2[:, :], m.astype(np.int16))


def test_a_new_file_stamps_every_dataset_and_group_it_writes(small, tmp_path):
    """The spec keeps a last_modified stamp on each attribute, layer and graph written, and on the
    groups and the root; /attrs/CreationDate and LOOM_SPEC_VERSION had none."""
    path, m, ra, ca = small
    with loompy.create(tmp_path / "s.loom", {"": m, "L": m}, ra, ca, file_attrs={"title": "t"}) as ds:
        ds.col_graphs["knn"] = sp.eye(m.shape[1])
    unstamped = []
    with h5py.File(tmp_path / "s.loom", "r") as f:
        def look(name, obj):
            if "last_modified" not in obj.attrs and not name.startswith("col_graphs/knn/"):  # (the graph's group)
                unstamped.append(name)
        f.visititems(look)
        assert "last_modified" in f.attrs and "last_modified" in f["col_graphs/knn"].attrs
    assert unstamped == []


def test_attributes_round_trip_and_dict_protocol(small):
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        assert ds.shape == (5, 8)
        assert ds.ra is ds.row_attrs and ds.ca is ds.col_attrs and ds.layer is ds.layers
        assert sorted(ds.ra.keys()) == ["Gene", "Score"] and len(ds.ca) == 3
        assert "Gene" in ds.ra and "Nope" not in ds.ra
        assert list(ds.ra.Gene) == list(ra["Gene"]) and all(type(x) is str for x in ds.ra.Gene)
        np.testing.assert_array_equal(ds.ca.Age, ca["Age"])
        assert ds.ca.Keep.dtype == np.uint8  # booleans are stored as uint8
        np.testing.assert_array_equal(ds.ca.Keep, ca["Keep"].astype(np.uint8))
        assert dict(ds.ra.items()).keys() == {"Gene", "Score"}
        assert ds.ra.get("Nope") is None
        with pytest.raises(KeyError):
            ds.ra["Nope"]
        with pytest.raises(AttributeError):
            ds.ra.Nope
        # slicing a manager gives a dict of sliced arrays
        sliced = ds.ca[ds.ca.Age > 6]
        assert set(sliced) == {"CellID", "Age", "Keep"}
        np.testing.assert_array_equal(sliced["Age"], [8, 10, 12, 14])
        assert list(ds.ca[1:3]["CellID"]) == ["c1", "c2"]
        # assignment styles, all saved
        ds.ra.Extra = np.arange(5)
        ds.ca["Name"] = [f"n{i}" for i in range(8)]
        ds.set_attr("Viaset", np.ones(5), axis=0)
        ds.set_attr("Typed", np.arange(8), axis=1, dtype="float32")
        ds.ra.Multi = np.arange(10).reshape(5, 2)
        ds.set_attr("AsText", np.arange(5), axis=0, dtype="string")
        assert list(ds.ra.AsText) == ["0", "1", "2", "3", "4"]
        with pytest.raises(ValueError):
            ds.set_attr("Bad", ["x"] * 5, axis=0, dtype="float64")
    with h5py.File(path, "r") as f:
        assert f["row_attrs/Extra"][...].tolist() == list(range(5))
        assert f["col_attrs/Typed"].dtype == np.float32
        assert f["row_attrs/Multi"].shape == (5, 2)
        assert f["col_attrs"]["Name"].maxshape[0] is None  # column attributes can grow
    with loompy.connect(path) as ds:
        assert list(ds.ca.Name) == [f"n{i}" for i in range(8)]
        del ds.ra.Extra
        ds.delete_attr("Typed", axis=1)
        del ds.ca["Name"]
        assert "Extra" not in ds.ra and "Typed" not in ds.ca and "Name" not in ds.ca
    with h5py.File(path, "r") as f:
        assert "Extra" not in f["row_attrs"] and "Typed" not in f["col_attrs"]


def test_dot_access_precedence(tmp_path):
    m = np.zeros((2, 3), dtype=np.float32)
    with loompy.create(tmp_path / "p.loom", m, {"Name": ["r0", "r1"], "shape": [1, 2], "OnlyRow": [5, 6]},
                       {"Name": ["c0", "c1", "c2"]}) as ds:
        assert list(ds.Name) == ["c0", "c1", "c2"]  # column attributes win
        assert list(ds.OnlyRow) == [5, 6]
        assert ds.shape == (2, 3)  # methods and properties win over attributes
        with pytest.raises(AttributeError):
            ds.Missing


def test_every_name_assigned_with_a_dot_is_written(small):
    """``ds.ra._Valid = ...`` (and on the other managers) set a Python attribute of the manager and
    wrote nothing, though it read back; ``ds.ca.axis = ...`` replaced the manager's own axis and broke
    every later write through it. loompy 3 writes both."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.ra._Valid = np.arange(5)
        ds.ca._Total, ds.ca.axis = np.arange(8), np.arange(8) * 2
        ds.attrs._note = "kept"
        ds.layers._spliced = m * 2
        ds.col_graphs._knn, ds.row_graphs.axis = sp.eye(8), sp.eye(5)
        ds.ca.After = np.ones(8)  # (the manager still works)
        view = ds.view[:, :3]
        view.layers.extra, view.attrs.seen = np.ones((5, 3)), 1
        assert "extra" in view.layers.keys() and view.attrs["seen"] == 1
    with h5py.File(path, "r") as f:
        assert f["row_attrs/_Valid"][:].tolist() == list(range(5))
        assert f["col_attrs/_Total"][:].tolist() == list(range(8))
        assert f["col_attrs/axis"][:].tolist() == list(range(0, 16, 2)) and "After" in f["col_attrs"]
        assert f["attrs/_note"].asstr()[()] == "kept"
        np.testing.assert_array_equal(f["layers/_spliced"][:, :], m * 2)
        assert set(f["col_graphs"]) == {"_knn"} and set(f["row_graphs"]) == {"axis"}


def test_overwriting_attribute_in_place_does_not_grow_file(small):
    path, *_ = small
    with loompy.connect(path) as ds:
        ds.ra.Score = np.zeros(5)
    size = path.stat().st_size
    for i in range(20):
        with loompy.connect(path) as ds:
            ds.ra.Score = np.full(5, float(i))
            ds.ca.CellID = np.array([f"cell-{i}-{j}" for j in range(8)])
    assert path.stat().st_size <= size + 64 * 1024
    with loompy.connect(path) as ds:
        np.testing.assert_array_equal(ds.ra.Score, np.full(5, 19.0))


def test_global_attributes(small):
    path, *_ = small
    with loompy.connect(path) as ds:
        assert ds.attrs["title"] == "Small <test>" and ds.attrs.title == "Small <test>"
        assert ds.attrs["LOOM_SPEC_VERSION"] == "3.0.0"
        assert "CreationDate" in ds.attrs
        ds.attrs.description = "Longer text é"
        ds.attrs["n"] = 42
        ds.attrs["ratio"] = 0.5
        ds.attrs["tags"] = ["a", "b", "ç"]
        ds.attrs["vec"] = np.arange(4)
        with pytest.raises(ValueError):
            ds.attrs["LOOM_SPEC_VERSION"] = "9"
        with pytest.raises(ValueError):
            del ds.attrs["LOOM_SPEC_VERSION"]
        with pytest.raises(TypeError):
            ds.attrs["bad"] = {"a": 1}
    with loompy.connect(path, "r") as ds:
        assert ds.attrs.description == "Longer text é"
        assert int(ds.attrs.n) == 42 and float(ds.attrs.ratio) == 0.5
        assert list(ds.attrs.tags) == ["a", "b", "ç"]
        np.testing.assert_array_equal(ds.attrs.vec, np.arange(4))
    with loompy.connect(path) as ds:
        del ds.attrs.description
        assert "description" not in ds.attrs
        with pytest.raises(KeyError):
            ds.attrs["description"]
        with pytest.raises(AttributeError):
            ds.attrs.description


def test_layers(small):
    path, m, *_ = small
    with loompy.connect(path) as ds:
        assert ds.layers.keys() == [""]
        ds.layers["dense"] = m * 2
        ds.layers["sparse"] = sp.csr_matrix(m.astype(np.int32))
        ds.layers["empty"] = "float64"
        ds.set_layer("explicit", m, dtype="uint16", chunks=(2, 3), compression_opts=7)
        ds["viaitem"] = m + 1
        assert set(ds.layers.keys()) == {"", "dense", "sparse", "empty", "explicit", "viaitem"}
        np.testing.assert_array_equal(ds.layers["dense"][:, :], m * 2)
        np.testing.assert_array_equal(ds["viaitem"][1:3, ::2], (m + 1)[1:3, ::2])
        assert ds.layers["sparse"].dtype == np.int32
        assert ds.layers["empty"].dtype == np.float64 and not ds.layers["empty"][:, :].any()
        sm = ds.layers["sparse"].sparse()
        assert sp.isspmatrix_coo(sm) and sm.dtype == np.int32
        np.testing.assert_array_equal(sm.toarray(), m.astype(np.int32))
        as_float = ds.layers["sparse"].sparse(rows=[3, 1], dtype="float32")  # loompy 3's dtype argument
        assert as_float.dtype == np.float32
        np.testing.assert_array_equal(as_float.toarray(), m[[3, 1]].astype(np.float32))
        np.testing.assert_array_equal(ds.layers["dense"].as_csr().toarray(), m * 2)
        np.testing.assert_array_equal(ds.layers["dense"].as_csc().toarray(), m * 2)
        np.testing.assert_array_equal(ds.layers["dense"].as_coo().toarray(), m * 2)
        np.testing.assert_array_equal(ds.sparse(rows=[4, 0], cols=np.arange(8) > 3).toarray(), m[[4, 0]][:, 4:])
        np.testing.assert_array_equal(ds.sparse(layer="dense").toarray(), m * 2)
        np.testing.assert_array_equal(np.asarray(ds.layers["dense"]), m * 2)
        ds.layers["dense"][0, :] = 99
        assert (ds.layers["dense"][0] == 99).all()
        del ds.layers["empty"]
        assert "empty" not in ds.layers
        with pytest.raises(KeyError):
            ds.layers["empty"]
        with pytest.raises(ValueError):
            del ds.layers[""]
        with pytest.raises(ValueError):
            ds.layers["wrong"] = np.zeros((3, 3))
        with pytest.raises(ValueError):
            ds.layers["bad"] = np.array([["a"] * 8] * 5)
    with h5py.File(path, "r") as f:
        e = f["layers/explicit"]
        assert e.dtype == np.uint16 and e.chunks == (2, 3) and e.compression_opts == 7
        assert f["matrix"].chunks == (5, 8) and f["matrix"].compression == "gzip"
        assert f["matrix"].compression_opts == 2 and f["matrix"].maxshape == (5, None)


def test_graphs(small):
    path, *_ = small
    g = sp.coo_matrix((np.array([0.5, 1.5, 2.0]), (np.array([0, 1, 7]), np.array([1, 2, 0]))), shape=(8, 8))
    with loompy.connect(path) as ds:
        ds.col_graphs["knn"] = g
        ds.row_graphs.net = sp.csr_matrix(np.eye(5))
        ds.set_edges("edges", [0, 1], [1, 2], [1.0, 3.0], axis=1)
        with pytest.raises(ValueError):
            ds.col_graphs["bad"] = sp.coo_matrix(np.eye(5))
        with pytest.raises(ValueError):
            ds.set_edges("bad", [0, 8], [1, 2], [1.0, 1.0], axis=1)
    with loompy.connect(path, "r") as ds:
        knn = ds.col_graphs["knn"]
        assert sp.isspmatrix_coo(knn) and knn.shape == (8, 8)
        np.testing.assert_array_equal(knn.toarray(), g.toarray())
        np.testing.assert_array_equal(ds.row_graphs.net.toarray(), np.eye(5))
        assert set(ds.list_edges(axis=1)) == {"knn", "edges"}
        a, b, w = ds.get_edges("edges", axis=1)
        assert list(a) == [0, 1] and list(b) == [1, 2] and list(w) == [1.0, 3.0]
    with loompy.connect(path) as ds:
        del ds.col_graphs["knn"]
        assert "knn" not in ds.col_graphs
    with h5py.File(path, "r") as f:
        assert set(f["col_graphs/edges"].keys()) == {"a", "b", "w"}


def test_global_attributes_read_again_only_once_written_by_any_connection(small, monkeypatch):
    """Global attributes are kept once read (a view read them all each time) until /attrs is written
    again, through any connection of the process; an array given out is the caller's to change."""
    path, *_ = small
    reads = []
    real = fmt.read_global
    monkeypatch.setattr(fmt, "read_global", lambda f, name, *rest: reads.append(name) or real(f, name, *rest))
    with loompy.connect(path) as ds, loompy.connect(path) as other:
        ds.attrs["vector"] = np.arange(3)
        for _ in range(3):
            ds.view[:2, :2]
            got = ds.attrs["vector"]
            got[0] = 99
        assert ds.attrs["vector"].tolist() == [0, 1, 2] and reads.count("vector") == 1
        other.attrs["vector"] = np.arange(4)
        assert ds.attrs["vector"].tolist() == [0, 1, 2, 3] and "extra" not in ds.attrs.keys()
        other.attrs["extra"] = "x"
        assert "extra" in ds.attrs.keys() and ds.attrs.extra == "x"
        del other.attrs["extra"]
        assert "extra" not in ds.attrs.keys() and "extra" not in ds.attrs
        with pytest.raises(KeyError):
            ds.attrs["extra"]


def test_graphs_are_stored_gzip_compressed_in_whole_chunks_any_hdf5_reader_reads(small, monkeypatch):
    """a, b and w are deflated here and stored as chunks of HDF5's gzip filter (HDF5's own zlib took
    8x the time): plain h5py reads every edge back, across chunk boundaries and a last partial chunk."""
    from loompy import graphs

    monkeypatch.setattr(graphs, "VECTOR_CHUNK", 7)  # (chunks of 7 edges: 30 edges, a partial last)
    path, *_ = small
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 8, 30), rng.integers(0, 8, 30)
    w = rng.random(30).astype(np.float32)
    with loompy.connect(path) as ds:
        ds.col_graphs["g"] = sp.coo_matrix((w, (a, b)), shape=(8, 8))
        expected = ds.col_graphs["g"]  # (scipy keeps the edges as given)
    with h5py.File(path, "r") as f:
        for key, values in (("a", expected.row), ("b", expected.col), ("w", expected.data)):
            stored = f[f"col_graphs/g/{key}"]
            assert stored.compression == "gzip" and stored.chunks == (7,) and stored.shape == (30,)
            assert stored[:].tolist() == values.tolist()
        assert f["col_graphs/g/w"].dtype == np.float32 and sorted(zip(a.tolist(), b.tolist())) == \
            sorted(zip(f["col_graphs/g/a"][:].tolist(), f["col_graphs/g/b"][:].tolist()))


def test_a_graph_read_again_is_the_one_last_written_wherever_it_was_written(small, monkeypatch):
    """Graphs are kept once read or written (each read took 5.6 ms), and read again when a write
    through any connection of the process replaced it, or columns were appended. The graph given
    out is the caller's to change."""
    from loompy import graphs

    path, m, *_ = small
    reads = []
    real = graphs.read_edges
    monkeypatch.setattr(graphs, "read_edges", lambda g, n: reads.append(g.name) or real(g, n))
    with loompy.connect(path) as ds, loompy.connect(path) as other:
        ds.col_graphs["knn"] = sp.coo_matrix(([1.0, 2.0], ([0, 1], [1, 2])), shape=(8, 8))
        first = ds.col_graphs["knn"]
        first.data[:] = 9  # (the caller's copy)
        assert ds.col_graphs["knn"].data.tolist() == [1.0, 2.0] and reads == []
        other.col_graphs["knn"] = sp.coo_matrix(([5.0], ([3], [4])), shape=(8, 8))
        assert ds.col_graphs["knn"].data.tolist() == [5.0] and reads == ["/col_graphs/knn"]
        assert ds.col_graphs["knn"].data.tolist() == [5.0] and reads == ["/col_graphs/knn"]
        ds.add_columns(np.ones((5, 2), m.dtype), {name: values[:2] for name, values in ds.ca.items()})
        assert ds.col_graphs["knn"].shape == (10, 10) and ds.col_graphs["knn"].data.tolist() == [5.0]
        del other.col_graphs["knn"]
        assert "knn" not in ds.col_graphs
        with pytest.raises(KeyError):
            ds.col_graphs["knn"]


def test_a_graph_written_while_another_write_ran_is_read_again_not_kept(small, monkeypatch):
    """A graph write keeps what it wrote only if no other graph write ran meanwhile (another thread's
    write of the same name between the two would leave this connection keeping the wrong one)."""
    from loompy import graphs, handles

    path, *_ = small
    real = graphs.swaps.replace

    def another_write_meanwhile(parent, name, build):
        done = real(parent, name, build)
        handles.changed(parent.file, "graphs")  # (what another thread's write of a graph does)
        return done

    with loompy.connect(path) as ds:
        monkeypatch.setattr(graphs.swaps, "replace", another_write_meanwhile)
        ds.col_graphs["knn"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(8, 8))
        assert "knn" not in ds.col_graphs._found  # (read from the file next time)
        monkeypatch.undo()
        ds.col_graphs["knn"] = sp.coo_matrix(([2.0], ([0], [1])), shape=(8, 8))
        assert ds.col_graphs._found["knn"][1].data.tolist() == [2.0]


def test_layer_and_graph_names_are_listed_again_after_any_change_through_any_connection(small, tmp_path,
                                                                                       monkeypatch):
    """Layer names are kept once listed (a view listed them, and the graphs', each time: 0.5 ms of a
    0.9 ms view); layer and graph names are listed again after a layer or graph is created, replaced
    or deleted through any connection of the process, or an empty file's first append is undone."""
    from loompy import format as fmt_module
    from loompy import growing

    path, m, *_ = small
    listings = []
    real = fmt_module.matrix_datasets
    monkeypatch.setattr(fmt_module, "matrix_datasets", lambda f: listings.append(1) or real(f))
    with loompy.connect(path) as ds, loompy.connect(path) as other:
        assert ds.layers.keys() == [""] and ds.layers.keys() == [""] and len(listings) == 1
        assert "x" not in ds.layers and ds.view[:2, :3].shape == (2, 3) and len(listings) == 1
        other.layers["x"] = m
        assert ds.layers.keys() == ["", "x"] and "x" in ds.layers and ds.view[:2, :3].layers.keys() == ["", "x"]
        other.layers["x"] = m.astype(np.float64)  # replaced
        assert ds.layers["x"].dtype == np.float64
        del other.layers["x"]
        assert ds.layers.keys() == [""] and "x" not in ds.layers
        assert ds.col_graphs.keys() == [] and "g" not in ds.col_graphs
        other.col_graphs["g"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(8, 8))
        assert ds.col_graphs.keys() == ["g"] and "g" in ds.col_graphs and ds.view[:, :3].col_graphs.keys() == ["g"]
        del other.col_graphs["g"]
        assert ds.col_graphs.keys() == [] and "g" not in ds.col_graphs
        names = ds.layers.keys()
        names.append("mine")  # (the caller's list)
        assert ds.layers.keys() == [""]

    empty = tmp_path / "empty.loom"
    loompy.new(empty).close()
    with loompy.connect(empty) as ds, loompy.connect(empty) as other:
        assert other.layers.keys() == [] and other.col_graphs.keys() == []
        ds.add_columns({"": np.ones((3, 2)), "x": np.ones((3, 2))}, {"c": np.arange(2)}, row_attrs={"r": np.arange(3)})
        assert other.layers.keys() == ["", "x"]
        ds.col_graphs["g"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(2, 2))
        assert other.col_graphs.keys() == ["g"]

    loompy.new(empty).close()  # an append that fails leaves the file empty again
    with loompy.connect(empty) as ds, loompy.connect(empty) as other:

        def fail(f):
            assert other.layers.keys() == [""]  # (listed as the append wrote)
            raise OSError("disk gone")

        monkeypatch.setattr(growing.journal, "commit", fail)
        with pytest.raises(OSError, match="disk gone"):
            ds.add_columns({"": np.ones((3, 2))}, {"c": np.arange(2)}, row_attrs={"r": np.arange(3)})
        assert other.layers.keys() == [] and ds.layers.keys() == []


def test_names_kept_are_listed_again_after_a_delete_an_interrupt_cut_short(small, monkeypatch):
    """Ctrl-C just after h5py deleted a layer or graph, before the change was counted, left every
    connection of the process listing it (and handing out the deleted graph) for good."""
    path, m, *_ = small
    with loompy.connect(path) as ds, loompy.connect(path) as other:
        ds.layers["x"] = m
        ds.col_graphs["g"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(8, 8))
        assert other.layers.keys() == ["", "x"] and other.col_graphs.keys() == ["g"] and other.col_graphs["g"].nnz
        real = h5py.Group.__delitem__

        def delete_then_interrupted(group, name):
            real(group, name)
            raise KeyboardInterrupt

        monkeypatch.setattr(h5py.Group, "__delitem__", delete_then_interrupted)
        for delete in (lambda: ds.layers.__delitem__("x"), lambda: ds.col_graphs.__delitem__("g")):
            with pytest.raises(KeyboardInterrupt):
                delete()
        monkeypatch.undo()
        assert other.layers.keys() == [""] and other.col_graphs.keys() == [] and "g" not in other.col_graphs


def test_an_append_keeps_the_row_attribute_values_it_read(small, monkeypatch):
    """After add_columns the connection re-read every row attribute from the file (the rows do not
    change): in a loop passing row_attrs, each call read and decoded them all again."""
    from loompy import encoding

    path, m, *_ = small
    with loompy.connect(path) as ds:
        genes = ds.ra.Gene
        reads = []
        real = encoding.read_values
        monkeypatch.setattr(encoding, "read_values", lambda d, legacy: reads.append(d.name) or real(d, legacy))
        for _ in range(3):
            ds.add_columns(np.ones((5, 2), m.dtype), {k: v[:2] for k, v in ds.ca.items()},
                           row_attrs={"Gene": genes, "New": np.arange(5)})
        assert "/row_attrs/Gene" not in reads and list(ds.ra.Gene) == list(genes)
        assert ds.ra.New.tolist() == list(range(5))


def test_read_only_mode_refuses_writes_and_leaves_file_intact(small):
    path, m, *_ = small
    before = digest(path)
    with loompy.connect(path, "r") as ds:
        assert ds.mode == "r"
        for action in (lambda: ds.ra.__setitem__("X", np.ones(5)), lambda: ds.attrs.__setitem__("t", "x"),
                       lambda: ds.layers.__setitem__("L", m), lambda: ds.__setitem__((0, 0), 1),
                       lambda: ds.col_graphs.__setitem__("g", sp.coo_matrix((8, 8))),
                       lambda: ds.ra.__delitem__("Gene"), lambda: ds.permute(np.arange(8)[::-1], axis=1)):
            with pytest.raises(OSError) as info:
                action()
            assert str(path) in str(info.value)
            assert isinstance(info.value, ValueError)  # (as loompy 3 raised)
        assert loompy.handles.changes(ds._file, "writes") == 0  # (refused: no scan reads a batch again)
        with pytest.raises(AttributeError, match="differ in dtype"):  # (loompy 3's error)
            ds.ca[("CellID", "Age")]
    assert digest(path) == before


def test_a_replaced_or_deleted_layer_leaves_no_chunk_index_behind(tmp_path):
    """A layer made under the name of one that was read in full reads as itself (zeros), not as
    the old layer's chunks."""
    rng = np.random.default_rng(3)
    m = rng.random((640, 640)).astype(np.float32) + 1
    layers, genes, cells = {"": m, "x": m, "y": m}, {"g": np.arange(640)}, {"c": np.arange(640)}
    with loompy.create(tmp_path / "r.loom", layers, genes, cells) as ds:
        ds.layers["x"][:, :], ds.layers["y"][:, :]  # reads of every chunk: both get a chunk index
        ds.layers["x"] = "float64"  # replaced
        np.testing.assert_array_equal(ds.layers["x"][:, :], np.zeros((640, 640)))
        del ds.layers["y"]
        ds.layers["y"] = "float32"
        np.testing.assert_array_equal(ds.layers["y"][:, :], np.zeros((640, 640)))
        np.testing.assert_array_equal(ds[:, :], m)


def test_a_deleted_layer_is_not_kept_open(small):
    """Once deleted, a layer that was read holds no dataset of the file open (its space is free to reuse)."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.layers["extra"] = m
        open_datasets = h5py.h5f.get_obj_count(ds._file.id, h5py.h5f.OBJ_DATASET)
        np.testing.assert_array_equal(ds.layers["extra"][:, :], m)
        assert h5py.h5f.get_obj_count(ds._file.id, h5py.h5f.OBJ_DATASET) == open_datasets + 1
        del ds.layers["extra"]
        assert h5py.h5f.get_obj_count(ds._file.id, h5py.h5f.OBJ_DATASET) == open_datasets


def test_compound_attributes_with_text_fields_are_stored_and_carried_through(small, tmp_path):
    path, m, *_ = small
    values = np.zeros(8, dtype=[("name", "U5"), ("v", "f8")])
    values["name"], values["v"] = [f"n{i}é" for i in range(8)], np.arange(8) / 2
    with h5py.File(path, "r+") as f:  # as another writer stores one: fixed-length bytes
        stored = np.zeros(5, dtype=[("tag", "S4"), ("n", "i4")])
        stored["tag"], stored["n"] = [b"a", b"bb", b"ccc", b"dddd", b"e"], np.arange(5)
        f["row_attrs"].create_dataset("Tagged", data=stored)
    with loompy.connect(path) as ds:
        ds.ca["Named"] = values
        assert list(ds.ca["Named"]["name"]) == list(values["name"])
        ds.ra["Tagged"] = ds.ra["Tagged"]  # written back as read
        ds.permute(np.arange(8)[::-1], axis=1)
    loompy.combine([path, path], tmp_path / "both.loom")
    with loompy.connect(path, "r") as ds, loompy.connect(tmp_path / "both.loom", "r") as both:
        assert list(ds.ca["Named"]["name"]) == list(values["name"][::-1])
        np.testing.assert_array_equal(ds.ca["Named"]["v"], values["v"][::-1])
        assert list(ds.ra["Tagged"]["tag"]) == ["a", "bb", "ccc", "dddd", "e"]
        np.testing.assert_array_equal(ds.ra["Tagged"]["n"], np.arange(5))
        assert list(both.ca["Named"]["name"]) == 2 * list(values["name"][::-1])


def test_an_attribute_hdf5_refuses_to_store_keeps_the_old_one(small, monkeypatch):
    path, *_ = small
    real = h5py.Group.create_dataset

    def refuse(self, name, *args, **kwargs):  # HDF5 fails after making the dataset
        real(self, name, *args, **kwargs)
        raise TypeError("refused")

    with loompy.connect(path) as ds:
        monkeypatch.setattr(h5py.Group, "create_dataset", refuse)
        with pytest.raises(loompy.LoomValueError, match="Age"):
            ds.ca["Age"] = np.array([f"x{i}" for i in range(8)])
        monkeypatch.undo()
        assert sorted(ds._file["col_attrs"]) == ["Age", "CellID", "Keep"]
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds.ca.Age, np.arange(8) * 2)


def test_seed_signatures_of_create_and_add_columns(small, tmp_path):
    """The seed's positional create() and add_columns(submatrix=...) work as documented."""
    path, m, ra, ca = small
    with loompy.create(tmp_path / "p.loom", m, ra, ca, {"title": "t"}, (4, 4), 64, "float64", 5) as ds:
        assert ds.attrs.title == "t" and ds.layers[""].dtype == np.float64
        assert ds._file["matrix"].chunks == (4, 4) and ds._file["matrix"].compression_opts == 5
        ds.add_columns(submatrix=m[:, :2].astype(np.float64), col_attrs={k: v[:2] for k, v in ca.items()})
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m[:, :2]]))
        with pytest.raises(TypeError):
            ds.add_columns(m[:, :2], {k: v[:2] for k, v in ca.items()}, submatrix=m[:, :2])


def test_a_legacy_global_attribute_hdf5_refuses_keeps_the_old_value(tmp_path):
    """Files of spec 2 keep global attributes in the root's HDF5 attributes (64 KB each at most)."""
    path = tmp_path / "legacy.loom"
    shutil.copy(REAL / "linnarsson-lab+loompy/_history/bc58ebdd2632/test.loom", path)
    with loompy.connect(path) as ds:
        ds.attrs["description"] = "x" * 100000  # text lives outside the header: any length
        with pytest.raises(loompy.LoomValueError, match="description"):
            ds.attrs["description"] = np.arange(20000.0)
        assert ds.attrs.description == "x" * 100000
        ds.attrs["description"] = np.arange(3.0)  # replaced beside the old value, then renamed
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds.attrs.description, np.arange(3.0))
        # (the root's stamp is listed, as loompy 3.0.8 lists it; loompy keeps it, so it cannot be deleted)
        assert sorted(ds.attrs.keys()) == ["CreationDate", "LOOM_SPEC_VERSION", "description", "last_modified"]
        assert ds.attrs.last_modified == ds.last_modified() and len(ds.attrs) == 4
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match="legacy.loom: global attribute 'last_modified' is managed"):
            del ds.attrs["last_modified"]


def test_a_read_only_connection_to_a_file_open_for_writing_stays_read_only(small):
    """HDF5 gives a second opening of a file open for writing in this process that same writable
    file; the 'r' connection still refuses to write, and leaves the writer's journal alone."""
    path, m, *_ = small
    with loompy.connect(path) as writer:
        writer._file.attrs["loompy_append_from_columns"] = 8  # as in the middle of an append
        with pytest.raises(loompy.LoomFileError, match="unfinished"):
            loompy.connect(path, "r")
        del writer._file.attrs["loompy_append_from_columns"]
        with loompy.connect(path, "r") as reader:
            assert reader.mode == "r" and writer.mode == "r+"
            for write in (lambda: reader.__setitem__((0, 0), 5), lambda: reader.ca.__setitem__("X", np.ones(8)),
                          lambda: reader.layers[""].__setitem__((0, 0), 5), lambda: reader.attrs.__setitem__("t", "x")):
                with pytest.raises(loompy.LoomFileError, match="read-only") as refused:
                    write()
                assert str(refused.value).count(str(path)) == 1, refused.value  # (the file named once)
            np.testing.assert_array_equal(reader[:, :], m)


@pytest.mark.parametrize("dtype", ["float32", "float64"])  # the same dtype as stored, and another
def test_an_interrupted_layer_replacement_leaves_the_old_layer_whole(small, monkeypatch, dtype):
    """A replacement is written beside the old layer and swapped in once complete, whatever its
    dtype: interrupted halfway, the old layer reads as it was and nothing of the new one is left.
    Replaced again and again while the file is open, the file takes at most one extra copy."""
    path, m, *_ = small
    layers_module = importlib.import_module("loompy.layers")
    real = layers_module.engine.write_matrix

    def interrupted(dataset, matrix, *args, **kwargs):
        real(dataset, matrix[:, :4], *args, **kwargs)  # half of it is written, then Ctrl-C
        raise KeyboardInterrupt

    with loompy.connect(path) as ds:
        held = ds.layers[""]
        monkeypatch.setattr(layers_module.engine, "write_matrix", interrupted)
        with pytest.raises(KeyboardInterrupt):
            ds.layers[""] = (m * 10).astype(dtype)
        monkeypatch.undo()
        np.testing.assert_array_equal(ds[:, :], m)
        assert ds.layers[""].dtype == np.float32 and not any("loompy" in k for k in ds._file)
        assert not any(k.startswith("loompy") for k in ds._file["matrix"].attrs)
        ds.layers[""] = (m * 10).astype(dtype)
        np.testing.assert_array_equal(held[:, :], m * 10)  # a layer object held before sees the new values
        held[0, 0] = -1  # ... and writes to them
        assert ds[0, 0] == -1
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[1:, :], (m * 10).astype(dtype)[1:])
    size = path.stat().st_size
    with h5py.File(path, "r") as f:
        stored = f["matrix"].id.get_storage_size()
    with loompy.connect(path) as ds:
        for k in range(5):  # the old layer's space is reused while the file is open
            ds.layers[""] = (m * k).astype(dtype)
    assert path.stat().st_size <= size + 2 * stored + 65536
    with loompy.connect(path, "r") as ds:
        assert ds.layers[""].dtype == np.dtype(dtype) and ds[4, 7] == m[4, 7] * 4


@pytest.mark.parametrize("step", ["create", "swap", "drop old"])
def test_a_layer_replacement_killed_at_any_step_is_settled_on_the_next_open(small, monkeypatch, step):
    """Whatever step a kill interrupts, the next 'r+' open leaves one complete layer under its name
    (the old values, or the new ones once swapped in) and nothing of the swap behind; a read-only
    open shows only the real layers."""
    path, m, *_ = small
    swaps = importlib.import_module("loompy.swaps")
    layers_module = importlib.import_module("loompy.layers")
    with loompy.connect(path) as ds:
        ds.layers["x"] = m * 2
    real_create = layers_module.fmt.create_matrix

    def killed(*args, **kwargs):
        raise SystemExit  # stands in for the kill

    def swap_then_killed(group, name, staged):  # renames done; killed before the old one is dropped
        f, target = group.file, f"{group.name}/{name}"
        f.move(target, f"{staged}.old")
        f.move(staged, target)
        raise SystemExit

    if step == "create":
        monkeypatch.setattr(layers_module.fmt, "create_matrix",
                            lambda *a, **k: (real_create(*a, **k), killed())[0])
    elif step == "swap":
        monkeypatch.setattr(layers_module.swaps, "swap_in", lambda *a: killed())
    else:
        monkeypatch.setattr(layers_module.swaps, "swap_in", swap_then_killed)
    ds = loompy.connect(path)
    with pytest.raises(SystemExit):
        ds.layers["x"] = (m * 3).astype(np.float64)  # another dtype: written beside, then swapped in
    ds._file.flush()
    ds._file.close()  # (a killed process runs no clean-up: the file is left as it is)
    monkeypatch.undo()
    with loompy.connect(path, "r") as ds:
        assert ds.layers.keys() == ["", "x"]
    with loompy.connect(path) as ds:
        assert ds.layers.keys() == ["", "x"]
        np.testing.assert_array_equal(ds.layers["x"][:, :], m * (3 if step == "drop old" else 2))
        assert swaps.STAGING not in ds._file and not [k for k in ds._file["layers"] if "loompy" in k]


def test_assignments_refuse_values_the_layer_cannot_hold(small):
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.layers["i8"] = np.zeros((5, 8), np.int8)
        for value in (300, -1.5, np.nan):
            with pytest.raises(loompy.LoomValueError, match="int8"):
                ds.layers["i8"][0, 0] = value
        ds.layers["i8"][0, :2] = [127, -128]
        for write in (lambda: ds.set_layer("big", np.full((5, 8), 300), dtype="int8"),
                      lambda: ds.set_layer("i8", sp.csr_matrix(np.full((5, 8), 0.5)), dtype="int8"),
                      lambda: loompy.create(path.parent / "n.loom", np.full((5, 8), -1), {}, {}, dtype="uint8")):
            with pytest.raises(loompy.LoomValueError, match="int8"):
                write()
        assert "big" not in ds.layers and not (path.parent / "n.loom").exists()
        ds.layers["u16"] = np.zeros((5, 8), np.uint16)
        twice = sp.coo_matrix((np.array([200, 200]), ([0, 0], [0, 0])), shape=(5, 8))  # 400 once summed
        for write in (lambda: ds.layers["u16"].__setitem__((0, slice(0, 1)), np.array([-1], np.int16)),  # same width
                      lambda: ds.layers["i8"].__setitem__((0, slice(0, 1)), np.array([200], np.uint8)),
                      lambda: ds.set_layer("dup", twice, dtype="uint8")):
            with pytest.raises(loompy.LoomValueError, match="int"):
                write()
        ds.layers["u16"][0, :2] = np.array([65535, 0], np.int64)  # at the limits: fine
        with pytest.raises(loompy.LoomValueError, match="int8"):  # another file's layer, read to check it
            loompy.create(path.parent / "l.loom", ds.layers["u16"], {}, {}, dtype="int8")
        ds.layers["f32"] = np.zeros((5, 8), np.float32)
        ds.layers["f32"][0, 0] = np.int64(16777217)  # an integer float32 rounds: as float64 would
        assert ds.layers["u16"][0, 0] == 65535 and ds.layers["f32"][0, 0] == np.float32(16777216)
        ds[0, :] = np.full(8, 0.1)  # float64 into float32: rounding is no change of value here
        with pytest.raises(loompy.LoomValueError, match="float32"):
            ds[1, 0] = 1e300  # would overflow to infinity
        assert ds.layers["i8"][0, :3].tolist() == [127, -128, 0] and ds[0, 0] == np.float32(0.1)


def test_a_closed_connection_says_so(small):
    path, *_ = small
    ds = loompy.connect(path, "r")
    batches = ds.scan(axis=1, batch_size=2)
    next(batches)
    ds.close()
    for use in (lambda: ds[:, :], lambda: next(batches), lambda: ds.map(np.sum), lambda: next(ds.scan(axis=0)),
                lambda: ds.layers["x"], lambda: ds.sparse()):
        with pytest.raises(loompy.LoomFileError, match="small.loom: the connection is closed"):
            use()
    for use in (lambda: ds.layers.keys(), lambda: ds.row_graphs.keys(), lambda: ds.last_modified(),
                lambda: ds.view[:, :], lambda: ds.attrs.keys(), lambda: ds.attrs.title, lambda: ds.flush(),
                lambda: ds.ca.__setitem__("X", np.ones(8)), lambda: ds.layers.__setitem__("L", np.ones((5, 8))),
                lambda: ds.permute(np.arange(8), axis=1), lambda: ds.add_columns(np.ones((5, 1)), {})):
        with pytest.raises(loompy.LoomFileError, match="the connection is closed"):
            use()


def test_a_scan_closed_while_it_reads_ahead_says_so(small, monkeypatch):
    """The batch being read ahead when the connection closes fails with h5py's own error; the
    caller hears LoomFileError."""
    import threading

    operations = importlib.import_module("loompy.operations")
    path, *_ = small
    ds = loompy.connect(path, "r")
    closed, make_view, calls = threading.Event(), operations.make_view, []
    dataset = ds.layers[""]._dataset

    def view_read_as_the_file_closes(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the read ahead: under way (its dataset in hand) when the caller closes
            closed.wait(10)
            dataset[0, 0]
        return make_view(*args, **kwargs)

    monkeypatch.setattr(operations, "make_view", view_read_as_the_file_closes)
    batches = ds.scan(axis=1, batch_size=2)
    next(batches)
    ds.close()
    closed.set()
    with pytest.raises(loompy.LoomFileError, match="small.loom: the connection is closed"):
        next(batches)


def test_paths_that_are_not_loom_files_are_refused_untouched(tmp_path):
    empty = tmp_path / "empty.loom"
    empty.write_bytes(b"")
    folder = tmp_path / "folder.loom"
    folder.mkdir()
    for path in (empty, folder):
        for mode in ("r", "r+"):
            with pytest.raises(loompy.LoomFileError):
                loompy.connect(path, mode)
    assert empty.read_bytes() == b""
    with pytest.raises(loompy.LoomFileError, match="folder"):
        loompy.create(folder, np.ones((2, 2)), {}, {})
    assert folder.is_dir() and not list(tmp_path.glob(".*loom-tmp"))


def test_permute_rewrites_the_file_opened_whatever_the_working_directory(small, tmp_path, monkeypatch):
    path, m, *_ = small
    monkeypatch.chdir(path.parent)
    ds = loompy.connect(path.name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ds.permute(np.arange(8)[::-1], axis=1)
    ds.close()
    assert not (elsewhere / path.name).exists()
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m[:, ::-1])


def test_an_attribute_keeps_the_values_given_not_the_callers_array(small):
    path, *_ = small
    with loompy.connect(path) as ds:
        mine = np.arange(5)
        ds.ra.x = mine
        mine[:] = 9
        assert list(ds.ra.x) == [0, 1, 2, 3, 4]
        ds.permute(np.arange(5)[::-1], axis=0)
        assert list(ds.ra.x) == [4, 3, 2, 1, 0]


def test_booleans_are_stored_as_uint8(tmp_path):
    flags = np.eye(3, dtype=bool)
    for kwargs in ({}, {"dtype": bool}, {"dtype": "bool"}):
        with loompy.create(tmp_path / "b.loom", flags, {}, {}, **kwargs) as ds:
            assert ds.layers[""].dtype == np.uint8 and (ds[:, :] == flags).all()
            ds.layers["flag"] = flags
            ds.set_layer("again", flags.astype(np.int32), dtype=bool)
            assert ds.layers["flag"].dtype == ds.layers["again"].dtype == np.uint8
            assert (ds.layers["again"][:, :] == flags).all()


def test_connect_to_something_that_is_not_a_path():
    with pytest.raises(loompy.LoomTypeError, match="path"):
        loompy.connect(123)


def test_a_matrix_with_no_rows(tmp_path):
    with loompy.create(tmp_path / "z.loom", np.zeros((0, 3), np.float32), {}, {"c": np.arange(3)}) as ds:
        assert ds.shape == (0, 3) and ds[:, :].shape == (0, 3) and ds.sparse().nnz == 0
        ds.add_columns(np.zeros((0, 2), np.float32), {"c": [3, 4]})
        assert ds.shape == (0, 5) and list(ds.ca.c) == [0, 1, 2, 3, 4]
    assert loompy.LoomValidator().validate(tmp_path / "z.loom")


def test_empty_global_attributes_are_stored(small):
    path, *_ = small
    with loompy.connect(path) as ds:
        ds.attrs["none_yet"] = np.zeros(0)
    with loompy.connect(path, "r") as ds:
        assert ds.attrs.none_yet.shape == (0,)


def test_reading_in_read_write_mode_changes_nothing(small):
    path, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:  # default mode r+
        ds[:, :], ds.ra.Gene, ds.ca.to_dict(), ds.attrs.keys(), ds.sparse(), ds.col_graphs.keys()
    assert digest(path) == before


def test_rejected_calls_leave_file_byte_identical(small):
    path, m, *_ = small
    before = digest(path)
    bad_calls = [
        lambda ds: ds.ra.__setitem__("Gene", np.arange(4)),  # wrong length
        lambda ds: ds.ca.__setitem__("X", np.arange(9)),
        lambda ds: ds.ra.__setitem__("a/b", np.arange(5)),
        lambda ds: ds.ra.__setitem__("S", ["ok", "bad\x00", "x", "y", "z"]),
        lambda ds: ds.ra.__setitem__("S", np.array(["ok", "b\x00d", "x", "y", "z"], dtype=object)),
        lambda ds: ds.layers.__setitem__("L", np.zeros((5, 7))),
        lambda ds: ds.layers.__setitem__("L", np.zeros((5, 8), dtype=complex)),
        lambda ds: ds.attrs.__setitem__("LOOM_SPEC_VERSION", "1"),
        lambda ds: ds.col_graphs.__setitem__("g", sp.coo_matrix((5, 5))),
        lambda ds: ds.__setitem__((slice(None), slice(None)), np.zeros((2, 2))),
        lambda ds: ds.set_attr("x", np.ones(5), axis=2),
        lambda ds: ds.set_layer("", m * 2, compression_opts=12),  # storage settings HDF5 would refuse,
        lambda ds: ds.set_layer("", m.astype(np.float64), chunks=("a", 3)),  # on a layer to be replaced
        lambda ds: ds.set_layer("", m.astype(np.float64), chunks=None),
        lambda ds: ds.set_layer("", m.astype(np.float64), chunk_cache="big"),
        lambda ds: ds.layers.__setitem__("L", "notadtype"),
        lambda ds: ds.set_edges("g", np.array([0.5, 2.9]), np.array([1.0, 3.0]), np.ones(2), axis=1),
        lambda ds: ds.set_edges("g", np.array([0]), np.array([1]), np.ones(1), axis=2),
        lambda ds: ds.col_graphs.__setitem__("g", sp.coo_matrix(np.eye(8) * (1 + 2j))),
        lambda ds: ds.col_graphs.__setitem__("g", np.full((8, 8), "a")),
        lambda ds: ds.ca.__setitem__("CellID", np.array([f"c{i}" for i in range(7)] + ["bad\ud800"], dtype=object)),
        lambda ds: ds.add_columns(np.ones((5, 1), np.float32), {"CellID": ["x\ud800"], "Age": [1], "Keep": [1]}),
        lambda ds: ds.layers.__setitem__("L", [[1, 2], [3]]),  # ragged
        lambda ds: ds.__setitem__((0, 0), "abc"),
        lambda ds: ds.ca.__setitem__("Age", np.array([{"a": 1}] * 8, dtype=object)),
        # a mask would be dropped (numpy hands over what lies under it); 1-D and ragged new columns
        lambda ds: ds.ca.__setitem__("Age", np.ma.masked_array(np.arange(8), mask=np.arange(8) == 2)),
        lambda ds: ds.layers.__setitem__("L", np.ma.masked_array(m, mask=m == 3)),
        lambda ds: ds.__setitem__((0, slice(None)), np.ma.masked_array(np.zeros(8), mask=np.eye(8)[0])),
        lambda ds: ds.add_columns({"": np.ones(5)}, {"CellID": ["x"], "Age": [1], "Keep": [1]}),
        lambda ds: ds.add_columns([[1.0], [2.0, 3.0], [1.0], [1.0], [1.0]], {"CellID": ["x"], "Age": [1], "Keep": [1]}),
    ]
    for call in bad_calls:
        with loompy.connect(path) as ds:
            with pytest.raises(loompy.LoomError) as info:
                call(ds)
            assert isinstance(info.value, (ValueError, TypeError, IndexError, KeyError))
        assert digest(path) == before, call


def test_names_with_a_nul_are_refused_and_replace_nothing(small, tmp_path):
    """HDF5 ends a name at its NUL: "Age\\0z" would have overwritten the attribute Age (a graph, a
    global attribute alike), and in create one of two attributes was silently lost."""
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        ds.col_graphs["g"] = sp.coo_matrix(([1.0], ([0], [1])), shape=(8, 8))
    before = digest(path)
    calls = {
        "column attribute": lambda ds: ds.ca.__setitem__("Age\0z", np.zeros(8)),
        "row attribute": lambda ds: ds.ra.__setitem__("Gene\0z", np.array(list("zzzzz"))),
        "global attribute": lambda ds: ds.attrs.__setitem__("title\0z", "replaced"),
        "column graph": lambda ds: ds.col_graphs.__setitem__("g\0z", sp.coo_matrix((8, 8))),
        "layer": lambda ds: ds.layers.__setitem__("L\0z", m),
    }
    for kind, call in calls.items():
        with loompy.connect(path) as ds:
            with pytest.raises(loompy.LoomValueError, match=rf"small\.loom: {kind}.*NUL"):
                call(ds)
            assert ds.ca.Age.tolist() == ca["Age"].tolist() and ds.attrs.title == "Small <test>"
            assert ds.col_graphs["g"].nnz == 1 and list(ds.ra.Gene) == list(ra["Gene"])
        assert digest(path) == before, kind
    for where, kwargs in {"row attribute": {"row_attrs": {"a\0b": np.arange(5), "a": np.arange(5)}},
                          "global attribute": {"file_attrs": {"t\0": "x", "t": "y"}}}.items():
        with pytest.raises(loompy.LoomValueError, match=rf"new\.loom: {where}.*NUL"):
            loompy.create(tmp_path / "new.loom", m, kwargs.get("row_attrs", {}), {},
                          file_attrs=kwargs.get("file_attrs"))
        assert not (tmp_path / "new.loom").exists()
    with pytest.raises(loompy.LoomValueError, match=r"new\.loom: global attribute.*NUL"):
        loompy.new(tmp_path / "new.loom", file_attrs={"t\0": "x"})
    with pytest.raises(loompy.LoomValueError, match=r"both\.loom: global attribute.*NUL"):
        loompy.combine([path, path], tmp_path / "both.loom", file_attrs={"t\0": "x"})
    with pytest.raises(loompy.LoomValueError, match=r"both\.loom: global attribute 'LOOM_SPEC_VERSION'.*not a ver"):
        loompy.combine([path, path], tmp_path / "both.loom", file_attrs={"LOOM_SPEC_VERSION": 3})
    assert not (tmp_path / "both.loom").exists()


def test_combine_refuses_to_write_over_one_of_its_inputs(small, tmp_path):
    """combine([a, b], a) replaced the input a (and lost its graphs), under any name for it."""
    path, m, ra, ca = small
    other = tmp_path / "other.loom"
    loompy.create(other, m + 1, ra, ca).close()
    (tmp_path / "link.loom").symlink_to(other)
    before = {p: digest(p) for p in (path, other)}
    for combine in (loompy.combine, loompy.combine_faster):
        for out in (path, other, tmp_path / "sub" / ".." / "small.loom", tmp_path / "link.loom"):
            (tmp_path / "sub").mkdir(exist_ok=True)
            with pytest.raises(loompy.LoomFileError, match=r"is an input of combine"):
                combine([path, other], out)
    assert {p: digest(p) for p in (path, other)} == before
    loompy.combine([path, other], tmp_path / "both.loom")  # a new file is fine
    with loompy.connect(tmp_path / "both.loom", "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack([m, m + 1]))


def test_misused_module_helpers_say_what_they_take(small, tmp_path):
    """combine given one path (it combined the path's characters), file_attrs given a list, to_html
    given something else than a connection, spec versions that are not numbers, a permutation of
    an in-memory layer along a third axis: each refused with what it takes, no file written."""
    import h5py

    path, m, _, _ = small
    for combine in (loompy.combine, loompy.combine_faster):
        with pytest.raises(TypeError, match=r"combine takes a list of Loom files, not the single path"):
            combine(path, tmp_path / "out.loom")
        with pytest.raises(TypeError, match=r"out.loom: file_attrs must be a mapping \(a dict\)"):
            combine([path, path], tmp_path / "out.loom", file_attrs=["title"])
    with pytest.raises(TypeError, match=r"new.loom: file_attrs must be a mapping \(a dict\)"):
        loompy.create(tmp_path / "new.loom", m, {}, {}, file_attrs=[("title", "x")])
    assert not (tmp_path / "out.loom").exists() and not (tmp_path / "new.loom").exists()
    with pytest.raises(TypeError, match="to_html takes a Loom connection or view, not ndarray"):
        loompy.to_html(m)
    with h5py.File(path, "r") as f:
        for version in ("3.0.1-rc1", "three", "", "3..0", 3):
            with pytest.raises(ValueError, match="is not a version number such as '3.0.0'"):
                loompy.compare_loom_spec_version(f, version)
        assert loompy.compare_loom_spec_version(f, "3.0.0") == loompy.compare_loom_spec_version(f, " 3.0.0\n") == 0
    with loompy.connect(path, "r") as ds:
        layer = ds.view[:, :4].layers[""]
        for axis in (2, -1, True):
            with pytest.raises(ValueError, match=f"axis must be 0 \\(rows\\) or 1 \\(columns\\), got {axis}"):
                layer.permute([1, 0, 2, 3], axis=axis)
        np.testing.assert_array_equal(layer[:, :], m[:, :4])
        layer.permute([1, 0, 2, 3], axis=1.0)  # (an axis as loompy 3 takes it)
        np.testing.assert_array_equal(layer[:, :], m[:, [1, 0, 2, 3]])


def test_error_messages_name_file_and_thing(small):
    path, *_ = small
    with loompy.connect(path) as ds:
        for call in (lambda: ds[99, 0], lambda: ds.__setitem__((slice(None), 0), np.ones(3)),
                     lambda: ds.attrs.__setitem__("t", None), lambda: ds.set_attr("x", np.ones(5), axis=2),
                     lambda: ds.list_edges(5), lambda: ds.layers[""].__getitem__((0, 0, 0))):
            with pytest.raises(loompy.LoomError) as info:
                call()
            assert "small.loom" in str(info.value), info.value
        with pytest.raises(ValueError) as info:
            ds.ra["Gene"] = np.arange(4)
        assert "Gene" in str(info.value) and "small.loom" in str(info.value) and "5" in str(info.value)
        with pytest.raises(KeyError) as info:
            ds.layers["nope"]
        assert "nope" in str(info.value) and "small.loom" in str(info.value)


def test_index_errors_name_the_file_and_the_call_everywhere(small):
    """ds[...] named the file in its index errors; sparse(), ds.view[...], attribute and graph
    selections, map(selection=...) and batch_scan(genes=/cells=...) did not."""
    path, *_ = small
    with loompy.connect(path, "r") as ds:
        calls = {r"layer '': sparse\(\)": lambda: ds.sparse([100]),
                 "view": lambda: ds.view[[100], :],
                 "column attributes": lambda: ds.ca[np.ones(3, bool)],
                 "column graphs": lambda: ds.col_graphs[[100]],
                 r"layer '': map\(selection=...\)": lambda: ds.map([np.sum], axis=0, selection=[100]),
                 r"batch_scan\(genes=...\)": lambda: list(ds.batch_scan(axis=0, genes=[100])),
                 r"batch_scan\(cells=...\)": lambda: list(ds.batch_scan(axis=0, cells=[100]))}
        for where, call in calls.items():
            with pytest.raises(loompy.LoomIndexError, match=rf"^{re.escape(str(path))}: {where}: (row|column|boolean)"):
                call()
        view = ds.view[:, :3]
        with pytest.raises(loompy.LoomIndexError, match=r"^view: layer '': row index 100 is out of bounds"):
            view[[100], :]


def test_connect_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        loompy.connect(tmp_path / "missing.loom")
    assert "missing.loom" in str(info.value)
    bogus = tmp_path / "bogus.loom"
    bogus.write_bytes(b"not hdf5 at all")
    with pytest.raises(OSError) as info:
        loompy.connect(bogus)
    assert isinstance(info.value, loompy.LoomFileError) and "bogus.loom" in str(info.value)
    with pytest.raises(ValueError):
        loompy.connect(bogus, mode="w")
    broken = tmp_path / "broken.loom"
    with h5py.File(broken, "w") as f:
        f["matrix"] = np.zeros((3, 4))
        f["row_attrs/Gene"] = np.arange(7)
    with pytest.raises(loompy.LoomFormatError) as info:
        loompy.connect(broken)
    assert "Gene" in str(info.value)
    with loompy.connect(broken, validate=False) as ds:  # the escape hatch still opens it
        assert ds.shape == (3, 4)


def test_lock_error_names_the_lock_and_unlocked_read_only_works(small):
    path, *_ = small
    with held_for_writing(path):
        with pytest.raises(loompy.LoomLockError) as info:
            loompy.connect(path, "r")
        assert "lock" in str(info.value).lower() and "locking=False" in str(info.value)
        with loompy.connect(path, "r", locking=False) as ds:
            assert ds.shape == (5, 8)


def test_repr_and_html_escape_everything(tmp_path):
    m = np.arange(12 * 12, dtype=np.float32).reshape(12, 12)
    ra = {"Gene": np.array([f"<g{i}>&" for i in range(12)])}
    ca = {"<script>": np.array([f"c{i}" for i in range(12)])}
    with loompy.create(tmp_path / "h.loom", m, ra, ca) as ds:
        text = repr(ds)
        assert "h.loom" in text and "12 rows" in text and "Gene" in text
        page = ds._repr_html_()
        assert "<script>" not in page and "&lt;script&gt;" in page
        assert "&lt;g0&gt;&amp;" in page and "<g0>" not in page
        assert "(12, 12)" in page and page.count("<tr>") == 1 + 1 + 10 + 1
        assert ">9.0<" in page and ">10.0<" not in page  # only the 10x10 corner


def test_new_file_is_empty_and_valid(tmp_path):
    path = tmp_path / "new.loom"
    with loompy.new(path, file_attrs={"title": "empty"}) as ds:
        assert ds.shape == (0, 0) and ds.attrs.title == "empty"
    with h5py.File(path, "r") as f:
        assert {"attrs", "layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs"} <= set(f.keys())
        assert f["attrs/LOOM_SPEC_VERSION"][()] == b"3.0.0"


def test_create_accepts_dicts_managers_and_sliced_managers(small, tmp_path):
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        ds.layers["extra"] = m + 5
        keep = ds.ca.Age >= 4
        with loompy.create(tmp_path / "copy.loom", ds.layers, ds.ra, ds.ca) as copy:
            assert copy.layers.keys() == ds.layers.keys()
            np.testing.assert_array_equal(copy["extra"][:, :], m + 5)
            assert list(copy.ra.Gene) == list(ra["Gene"])
        sub = {name: layer[:, keep] for name, layer in ds.layers.items()}
        with loompy.create(tmp_path / "sub.loom", sub, ds.ra[:], ds.ca[keep]) as part:
            assert part.shape == (5, int(keep.sum()))
            np.testing.assert_array_equal(part[:, :], m[:, keep])
            np.testing.assert_array_equal(part.ca.Age, ca["Age"][keep])
    sparse_in = sp.random(300, 200, density=0.05, format="coo", random_state=1, dtype=np.float64)
    with loompy.create(tmp_path / "sp.loom", sparse_in, {}, {}) as ds:
        assert ds.layers[""].dtype == np.float64
        np.testing.assert_array_equal(ds[:, :], sparse_in.toarray())
    with pytest.raises(ValueError):
        loompy.create(tmp_path / "bad.loom", {"": m, "x": np.zeros((2, 2))}, {}, {})
    with pytest.raises(ValueError):
        loompy.create(tmp_path / "bad.loom", {"x": m}, {}, {})
    with pytest.raises(ValueError):
        loompy.create(tmp_path / "bad.loom", m, {"Gene": np.arange(3)}, {})
    assert not (tmp_path / "bad.loom").exists()
    assert not list(tmp_path.glob("*.loom-tmp"))


def test_validator(small, tmp_path):
    path, *_ = small
    v = loompy.LoomValidator()
    assert v.validate(path) and v.errors == []
    assert any("matrix" in line for line in v.summary)
    assert not v.validate(path, strictness="conventions")  # (no ClusterID, no Accession)
    assert v.errors == ["column attribute 'ClusterID' is missing", "row attribute 'Accession' is missing"]
    with loompy.connect(path) as ds:
        ds.ca.ClusterID = np.array([0, 1, 1, 2, 0, 0, 2, 1])
        ds.ca.ClusterName = np.array(["a", "b", "b", "c", "a", "a", "c", "b"], dtype=object)
        ds.ra.Accession = np.array([f"ENSG{i}" for i in range(5)], dtype=object)
    assert v.validate(path, strictness="conventions"), v.errors
    assert "optional column attribute 'Valid' is missing" in v.warnings
    with loompy.connect(path) as ds:
        ds.ca.ClusterID = np.array([0, 1, 1, 3, 0, 0, 3, 1])
        ds.ra.Accession = np.array(["a", "a", "b", "c", "d"], dtype=object)
        ds.ca.Valid = np.arange(8)
    assert not v.validate(path, strictness="conventions")
    assert sorted(v.errors) == ["column attribute 'ClusterID' must be the integers 0, 1, 2, ... with none missing",
                                "column attribute 'Valid' must be the integers 0 or 1 only",
                                "row attribute 'Accession' cannot contain duplicate values"]
    bad = tmp_path / "bad.loom"
    with h5py.File(bad, "w") as f:
        f["matrix"] = np.zeros((3, 4), dtype=complex)
        f["row_attrs/Gene"] = np.arange(3)
        f["col_graphs/g/a"] = np.array([0, 9])
        f["col_graphs/g/b"] = np.array([1, 2])
        f["col_graphs/g/w"] = np.array([1.0, 1.0])
    v = loompy.LoomValidator(version="3.0.0")
    assert not v.validate(bad)
    joined = " ".join(v.errors)
    assert "complex" in joined and "vertex" in joined and "/attrs" in joined


def test_validator_names_what_a_reader_would_take_silently(small):
    """A graph without weights (read with weights 1), a dataset where a graph's group belongs (not
    read) and a boolean attribute (the spec stores uint8) passed with no word."""
    path, *_ = small
    v = loompy.LoomValidator()
    assert v.validate(path) and v.warnings == [] and v.errors == []
    with h5py.File(path, "r+") as f:
        f["col_graphs/knn/a"], f["col_graphs/knn/b"] = np.array([0, 1]), np.array([1, 2])
        f["col_graphs/flat"] = np.zeros(3)
    assert v.validate(path)
    assert v.warnings == ["/col_graphs/flat is a dataset, not a graph's group (kept, not read)",
                          "graph /col_graphs/knn has no 'w' dataset (the spec stores weights): read with "
                          "every weight 1"]
    with h5py.File(path, "r+") as f:
        f["col_attrs/Flag"] = np.zeros(8, dtype=bool)
    assert not v.validate(path) and v.errors == [
        "/col_attrs/Flag has dtype bool, which the spec does not allow (booleans are stored as uint8; "
        "loompy reads it all the same)"]


def test_the_validator_takes_a_big_endian_layer_loompy_reads(small):
    """A '>f4' layer (another machine's writer), read as any other, was a spec error to the validator."""
    path, m, *_ = small
    with h5py.File(path, "r+") as f:
        f.create_dataset("layers/big", data=m.astype(">f4"), chunks=(5, 8), maxshape=(5, None))
    v = loompy.LoomValidator()
    assert v.validate(path) and v.errors == [], v.errors
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds.layers["big"][:, :], m)


def test_loompy3_helpers_and_validator_methods_are_there(small):
    """loompy 3's public helpers the seed does not name: its validator's two halves, the
    attribute conversions, and the modules loompy.utils and loompy.normalize."""
    from loompy.normalize import materialize_attr_values as materialize
    from loompy.utils import compare_loom_spec_version, deprecated, get_loom_spec_version, timestamp

    path, *_ = small
    v = loompy.LoomValidator()
    with h5py.File(path, "r") as f:
        assert v.validate_spec(f) and get_loom_spec_version(f) == "3.0.0" and compare_loom_spec_version(f, "3.0.0") == 0
    with loompy.connect(path, "r") as ds:
        assert not v.validate_conventions(ds) and "column attribute 'ClusterID' is missing" in v.errors
    assert loompy.normalize_attr_values(["a", "é"]).tolist() == ["a", "é"]
    assert loompy.normalize_attr_values([True, False]).tolist() == [1, 0] and loompy.normalize_attr_values(True) == 1
    assert materialize(np.array([b"caf&#233;", b"a&amp;b"])).tolist() == ["café", "a&b"]
    assert materialize(b"&#233;") == "é"
    assert materialize(np.array(["a&#233;b"])).tolist() == ["a&#233;b"]  # (str as it is, as loompy 3 leaves it)
    assert materialize(np.arange(3)).tolist() == [0, 1, 2] and len(timestamp()) == len("20171005T094012.123456Z")
    with pytest.warns(DeprecationWarning, match="old way"):
        deprecated("old way")


def test_validator_reports_broken_files_instead_of_failing(tmp_path):
    """Each broken file gets errors, never an exception; connect agrees, and a bad graph read says why."""
    def write(name, build):
        path = tmp_path / f"{name}.loom"
        with h5py.File(path, "w") as f:
            for group in ("row_attrs", "col_attrs", "layers", "row_graphs", "col_graphs", "attrs"):
                f.create_group(group)
            f["attrs/LOOM_SPEC_VERSION"] = "3.0.0"
            f["matrix"] = np.zeros((3, 4), np.float32)
            build(f)
        return path

    def graph(parts):
        def build(f):
            for key, value in parts.items():
                f[f"col_graphs/g/{key}"] = value
        return build

    def replace(path, value):
        def build(f):
            del f[path]
            f[path] = value
        return build

    def version(text):
        def build(f):
            del f["attrs/LOOM_SPEC_VERSION"]
            f["attrs/LOOM_SPEC_VERSION"] = text
        return build

    broken = {
        "matrix_1d": (replace("matrix", np.zeros(3)), "two-dimensional"),
        "graph_a_group": (lambda f: (f.create_group("col_graphs/g/a"), f.__setitem__("col_graphs/g/b", [0])), "'a'"),
        "graph_text": (graph({"a": [0], "b": [1], "w": np.array([b"x"])}), "numbers"),
        "graph_scalars": (graph({"a": 0, "b": 1, "w": 1.0}), "1-D"),
        "graph_range": (graph({"a": [0, 7], "b": [1, 1], "w": [1.0, 1.0]}), "outside"),
        "version_text": (version("abc"), "not a version"),
        "not_loom": (lambda f: [f.__delitem__(k) for k in list(f)], "not an empty Loom file"),
    }
    for name, (build, expected) in broken.items():
        path = write(name, build)
        for strictness in ("speconly", "conventions"):
            v = loompy.LoomValidator()
            assert not v.validate(path, strictness=strictness), name
            assert any(expected in e for e in v.errors), (name, v.errors)
        if name.startswith("graph") and name != "graph_a_group":  # that one connect refuses outright
            with loompy.connect(path, "r") as ds, pytest.raises(loompy.LoomFormatError, match="graph 'g'"):
                ds.col_graphs["g"]
    with pytest.raises(loompy.LoomValueError):
        loompy.LoomValidator().validate(write("fine", lambda f: None), strictness="strict")
    empty = tmp_path / "new.loom"
    loompy.new(empty).close()
    v = loompy.LoomValidator()
    assert v.validate(empty) and any("new()" in w for w in v.warnings)


def test_strings_with_nul_are_refused_wherever_the_nul_is(small, tmp_path):
    """numpy's fixed-width strings drop trailing NULs: they must be refused before numpy sees them."""
    path, m, *_ = small
    with pytest.raises(loompy.LoomValueError, match="NUL"):
        loompy.create(tmp_path / "n.loom", m, {}, {}, file_attrs={"c": "made\0"})
    assert not (tmp_path / "n.loom").exists()
    with loompy.connect(path) as ds:
        for value in ("a\0", [["x\0", "y"]], ("ok", "b\0")):
            with pytest.raises(loompy.LoomValueError, match="NUL"):
                ds.attrs.t = value
        with pytest.raises(loompy.LoomValueError, match="NUL"):
            ds.ca["bad"] = ["ok"] * 7 + ["trailing\0"]
        assert "t" not in ds.attrs and "bad" not in ds.ca
        with pytest.raises(loompy.LoomTypeError, match="timestamp string"):
            ds.get_changes_since(5)


def test_names_like_loompys_own_swap_names_are_a_users_to_keep(small):
    """loompy 3 lets anyone name a layer or attribute 'x.loompy-new0': such names are listed, kept,
    and never taken for the leftovers of an interrupted replacement (those carry a mark)."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.ca["x.loompy-old0"] = np.ones(8)
        ds.attrs["t.loompy-new3"] = "v"
        ds.layers["L.loompy-new0"] = m
    for _ in range(2):  # an r+ open settles only marked leftovers
        with loompy.connect(path) as ds:
            assert "x.loompy-old0" in ds.ca.keys() and ds.attrs["t.loompy-new3"] == "v"
            assert "L.loompy-new0" in ds.layers.keys()
            ds.layers["L.loompy-new0"] = m.astype(np.float64)  # replaced beside itself, and kept
    with loompy.connect(path, "r") as ds:
        assert ds.layers["L.loompy-new0"].dtype == np.float64 and "L.loompy-new0.loompy-new0" not in ds.layers


def test_a_file_killed_between_the_renames_of_a_matrix_swap(small):
    """Killed after the old matrix was moved aside and before the new one took its name: a read-only
    open says how to repair it, and an r+ open puts the old matrix back."""
    path, m, *_ = small
    swaps = importlib.import_module("loompy.swaps")
    with h5py.File(path, "r+") as f:
        staged = swaps.stage(f, "matrix")
        f.create_dataset(staged, data=np.zeros_like(m))
        f.move("/matrix", f"{staged}.old")
    with pytest.raises(loompy.LoomFileError, match=r"/matrix was interrupted; open the file once with mode 'r\+'"):
        loompy.connect(path, "r")
    with loompy.connect(path) as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        assert not [k for k in ds._file if "loompy" in k]
        assert not [k for k in ds._file["matrix"].attrs if k.startswith("loompy_")]


def test_layer_objects_follow_writes_of_any_connection_and_interrupted_replacements(small, monkeypatch):
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.layers["x"] = m * 2
    a, b = loompy.connect(path), loompy.connect(path)
    held = a.layers["x"]
    b.layers["x"] = (m * 3).astype(np.float64)  # another connection replaces it
    assert held.dtype == np.float64 and held[0, 1] == m[0, 1] * 3
    del b.layers["x"]
    with pytest.raises(loompy.LoomKeyError, match="layer 'x' no longer exists"):
        held[0, 0]
    b.layers["x"] = m * 2
    held = a.layers["x"]
    layers_module = importlib.import_module("loompy.layers")
    real = layers_module.engine.write_matrix

    def interrupted(dataset, matrix, *args, **kwargs):
        real(dataset, matrix[:, :4], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(layers_module.engine, "write_matrix", interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.layers["x"] = m * 5  # interrupted: the old layer stays, for every connection
    monkeypatch.undo()
    for read in (lambda: held[:, :], lambda: held.sparse().toarray(), lambda: np.asarray(held),
                 lambda: a.layers["x"][:, :]):
        np.testing.assert_array_equal(read(), m * 2)
    b.layers["x"] = m * 5
    assert held[0, 1] == m[0, 1] * 5
    a.close()
    b.close()


def test_set_layer_honours_compression_when_replacing(small):
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.layers["x"] = m
        for level in (9, None, 2):
            ds.set_layer("x", m * 2, compression_opts=level)
            dataset = ds.layers["x"]._dataset
            assert dataset.compression_opts == level and (dataset.compression is None) == (level is None)
            np.testing.assert_array_equal(ds.layers["x"][:, :], m * 2)


@pytest.mark.parametrize("killed", [False, True])
def test_an_attribute_replacement_interrupted_between_its_renames(small, monkeypatch, killed):
    """Interrupted after the old values moved aside and before the new ones took the name: in the
    process, the old values go back at once; after a kill, a read-only open says to repair it and
    an r+ open puts the old values back. A user's look-alike names are never touched."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.ca["Age.loompy-new0"] = np.arange(8) * 7  # a user's own name
    real, calls = h5py.Group.move, []

    def second_move_fails(self, source, dest):
        calls.append(source)
        if len(calls) == 2 or (killed and len(calls) > 2):  # a kill: nothing more gets done
            raise SystemExit if killed else KeyboardInterrupt
        return real(self, source, dest)

    ds = loompy.connect(path)
    monkeypatch.setattr(h5py.Group, "move", second_move_fails)
    with pytest.raises(SystemExit if killed else KeyboardInterrupt):
        ds.ca["Age"] = np.array(["t"] * 8)  # text for numbers: written beside, swapped in
    monkeypatch.undo()
    if killed:
        ds._file.close()
        with pytest.raises(loompy.LoomFileError, match="col_attrs/Age was interrupted"):
            loompy.connect(path, "r")
        ds = loompy.connect(path)
    assert ds.ca.Age.tolist() == (np.arange(8) * 2).tolist() and ds.ca["Age.loompy-new0"][1] == 7
    ds.close()
    with loompy.connect(path, "r") as ds:
        assert ds.ca.Age.tolist() == (np.arange(8) * 2).tolist() and "loompy_swap" not in ds._file


@pytest.mark.reference
def test_missing_values_in_text_attributes_are_stored_as_the_reference_stores_them(small, reference):
    """A pandas column with missing values (None among the strings) was refused; loompy 3 stores
    each None as the text "None" (and numbers beside them as text)."""
    path, *_ = small
    theirs_path = shutil.copy(path, path.with_name("theirs.loom"))
    columns = {"S": ["a", None] * 4, "N": [None] * 8, "F": [1.5, None] * 4}
    theirs = reference.run("""
        import sys, json, numpy as np, loompy
        with loompy.connect(sys.argv[1]) as ds:
            for name, values in json.loads(sys.argv[2]).items():
                ds.ca[name] = np.array(values, dtype=object)
            print(json.dumps({name: ds.ca[name].tolist() for name in json.loads(sys.argv[2])}))
    """, str(theirs_path), json.dumps(columns))
    with loompy.connect(path) as ds:
        for name, values in columns.items():
            ds.ca[name] = np.array(values, dtype=object)
        with pytest.raises(loompy.LoomValueError, match="small.loom: column attribute 'D'"):
            ds.ca["D"] = np.array([{"a": 1}, None] * 4, dtype=object)  # (neither text nor numbers)
    with loompy.connect(path, "r") as ds:
        assert {name: ds.ca[name].tolist() for name in columns} == theirs
    assert theirs["S"][:2] == ["a", "None"] and theirs["F"][:2] == ["1.5", "None"]


def test_loompy3_idioms_on_attribute_and_graph_managers(small):
    """What loompy 3 code does with the managers: a slice of attributes or graphs is a manager
    (dot access), a tuple names alternatives, last_modified() on each, and a missing name caught
    by ``except AttributeError`` as by ``except KeyError``."""
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        edges = ([0, 2, 5, 6], [1, 3, 6, 7], [1.0, 2.0, 3.0, 4.0])
        ds.col_graphs["knn"] = sp.coo_matrix((edges[2], (edges[0], edges[1])), shape=(8, 8))
        part = ds.ca[2:6]
        assert isinstance(part, loompy.AttributeManager) and part.keys() == ds.ca.keys()
        assert part.Age.tolist() == [4, 6, 8, 10] and list(part.CellID) == ["c2", "c3", "c4", "c5"]
        assert ds.ca[ca["Keep"].astype(bool)].Age.tolist() == [0, 4, 8, 12] and ds.ra[1].Gene == "Gapdh"
        assert ds.ca[("Missing", "Age")].tolist() == ca["Age"].tolist()
        np.testing.assert_array_equal(ds.ca[("Age", "Missing", "Age")], np.column_stack([ca["Age"], ca["Age"]]))
        with pytest.raises(AttributeError, match="small.loom: column attribute: none of"):
            ds.ca[("x", "y")]
        with pytest.raises(AttributeError, match="small.loom: column attribute 'nope' does not exist"):
            ds.ca["nope"]
        with pytest.raises(KeyError):
            ds.layers["nope"]
        sub = ds.col_graphs[2:7]  # vertices 2..6 become 0..4: edges 2->3 and 5->6 stay
        assert isinstance(sub, loompy.GraphManager) and sub.keys() == ["knn"]
        assert sorted(zip(sub.knn.row.tolist(), sub.knn.col.tolist(), sub.knn.data.tolist())) == \
            [(0, 1, 2.0), (3, 4, 3.0)]
        assert ds.col_graphs[np.arange(8) < 2].knn.toarray().tolist() == [[0, 1], [0, 0]]
        assert ds.col_graphs[np.array([6, 5])].knn.toarray().tolist() == [[0, 0], [3, 0]]  # (in the order given)
        assert ds.col_graphs[("none", "knn")].nnz == 4
        bad = sp.coo_matrix(([1.0], ([0], [1])), shape=(8, 8))
        bad.row[0] = -1
        with pytest.raises(loompy.LoomValueError, match="small.loom: column graph 'bad'"):
            ds.col_graphs["bad"] = bad
        before = ds.last_modified()
        ds.ca["Age"] = ca["Age"] + 1
        assert ds.ca.last_modified("Age") > before and ds.ca.last_modified() == ds.ca.last_modified("Age")
        assert ds.ra.last_modified("Gene") <= before and ds.col_graphs.last_modified("knn") <= before
        ds.layers["extra"] = m * 2
        assert ds.layers["extra"].last_modified() > before and ds.layers.last_modified() == \
            ds.layers.last_modified("extra") > ds.layers[""].last_modified()
        view = ds.view[:, 1:4]
        assert view.attrs.title == "Small <test>" and view.attrs["title"] == "Small <test>"
        with pytest.raises(AttributeError):
            view.attrs.nothing


def test_a_second_connection_takes_the_shape_another_appended(small):
    """Two connections to one file in a process: after one appended columns, the other wrote
    attributes at the old width (a file connect then refused) and saw neither the new shape nor
    the new columns' attributes."""
    path, m, ra, ca = small
    a, b = loompy.connect(path), loompy.connect(path)
    try:
        assert b.shape == (5, 8) and len(b.ca.Age) == 8
        a.add_columns(np.ones((5, 2), np.float32), {"CellID": ["x", "y"], "Age": [100, 101], "Keep": [1, 0]})
        assert b.ca.CellID.size == 10 and b[:, b.ca.Age > 99].shape == (5, 2)  # (read before b.shape)
        with pytest.raises(loompy.LoomValueError, match="small.loom: column attribute 'New': expected 10 values"):
            b.ca["New"] = np.arange(8)
        assert b.shape == (5, 10) and b.ca.Age[-2:].tolist() == [100, 101]
        b.col_graphs["g"] = sp.coo_matrix(([1.0], ([9], [0])), shape=(10, 10))
        b.add_columns(np.zeros((5, 1), np.float32), {"CellID": ["z"], "Age": [102], "Keep": [1]})
        assert a.shape == (5, 11) and a.ca.CellID[-3:].tolist() == ["x", "y", "z"]
        np.testing.assert_array_equal(a[:, :8], m)
    finally:
        a.close()
        b.close()
    with loompy.connect(path, "r") as ds:  # (validates)
        assert ds.shape == (5, 11) and ds.col_graphs["g"].nnz == 1


def test_reading_shape_and_attributes_again_does_not_look_in_the_file(small, monkeypatch):
    """Every ``ds.shape`` and ``ds.ra.Gene`` looked ``/matrix`` up in the file (40-50 us, against
    0.6 us in loompy 3: a loop over 30,000 genes' names took 3 s). Reads now look again only when
    loompy changed the shape; writes still look on disk (a shape changed through h5py directly)."""
    import h5py

    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        assert ds.shape == (5, 8) and len(ds.ca.Age) == 8 and ds.ra["Gene"].size == 5
        lookups = []
        original = h5py.Group.get
        monkeypatch.setattr(h5py.Group, "get", lambda self, *a, **k: lookups.append(a) or original(self, *a, **k))
        for _ in range(50):
            assert ds.shape == (5, 8) and ds.ca.Age.size == 8 and ds.ra["Gene"].size == 5
        assert lookups == []
        ds._file["matrix"].resize(9, axis=1)  # (behind loompy's back)
        with pytest.raises(loompy.LoomValueError, match="small.loom: column attribute 'New': expected 9 values"):
            ds.ca["New"] = np.arange(8)


def test_loompy3_calls_that_change_nothing_or_convert_exactly(small, tmp_path):
    """Copying a file's attributes whole (LOOM_SPEC_VERSION among them, the version loompy writes)
    was refused, as was setting it to what it is; set_attr(dtype="int") truncated 1.5 to 1 (matrix
    writes refuse that); permute refused an ordering shaped as a column vector."""
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        copied = loompy.create(tmp_path / "copy.loom", m, {}, {}, file_attrs=dict(ds.attrs))
        assert copied.attrs.title == "Small <test>" and copied.attrs.LOOM_SPEC_VERSION == "3.0.0"
        copied.close()
        ds.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        ds.attrs["LOOM_SPEC_VERSION"] = np.bytes_(b"3.0.0")
        with pytest.raises(loompy.LoomValueError, match="LOOM_SPEC_VERSION"):
            ds.attrs["LOOM_SPEC_VERSION"] = "2.0.1"
        with pytest.raises(loompy.LoomValueError, match="small.loom: column attribute 'Half'.*without change"):
            ds.set_attr("Half", np.arange(8) / 2, axis=1, dtype="int")
        ds.set_attr("Whole", np.arange(8) * 1.0, axis=1, dtype="int32")
        assert ds.ca.Whole.dtype == np.int32 and "Half" not in ds.ca
        ds.permute(np.arange(8)[::-1].reshape(8, 1), axis=1)
        assert ds.ca.Age.tolist() == ca["Age"][::-1].tolist()
        np.testing.assert_array_equal(ds[:, :], m[:, ::-1])
    with loompy.create(tmp_path / "old.loom", m, {}, {}, file_attrs={"LOOM_SPEC_VERSION": "2.0.1"}) as old:
        assert old.attrs.LOOM_SPEC_VERSION == "3.0.0"  # (the layout it has; a version given is set aside)


def test_integers_past_int64_are_stored_exactly_or_refused(small):
    """numpy makes [2**63 + 5, 1, ...] float64: the attribute lost its last digits silently."""
    path, *_ = small
    big = [2**63 + 5, 1, 2, 3, 4]
    with loompy.connect(path) as ds:
        ds.ra["ids"] = big
        assert ds.ra.ids.dtype == np.uint64 and ds.ra.ids.tolist() == big
        ds.ra["obj"] = np.array(big, dtype=object)
        assert ds.ra.obj.dtype == np.uint64 and ds.ra.obj.tolist() == big
        ds.ra["mixed"] = [1, 2.5, 3, 4, 5]  # fractions and small integers: float64, as numpy has it
        assert ds.ra.mixed.dtype == np.float64
    before = digest(path)
    with loompy.connect(path) as ds:
        for values, message in [([np.uint64(2**64 - 3), np.int64(-1), 0, 0, 0], "from -1 to 18446744073709551613"),
                                ([2**70] * 5, "do not fit one 64-bit"),
                                ([2**53 + 1, 0.5, 0, 0, 0], "lose digits as float64")]:
            with pytest.raises(loompy.LoomValueError, match=f"small.loom: row attribute 'x': .*{message}"):
                ds.ra["x"] = values
    assert digest(path) == before


def test_clear_errors_for_odd_arguments_and_sparse_values_into_a_selection(small, tmp_path):
    """Raw or misleading errors: a zero slice step (ValueError from Python), mixed aggregate labels
    (TypeError from numpy's sort), a fill_values that is neither 'auto' nor a dict (ignored), a
    combine_faster selection out of range (no file named), a sparse matrix written into a
    selection ('dtype object'), repeated key values in add_loom ('values differ')."""
    path, m, *_ = small
    other = tmp_path / "other.loom"
    shutil.copy(path, other)
    with loompy.connect(other) as ds:
        ds.ra["Gene"] = np.array(["Actb", "Actb", "Sox2", "x", "y"], dtype=object)
    before = digest(path)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match="row slice step cannot be zero"):
            ds[::0, 0] = 1.0
        with pytest.raises(loompy.LoomValueError, match="fill_values must be None, 'auto' or a dict"):
            ds.add_columns(np.ones((5, 1), np.float32), {"CellID": ["n"], "Age": [1], "Keep": [True]},
                           fill_values="bogus")
        with pytest.raises(loompy.LoomValueError, match="other.loom: key 'Gene' has repeated values"):
            ds.add_loom(other, key="Gene")
        labels = np.array([1, "a", None, "a", 1, 1, "a", None], dtype=object)
        result = ds.aggregate(None, group_by=labels, aggr_by="sum")
    assert digest(path) == before
    groups = ["1", "None", "a"]  # (as text, sorted, as a column attribute would store them)
    expected = np.stack([m[:, [str(x) == g for x in labels]].sum(axis=1) for g in groups], axis=1)
    np.testing.assert_allclose(result, expected)
    with pytest.raises(loompy.LoomIndexError, match="other.loom: selection: column index 9 is out of bounds"):
        loompy.combine_faster([path, other], tmp_path / "out.loom", selections=[None, [9]])
    with loompy.connect(path) as ds:
        ds[1:3, 2:5] = sp.csr_matrix(np.full((2, 3), 7, np.float32))
        expected = m.copy()
        expected[1:3, 2:5] = 7
        np.testing.assert_array_equal(ds[:, :], expected)


def test_long_double_attributes_are_refused_and_row_attribute_names_are_labelled(small):
    """float128 (numpy's longdouble) was stored: a type other machines' HDF5 may not read."""
    path, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:
        if np.dtype(np.longdouble).itemsize > 8:  # (where longdouble is float64, it is float64)
            with pytest.raises(loompy.LoomValueError, match="row attribute 'x': values of dtype float.* not portable"):
                ds.ra["x"] = np.ones(5, dtype=np.longdouble)
        with pytest.raises(loompy.LoomValueError, match="small.loom: row attribute: name 'a/b' is invalid"):
            ds.add_columns(np.ones((5, 1), np.float32), {"CellID": ["n"], "Age": [1], "Keep": [True]},
                           row_attrs={"a/b": np.arange(5)})
    assert digest(path) == before


def test_a_write_refused_by_a_read_only_file_names_it_once(small, monkeypatch):
    """However the file was named to connect (here relatively), a refusal says its name once."""
    path, m, *_ = small
    monkeypatch.chdir(path.parent)
    with loompy.connect(path.name, "r") as ds:
        for write in (lambda: ds.add_columns(np.ones((5, 1), np.float32), {"CellID": ["n"], "Age": [1], "Keep": [1]}),
                      lambda: ds.permute(np.arange(8), axis=1), lambda: ds.ca.__setitem__("X", np.ones(8))):
            with pytest.raises(loompy.LoomReadOnlyError, match="small.loom") as refused:
                write()
            assert str(refused.value).count("small.loom") == 1, refused.value


def test_values_of_a_type_no_loom_file_holds_are_refused_naming_the_type(small):
    """Dates (which loompy 3 stored as their text) and generators were refused as "values of mixed
    or unknown types", which they are not: the message names the type and what to do."""
    import datetime

    path, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match="column attribute 'When'.*of type datetime: .*str()"):
            ds.ca.When = [datetime.datetime(2020, 1, k + 1) for k in range(8)]
        with pytest.raises(loompy.LoomValueError, match="row attribute 'G'.*of type generator"):
            ds.ra.G = (k for k in range(5))
        with pytest.raises(loompy.LoomValueError, match=r"of mixed types \(int, object, str\)"):
            ds.ca.Mixed = [1, "a", object(), 1, 1, 1, 1, 1]
    assert digest(path) == before


@pytest.mark.reference
def test_conventions_find_the_missing_attributes_the_reference_finds(tmp_path, reference):
    """strictness='conventions' only warned about a few names; loompy 3 checks the Linnarsson lab's
    conventions and calls a file without CellID, ClusterID, Gene or Accession invalid."""
    path = tmp_path / "c.loom"
    loompy.create(path, np.ones((3, 2), np.float32), {"Gene": ["a", "b", "c"]}, {"Age": [1, 2]}).close()
    theirs = reference.run("""
        import sys, json, loompy
        v = loompy.LoomValidator()
        print(json.dumps([v.validate(sys.argv[1], strictness="conventions"), v.errors]))
    """, str(path))
    v = loompy.LoomValidator()
    assert [v.validate(path, strictness="conventions")] == theirs[:1] == [False]
    missing = sorted(e.split("'")[1] for e in theirs[1] if "missing" in e)
    ours = sorted(e.split("'")[1] for e in v.errors if "missing" in e)
    assert missing == ours == ["Accession", "CellID", "ClusterID"]


@pytest.mark.parametrize("read", ["ds[...]", "sparse()", "shape"])
def test_a_read_the_connection_closes_under_says_so_naming_the_file(small, monkeypatch, read):
    """close() in another thread as a read looked its layer up gave h5py's own ValueError ("Invalid
    location identifier") or RuntimeError; some messages named no file, one named it twice."""
    from loompy import layers

    path, *_ = small
    ds = loompy.connect(path)
    real, closed = layers.kept_since, []

    def closing_first(file, what):  # (what another thread's close() does at the worst moment)
        if not closed:
            closed.append(True)
            ds.close()
        return real(file, what)

    monkeypatch.setattr(layers, "kept_since", closing_first)
    action = {"ds[...]": lambda: ds[0:2, 0:2], "sparse()": lambda: ds.sparse(),
              "shape": lambda: ds.layers[""].shape}[read]
    with pytest.raises(loompy.LoomFileError) as caught:
        action()
    assert str(caught.value).count(str(path)) == 1 and "closed" in str(caught.value)


def test_documented_error_kinds_and_export_of_undecodable_text(small, tmp_path):
    """Dot access to a missing name was not a KeyError (the README says it is); a mismatched
    write raised an IndexError where numpy raises ValueError; export of text that is not valid
    UTF-8 (read with surrogateescape) raised UnicodeEncodeError, a truncated file left behind; a
    scan index past the end named no file."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        for get in (lambda: ds.ca.Missing, lambda: ds.ra.Missing, lambda: ds.attrs.missing, lambda: ds.Missing):
            with pytest.raises(KeyError):
                get()
            with pytest.raises(AttributeError):
                get()
        with pytest.raises(ValueError, match="cannot assign values of shape"):
            ds[:, 0] = np.ones(3)
        with pytest.raises(IndexError, match=r"small.loom: scan\(items=...\): row index 9"):
            next(ds.scan(items=np.array([9]), axis=0))
    with h5py.File(path, "r+") as f:
        del f["row_attrs/Gene"]
        f["row_attrs/Gene"] = np.array([b"a\xff", b"b", b"c", b"d", b"e"], dtype=object)
    with loompy.connect(path, "r") as ds:
        ds.export(tmp_path / "out.tab")
    lines = (tmp_path / "out.tab").read_bytes().split(b"\n")
    assert len(lines) == 3 + 1 + 5 + 1 and lines[4].startswith(b"a\xff\t")  # (the bytes the file holds)


def test_a_close_whose_flush_fails_still_closes_the_file(small, monkeypatch):
    """A full disk while close() writes out what HDF5 holds: the error is raised, and the file is
    closed all the same (it stayed open, and every later rewrite of the path in this process was
    refused as 'open for writing by another connection')."""
    path, m, *_ = small
    ds = loompy.connect(path)
    ds.ca["Extra"] = np.arange(ds.shape[1])
    real, calls = h5py.File.flush, []

    def full_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self)

    monkeypatch.setattr(h5py.File, "flush", full_once)
    with pytest.raises(OSError, match="No space left"):
        ds.close()
    monkeypatch.undo()
    assert ds.closed and ds.mode == "closed"
    with pytest.raises(loompy.LoomFileError, match="closed"):
        ds[:, :]
    ds.close()  # (again: nothing to do)
    loompy.create(path, m, {"g": np.arange(m.shape[0])}, {"c": np.arange(m.shape[1])}).close()
    with loompy.connect(path, "r") as again:
        np.testing.assert_array_equal(again[:, :], m)


@pytest.mark.parametrize("at", ["its own stamp", "the group's stamp"])
def test_an_attribute_write_that_fails_leaves_file_and_connection_agreeing(small, monkeypatch, at):
    """A new attribute whose stamping fails: if its own stamp failed, it is not in the file; if a
    later stamp failed, it is stored whole, and the connection lists it (it said nothing)."""
    path, m, *_ = small
    real, calls = h5py.AttributeManager.__setitem__, []

    def failing_stamp(self, key, value):
        if key == "last_modified":
            calls.append(1)
            if len(calls) == (1 if at == "its own stamp" else 2):
                raise OSError(28, "No space left on device")
        return real(self, key, value)

    values = np.arange(m.shape[0]) * 2
    with loompy.connect(path) as ds:
        monkeypatch.setattr(h5py.AttributeManager, "__setitem__", failing_stamp)
        with pytest.raises(OSError):
            ds.ra["New"] = values
        monkeypatch.undo()
        listed = "New" in ds.ra.keys()
        if listed:
            np.testing.assert_array_equal(ds.ra.New, values)
    with loompy.connect(path, "r") as ds:
        assert ("New" in ds.ra.keys()) == listed == (at == "the group's stamp")
        if listed:
            np.testing.assert_array_equal(ds.ra.New, values)


def test_deleting_a_missing_name_raises_and_pop_takes_a_default(small):
    path, m, *_ = small
    with loompy.connect(path) as ds:
        for delete in (lambda: ds.ca.__delattr__("Temp"), lambda: ds.layers.__delitem__("x"),
                       lambda: ds.ra.__delitem__("Temp"), lambda: ds.col_graphs.__delitem__("none")):
            with pytest.raises(KeyError):
                delete()
        assert ds.ca.pop("Temp", None) is None and ds.layers.pop("x", None) is None
        ds.ca["Temp"] = np.arange(ds.shape[1])
        np.testing.assert_array_equal(ds.ca.pop("Temp", None), np.arange(ds.shape[1]))
        assert "Temp" not in ds.ca


def test_a_with_block_that_raised_keeps_its_error_when_closing_fails_too(small, monkeypatch):
    path, *_ = small
    monkeypatch.setattr(h5py.File, "flush", lambda self: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(ZeroDivisionError) as info:
        with loompy.connect(path) as ds:
            1 / 0
    assert ds.closed and any("No space left" in note for note in getattr(info.value, "__notes__", ["No space left"]))


def test_threads_replacing_layers_of_one_connection_do_not_collide(small):
    """Replacements share the file's staging group: two at once took each other's names (60-102 of
    400 failed with 4 threads, one after its swap had completed). One at a time now."""
    import threading

    path, m, *_ = small
    failures, last = [], {}
    with loompy.connect(path) as ds:
        def replace(k):
            try:
                for i in range(25):
                    ds.layers[f"t{k}"] = np.full(m.shape, k * 100 + i, np.float32)
                    last[k] = k * 100 + i
            except Exception as error:  # (reported below)
                failures.append(repr(error))

        threads = [threading.Thread(target=replace, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert failures == []
        for k in range(4):
            assert ds.layers[f"t{k}"][0, 0] == last[k] == k * 100 + 24
        assert not [name for name in ds._file if "loompy" in name]


def test_a_layer_being_replaced_never_goes_missing_to_other_threads(small, monkeypatch):
    """Between the swap's two renames the layer's name was free: a thread looking it up then was
    told it does not exist (1 read in about 1,000 beside a replacing loop). The renames now hold
    h5py's lock, which every HDF5 call of another thread waits for. The old name is held free a
    little longer here (a pause after the first rename) so that the race is not left to chance."""
    import threading
    import time

    import h5py

    path, m, *_ = small
    move = h5py.Group.move

    def slow_move(self, source, dest):
        move(self, source, dest)
        if dest.endswith(".old"):
            time.sleep(0.002)

    monkeypatch.setattr(h5py.Group, "move", slow_move)
    failures, reads, stop = [], [0], threading.Event()
    with loompy.connect(path) as ds:
        ds.layers["x"] = m

        def reader():
            while not stop.is_set():
                try:
                    values = ds.layers["x"][:, :]
                    assert values[0, 0] >= 0
                    reads[0] += 1
                except Exception as error:  # (reported below)
                    failures.append(repr(error))

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for k in range(40):
                ds.layers["x"] = m + k
                time.sleep(0.001)
        finally:
            stop.set()
            thread.join(timeout=60)
        np.testing.assert_array_equal(ds.layers["x"][:, :], m + 39)
    assert failures == [] and reads[0] > 20, (failures[:3], reads[0])


def test_combine_checks_file_attrs_before_opening_its_inputs(small, tmp_path, monkeypatch):
    path, *_ = small
    combine_module = __import__("importlib").import_module("loompy.combine")
    monkeypatch.setattr(combine_module, "connect", lambda *a, **k: pytest.fail("an input was opened first"))
    for combine in (loompy.combine, loompy.combine_faster):
        with pytest.raises(TypeError, match="file_attrs must be a mapping"):
            combine([path, path], tmp_path / "out.loom", file_attrs=["title"])
        with pytest.raises(ValueError, match="LOOM_SPEC_VERSION"):
            combine([path, path], tmp_path / "out.loom", file_attrs={"LOOM_SPEC_VERSION": "latest"})


def test_a_layer_looked_up_as_another_thread_replaces_it_reads_the_new_one(small, monkeypatch):
    """A layer object made just as another thread replaced the layer kept the old dataset for good
    (its file state was taken after the lookup), and one made while the old dataset sat in the
    staging group took that as its path. It now reads the layer by name, looked up again."""
    from loompy.layers import LayerManager

    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.layers["L"] = m
        real, replaced = LayerManager._dataset, []

        def lookup_then_replaced(self, name):
            found = real(self, name)
            if name == "L" and not replaced:  # another thread's replacement lands right after the lookup
                replaced.append(True)
                ds.layers["L"] = m + 1
            return found

        monkeypatch.setattr(LayerManager, "_dataset", lookup_then_replaced)
        layer = ds.layers["L"]
        monkeypatch.undo()
        np.testing.assert_array_equal(layer[:, :], m + 1)
        ds.layers["L"] = m + 2
        np.testing.assert_array_equal(layer[:, :], m + 2)


def test_set_layer_takes_a_dtype_name_as_layers_assignment_does(small):
    """loompy 3's set_layer(name, "int16") makes an empty int16 layer, as ds.layers[name] = "int16" does."""
    path, m, *_ = small
    with loompy.connect(path) as ds:
        ds.set_layer("a", "int16")
        ds.layers["b"] = np.float64
        assert ds.layers["a"].dtype == np.int16 and ds.layers["b"].dtype == np.float64
        np.testing.assert_array_equal(ds.layers["a"][:, :], np.zeros(m.shape, np.int16))
        with pytest.raises(ValueError, match="given twice"):
            ds.set_layer("c", "int16", dtype="float32")
        assert "c" not in ds.layers


def test_refusals_name_the_file_and_what_is_wrong(small, tmp_path):
    """Refusals found naming neither the file nor the fault: permute's ordering (which position),
    create without a matrix, combine of nothing, a graph deleted through a closed connection."""
    path, m, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:
        with pytest.raises(ValueError, match=r"\(8 is out of range\)") as info:
            ds.permute([0, 1, 2, 3, 4, 5, 6, 8], axis=1)
        assert str(path) in str(info.value)
        with pytest.raises(ValueError, match=r"\(0 is repeated and 7 missing\)"):
            ds.permute([0, 0, 1, 2, 3, 4, 5, 6], axis=1)
        with pytest.raises(AttributeError, match="ds.ca.CellID"):
            ds.CellID = np.arange(8)  # (would only hide the attribute)
        assert list(ds.CellID) == list(ds.ca.CellID)
    assert digest(path) == before
    ds.close()
    with pytest.raises(OSError, match=str(path)):
        del ds.col_graphs["any"]
    target = tmp_path / "new.loom"
    with pytest.raises(TypeError, match=str(target)):
        loompy.create(target, None)
    with pytest.raises(ValueError, match=str(target)):
        loompy.combine([], target)
    assert not target.exists()


@pytest.mark.parametrize("name", ["attrs", "row_graphs", "col_graphs", "filename", "version", "layers"])
def test_attributes_named_as_the_connections_own_parts_open_and_scan(tmp_path, name):
    """The refusal of ds.Name = values (an attribute hidden by a Python one) refused loompy's own
    setup of a connection or view whose file has an attribute of such a name: the file could not
    be opened or created."""
    path = tmp_path / "n.loom"
    with loompy.create(path, np.ones((3, 2), np.float32), {name: np.arange(3)}, {name: np.arange(2)}):
        pass
    with loompy.connect(path) as ds:
        np.testing.assert_array_equal(ds.ra[name], np.arange(3))
        np.testing.assert_array_equal(ds.view[:, 1:].ca[name], [1])
        for _, selection, view in ds.scan(axis=1, batch_size=1):
            np.testing.assert_array_equal(view.ca[name], selection)


@pytest.mark.parametrize("way", ["sharing", "alone"])
def test_an_interrupt_as_a_turn_is_taken_does_not_keep_it(way):
    """A turn was recorded before the try that gives it back: a Ctrl-C landing in between (here:
    as the lock's condition is left) kept it for good, and every other thread waited on it."""
    import threading

    from loompy.handles import SharedOrAlone

    class InterruptedOnce(threading.Condition):
        armed = True

        def __exit__(self, *exc):
            super().__exit__(*exc)
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt

    lock = SharedOrAlone()
    lock.changed = InterruptedOnce()
    with pytest.raises(KeyboardInterrupt):
        with getattr(lock, way)():
            pass
    assert lock.shared == {} and lock.owner is None and lock.depth == 0
    with lock.alone(), lock.sharing():  # (taken again, as usual)
        assert lock.owner is not None


def test_turns_given_back_out_of_order_and_by_their_owner_while_others_wait():
    """Found by a review of the turn-keeping: (1) turns given back out of order (a generator closed
    late) freed the lock while another was still held; (2) a thread holding the lock alone that takes
    it shared, while another waits to hold it alone, waited for good; (3) a thread that gave up
    waiting to hold it alone (Ctrl-C) left those held behind it asleep."""
    import threading
    import time

    from loompy.handles import SharedOrAlone

    lock = SharedOrAlone(alone_first=True)
    first, second = lock.sharing(), lock.sharing()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # (1): the first given back first
    assert lock.shared_by(threading.get_ident()) == 1
    second.__exit__(None, None, None)
    assert lock.shared == {}

    got = []
    with lock.alone():
        waiter = threading.Thread(target=lambda: lock.alone().__enter__() and None, daemon=True)
        waiter.start()
        while not lock.waiting:
            time.sleep(0.001)
        with lock.sharing():  # (2): its owner shares it, though a thread waits to hold it alone
            got.append("shared")
    waiter.join(5)
    assert got == ["shared"] and not waiter.is_alive()

    class GivingUp(threading.Condition):
        """The waiter's wait ends in a Ctrl-C once another thread waits behind it."""
        waiter = None

        def wait_for(self, predicate, timeout=None):
            if threading.get_ident() != self.waiter:
                return super().wait_for(predicate, timeout)
            deadline = time.monotonic() + 5
            while not self._waiters and time.monotonic() < deadline:
                self.wait(0.01)
            raise KeyboardInterrupt

    lock = SharedOrAlone(alone_first=True)
    lock.changed = GivingUp()
    release, gave_up, shared = threading.Event(), threading.Event(), threading.Event()

    def hold():
        with lock.sharing():
            release.wait(10)

    def wait_then_give_up():
        GivingUp.waiter = threading.get_ident()
        try:
            with lock.alone():
                pass
        except KeyboardInterrupt:
            gave_up.set()

    def share():
        with lock.sharing():
            shared.set()

    threading.Thread(target=hold, daemon=True).start()
    while not lock.shared:
        time.sleep(0.001)
    threading.Thread(target=wait_then_give_up, daemon=True).start()
    while not lock.waiting:
        time.sleep(0.001)
    threading.Thread(target=share, daemon=True).start()
    try:
        assert gave_up.wait(5)
        assert shared.wait(2)  # (3): woken when the waiter gave up, not left asleep
    finally:
        release.set()


def _two_threads(first, second, timeout=20):
    """Run ``first`` and ``second`` on two threads at once: what each returned or raised, and
    whether either still runs after ``timeout`` seconds (waiting for good)."""
    import threading

    said = {}

    def run(name, work):
        try:
            said[name] = work()
        except Exception as error:  # (the refusal under test)
            said[name] = error

    threads = [threading.Thread(target=run, args=(name, work), daemon=True)
               for name, work in (("first", first), ("second", second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return said, [thread.name for thread in threads if thread.is_alive()]


def test_two_threads_that_each_read_a_layer_and_then_write_it_are_not_left_waiting_for_good(tmp_path):
    """Each held a reading turn of the layer and waited for the other's to end before writing it:
    both waited for good. Now the second to wait is refused (naming the file) and the first writes."""
    import threading

    from loompy.engine import storage

    path = tmp_path / "r.loom"
    loompy.create(path, np.ones((20, 30), np.float32), {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    with loompy.connect(path) as ds:
        dataset = ds.layers[""]._dataset
        both_read = threading.Barrier(2)

        def read_then_write():
            with storage.reading(dataset):
                both_read.wait(10)
                with storage.writing(dataset):
                    return "wrote"

        said, still_waiting = _two_threads(read_then_write, read_then_write)
        assert still_waiting == []
        refused = [v for v in said.values() if isinstance(v, loompy.LoomFileError)]
        assert sorted(map(str, said.values()))[-1] == "wrote" and len(refused) == 1
        assert str(path) in str(refused[0]) and "would wait for another thread that waits for this one" in \
            str(refused[0])


def test_a_write_inside_a_read_that_closes_a_circle_of_waits_begun_later_is_refused(tmp_path):
    """A reads X and waits to write Y; C, inside its read of Y, writes Y (nobody else reads it), then
    X, which A reads: each waits for the other. Only C's write of X can see the circle, and the
    refusal of writes inside reads was asked only of writes whose dataset another thread writes."""
    import threading
    import time

    from loompy.engine import storage

    path = tmp_path / "x.loom"
    loompy.create(path, np.ones((20, 30), np.float32), {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    with loompy.connect(path) as ds:
        ds.layers["y"] = np.zeros((20, 30), np.float32)
        x, y = ds.layers[""]._dataset, ds.layers["y"]._dataset
        a_reads, c_reads = threading.Event(), threading.Event()

        def a():
            with storage.reading(x):
                a_reads.set()
                assert c_reads.wait(10)
                with storage.writing(y):
                    return "a wrote y"

        def c():
            assert a_reads.wait(10)
            with storage.reading(y):
                c_reads.set()
                while not storage._turns_for(y).waiting:  # (A waits to write Y)
                    time.sleep(0.001)
                with storage.writing(y), storage.writing(x):
                    return "c wrote both"

        said, still_waiting = _two_threads(a, c)
        assert still_waiting == []
        assert said["first"] == "a wrote y"
        assert isinstance(said["second"], loompy.LoomFileError) and "cannot write now" in str(said["second"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_another_thread_held_a_locks_condition_gives_back_its_turn(tmp_path):
    """The condition of a lock was copied into a forked child held by a thread that does not exist
    there: the child waited for good when it gave back a turn it held (15 of 30 such forks)."""
    import threading

    from loompy.handles import SharedOrAlone

    lock = SharedOrAlone()
    turn = lock.sharing()
    turn.__enter__()
    holding, leave = threading.Event(), threading.Event()

    def hold_the_condition():
        with lock.changed:
            holding.set()
            leave.wait(30)

    holder = threading.Thread(target=hold_the_condition, daemon=True)
    holder.start()
    assert holding.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: give the turn back, then take the lock alone
        try:
            turn.__exit__(None, None, None)
            with lock.alone():
                pass
        finally:
            os._exit(0 if lock.shared == {} and lock.owner is None else 1)
    try:
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        leave.set()
        holder.join()
        turn.__exit__(None, None, None)


def test_a_reading_turn_given_back_by_another_thread_leaves_no_read_behind(tmp_path):
    """Reads were counted per thread: a reading turn given back from another thread (a generator
    closed there) left its thread counted as inside a read, and that thread's next write, while
    another thread wrote, was refused as a write from inside a read."""
    import threading

    from loompy.engine import storage

    path = tmp_path / "c.loom"
    loompy.create(path, np.ones((20, 30), np.float32), {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    with loompy.connect(path) as ds:
        ds.layers["y"] = np.zeros((20, 30), np.float32)
        x, y = ds.layers[""]._dataset, ds.layers["y"]._dataset
        turn = storage.reading(x)
        turn.__enter__()
        given_back = threading.Thread(target=turn.__exit__, args=(None, None, None))
        given_back.start()
        given_back.join()
        with held_in_another_thread(storage.writing(y)) as leave:
            threading.Timer(0.2, leave.set).start()
            with storage.writing(y):  # (waits for the other thread's write, then writes)
                pass


def test_loompy_3s_module_of_the_connection_imports(tmp_path):
    """The SCope viewer's server writes ``from loompy.loompy import LoomConnection``, loompy 3's module."""
    from loompy.loompy import LoomConnection, connect, create

    path = tmp_path / "m.loom"
    create(path, np.ones((2, 3), np.float32), {"g": np.arange(2)}, {"c": np.arange(3)}).close()
    with connect(path, "r") as ds:
        assert isinstance(ds, LoomConnection) and LoomConnection is loompy.LoomConnection and ds.shape == (2, 3)


def test_loompy_3s_module_paths_are_there_after_import_loompy():
    """After ``import loompy``, loompy 3 had ``loompy.utils``, ``loompy.loompy``, ``loompy.deprecated`` and
    its managers' modules (``from loompy.loom_view import LoomView``, for type hints); ours had none."""
    import subprocess
    import sys

    script = """
import loompy
assert loompy.utils.timestamp and loompy.deprecated is loompy.utils.deprecated
assert loompy.loompy.LoomConnection is loompy.LoomConnection
from loompy.loom_view import LoomView
from loompy.loom_layer import LoomLayer, MemoryLoomLayer
from loompy.attribute_manager import AttributeManager
from loompy.global_attribute_manager import GlobalAttributeManager
from loompy.graph_manager import GraphManager
from loompy.layer_manager import LayerManager
from loompy.view_manager import ViewManager
import loompy.loom_validator
import importlib.util
assert loompy.loom_validator.LoomValidator is loompy.LoomValidator and LoomView is loompy.LoomView
assert importlib.util.find_spec("loompy.loom_view").name == "loompy.loom_view"
assert (LoomLayer, MemoryLoomLayer, AttributeManager, GlobalAttributeManager, GraphManager, LayerManager,
        ViewManager) == (loompy.LoomLayer, loompy.MemoryLoomLayer, loompy.AttributeManager,
        loompy.GlobalAttributeManager, loompy.GraphManager, loompy.LayerManager, loompy.ViewManager)
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=os.path.dirname(__file__))


def test_a_second_connection_to_a_new_file_takes_its_first_columns(tmp_path):
    """The first columns of a new() file gave it a shape another connection to it did not take
    (it kept (0, 0) and no attributes while its reads gave the matrix): only resizes said so."""
    path = tmp_path / "n.loom"
    a = loompy.new(path)
    b = loompy.connect(path)
    try:
        assert b.shape == (0, 0)
        a.add_columns(np.ones((7, 3), np.float32), {"c": np.arange(3)}, row_attrs={"g": np.arange(7)})
        assert b.shape == (7, 3) and b.ca.keys() == ["c"] and b.ra.g.tolist() == list(range(7))
    finally:
        a.close()
        b.close()


def test_a_layer_held_through_another_connections_close_sees_later_replacements(tmp_path):
    """Closing one of two connections to a file started its count of layer changes over, so a
    layer object held from the other one took a later replacement for a state it had seen and
    read the old layer's values."""
    path = tmp_path / "h.loom"
    loompy.create(path, np.zeros((20, 10), np.float32), {"g": np.arange(20)}, {"c": np.arange(10)}).close()
    with loompy.connect(path) as ds:
        ds.layers["x"] = np.full((20, 10), 1.0, np.float32)
    a, b = loompy.connect(path), loompy.connect(path)
    try:
        held = b.layers["x"]
        a.layers["x"] = np.full((20, 10), 2.0, np.float32)
        assert held[0, 0] == 2.0
        a.close()
        b.layers["x"] = np.full((20, 10), 3.0, np.float32)
        assert held[0, 0] == 3.0 and held[:, :].sum() == 600
    finally:
        a.close()
        b.close()


def test_locks_made_while_another_thread_lists_them_do_not_stop_it():
    """Every lock is listed when a write that must wait asks what reads its thread holds; a lock
    made meanwhile (every write makes its file's write gate) stopped the listing with a bare
    RuntimeError ("Set changed size during iteration")."""
    import sys
    import threading

    from loompy.handles import SharedOrAlone, reads_held

    interval, stop, errors = sys.getswitchinterval(), threading.Event(), []
    sys.setswitchinterval(1e-6)

    def make():
        kept = []
        while not stop.is_set():
            kept.append(SharedOrAlone())
            del kept[:-50]

    maker = threading.Thread(target=make, daemon=True)
    maker.start()
    try:
        for _ in range(3000):
            try:
                reads_held()
            except RuntimeError as error:
                errors.append(error)
                break
    finally:
        stop.set()
        maker.join()
        sys.setswitchinterval(interval)
    assert errors == []


def test_combine_of_a_loompy_2_file_does_not_carry_its_stamp_as_a_global_attribute(tmp_path):
    """Once ds.attrs listed a loompy 2 file's root stamp, combine copied it into the new file's
    global attributes, the old time kept as if a user had stored it."""
    path = tmp_path / "legacy.loom"
    shutil.copy(REAL / "linnarsson-lab+loompy/_history/bc58ebdd2632/test.loom", path)
    with loompy.connect(path, "r") as ds:
        assert "last_modified" in ds.attrs.keys()
    out = tmp_path / "out.loom"
    loompy.combine([path, path], out)
    with loompy.connect(out, "r") as ds:
        assert "last_modified" not in ds.attrs.keys() and "CreationDate" in ds.attrs.keys()


def test_pandas_nullable_integers_keep_every_digit_or_are_refused(small):
    """pandas' nullable Int64 / UInt64 with a missing value reach numpy as float64: 2**62 + 1 was
    stored as 2**62, silently. Without missing values they are exact integers."""
    pd = pytest.importorskip("pandas")
    path, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:
        for big, dtype in ((2**62 + 1, "Int64"), (2**64 - 1, "UInt64")):
            with pytest.raises(loompy.LoomValueError,
                               match=rf"small.loom: column attribute 'id'.*missing values.*{big}.*fill those first"):
                ds.ca["id"] = pd.array([big, None, 3, 4, 5, 6, 7, 8], dtype=dtype)
        with pytest.raises(loompy.LoomValueError, match=r"column attribute 'id'.*missing values.*fill those first"):
            ds.ca["id"] = [2**62 + 1, float("nan"), 3, 4, 5, 6, 7, 8]
    assert digest(path) == before
    with loompy.connect(path) as ds:
        ds.ca["id"] = pd.array([2**62 + 1, 2, 3, 4, 5, 6, 7, 8], dtype="Int64")
        ds.ca["small"] = pd.array([1, None, 3, 4, 5, 6, 7, 8], dtype="Int64")  # (exact as float64: NaN there)
        assert ds.ca.id.tolist() == [2**62 + 1, 2, 3, 4, 5, 6, 7, 8] and ds.ca.id.dtype == np.int64
        np.testing.assert_array_equal(ds.ca.small, [1, np.nan, 3, 4, 5, 6, 7, 8])


def test_text_given_a_numeric_dtype_is_read_exactly_or_refused(small):
    """set_attr(text, dtype=float16) stored "70000" as inf, and dtype=uint8 raised numpy's bare
    OverflowError for "300" (naming neither file nor attribute): text now converts as numbers do."""
    path, *_ = small
    before = digest(path)
    with loompy.connect(path) as ds:
        for texts, dtype in ((["70000"] + ["2"] * 7, "float16"), (["300"] + ["2"] * 7, "uint8"),
                             (["1.5"] + ["2"] * 7, "int32"), ([str(2**64)] + ["2"] * 7, "uint64")):
            with pytest.raises(loompy.LoomValueError, match="small.loom: column attribute 'T'"):
                ds.set_attr("T", np.array(texts), axis=1, dtype=dtype)
    assert digest(path) == before
    with loompy.connect(path) as ds:
        ds.set_attr("T", np.array([str(2**63 + 5)] + ["2"] * 7), axis=1, dtype="uint64")
        assert ds.ca.T.dtype == np.uint64 and ds.ca.T[0] == 2**63 + 5
        ds.set_attr("F", np.array(["0.5", "-2", "1e3"] + ["0"] * 5), axis=1, dtype="float32")
        assert ds.ca.F.dtype == np.float32 and ds.ca.F[:3].tolist() == [0.5, -2.0, 1000.0]


def test_a_sparse_matrix_built_from_damaged_arrays_is_refused_before_anything_is_written(small, tmp_path):
    """scipy builds a CSC matrix from (data, indices, indptr) without checking the indices: a row just
    past the last was dropped (one count fewer, silently), one far past it raised a bare IndexError
    from the engine. Every way in now names the matrix, and the user's matrix is left as it was."""
    path, m, *_ = small
    n, k = m.shape
    for bad_row in (n, 10**6, -1):
        indices = np.array([0, 1, bad_row, 2], dtype=np.int64)
        csc = sp.csc_matrix((np.ones(4, np.float32), indices, np.array([0, 2, 4] + [4] * (k - 2))), shape=(n, k))
        coo = sp.coo_matrix((np.ones(2), (np.array([0, 0]), np.array([0, 1]))), shape=(n, k))
        coo.row[1] = bad_row  # (scipy checks a COO matrix's indices when it is built only)
        bad_col = k if bad_row == n else bad_row
        csr = sp.csr_matrix((np.ones(2), np.array([0, bad_col]), np.array([0] + [2] * n)), shape=(n, k))
        held = csc.indices
        for matrix in (csc, csr, coo):
            with pytest.raises(loompy.LoomValueError, match=r"new\.loom: layer '': the sparse matrix .*malformed"):
                loompy.create(tmp_path / "new.loom", matrix, {}, {})
            assert not (tmp_path / "new.loom").exists()
            before = digest(path)
            with loompy.connect(path) as ds:
                with pytest.raises(loompy.LoomValueError, match=r"small\.loom: layer 'L'.*malformed"):
                    ds.layers["L"] = matrix
                with pytest.raises(loompy.LoomValueError, match=r"small\.loom.*malformed"):
                    ds[:, :] = matrix
                with pytest.raises(loompy.LoomValueError, match=r"small\.loom.*malformed"):
                    ds.add_columns(matrix, {"Age": np.arange(k), "CellID": np.arange(k).astype(str)})
            assert digest(path) == before
        assert csc.indices is held  # (the check did not retype the user's matrix)
    good = sp.csc_matrix(m)
    with loompy.create(tmp_path / "good.loom", good, {}, {}) as ds:
        np.testing.assert_array_equal(ds[:, :], m)


def test_a_connection_let_go_of_without_close_unlocks_its_file_at_once(small):
    """The seed says there is usually no need to close: a connection dropped unclosed kept its file
    open, and locked against other processes, until Python's cycle collector ran (a layer and its
    manager referred to each other)."""
    import gc
    import subprocess
    import sys

    path, m, *_ = small
    gc.disable()
    try:
        for mode in ("r", "r+"):
            ds = loompy.connect(path, mode)
            ds[0:2, :]
            layer = ds.layers[""]
            assert layer[0, 0] == m[0, 0] and ds.layers[""][1, 1] == m[1, 1]
            del ds, layer
            opened = subprocess.run([sys.executable, "-c", "import h5py, sys; h5py.File(sys.argv[1], 'r+').close()",
                                     str(path)], capture_output=True, text=True)
            assert opened.returncode == 0, (mode, opened.stderr[-300:])
    finally:
        gc.enable()
    rows = loompy.connect(path).layers[""]  # (the layer alone keeps what it needs open)
    np.testing.assert_array_equal(rows[0:2, :], m[0:2, :])


def test_text_given_a_boolean_dtype_is_read_as_what_it_says(small):
    """numpy takes any non-empty text for True: set_attr(["False", "True", ...], dtype=bool) stored
    every value as True."""
    path, *_ = small
    with loompy.connect(path) as ds:
        ds.set_attr("B", np.array(["False", "True", "0", "1", "true", " FALSE ", "1", "0"]), axis=1, dtype=bool)
        assert ds.ca.B.tolist() == [0, 1, 0, 1, 1, 0, 1, 0]
        before = ds.ca.B.copy()
        with pytest.raises(loompy.LoomValueError, match=r"small\.loom: column attribute 'B'.*'yes' is not a boolean"):
            ds.set_attr("B", np.array(["yes"] * 8), axis=1, dtype=bool)
        np.testing.assert_array_equal(ds.ca.B, before)


def test_a_mapping_given_as_attribute_values_is_named_as_one(small):
    """An attribute manager given as values was read as its names ("expected 5 values, got 2")."""
    path, m, ra, ca = small
    with loompy.connect(path) as ds:
        before = {k: ds.ra[k].tolist() for k in ds.ra.keys()}
        with pytest.raises(loompy.LoomValueError, match=r"row attribute 'X': expected an array of values, got a "
                                                        r"mapping \(AttributeManager: '"):
            ds.ra["X"] = ds.view[:, :].ra
        with pytest.raises(loompy.LoomValueError, match=r"column attribute 'G': .* mapping \(dict: 'a'\)"):
            ds.ca.G = {"a": 1}
        assert {k: ds.ra[k].tolist() for k in ds.ra.keys()} == before and "G" not in ds.ca


def test_compound_attribute_fields_follow_the_rules_of_plain_values(small):
    """A boolean field was stored as an HDF5 enum, a complex one as a compound of two floats, which
    plain values refuse (booleans are stored as uint8; complex numbers not at all)."""
    path, m, ra, ca = small
    n = m.shape[1]
    with loompy.connect(path) as ds:
        given = np.array([(True, 1.5, [1, 0])] * n, dtype=[("x", "?"), ("y", "f2"), ("z", "?", (2,))])
        ds.ca.s = given
        assert ds.ca.s.dtype == np.dtype([("x", "u1"), ("y", "f2"), ("z", "u1", (2,))])
        assert ds.ca.s["x"].tolist() == [1] * n and ds.ca.s["z"].tolist() == [[1, 0]] * n
        for bad, dtype in (("complex64", [("x", "c8")]), (r"datetime64\[s\]", [("x", "M8[s]")]),
                           (r"\[\('a', '<f4'\)\]", [("x", [("a", "f4")])])):
            with pytest.raises(loompy.LoomValueError, match=f"column attribute 'q': field 'x' of dtype {bad} cannot"):
                ds.ca.q = np.zeros(n, dtype=dtype)
        assert "q" not in ds.ca
    with h5py.File(path, "r") as f:
        assert f["col_attrs/s"].dtype == np.dtype([("x", "u1"), ("y", "f2"), ("z", "u1", (2,))])
