"""Every Loom file from the field opens, lists its contents and reads its values (see tests/data/real/README.md)."""

from __future__ import annotations

import hashlib
import shutil

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy

from .conftest import REAL

LOOMS = sorted(p.relative_to(REAL).as_posix() for p in REAL.rglob("*.loom"))

# hand-checked facts per file: shape, matrix dtype, spec, layers, a few row/col attribute values
EXPECTED = {
    "Bioconductor+LoomExperiment/inst/extdata/L1_DRG_20_example.loom":
        ((20, 20), "float64", "2.0.1", [""], ("Gene", ["Nnat", "Rasl10a"]), ("Age", ["p20", "p20"])),
    "Bioconductor+LoomExperiment/inst/extdata/example.loom":
        ((20, 6), "float64", "old", ["", "a", "b"], ("id", ["1", "2"]), ("group", ["A", "A"])),
    "aertslab+SCope/server/test/data/minimal.loom":
        ((64, 5), "int32", "3.0.0", [""], None, ("CellID", ["Cell_1", "Cell_2"])),
    "aertslab+SCopeLoomR/inst/extdata/example.loom":
        ((50, 100), "float64", "old", [""], ("Gene", ["gene_1", "gene_2"]), ("CellID", ["cell_1", "cell_2"])),
    "linnarsson-lab+loom-viewer/test_loom.loom":
        ((21, 2100), "float32", "old", [""], ("Gene", ["Cdk1", "Top2a"]), ("Cluster", [0, 0])),
    "linnarsson-lab+loompy/_history/bc58ebdd2632/test.loom":
        ((1000, 100), "float64", "2.0.1", [""], ("g_id", [0, 1]), ("c_id", [0, 1])),
    "linnarsson-lab+loompy/test.loom":
        ((20, 200), "float64", "3.0.0", [""], ("Gene", ["A", "B"]), ("Cell", [0, 1])),
    "pachterlab+kb_python/tests/fixtures/counts/genes.loom":
        ((17, 29), "float32", "3.0.0", [""], ("var_names", ["ENSMUSG00000026034", "ENSMUSG00000092572"]),
         ("obs_names", ["AACTCAGAGAGTCGGT", "AACTCTTAGGAGTTTA"])),
    "scverse+scvi-tools/tests/test_data/Cortex.loom":
        ((10, 50), "int64", "2.0.1", [""], ("Gene", ["R_SSU-RRNA_HSA", "TTR"]), None),
}


def test_every_real_file_is_listed():
    assert sorted(EXPECTED) == LOOMS


@pytest.mark.parametrize("name", LOOMS)
def test_opens_lists_and_reads_like_raw_h5py(name):
    shape, dtype, spec, layers, row, col = EXPECTED[name]
    path = REAL / name
    with loompy.connect(path, "r") as ds, h5py.File(path, "r") as raw:
        assert ds.shape == shape and str(ds.layers[""].dtype) == dtype and str(ds.version) == spec
        assert ds.layers.keys() == layers
        np.testing.assert_array_equal(ds[:, :], raw["matrix"][...])
        for layer in layers[1:]:
            np.testing.assert_array_equal(ds.layers[layer][:, :], raw["layers"][layer][...])
        np.testing.assert_array_equal(ds.sparse().toarray(), raw["matrix"][...])
        for axis, expected, group in ((0, row, "row_attrs"), (1, col, "col_attrs")):
            manager = ds.ra if axis == 0 else ds.ca
            assert sorted(manager.keys()) == sorted(k for k, v in raw[group].items() if isinstance(v, h5py.Dataset))
            for key in manager.keys():
                values = manager[key]
                assert len(values) == shape[axis]
                if values.dtype == object:
                    assert all(type(v) is str for v in values.ravel()), key
            if expected:
                attr, first_two = expected
                assert list(manager[attr][:2]) == first_two
        for key in ds.attrs.keys():
            value = ds.attrs[key]
            assert not isinstance(value, bytes)


