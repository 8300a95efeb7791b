"""Files written with raw h5py the way other tools do, read back through loompy."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import loompy


def make(path, *, spec=None, spec_where="attrs", spec_shape=(), spec_bytes=False, groups=True, n=3, m=4):
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=np.arange(n * m, dtype=np.float32).reshape(n, m), chunks=(n, m),
                         maxshape=(n, None))
        for g in ("row_attrs", "col_attrs") + (("layers", "row_graphs", "col_graphs") if groups else ()):
            f.create_group(g)
        if spec is not None:
            value = spec.encode() if spec_bytes else spec
            if spec_shape == (1,):
                value = np.array([value], dtype=object if isinstance(value, str) else None)
                value = value.astype(h5py.string_dtype()) if value.dtype == object else value
            if spec_where == "attrs":
                f.create_group("attrs")
                f["attrs"].create_dataset("LOOM_SPEC_VERSION", data=value)
            else:
                f.attrs["LOOM_SPEC_VERSION"] = value
    return path


@pytest.mark.parametrize("where", ["attrs", "root"])
@pytest.mark.parametrize("shape", [(), (1,)])
@pytest.mark.parametrize("as_bytes", [False, True])
def test_spec_version_in_every_form(tmp_path, where, shape, as_bytes):
    path = make(tmp_path / "s.loom", spec="2.0.1" if where == "root" else "3.0.0", spec_where=where,
                spec_shape=shape, spec_bytes=as_bytes)
    with loompy.connect(path) as ds:
        assert str(ds.version) == ("2.0.1" if where == "root" else "3.0.0")
        assert ds.attrs["LOOM_SPEC_VERSION"] == ("2.0.1" if where == "root" else "3.0.0")
        ds.attrs["title"] = "T"  # new globals go where this file keeps them
    with h5py.File(path, "r") as f:
        assert ("title" in f.attrs) == (where == "root")
        assert ("attrs" in f and "title" in f["attrs"]) == (where == "attrs")


def test_no_spec_version_is_old_and_missing_groups_are_fine(tmp_path):
    path = make(tmp_path / "o.loom", groups=False)
    with loompy.connect(path) as ds:
        assert str(ds.version) == "old" and ds.version.is_legacy
        assert ds.layers.keys() == [""] and ds.row_graphs.keys() == [] and ds.col_graphs.keys() == []
        ds.layers["x"] = np.ones((3, 4))  # missing groups are created on first write
        ds.col_graphs["g"] = np.eye(4)
    with h5py.File(path, "r") as f:
        assert "layers/x" in f and "col_graphs/g/a" in f


def test_string_storage_variants(tmp_path):
    path = make(tmp_path / "str.loom", spec="2.0.1", spec_where="root")
    with h5py.File(path, "r+") as f:
        ra = f["row_attrs"]
        ra["padded"] = np.array([b"ab", b"c", b""], dtype="S4")  # NUL-padded fixed length
        tid = h5py.h5t.C_S1.copy()
        tid.set_size(4)
        tid.set_strpad(h5py.h5t.STR_NULLTERM)
        ds = h5py.Dataset(h5py.h5d.create(ra.id, b"nullterm", tid, h5py.h5s.create_simple((3,))))
        ds[...] = np.array([b"xyz", b"q", b"w"], dtype="S4")
        ra.create_dataset("vlen_ascii", data=[b"a", b"b", b"c"], dtype=h5py.string_dtype("ascii"))
        ra.create_dataset("vlen_utf8", data=["é", "中文", "ok"], dtype=h5py.string_dtype("utf-8"))
        ra["xml"] = np.array([b"caf&#233;", b"&#x4e2d;&#25991;", b"a&amp;b"], dtype="S20")
        ra.create_dataset("vlen_xml", data=["&#233;", "x", "y"], dtype=h5py.string_dtype("utf-8"))
    with loompy.connect(path, "r") as ds:
        assert list(ds.ra.padded) == ["ab", "c", ""]
        assert list(ds.ra.nullterm) == ["xyz", "q", "w"]
        assert list(ds.ra.vlen_ascii) == ["a", "b", "c"]
        assert list(ds.ra.vlen_utf8) == ["é", "中文", "ok"]
        # pre-3.0 fixed-length ASCII carries XML character references: numeric ones are decoded
        assert list(ds.ra.xml) == ["café", "中文", "a&amp;b"]
        # variable-length strings are real Unicode already: left alone
        assert list(ds.ra.vlen_xml) == ["&#233;", "x", "y"]
        for key in ds.ra.keys():
            assert all(type(v) is str for v in ds.ra[key])


def test_xml_references_are_not_decoded_in_spec3_files(tmp_path):
    path = make(tmp_path / "x3.loom", spec="3.0.0")
    with h5py.File(path, "r+") as f:
        f["row_attrs"]["fixed"] = np.array([b"&#233;", b"b", b"c"], dtype="S8")
    with loompy.connect(path, "r") as ds:
        assert list(ds.ra.fixed) == ["&#233;", "b", "c"]


def test_invalid_utf8_is_decoded_losslessly_and_round_trips(tmp_path):
    path = make(tmp_path / "bad.loom", spec="3.0.0")
    raw_values = [b"ok", b"caf\xe9", b"\xff\xfe"]  # Latin-1 and garbage: not UTF-8
    with h5py.File(path, "r+") as f:
        f["row_attrs"].create_dataset("Name", data=raw_values, dtype=h5py.string_dtype("utf-8"))
    with loompy.connect(path) as ds:
        names = ds.ra.Name
        assert names[0] == "ok" and names[1] == "caf\udce9"  # surrogateescape marks each bad byte
        assert all(type(v) is str for v in names)
        ds.ra.Copy = names
    with h5py.File(path, "r") as f:
        assert list(f["row_attrs/Copy"][...]) == raw_values  # the exact bytes come back


def test_bytes_a_user_gives_must_be_utf8_text(tmp_path):
    """Bytes that are not UTF-8 were stored as they were in strings the file declares UTF-8: h5py's
    asstr() and other readers failed on them. Now refused, naming the value, with the file as it
    was; UTF-8 bytes (also beside str in one list) are stored as their text."""
    path = make(tmp_path / "u.loom", spec="3.0.0")
    before = path.read_bytes()
    pairs = np.array([(b"\xe9", 1)] * 4, dtype=[("t", "S2"), ("n", "i4")])
    with loompy.connect(path) as ds:
        for store in (lambda: ds.ra.__setitem__("Latin", np.array([b"ok", b"caf\xe9", b"c"])),
                      lambda: ds.ca.__setitem__("Latin", [b"\xe9t\xe9", "b", "c", "d"]),
                      lambda: ds.attrs.__setitem__("Raw", b"raw\xff"),
                      lambda: ds.ca.__setitem__("Pair", pairs)):
            with pytest.raises(loompy.LoomValueError, match=r"u.loom: .*is not UTF-8 text"):
                store()
    assert path.read_bytes() == before
    with pytest.raises(loompy.LoomValueError, match=r"row attribute 'G': b'caf\\xe9' is not UTF-8"):
        loompy.create(tmp_path / "n.loom", np.zeros((2, 2)), {"G": [b"ok", b"caf\xe9"]}, {"C": [1, 2]})
    assert not (tmp_path / "n.loom").exists()
    with loompy.connect(path) as ds:
        ds.ca.Mixed = [b"caf\xc3\xa9", "b", "c", "d"]
        ds.attrs.Bytes = b"\xc3\xa9t\xc3\xa9"
    with h5py.File(path, "r") as f:
        assert f["col_attrs/Mixed"].asstr()[0] == "café" and f["attrs/Bytes"].asstr()[()] == "été"


def test_a_file_before_spec_3_takes_no_global_named_as_the_append_record(tmp_path):
    """Such files keep global attributes on the root, beside loompy's record of an unfinished append:
    ds.attrs took that name, and the next connect 'rolled back' an append that never was, cutting
    the matrix to the value's width. Now refused with the file unchanged."""
    path = make(tmp_path / "old.loom", spec="2.0.1", spec_where="root")
    before = path.read_bytes()
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomValueError, match="old.loom: global attribute 'loompy_append_from_columns'"
                                                        ".*record of an unfinished append"):
            ds.attrs["loompy_append_from_columns"] = 1
    assert path.read_bytes() == before
    with loompy.connect(path) as ds:
        assert ds.shape == (3, 4) and ds[:, :].tolist() == np.arange(12).reshape(3, 4).tolist()


