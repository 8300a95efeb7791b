"""Importers of text matrices (Matrix Market, tab-separated tables), against the reference loompy 3.0.8
on the same inputs and against scipy / numpy reading of the real 10x files."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import scipy.io

import loompy

from .conftest import REAL

CR2 = REAL / "scverse+scanpy/tests/_data/10x_data/1.2.0/filtered_gene_bc_matrices/hg19_chr21"
CR3 = REAL / "scverse+scanpy/tests/_data/10x_data/3.0.0/filtered_feature_bc_matrix"

READ_BACK = """
    import sys, json, numpy as np, loompy
    {make}
    with loompy.connect(sys.argv[1], "r") as ds:
        print(json.dumps({{"layers": {{k: ds.layers[k][:, :].tolist() for k in ds.layers.keys()}},
                          "ra": {{k: [str(v) for v in ds.ra[k]] for k in ds.ra.keys()}},
                          "ca": {{k: [str(v) for v in ds.ca[k]] for k in ds.ca.keys()}}}}))
"""


def _same_as_reference(path, ref):
    with loompy.connect(path, "r") as ds:
        assert sorted(ds.layers.keys()) == sorted(ref["layers"])
        for name, values in ref["layers"].items():
            np.testing.assert_allclose(ds.layers[name][:, :], np.array(values, dtype=np.float64))
        assert sorted(ds.ra.keys()) == sorted(ref["ra"]) and sorted(ds.ca.keys()) == sorted(ref["ca"])
        for name, values in ref["ra"].items():
            assert [str(v) for v in ds.ra[name]] == values, name
        for name, values in ref["ca"].items():
            assert [str(v) for v in ds.ca[name]] == values, name


@pytest.mark.reference
def test_matrix_market_as_the_reference_imports_it(tmp_path, reference):
    shutil.copytree(CR2, tmp_path / "in")
    mtx, genes, barcodes = (str(tmp_path / "in" / n) for n in ("matrix.mtx", "genes.tsv", "barcodes.tsv"))
    doubled = tmp_path / "in" / "doubled.mtx"
    scipy.io.mmwrite(str(doubled), scipy.io.mmread(mtx) * 2)
    for layers in ({"": mtx}, {"spliced": mtx, "unspliced": str(doubled)}):
        ref = reference.run(READ_BACK.format(make=(
            f"loompy.create_from_matrix_market(sys.argv[1], 'S1', {layers!r}, {genes!r}, {barcodes!r})")),
            str(tmp_path / "ref.loom"))
        out = loompy.create_from_matrix_market(tmp_path / "ours.loom", "S1", layers, genes, barcodes)
        assert out == str(tmp_path / "ours.loom")
        _same_as_reference(out, ref)
    with loompy.connect(out, "r") as ds:  # the main matrix is the layers' sum
        np.testing.assert_array_equal(ds[:, :], scipy.io.mmread(mtx).toarray() * 3)


def test_matrix_market_gzipped_transposed_with_headers(tmp_path):
    m = scipy.io.mmread(str(CR3 / "matrix.mtx.gz")).toarray()
    with gzip.open(CR3 / "features.tsv.gz", "rt") as f:
        features = [line.rstrip("\n").split("\t") for line in f]
    with gzip.open(CR3 / "barcodes.tsv.gz", "rt") as f:
        barcodes = [line.strip() for line in f]
    scipy.io.mmwrite(str(tmp_path / "cells_by_genes.mtx"), scipy.sparse.coo_matrix(m.T))
    (tmp_path / "genes.csv").write_text("id,name,type\n" + "".join(",".join(r) + "\n" for r in features))
    (tmp_path / "cells.csv").write_text("barcode\n" + "".join(f'"{b}"\n' for b in barcodes))
    out = loompy.create_from_matrix_market(tmp_path / "t.loom", "X", {"": str(tmp_path / "cells_by_genes.mtx")},
                                           tmp_path / "genes.csv", tmp_path / "cells.csv", delim=",",
                                           skip_row_headers=True, skip_colums_headers=True, matrix_transposed=True)
    with loompy.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        assert list(ds.ra.Accession) == [r[0] for r in features] and list(ds.ra.Gene) == [r[1] for r in features]
        assert list(ds.ca.CellID) == [f"X:{b}" for b in barcodes]
    out = loompy.create_from_matrix_market(tmp_path / "gz.loom", "X", {"": str(CR3 / "matrix.mtx.gz")},
                                           CR3 / "features.tsv.gz", CR3 / "barcodes.tsv.gz")
    with loompy.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
    with pytest.raises(FileNotFoundError):  # (as loompy 3: it was a LoomValueError calling it unreadable)
        loompy.create_from_matrix_market(tmp_path / "no.loom", "X", {"": str(tmp_path / "missing.mtx")},
                                         CR3 / "features.tsv.gz", CR3 / "barcodes.tsv.gz")


def test_matrix_market_bad_input_is_named_and_nothing_is_written(tmp_path):
    shutil.copytree(CR2, tmp_path / "in")
    mtx, genes, barcodes = (tmp_path / "in" / n for n in ("matrix.mtx", "genes.tsv", "barcodes.tsv"))
    out = tmp_path / "out.loom"
    out.write_bytes(b"kept")
    short = tmp_path / "short.tsv"
    short.write_text("".join(genes.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(loompy.LoomValueError, match=r"short\.tsv.*lists \d+ rows"):
        loompy.create_from_matrix_market(out, "S", {"": str(mtx)}, short, barcodes)
    (tmp_path / "bad.mtx").write_text("not a matrix\n")
    with pytest.raises(loompy.LoomValueError, match=r"bad\.mtx: not a readable Matrix Market"):
        loompy.create_from_matrix_market(out, "S", {"": str(tmp_path / "bad.mtx")}, genes, barcodes)
    scipy.io.mmwrite(str(tmp_path / "complex.mtx"), scipy.sparse.coo_matrix(np.eye(2) * 1j))
    with pytest.raises(loompy.LoomValueError, match=r"complex\.mtx: layer '' holds complex128 values"):
        loompy.create_from_matrix_market(out, "S", {"": str(tmp_path / "complex.mtx")}, genes, barcodes)
    uneven = tmp_path / "uneven.tsv"
    uneven.write_text("".join(line if k != 3 else line.split("\t")[0] + "\n"
                              for k, line in enumerate(genes.read_text().splitlines(keepends=True))))
    with pytest.raises(loompy.LoomValueError, match=r"uneven\.tsv: row 4 has no second field"):
        loompy.create_from_matrix_market(out, "S", {"": str(mtx)}, uneven, barcodes)
    with pytest.raises(loompy.LoomTypeError, match="layer_paths"):
        loompy.create_from_matrix_market(out, "S", str(mtx), genes, barcodes)
    with pytest.raises(loompy.LoomFileError, match="one of the files being imported"):
        loompy.create_from_matrix_market(mtx, "S", {"": str(mtx)}, genes, barcodes)
    with pytest.raises(FileNotFoundError):
        loompy.create_from_matrix_market(out, "S", {"": str(mtx)}, tmp_path / "none.tsv", barcodes)
    assert out.read_bytes() == b"kept"
    assert scipy.io.mmread(str(mtx)).shape == (len(genes.read_text().splitlines()),
                                              len(barcodes.read_text().splitlines()))


def _table(path, header_corner=True, quoted=False, trailing=""):
    """A table of 4 genes x 5 cells, zeros and fractions among the values (each line ending in
    ``trailing``); returns the matrix."""
    m = np.array([[0, 1, 2.5, 0, 0], [3, 0, 0, 0, 4], [0, 0, 0, 0, 0], [7, 8, 9, 10, 11.25]])
    q = '"' if quoted else ""
    cells = [f"{q}c{j}{q}" for j in range(5)]
    lines = ["\t".join((["gene"] if header_corner else []) + cells)]
    lines += ["\t".join([f"{q}G{i}{q}"] + [repr(float(v)) for v in row]) for i, row in enumerate(m)]
    path.write_text("".join(line + trailing + "\n" for line in lines))
    return m


@pytest.mark.reference
def test_tsv_as_the_reference_imports_it(tmp_path, reference):
    loompy.create(tmp_path / "genes.loom", np.zeros((7, 2)),  # (G1 twice: its last row takes it, as in loompy 3)
                  {"Accession": ["G3", "Gx", "G1", "G0", "G1", "Gy", "G2"], "Gene": list("abcdefg"),
                   "Other": np.arange(7)}, {"CellID": ["a", "b"]}).close()
    (tmp_path / "meta.tsv").write_text("Age\tTissue\n" + "".join(f"S_c{j}\t{j * 10}\tliver\n" for j in range(5)))
    (tmp_path / "meta_tabs.tsv").write_text("Age\tTissue\t\n" + "".join(f"c{j}\t{j}\tgut\t\n" for j in range(5)))
    cases = [({}, {"header_corner": True}), ({}, {"header_corner": False, "quoted": True}),
             ({"row_metadata_loomfile": str(tmp_path / "genes.loom"), "sample_id": "S_",
               "col_metadata_tsv": str(tmp_path / "meta.tsv")}, {"header_corner": True}),
             ({"col_metadata_tsv": str(tmp_path / "meta_tabs.tsv")}, {"trailing": "\t"})]  # (as spreadsheets save)
    for k, (kwargs, shape) in enumerate(cases):
        table = tmp_path / f"t{k}.tsv"
        _table(table, **shape)
        ref = reference.run(READ_BACK.format(make=(
            f"loompy.create_from_tsv(sys.argv[1], {str(table)!r}, **{kwargs!r})")), str(tmp_path / f"ref{k}.loom"))
        out = loompy.create_from_tsv(tmp_path / f"ours{k}.loom", table, **kwargs)
        _same_as_reference(out, ref)


def test_tsv_values_dtype_gzip_and_rows_following_another_file(tmp_path):
    m = _table(tmp_path / "t.tsv")
    with open(tmp_path / "t.tsv", "rb") as f, gzip.open(tmp_path / "t.tsv.gz", "wb") as g:
        g.write(f.read())
    out = loompy.create_from_tsv(tmp_path / "a.loom", tmp_path / "t.tsv.gz", dtype="float64", sample_id="P:")
    with loompy.connect(out, "r") as ds:
        assert ds[:, :].dtype == np.float64
        np.testing.assert_array_equal(ds[:, :], m)
        assert list(ds.ra.Gene) == ["G0", "G1", "G2", "G3"] and list(ds.ca.CellID) == [f"P:c{j}" for j in range(5)]
    loompy.create(tmp_path / "g.loom", np.zeros((3, 1)), {"Name": ["G3", "G9", "G0"]}, {"CellID": ["x"]}).close()
    with pytest.warns(UserWarning, match="2 of its 4 genes are not in"):
        out = loompy.create_from_tsv(tmp_path / "b.loom", tmp_path / "t.tsv", row_metadata_loomfile=tmp_path / "g.loom",
                                     row_metadata_attr="Name")
    with loompy.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.stack([m[3], np.zeros(5), m[0]]).astype(np.float32))
        assert list(ds.ra.Name) == ["G3", "G9", "G0"]


def test_tsv_bad_input_is_named_and_nothing_is_written(tmp_path):
    _table(tmp_path / "t.tsv")
    out = tmp_path / "out.loom"
    out.write_bytes(b"kept")
    lines = (tmp_path / "t.tsv").read_text().splitlines()
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines[:2] + [lines[2] + "\t5"] + lines[3:]) + "\n")
    with pytest.raises(loompy.LoomValueError, match=r"bad\.tsv: line 3 has 6 values"):
        loompy.create_from_tsv(out, bad)
    bad.write_text("\n".join(lines[:3] + [lines[3].replace("0.0", "n/a", 1)] + lines[4:]) + "\n")
    with pytest.raises(loompy.LoomValueError, match=r"bad\.tsv: line 4 holds a value that is not a number"):
        loompy.create_from_tsv(out, bad)
    (tmp_path / "meta.tsv").write_text("Age\nc0\t1\nc2\t2\nc1\t3\nc3\t4\nc4\t5\n")
    with pytest.raises(loompy.LoomValueError, match=r"meta\.tsv: line 3 describes cell 'c2' where the matrix has 'c1'"):
        loompy.create_from_tsv(out, tmp_path / "t.tsv", col_metadata_tsv=tmp_path / "meta.tsv")
    with pytest.raises(loompy.LoomValueError, match="no row attribute 'Accession'"):
        loompy.create(tmp_path / "g.loom", np.zeros((1, 1)), {"Name": ["G0"]}, {"CellID": ["x"]}).close()
        loompy.create_from_tsv(out, tmp_path / "t.tsv", row_metadata_loomfile=tmp_path / "g.loom")
    with pytest.raises(loompy.LoomFileError, match="one of the files being imported"):
        loompy.create_from_tsv(tmp_path / "t.tsv", tmp_path / "t.tsv")
    bad.write_text("\n".join([lines[0].split("\t", 1)[1], lines[1].rsplit("\t", 1)[0] + "\t"] + lines[2:]) + "\n")
    with pytest.raises(loompy.LoomValueError, match=r"bad\.tsv: line 2 holds a value that is not a number"):
        loompy.create_from_tsv(out, bad)  # (a missing last value; the header without its corner field)
    bad.write_text(lines[0] + "\n")
    with pytest.raises(loompy.LoomValueError, match=r"bad\.tsv: the table has no line of values"):
        loompy.create_from_tsv(out, bad)
    (tmp_path / "twice.tsv").write_text("Age\tAge\n" + "".join(f"c{j}\t1\t2\n" for j in range(5)))
    with pytest.raises(loompy.LoomValueError, match=r"twice\.tsv: attributes named more than once: \['Age'\]"):
        loompy.create_from_tsv(out, tmp_path / "t.tsv", col_metadata_tsv=tmp_path / "twice.tsv")
    with pytest.raises(loompy.LoomValueError, match="dtype='str'"):
        loompy.create_from_tsv(out, tmp_path / "t.tsv", dtype="str")
    (tmp_path / "commas.csv").write_text("gene,c0,c1\ng1,1,0\ng2,0,5\n")  # (read at tabs: one field a line)
    with pytest.raises(loompy.LoomValueError, match=r"commas\.csv: its header lists no cell ids when split at '\\t'"):
        loompy.create_from_tsv(out, tmp_path / "commas.csv")
    for dtype, value in (("float32", "1e300"), ("int32", "0.5"), ("uint16", "-3")):  # (cast silently, before)
        bad.write_text("gene\tc0\tc1\ng1\t1\t0\ng2\t2\t" + value + "\n")
        with pytest.raises(loompy.LoomValueError, match=rf"bad\.tsv: line 3: values .* do not fit dtype {dtype}"):
            loompy.create_from_tsv(out, bad, dtype=dtype)
    (tmp_path / "headless.tsv").write_text("".join(f"c{j}\t{j}\n" for j in range(5)))
    with pytest.raises(loompy.LoomValueError, match=r"headless\.tsv: 4 cells described, the matrix has 5 \(its first "
                                                     r"line, which should name the attributes, describes cell 'c0'\)"):
        loompy.create_from_tsv(out, tmp_path / "t.tsv", col_metadata_tsv=tmp_path / "headless.tsv")
    assert out.read_bytes() == b"kept"


def test_tsv_with_a_byte_order_mark(tmp_path):
    m = _table(tmp_path / "t.tsv")
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "t.tsv").read_bytes())
    meta = b"CellID\tAge\n" + b"".join(b"c%d\t%d\n" % (j, j) for j in range(5))
    (tmp_path / "meta.tsv").write_bytes(b"\xef\xbb\xbf" + meta)
    out = loompy.create_from_tsv(tmp_path / "b.loom", tmp_path / "bom.tsv", col_metadata_tsv=tmp_path / "meta.tsv")
    with loompy.connect(out, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        assert sorted(ds.ca.keys()) == ["Age", "CellID"] and list(ds.ca.Age) == [str(j) for j in range(5)]
