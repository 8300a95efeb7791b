"""Files exchanged with the reference loompy 3.0.8 (its own venv, driven through subprocesses)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy

pytestmark = pytest.mark.reference

# The reference reads a file and reports everything as JSON-able values.
DUMP = """
    import sys, json, numpy as np, loompy
    def plain(v):
        v = np.asarray(v)
        return v.tolist()
    with loompy.connect(sys.argv[1], "r") as ds:
        out = {
            "shape": list(ds.shape),
            "layers": {k: plain(ds.layers[k][:, :]) for k in ds.layers.keys()},
            "dtypes": {k: str(ds.layers[k][:, :].dtype) for k in ds.layers.keys()},
            "ra": {k: plain(ds.ra[k]) for k in ds.ra.keys()},
            "ca": {k: plain(ds.ca[k]) for k in ds.ca.keys()},
            "row_graphs": {k: plain(ds.row_graphs[k].toarray()) for k in ds.row_graphs.keys()},
            "col_graphs": {k: plain(ds.col_graphs[k].toarray()) for k in ds.col_graphs.keys()},
            "attrs": {k: plain(ds.attrs[k]) for k in ds.attrs.keys()},
        }
    v = loompy.LoomValidator()
    out["valid"] = bool(v.validate(sys.argv[1]))
    out["errors"] = [str(e) for e in v.errors]
    print(json.dumps(out))