def test_enums_nested_groups_and_extra_groups_survive(tmp_path):
    path = make(tmp_path / "e.loom", spec="3.0.0")
    with h5py.File(path, "r+") as f:
        enum = h5py.enum_dtype({"LOW": 0, "HIGH": 1}, basetype="i1")
        f["col_attrs"].create_dataset("Level", data=np.array([0, 1, 1, 0], dtype="i1"), dtype=enum)
        nested = f["row_attrs"].create_group("Nested")
        nested["inner"] = np.arange(5)
        f.create_group("extra")["payload"] = np.arange(7)
        f["extra"].attrs["note"] = "keep me"
    with loompy.connect(path) as ds:
        assert list(ds.ca.Level) == [0, 1, 1, 0]
        assert "Nested" not in ds.ra  # groups are not attributes...
        ds.ra.Gene = ["a", "b", "c"]
        ds.layers["L"] = np.zeros((3, 4))
        ds.attrs["t"] = "x"
    with h5py.File(path, "r") as f:  # ...but they are kept intact
        assert list(f["row_attrs/Nested/inner"][...]) == list(range(5))
        assert list(f["extra/payload"][...]) == list(range(7)) and f["extra"].attrs["note"] == "keep me"
    v = loompy.LoomValidator()
    assert v.validate(path) and any("Nested" in w for w in v.warnings)