def test_scope_file_non_ascii_compound_and_spaces():
    path = REAL / "aertslab+SCope/server/test/data/minimal.loom"
    with loompy.connect(path, "r") as ds, h5py.File(path, "r") as raw:
        assert ds.attrs.title == raw["attrs/title"][()].decode("utf-8") == "ŅȰQìşţ"
        assert ds.attrs.Genome == "Nomen dubium"
        assert "My Annotation" in ds.ca
        assert list(ds.ca["My Annotation"]) == [v.decode("utf-8") for v in raw["col_attrs/My Annotation"][...]]
        emb = ds.ca.Embedding
        assert emb.dtype.names == ("_X", "_Y")
        np.testing.assert_array_equal(emb["_X"], raw["col_attrs/Embedding"]["_X"])
        assert ds.ca.Clusterings.dtype.names == ("14", "6", "63")
        assert len(ds.ra.Regulons.dtype.names) == len(raw["row_attrs/Regulons"].dtype.names)
        assert ds[0, :3].tolist() == [63, 58, 63]


def test_loomexperiment_float_graphs_and_shape1_spec_version():
    path = REAL / "Bioconductor+LoomExperiment/inst/extdata/L1_DRG_20_example.loom"
    with loompy.connect(path, "r") as ds, h5py.File(path, "r") as raw:
        assert raw.attrs["LOOM_SPEC_VERSION"].shape == (1,)  # stored as a shape-(1,) bytes array
        # (one-element arrays, as stored and as loompy 3 gives them)
        assert ds.attrs.LOOM_SPEC_VERSION.tolist() == ["2.0.1"]
        assert ds.attrs.CreatedWith.tolist() == ["LoomExperiment-1.3.3"]
        assert sorted(ds.col_graphs.keys()) == ["KNN", "MKNN"]
        knn = ds.col_graphs.KNN
        assert sp.isspmatrix_coo(knn) and knn.shape == (20, 20) and knn.nnz == 282
        assert raw["col_graphs/KNN/a"].dtype == np.float64
        np.testing.assert_array_equal(knn.row, raw["col_graphs/KNN/a"][...].astype(int))
        np.testing.assert_array_equal(knn.data, raw["col_graphs/KNN/w"][...])
        assert ds.col_graphs.MKNN.nnz == 152
        assert ds[:2, :3].tolist() == [[13.0, 13.0, 12.0], [6.0, 4.0, 4.0]]


def test_r_writers_shape1_title_and_json_metadata():
    with loompy.connect(REAL / "Bioconductor+LoomExperiment/inst/extdata/example.loom", "r") as ds:
        assert isinstance(ds.attrs.title, np.ndarray) and ds.attrs.title.tolist() == ["Sample '.loom' file"]
        assert ds.row_graphs.keys() == [] and ds.col_graphs.keys() == []
    with loompy.connect(REAL / "aertslab+SCopeLoomR/inst/extdata/example.loom", "r") as ds:
        assert ds.attrs.Genome == "Mouse" and ds.attrs.RVersion.startswith("R version 3.4.2")
        assert ds.ca.Embedding.dtype.names == ("_X", "_Y")
        assert ds.ra.Regulons.dtype.names == ("gene_5", "gene_7", "gene_21", "gene_36")


def test_cortex_two_dimensional_attribute():
    with loompy.connect(REAL / "scverse+scvi-tools/tests/test_data/Cortex.loom", "r") as ds:
        assert ds.ca.ClusterID.shape == (50, 1)
        assert ds[0, :3].tolist() == [8234, 6015, 4873]
        assert int(ds[:, :].sum()) == 649518