"""

ASCII_GENES = ["Actb", "Gapdh", "Sox2", "Pax6"]
NON_ASCII = ["Ménage", "中文", "naïve", "ok"]


def data():
    rng = np.random.default_rng(5)
    m = rng.integers(0, 9, size=(4, 70)).astype(np.float32)
    spliced = rng.integers(0, 3, size=(4, 70)).astype(np.int32)
    graph = sp.coo_matrix((np.array([1.0, 0.5]), (np.array([0, 69]), np.array([69, 3]))), shape=(70, 70))
    return m, spliced, graph


def test_reference_reads_our_files(tmp_path, reference):
    m, spliced, graph = data()
    path = tmp_path / "ours.loom"
    with loompy.create(path, {"": m, "spliced": spliced},
                       {"Gene": ASCII_GENES, "Score": np.array([0.5, 1.5, 2.5, 3.5])},
                       {"CellID": [f"c{i}" for i in range(70)], "Cluster": np.arange(70) % 3},
                       file_attrs={"title": "interop", "n": 7}) as ds:
        ds.col_graphs["knn"] = graph
        ds.row_graphs["net"] = sp.coo_matrix(np.eye(4))
    got = reference.run(DUMP, str(path))
    assert got["valid"], got["errors"]
    assert got["shape"] == [4, 70]
    np.testing.assert_array_equal(got["layers"][""], m)
    np.testing.assert_array_equal(got["layers"]["spliced"], spliced)
    assert got["dtypes"] == {"": "float32", "spliced": "int32"}
    assert got["ra"]["Gene"] == ASCII_GENES and got["ra"]["Score"] == [0.5, 1.5, 2.5, 3.5]
    assert got["ca"]["CellID"] == [f"c{i}" for i in range(70)]
    assert got["ca"]["Cluster"] == (np.arange(70) % 3).tolist()
    np.testing.assert_array_equal(got["col_graphs"]["knn"], graph.toarray())
    np.testing.assert_array_equal(got["row_graphs"]["net"], np.eye(4))
    assert got["attrs"]["title"] == "interop" and got["attrs"]["n"] == 7
    assert got["attrs"]["LOOM_SPEC_VERSION"] == "3.0.0"


def test_we_read_reference_files_identically(tmp_path, reference):
    path = tmp_path / "ref.loom"
    written = reference.run("""
        import sys, json, numpy as np, scipy.sparse as sp, loompy
        rng = np.random.default_rng(9)
        m = rng.integers(0, 9, size=(4, 70)).astype("float32")
        g = sp.coo_matrix((np.array([2.0]), (np.array([1]), np.array([5]))), shape=(70, 70))
        loompy.create(sys.argv[1], {"": m, "u": m.astype("int16")},
                      {"Gene": np.array(json.loads(sys.argv[2])), "Score": np.arange(4) * 0.5},
                      {"CellID": np.array([f"c{i}" for i in range(70)]), "Keep": np.arange(70) % 2 == 0},
                      file_attrs={"title": "from the reference"})
        with loompy.connect(sys.argv[1]) as ds:
            ds.col_graphs["g"] = g
        print(json.dumps({"m": m.tolist()}))
    """, str(path), json.dumps(NON_ASCII))
    with loompy.connect(path, "r") as ds, h5py.File(path, "r") as raw:
        np.testing.assert_array_equal(ds[:, :], np.array(written["m"], dtype=np.float32))
        assert ds.layers["u"].dtype == np.int16
        # every character survives: compare with the raw UTF-8 bytes the reference stored
        assert list(ds.ra.Gene) == [b.decode("utf-8") for b in raw["row_attrs/Gene"][...]] == NON_ASCII
        assert list(ds.ca.Keep) == [1, 0] * 35 and ds.ca.Keep.dtype == np.uint8
        assert ds.attrs.title == "from the reference"
        assert ds.col_graphs.g.toarray()[1, 5] == 2.0
    assert loompy.LoomValidator().validate(path)


def test_non_ascii_strings_read_by_reference_as_it_reads_its_own(tmp_path, reference):
    """Under h5py 3 the reference decodes UTF-8 attribute bytes as ASCII (dropping é even from its own
    files); our files must look to it exactly like its own, and the raw bytes must be proper UTF-8."""
    ours, theirs = tmp_path / "ours.loom", tmp_path / "theirs.loom"
    m = np.zeros((4, 2), dtype=np.float32)
    loompy.create(ours, m, {"Gene": NON_ASCII}, {"CellID": ["a", "b"]}, file_attrs={"title": "Ménage"}).close()
    reference.run("""
        import sys, json, numpy as np, loompy
        loompy.create(sys.argv[1], np.zeros((4, 2), dtype="float32"), {"Gene": np.array(json.loads(sys.argv[2]))},
                      {"CellID": np.array(["a", "b"])}, file_attrs={"title": "Ménage"})
        print("{}")
    """, str(theirs), json.dumps(NON_ASCII))
    read = reference.run("""
        import sys, json, loompy
        out = []
        for p in sys.argv[1:]:
            with loompy.connect(p, "r") as ds:
                out.append({"genes": list(ds.ra.Gene), "title": ds.attrs.title})
        print(json.dumps(out))
    """, str(ours), str(theirs))
    assert read[0] == read[1]
    with h5py.File(ours, "r") as a, h5py.File(theirs, "r") as b:
        assert list(a["row_attrs/Gene"][...]) == list(b["row_attrs/Gene"][...]) == [s.encode() for s in NON_ASCII]
    with loompy.connect(theirs, "r") as ds:
        assert list(ds.ra.Gene) == NON_ASCII and ds.attrs.title == "Ménage"


def test_export_writes_what_the_reference_writes_byte_for_byte(tmp_path, reference):
    """The same file exported by both: every cell followed by a tab, values printed alike (float32,
    integers, text, several values per column), for the main matrix and a named layer. (ASCII text:
    loompy 3.0.8 reads "Ménage" as "Mnage", see test_non_ascii_strings_read_by_reference_as_it_reads_its_own.)"""
    path = tmp_path / "e.loom"
    # zeros share one text, and -0.0 is not zero there; the other values are printed one by one
    m = np.array([[0.1, 1e-8, 3, 0.0, -0.0], [2.5, -1, 1e10, np.nan, np.inf], [0, 0, 0, 0, 0],
                  [1e-45, -np.inf, 7, 0, 16777217]], dtype=np.float32)
    with np.errstate(over="ignore"):
        half = m.astype(np.float16)  # (1e10 and 16777217 beyond float16: inf)
    loompy.create(path, {"": m, "i": np.arange(20, dtype=np.int32).reshape(4, 5) % 3 - 1, "h": half},
                  {"Gene": ["a", "b&c", "d", "e"], "F": np.array([0.1, 2.0, 0, -0.0])},
                  {"CellID": ["c1", "c2", "c3", "c4", "c5"], "N": np.arange(5),
                   "XY": np.arange(10.0).reshape(5, 2)}).close()
    for layer in ("", "i", "h"):
        ours = tmp_path / f"ours{layer}.tab"
        with loompy.connect(path, "r") as ds:
            ds.export(ours, layer=layer)
        theirs = tmp_path / f"theirs{layer}.tab"
        reference.run("""
            import sys, loompy
            with loompy.connect(sys.argv[1], "r") as ds:
                ds.export(sys.argv[2], layer=sys.argv[3])
        """, str(path), str(theirs), layer, parse_json=False)
        assert ours.read_bytes() == theirs.read_bytes()


def test_loompy3_module_helpers_answer_as_the_reference(tmp_path, reference):
    """loompy 3's module-level names: the spec version helpers on an HDF5 file (ours, a loompy 2
    file, one with no version), the spec version constant, to_html and MemoryLoomLayer."""
    import h5py

    from .conftest import REAL

    m, _, _ = data()
    ours = tmp_path / "ours.loom"
    loompy.create(ours, m, {"Gene": ASCII_GENES}, {"CellID": [f"c{i}" for i in range(70)]}).close()
    bare = tmp_path / "bare.h5"
    h5py.File(bare, "w").close()
    paths = [str(ours), str(REAL / "linnarsson-lab+loompy/_history/bc58ebdd2632/test.loom"), str(bare)]
    versions = ["2.0.1", "3.0.0", "3.0.1", "0.0.0"]
    got = reference.run("""
        import sys, json, h5py, loompy
        out = {"const": loompy.loom_spec_version, "files": []}
        versions = json.loads(sys.argv[1])
        for path in sys.argv[2:]:
            with h5py.File(path, "r") as f:
                out["files"].append([loompy.get_loom_spec_version(f)]
                                    + [loompy.compare_loom_spec_version(f, v) for v in versions])
        print(json.dumps(out))
    """, json.dumps(versions), *paths)
    assert loompy.loom_spec_version == got["const"] == loompy.LOOM_SPEC_VERSION
    for path, expected in zip(paths, got["files"]):
        with h5py.File(path, "r") as f:
            assert [loompy.get_loom_spec_version(f)] + [loompy.compare_loom_spec_version(f, v)
                                                        for v in versions] == expected
    with h5py.File(ours, "r") as f:  # numbers compared as numbers (loompy 3 joined the digits: 3.0.10 < 3.1)
        assert loompy.compare_loom_spec_version(f, "3.0.10") == -1 and loompy.compare_loom_spec_version(f, "3") == 0
    with loompy.connect(ours, "r") as ds:
        view = ds.view[:, :3]
        assert isinstance(view.layers[""], loompy.MemoryLoomLayer)
        html = loompy.to_html(view)
        assert html == view._repr_html_() and "c2" in html and "c3" not in html


def test_graph_weights_given_as_integers_are_stored_as_floats_the_reference_opens(tmp_path, reference):
    """The spec's weights are floats, and loompy 3 refuses to open a file whose are not (a 0/1
    integer adjacency matrix is a natural input): integers and booleans are stored as float64,
    values kept; weights float64 cannot hold exactly, or float128 ones, are refused."""
    path = tmp_path / "g.loom"
    adjacency = np.array([[0, 1, 0], [1, 0, 2], [0, 2, 0]], dtype=np.int8)
    with loompy.create(path, np.ones((3, 3), np.float32), {"G": np.arange(3)}, {"C": np.arange(3)}) as ds:
        ds.col_graphs["knn"] = adjacency
        ds.row_graphs["same"] = sp.eye(3, dtype=bool)
        ds.set_edges("e", [0, 1], [1, 2], np.array([3, 4], dtype=np.uint16), axis=1)
        for bad in (np.eye(3, dtype=np.longdouble), np.eye(3, dtype=np.int64) * (2**62 + 1),
                    np.eye(3, dtype=np.float16)):
            with pytest.raises(ValueError, match="column graph 'bad'"):
                ds.col_graphs["bad"] = bad
    with h5py.File(path, "r") as f:
        stored = {f[g]["w"].dtype for g in ("col_graphs/knn", "row_graphs/same", "col_graphs/e")}
        assert stored == {np.dtype(np.float64)}
        assert f["col_graphs/knn/a"].dtype == f["col_graphs/knn/b"].dtype == np.int32  # (as loompy 3 stores them)
        assert "bad" not in f["col_graphs"]
    assert loompy.LoomValidator().validate(str(path))
    read = reference.run("""
        import sys, json, loompy
        with loompy.connect(sys.argv[1], "r") as ds:
            print(json.dumps(ds.col_graphs["knn"].toarray().tolist()))
    """, str(path))
    np.testing.assert_array_equal(read, adjacency)
    with h5py.File(path, "r+") as f:  # another writer's integer weights: the validator says so
        del f["col_graphs/knn/w"]
        f["col_graphs/knn/w"] = np.array([1, 1, 2, 2], dtype=np.int32)
    validator = loompy.LoomValidator()
    assert not validator.validate(str(path))
    assert any("weights are stored as int32" in e for e in validator.errors)