def test_compound_attributes_with_string_fields(tmp_path):
    path = make(tmp_path / "c.loom", spec="3.0.0")
    dt = np.dtype([("x", "<f8"), ("label", "S5")])
    with h5py.File(path, "r+") as f:
        f["col_attrs"]["Emb"] = np.array([(1.0, b"a"), (2.0, b"bb"), (3.0, b"c"), (4.0, b"d")], dtype=dt)
    with loompy.connect(path) as ds:
        emb = ds.ca.Emb
        assert list(emb["x"]) == [1.0, 2.0, 3.0, 4.0]
        assert list(emb["label"]) == ["a", "bb", "c", "d"] and type(emb["label"][0]) is str


def test_legacy_row_edges_groups_read_as_graphs(tmp_path):
    path = make(tmp_path / "edges.loom", groups=False)
    with h5py.File(path, "r+") as f:
        g = f.create_group("col_edges").create_group("knn")
        g["a"], g["b"], g["w"] = np.array([0, 1]), np.array([1, 3]), np.array([0.5, 0.25])
    with loompy.connect(path, "r") as ds:
        knn = ds.col_graphs["knn"]
        assert knn.shape == (4, 4) and knn.toarray()[1, 3] == 0.25


def test_global_attributes_in_old_files(tmp_path):
    path = make(tmp_path / "g.loom", spec="2.0.1", spec_where="root")
    with h5py.File(path, "r+") as f:
        f.attrs["title"] = np.bytes_(b"caf&#233;")
        f.attrs["vec"] = np.array([1, 2, 3])
        f.attrs["names"] = np.array([b"a", b"b"])
    with loompy.connect(path, "r") as ds:
        assert ds.attrs.title == "café"
        assert list(ds.attrs.vec) == [1, 2, 3]
        assert list(ds.attrs.names) == ["a", "b"]
        assert "last_modified" not in ds.attrs