@pytest.mark.parametrize("name", LOOMS)
def test_writing_a_copy_keeps_everything_else(name, tmp_path):
    path = tmp_path / "copy.loom"
    shutil.copy(REAL / name, path)
    path.chmod(0o644)
    with h5py.File(path, "r") as raw:
        before = {}
        raw.visititems(lambda key, obj: before.__setitem__(key, obj[()] if isinstance(obj, h5py.Dataset) else None))
    with loompy.connect(path) as ds:
        n, m = ds.shape
        ds.ra["NewRow"] = np.arange(n)
        ds.ca["NewCol"] = [f"c{i}" for i in range(m)]
        ds.attrs["added"] = "yes é"
        ds.layers["extra"] = np.ones((n, m), dtype=np.float32)
    with loompy.connect(path, "r") as ds:
        assert list(ds.ra.NewRow) == list(range(n)) and ds.ca.NewCol[-1] == f"c{m - 1}"
        assert ds.attrs.added == "yes é"
        assert ds.layers["extra"][:, :].sum() == n * m
    with h5py.File(path, "r") as raw:
        for key, value in before.items():
            assert key in raw, key
            if value is not None:
                now = raw[key][()]
                same = now.tolist() == value.tolist() if np.asarray(value).dtype == object else \
                    np.asarray(now).tobytes() == np.asarray(value).tobytes()  # bitwise: NaNs compare equal
                assert same, key
    v = loompy.LoomValidator()
    assert v.validate(path), v.errors


@pytest.mark.reference
@pytest.mark.parametrize("name", LOOMS)
def test_reference_reads_our_modified_copies(name, tmp_path, reference):
    path = tmp_path / "copy.loom"
    shutil.copy(REAL / name, path)
    path.chmod(0o644)
    script = """
        import sys, json, loompy
        with loompy.connect(sys.argv[1], "r", validate=False) as ds:
            print(json.dumps({"shape": list(ds.shape), "sum": float(ds[:, :].sum()), "ra": sorted(ds.ra.keys())}))
    """
    try:
        original = reference.run(script, str(path))
    except RuntimeError:
        pytest.skip("the reference loompy cannot open the original file either")
    with loompy.connect(path) as ds:
        ds.ra["NewRow"] = np.arange(ds.shape[0])
    after = reference.run(script, str(path))
    assert after["shape"] == original["shape"] and after["sum"] == original["sum"]
    assert after["ra"] == sorted(original["ra"] + ["NewRow"])


@pytest.mark.parametrize("name", LOOMS)
def test_add_columns_grows_each_real_file_or_leaves_it_untouched(name, tmp_path):
    """Files whose writer fixed the number of columns (the R writers) are refused up front."""
    import hashlib

    path = tmp_path / "copy.loom"
    shutil.copy(REAL / name, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with h5py.File(path, "r") as raw:
        fixed = any(d.maxshape[1] is not None for d in [raw["matrix"], *raw.get("layers", {}).values()])
    with loompy.connect(path) as ds:
        n, m = ds.shape
        layers = {k: ds.layers[k][:, :2] for k in ds.layers.keys()}
        attrs = {k: v[:2] for k, v in ds.ca.items()}
        if fixed:
            with pytest.raises(loompy.LoomValueError, match="cannot grow"):
                ds.add_columns(layers, attrs)
        else:
            ds.add_columns(layers, attrs)
    if fixed:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == before
        return
    with loompy.connect(path, "r") as ds, h5py.File(REAL / name, "r") as raw:
        assert ds.shape == (n, m + 2)
        np.testing.assert_array_equal(ds[:, :], np.hstack([raw["matrix"][...], raw["matrix"][:, :2]]))
        for key, given in attrs.items():
            stored = ds.ca[key][m:]
            for field in given.dtype.names or [None]:  # compound ones field by field (NaN equals NaN)
                np.testing.assert_array_equal(stored if field is None else stored[field],
                                              given if field is None else given[field])


@pytest.mark.parametrize("killed", [False, True])
def test_a_spec2_global_attribute_interrupted_while_replaced_is_kept(tmp_path, monkeypatch, killed):
    """HDF5 replaces an attribute by deleting it, then creating the new one: interrupted in between,
    the old value comes back (at once, or after a kill on the next r+ open)."""
    path = tmp_path / "legacy.loom"
    shutil.copy(REAL / "Bioconductor+LoomExperiment/inst/extdata/L1_DRG_20_example.loom", path)
    with loompy.connect(path, "r") as ds:
        old = ds.attrs["CreatedWith"]
    real_create = h5py.AttributeManager.create
    calls = []

    def interrupted(self, name, *args, **kwargs):
        if name == "CreatedWith" and name in self and not calls:
            calls.append(name)
            del self[name]  # HDF5's first step, then the interruption
            raise SystemExit if killed else KeyboardInterrupt
        if killed and calls and name == "CreatedWith":
            raise SystemExit  # a killed process restores nothing
        return real_create(self, name, *args, **kwargs)

    ds = loompy.connect(path)
    monkeypatch.setattr(h5py.AttributeManager, "create", interrupted)
    with pytest.raises(SystemExit if killed else KeyboardInterrupt):
        ds.attrs["CreatedWith"] = "today"
    monkeypatch.undo()
    ds._file.close()
    if killed:
        with pytest.raises(loompy.LoomFileError, match="global attribute 'CreatedWith' was interrupted"):
            loompy.connect(path, "r")
    with loompy.connect(path) as ds:
        assert ds.attrs["CreatedWith"] == old and "loompy_swap" not in ds._file


@pytest.mark.reference
def test_spec2_files_keep_their_layout_when_written_so_loompy3_still_opens_them(tmp_path, reference):
    """Text written into a spec 2.0.1 file (attributes, globals, a permute's rewrite, new columns)
    was stored as 3.0.0 stores it (variable-length UTF-8): loompy 3.0.8 then refused the file. It
    is now fixed-length ASCII with XML character references, as that spec and loompy 3 have it."""
    path = tmp_path / "cortex.loom"
    shutil.copy(REAL / "scverse+scvi-tools/tests/test_data/Cortex.loom", path)
    path.chmod(0o644)
    with loompy.connect(path) as ds:
        genes = list(ds.ra.Gene)
        ds.ca["Name"] = np.array([f"cé{i}" for i in range(50)], dtype=object)
        ds.ra["Note"] = np.array(["中文", "a", "", "b&c", "d", "e", "f", "g", "h", "i"], dtype=object)
        ds.attrs["title"] = "Cortéx"
        ds.permute(np.arange(10)[::-1], axis=0)
        ds.add_columns(np.ones((10, 2), dtype=ds[:, :].dtype), {"Name": ["x", "ÿ"], "ClusterID": np.ones((2, 1))})
    with h5py.File(path, "r") as f:
        assert all(f[group][name].dtype.kind != "O" for group in ("row_attrs", "col_attrs") for name in f[group])
        assert f["col_attrs/Name"].dtype.kind == "S" and f.attrs["title"] == b"Cort&#233;x"
    theirs = reference.run("""
        import sys, json, loompy
        with loompy.connect(sys.argv[1], "r") as ds:  # (validate=True: loompy 3 checks the spec-2 layout)
            print(json.dumps({"Name": list(ds.ca.Name), "Note": list(ds.ra.Note), "Gene": list(ds.ra.Gene),
                              "title": str(ds.attrs.title), "shape": list(ds.shape)}))
    """, str(path))
    assert theirs == {"Name": [f"cé{i}" for i in range(50)] + ["x", "ÿ"], "shape": [10, 52], "title": "Cortéx",
                      "Note": ["i", "h", "g", "f", "e", "d", "b&c", "", "a", "中文"], "Gene": genes[::-1]}
    with loompy.connect(path, "r") as ds:  # and we read back what we wrote
        assert list(ds.ca.Name)[-2:] == ["x", "ÿ"] and ds.ra.Note[-1] == "中文" and ds.attrs.title == "Cortéx"


@pytest.mark.reference
def test_literal_character_references_written_into_a_spec2_file_read_back_as_written(tmp_path, reference):
    """Text like '&#36;5' written into a spec 2.0.1 file was stored as is and read back as '$5'
    (globals at once, attributes after reopening): an '&' that would start a reference is now
    stored as '&#38;'."""
    path = tmp_path / "cortex.loom"
    shutil.copy(REAL / "scverse+scvi-tools/tests/test_data/Cortex.loom", path)
    path.chmod(0o644)
    texts = ["price &#36;5", "&#x41;", "é&#233;", "a&#;b", "AT&T", "&#38;#36;", "&lt;b&gt;", "&copy 2020", "&#36",
             "&#X24;"]  # (loompy 3 decodes named entities and references without ';' too)
    with loompy.connect(path) as ds:
        ds.ra["Note"] = np.array(texts, dtype=object)
        ds.attrs["note"] = "price &#36;5 &amp; up"
        assert ds.attrs["note"] == "price &#36;5 &amp; up"
    with loompy.connect(path, "r") as ds:
        assert list(ds.ra.Note) == texts and ds.attrs["note"] == "price &#36;5 &amp; up"
    theirs = reference.run("""
        import sys, json, loompy
        with loompy.connect(sys.argv[1], "r") as ds:
            print(json.dumps([list(ds.ra.Note), str(ds.attrs.note)]))
    """, str(path))
    assert theirs == [texts, "price &#36;5 &amp; up"]


def test_names_hdf5_reads_as_paths_and_a_spec2_files_time_stamp_are_refused(tmp_path):
    """'.' failed inside h5py (raw errors, or one blaming the dtype); '..' was stored; in a spec-2
    file a global 'last_modified' was accepted, then overwritten by the file's time stamp."""
    path = tmp_path / "cortex.loom"
    shutil.copy(REAL / "scverse+scvi-tools/tests/test_data/Cortex.loom", path)
    path.chmod(0o644)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with loompy.connect(path) as ds:
        n, m = ds.shape
        for name in (".", ".."):
            for target, value in [(ds.layers, np.zeros((n, m))), (ds.row_graphs, sp.coo_matrix((n, n))),
                                  (ds.ra, np.arange(n)), (ds.attrs, 1)]:
                with pytest.raises(loompy.LoomValueError, match=r"cortex.loom: .*name '\.\.?' is invalid"):
                    target[name] = value
        with pytest.raises(loompy.LoomValueError, match="cortex.loom: global attribute 'last_modified'.*time stamp"):
            ds.attrs["last_modified"] = "yesterday"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("name", [n for n in LOOMS if EXPECTED[n][2] == "2.0.1"])
def test_a_new_file_takes_an_older_files_global_attributes_whole(name, tmp_path):
    """create(..., file_attrs=dict(ds.attrs)) from a loompy 2 file was refused on its
    LOOM_SPEC_VERSION "2.0.1" (loompy 3.0.8 sets it aside): the new file is laid out as spec 3.0.0
    and says so, and keeps every other attribute as it was."""
    with loompy.connect(REAL / name, "r") as ds:
        given = dict(ds.attrs)
        matrix = ds[:, :]
    new = loompy.create(tmp_path / "new.loom", matrix, {}, {}, file_attrs=given)
    with new:
        assert new.attrs.LOOM_SPEC_VERSION == "3.0.0" and set(new.attrs.keys()) == set(given) | {"CreationDate"}
        for key in set(given) - {"LOOM_SPEC_VERSION"}:
            np.testing.assert_array_equal(new.attrs[key], given[key])
    for value in (3, "", "three", ["2.0.1", "3.0.0"]):
        with pytest.raises(loompy.LoomValueError, match=r"other\.loom: global attribute 'LOOM_SPEC_VERSION'"):
            loompy.create(tmp_path / "other.loom", matrix, {}, {}, file_attrs={**given, "LOOM_SPEC_VERSION": value})
        assert not (tmp_path / "other.loom").exists()
