"""10x Genomics importers, checked against scipy.io.mmread / raw h5py on the same real files."""

from __future__ import annotations

import gzip
import os
import shutil

import h5py
import numpy as np
import pytest
import scipy.io

import loompy
from loompy.importers import read_10x

from .conftest import REAL

CR2 = REAL / "scverse+scanpy/tests/_data/10x_data/1.2.0"
CR3 = REAL / "scverse+scanpy/tests/_data/10x_data/3.0.0"
SEURAT_CR3 = REAL / "satijalab+seurat/tests/testdata/cr3.0"
PROTEIN = REAL / "scverse+scvi-tools/tests/test_data/10X/pbmc_10k_protein_v3/filtered_feature_bc_matrix"


def lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        return [line.rstrip("\n").split("\t") for line in handle]


@pytest.mark.parametrize("folder, features", [
    (CR2 / "filtered_gene_bc_matrices/hg19_chr21", "genes.tsv"),
    (CR3 / "filtered_feature_bc_matrix", "features.tsv.gz"),
    (SEURAT_CR3, "features.tsv.gz"),
    (PROTEIN, "features.tsv.gz"),
])
def test_mex_folders_match_mmread(folder, features):
    data = read_10x(folder)
    mtx = next(p for p in folder.iterdir() if p.name.startswith("matrix.mtx"))
    expected = scipy.io.mmread(str(mtx)).toarray()
    np.testing.assert_array_equal(data.matrix.toarray(), expected)
    feats = lines(folder / features)
    assert list(data.accessions) == [row[0] for row in feats]
    assert list(data.genes) == [row[1] for row in feats]
    barcodes = next(p for p in folder.iterdir() if p.name.startswith("barcodes"))
    assert list(data.barcodes) == [row[0] for row in lines(barcodes)]


def test_h5_files_match_raw_h5py_and_their_mex_twins():
    v3 = read_10x(CR3 / "filtered_feature_bc_matrix.h5")
    with h5py.File(CR3 / "filtered_feature_bc_matrix.h5", "r") as f:
        g = f["matrix"]
        assert v3.matrix.nnz == g["data"].shape[0] and v3.matrix.shape == tuple(g["shape"][...])
        assert v3.barcodes[0] == g["barcodes"][0].decode()
    mex = read_10x(CR3 / "filtered_feature_bc_matrix")
    np.testing.assert_array_equal(v3.matrix.toarray(), mex.matrix.toarray())
    assert list(v3.genes) == list(mex.genes) and list(v3.barcodes) == list(mex.barcodes)
    v2 = read_10x(CR2 / "filtered_gene_bc_matrices_h5.h5")
    mex2 = read_10x(CR2 / "filtered_gene_bc_matrices/hg19_chr21")
    assert v2.genome == "hg19_chr21" == mex2.genome
    np.testing.assert_array_equal(v2.matrix.toarray(), mex2.matrix.toarray())
    assert list(v2.genes) == list(mex2.genes)


def test_create_from_cellranger_both_conventions(tmp_path):
    sample = tmp_path / "sample3"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    # loompy 3: (indir, outdir) -> "{outdir}/{sample}.loom", cell ids "{sample}:{barcode}"
    path = loompy.create_from_cellranger(sample, tmp_path, file_attrs={"title": "t"})
    assert path == str(tmp_path / "sample3.loom")
    expected = scipy.io.mmread(str(CR3 / "filtered_feature_bc_matrix/matrix.mtx.gz")).toarray()
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (507, 1107) and ds.attrs.title == "t"
        np.testing.assert_array_equal(ds[:, :], expected)
        assert ds.ca.CellID[0] == "sample3:AAACCCAAGGAGAGTA-1"
        assert ds.ra.Gene[0] == "CH507-9B2.2" and ds.ra.Accession[0] == "ENSG00000279493"
        assert set(ds.ra.FeatureType) == {"Gene Expression"}
    # the seed: (folder, loom_file, cell_id_prefix, sample_annotation)
    out = tmp_path / "seed.loom"
    path = loompy.create_from_cellranger(sample, str(out), "S3_", {"Donor": "d1", "Index": np.arange(1107)})
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0] == "S3_AAACCCAAGGAGAGTA-1"
        assert set(ds.ca.Donor) == {"d1"} and ds.ca.Index[-1] == 1106
    # the seed's documented keywords: the prefix stays '' (the seed's default)
    path = loompy.create_from_cellranger(sample, str(out), sample_annotation={"Donor": "d2"})
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0] == "AAACCCAAGGAGAGTA-1" and set(ds.ca.Donor) == {"d2"}
    path = loompy.create_from_cellranger(sample, loom_file=out)
    with loompy.connect(path, "r") as ds:
        assert path == str(out) and ds.ca.CellID[0] == "AAACCCAAGGAGAGTA-1"
    with pytest.raises(TypeError):
        loompy.create_from_cellranger(sample, str(out), "S3_", cell_id_prefix="S4_")
    # the seed's name for the folder, and its file name in any case: its arguments read in its order
    upper = tmp_path / "S5.LOOM"
    path = loompy.create_from_cellranger(folder=sample, loom_file=upper, cell_id_prefix="S5_")
    assert path == str(upper)
    path = loompy.create_from_cellranger(sample, str(upper), "S6_", {"Donor": "d6"})
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0] == "S6_AAACCCAAGGAGAGTA-1" and set(ds.ca.Donor) == {"d6"}
        assert "Genome" not in ds.attrs or ds.attrs.Genome != "S6_"
    # a second argument neither a folder nor a .loom file: refused before anything is written
    with pytest.raises(ValueError, match="neither an existing folder"):
        loompy.create_from_cellranger(sample, str(tmp_path / "nowhere"), "S7_", {"Donor": "d7"})
    assert not (tmp_path / "nowhere").exists()
    with pytest.raises(TypeError):
        loompy.create_from_cellranger(sample, folder=sample)
    # an empty outdir is the current folder, as loompy 3 joins it with the file's name
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert os.path.samefile(loompy.create_from_cellranger(sample, ""), tmp_path / "sample3.loom")
    finally:
        os.chdir(here)
    keep = ["sample3:AAACCCAAGGAGAGTA-1", "sample3:AAACGCTTCAGCCCAG-1"]
    path = loompy.create_from_cellranger(sample, tmp_path, selected_cellids=keep)
    with loompy.connect(path, "r") as ds:
        assert list(ds.ca.CellID) == keep
        np.testing.assert_array_equal(ds[:, :], expected[:, :2])


def test_cellranger2_layout_records_genome(tmp_path):
    sample = tmp_path / "s2"
    shutil.copytree(CR2 / "filtered_gene_bc_matrices", sample / "outs" / "filtered_gene_bc_matrices")
    path = loompy.create_from_cellranger(sample, tmp_path)
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (343, 12) and ds.attrs.Genome == "hg19_chr21"
    with pytest.raises(ValueError) as info:
        loompy.create_from_cellranger(sample, tmp_path, genome="mm10")
    assert "mm10" in str(info.value) and "hg19_chr21" in str(info.value)
    # two genomes: genome= picks one, in either convention
    genomes = sample / "outs" / "filtered_gene_bc_matrices"
    shutil.copytree(genomes / "hg19_chr21", genomes / "mm10")
    for call in (lambda: loompy.create_from_cellranger(sample, tmp_path, "mm10"),
                 lambda: loompy.create_from_cellranger(sample, str(tmp_path / "seed.loom"), genome="mm10")):
        with loompy.connect(call(), "r") as ds:
            assert ds.attrs.Genome == "mm10" and ds.shape == (343, 12)
    with pytest.raises(ValueError, match="several genomes"):
        loompy.create_from_cellranger(sample, str(tmp_path / "seed.loom"))


def test_importer_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_10x(tmp_path / "nothing")
    with pytest.raises(ValueError) as info:
        read_10x(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.reference
def test_same_values_as_reference_importer(tmp_path, reference):
    sample = tmp_path / "sample1"
    shutil.copytree(CR2 / "filtered_gene_bc_matrices", sample / "outs" / "filtered_gene_bc_matrices")
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = reference.run("""
        import sys, json, loompy
        p = loompy.create_from_cellranger(sys.argv[1], sys.argv[2])
        with loompy.connect(p, "r") as ds:
            print(json.dumps({"m": ds[:, :].tolist(), "cells": list(ds.ca.CellID), "genes": list(ds.ra.Gene),
                              "acc": list(ds.ra.Accession), "genome": ds.attrs["Genome"]}))
    """, str(sample), str(ref_dir))
    path = loompy.create_from_cellranger(sample, tmp_path)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.array(ref["m"]))
        assert list(ds.ca.CellID) == ref["cells"] and list(ds.ra.Gene) == ref["genes"]
        assert list(ds.ra.Accession) == ref["acc"] and ds.attrs.Genome == ref["genome"]


def test_cellranger_sample_name_comes_from_the_folder_meant(tmp_path, monkeypatch):
    """'.' and '..' name the folder they mean; a .h5 file's stem names it, and the file goes beside it."""
    sample = tmp_path / "donor7"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    monkeypatch.chdir(sample / "outs")
    path = loompy.create_from_cellranger(".", str(tmp_path))
    assert path == str(tmp_path / "donor7.loom")
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0].startswith("donor7:")
    monkeypatch.chdir(tmp_path)  # a folder given relative: the path given back is too, as loompy 3's
    assert loompy.create_from_cellranger("donor7") == os.path.join("donor7", "donor7.loom")
    assert os.path.isfile(tmp_path / "donor7" / "donor7.loom")
    shutil.copy(CR3 / "filtered_feature_bc_matrix.h5", tmp_path / "run3.h5")
    path = loompy.create_from_cellranger(tmp_path / "run3.h5")
    assert path == str(tmp_path / "run3.loom")
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (507, 1107) and ds.ca.CellID[0].startswith("run3:")
        genomes = set(ds.ra.Genome)  # (one genome for every feature: also the file's, as Cell Ranger 2's)
        assert len(genomes) == 1 and ds.attrs.Genome == genomes.pop()


def _with_analysis(sample, barcodes, order=None):
    """Cell Ranger's secondary analysis and run record beside a sample's matrix: tSNE coordinates
    (i / 2, -i) and graph clusters (i % 3 + 1) for cell i, rows in ``order`` (default: the barcodes')."""
    order = range(len(barcodes)) if order is None else order
    tsne = sample / "outs" / "analysis" / "tsne" / "2_components"
    clusters = sample / "outs" / "analysis" / "clustering" / "graphclust"
    tsne.mkdir(parents=True)
    clusters.mkdir(parents=True)
    (tsne / "projection.csv").write_text("Barcode,TSNE-1,TSNE-2\n" + "".join(
        f"{barcodes[i]},{i / 2},{-i}\n" for i in order))
    (clusters / "clusters.csv").write_text("Barcode,Cluster\n" + "".join(f"{barcodes[i]},{i % 3 + 1}\n" for i in order))
    (sample / "_cmdline").write_text("cellranger count --id=sample1\n")
    (sample / "_versions").write_text('{"pipelines": "2.1.0",\n "martian": "v2.3.2"}\n')


@pytest.mark.reference
def test_secondary_analysis_and_run_record_as_the_reference_imports_them(tmp_path, reference):
    """loompy 3 adds the tSNE coordinates (X, Y), the graph clusters (ClusterID, from 0) and the run's
    command line and versions; we did not. Ours matches cells by barcode (loompy 3 by row order)."""
    sample = tmp_path / "sample1"
    shutil.copytree(CR2 / "filtered_gene_bc_matrices", sample / "outs" / "filtered_gene_bc_matrices")
    barcodes = [row[0] for row in lines(CR2 / "filtered_gene_bc_matrices/hg19_chr21/barcodes.tsv")]
    _with_analysis(sample, barcodes)
    (tmp_path / "ref").mkdir()
    ref = reference.run("""
        import sys, json, loompy
        p = loompy.create_from_cellranger(sys.argv[1], sys.argv[2])
        with loompy.connect(p, "r") as ds:
            print(json.dumps({"X": ds.ca.X.tolist(), "Y": ds.ca.Y.tolist(), "ClusterID": ds.ca.ClusterID.tolist(),
                              "dtypes": [ds.ca.X.dtype.str, ds.ca.ClusterID.dtype.kind],
                              "Cmdline": ds.attrs["Cmdline"], "Versions": ds.attrs["Versions"]}))
    """, str(sample), str(tmp_path / "ref"))
    with loompy.connect(loompy.create_from_cellranger(sample, tmp_path), "r") as ds:
        ours = {"X": ds.ca.X.tolist(), "Y": ds.ca.Y.tolist(), "ClusterID": ds.ca.ClusterID.tolist(),
                "dtypes": [ds.ca.X.dtype.str, ds.ca.ClusterID.dtype.kind],
                "Cmdline": ds.attrs.Cmdline, "Versions": ds.attrs.Versions}
    assert ours == ref
    assert ref["X"][:3] == [0.0, 0.5, 1.0] and ref["ClusterID"][:3] == [0, 1, 2]
    assert ref["Cmdline"] == "cellranger count --id=sample1" and "\n" not in ref["Versions"]


def test_secondary_analysis_is_matched_by_barcode(tmp_path):
    """Rows in another order, a cell missing from the analysis (NaN, cluster -1), and the cells a
    selection keeps: each cell gets its own values."""
    sample = tmp_path / "s"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    barcodes = [row[0] for row in lines(CR3 / "filtered_feature_bc_matrix/barcodes.tsv.gz")]
    order = list(range(len(barcodes)))[::-1]
    order.remove(5)
    _with_analysis(sample, barcodes, order)
    with loompy.connect(loompy.create_from_cellranger(sample, tmp_path), "r") as ds:
        assert ds.ca.X[:5].tolist() == [0.0, 0.5, 1.0, 1.5, 2.0] and ds.ca.Y[10] == -10
        assert np.isnan(ds.ca.X[5]) and np.isnan(ds.ca.Y[5]) and ds.ca.ClusterID[5] == -1
        assert ds.ca.ClusterID[:5].tolist() == [0, 1, 2, 0, 1] and "Genome" not in ds.attrs
    picked = [f"s:{barcodes[i]}" for i in (7, 3)]
    out = tmp_path / "sel"
    out.mkdir()
    path = loompy.create_from_cellranger(sample, out, selected_cellids=picked, file_attrs={"Genome": "mine"})
    with loompy.connect(path, "r") as ds:
        assert list(ds.ca.CellID) == [f"s:{barcodes[i]}" for i in (3, 7)]  # (in the matrix's order)
        assert ds.ca.X.tolist() == [1.5, 3.5] and ds.ca.ClusterID.tolist() == [0, 1] and ds.attrs.Genome == "mine"
    (sample / "outs/analysis/clustering/graphclust/clusters.csv").write_text(f"Barcode,Cluster\n{barcodes[0]},4.0\n")
    with loompy.connect(loompy.create_from_cellranger(sample, out), "r") as ds:  # (floats: loompy 3 took them)
        assert ds.ca.ClusterID[:2].tolist() == [3, -1]
    (sample / "outs/analysis/clustering/graphclust/clusters.csv").write_text(f"Barcode,Cluster\n{barcodes[0]},one\n")
    with pytest.raises(loompy.LoomValueError, match="clusters.csv: not a Cell Ranger clusters table"):
        loompy.create_from_cellranger(sample, out)


def _two_genome_h5(path):
    """Cell Ranger 3's .h5 of the real sample, its features split between two genomes (as a
    barnyard experiment's): every other one labelled mm10."""
    with h5py.File(CR3 / "filtered_feature_bc_matrix.h5", "r") as src, h5py.File(path, "w") as f:
        src.copy(src["matrix"], f, name="matrix")
        genomes = f["matrix/features/genome"][...].copy()
        genomes[::2] = b"mm10"
        del f["matrix/features/genome"]
        f["matrix/features/genome"] = genomes
    return genomes.astype(str)


def test_genome_picks_that_genome_s_features_of_a_cellranger3_h5(tmp_path):
    genomes = _two_genome_h5(tmp_path / "barnyard.h5")
    whole = read_10x(CR3 / "filtered_feature_bc_matrix.h5")
    for name in ("mm10", "GRCh38_chr21"):
        path = loompy.create_from_cellranger(tmp_path / "barnyard.h5", str(tmp_path / f"{name}.loom"), genome=name)
        rows = genomes == name
        with loompy.connect(path, "r") as ds:
            assert ds.attrs.Genome == name and set(ds.ra.Genome) == {name} and ds.shape == (rows.sum(), 1107)
            np.testing.assert_array_equal(ds[:, :], whole.matrix.toarray()[rows])
            assert list(ds.ra.Gene) == list(whole.genes[rows])
    path = loompy.create_from_cellranger(tmp_path / "barnyard.h5", str(tmp_path / "both.loom"))
    with loompy.connect(path, "r") as ds:  # no genome asked for: every feature, each with its genome
        assert ds.shape == (507, 1107) and list(ds.ra.Genome) == list(genomes) and "Genome" not in ds.attrs
    for source in (tmp_path / "barnyard.h5", CR3 / "filtered_feature_bc_matrix.h5"):
        with pytest.raises(ValueError, match="genome 'hg19' not found") as info:
            loompy.create_from_cellranger(source, str(tmp_path / "x.loom"), genome="hg19")
        assert "GRCh38_chr21" in str(info.value)
    assert not (tmp_path / "x.loom").exists()


def test_genome_keeps_the_features_of_no_genome_antibodies_and_guides(tmp_path):
    """Cell Ranger 3 gives Antibody Capture features an empty genome: genome= dropped them (loompy 3
    kept every feature), and a sample of one genome got no global Genome."""
    path = tmp_path / "citeseq.h5"
    with h5py.File(CR3 / "filtered_feature_bc_matrix.h5", "r") as src, h5py.File(path, "w") as f:
        src.copy(src["matrix"], f, name="matrix")
        genomes = f["matrix/features/genome"][...].copy()
        genomes[-5:] = b""
        types = f["matrix/features/feature_type"][...].astype("S32")
        types[-5:] = b"Antibody Capture"
        for name, values in (("genome", genomes), ("feature_type", types)):
            del f[f"matrix/features/{name}"]
            f[f"matrix/features/{name}"] = values
    whole = read_10x(CR3 / "filtered_feature_bc_matrix.h5")
    for genome in ("GRCh38_chr21", None):
        out = loompy.create_from_cellranger(path, str(tmp_path / f"{genome}.loom"), genome=genome)
        with loompy.connect(out, "r") as ds:
            assert ds.shape == whole.matrix.shape and ds.attrs.Genome == "GRCh38_chr21"
            assert list(ds.ra.FeatureType[-6:]) == ["Gene Expression"] + ["Antibody Capture"] * 5
            assert list(ds.ra.Genome[-6:]) == ["GRCh38_chr21"] + [""] * 5
            np.testing.assert_array_equal(ds[:, :], whole.matrix.toarray())


def test_genome_folders_of_cellranger2_given_directly(tmp_path):
    genomes = tmp_path / "outs" / "filtered_gene_bc_matrices"
    shutil.copytree(CR2 / "filtered_gene_bc_matrices", genomes)
    with pytest.raises(ValueError, match="genome 'mm10' not found"):  # a genome folder, another genome asked for
        loompy.create_from_cellranger(genomes / "hg19_chr21", str(tmp_path / "a.loom"), genome="mm10")
    shutil.copytree(genomes / "hg19_chr21", genomes / "mm10")
    for source in (genomes, genomes / "mm10"):  # the folder of genome folders is a source too
        path = loompy.create_from_cellranger(source, str(tmp_path / "a.loom"), genome="mm10")
        with loompy.connect(path, "r") as ds:
            assert ds.attrs.Genome == "mm10" and ds.shape == (343, 12)
    with pytest.raises(ValueError, match="several genomes"):
        loompy.create_from_cellranger(genomes, str(tmp_path / "a.loom"))
    # beside a Cell Ranger 3 matrix, several Cell Ranger 2 genomes do not stop the import
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", tmp_path / "outs" / "filtered_feature_bc_matrix")
    path = loompy.create_from_cellranger(tmp_path, str(tmp_path / "b.loom"))
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (507, 1107)
    # a matrix folder named by the user (not a genome folder): genome= names its genome
    shutil.copytree(CR2 / "filtered_gene_bc_matrices/hg19_chr21", tmp_path / "my_counts")
    path = loompy.create_from_cellranger(tmp_path / "my_counts", str(tmp_path / "c.loom"), genome="hg19")
    with loompy.connect(path, "r") as ds:
        assert ds.attrs.Genome == "hg19"


def test_a_symlinked_source_is_read_where_the_user_put_it(tmp_path):
    """The sample name, secondary analysis and run record come from the link's folder (loompy 3
    does so too), not from wherever the link points."""
    store = tmp_path / "store" / "run42"
    store.mkdir(parents=True)
    shutil.copy(CR3 / "filtered_feature_bc_matrix.h5", store / "filtered_feature_bc_matrix.h5")
    sample = tmp_path / "donor7"
    (sample / "outs").mkdir(parents=True)
    (sample / "outs" / "filtered_feature_bc_matrix.h5").symlink_to(store / "filtered_feature_bc_matrix.h5")
    barcodes = read_10x(store / "filtered_feature_bc_matrix.h5").barcodes
    _with_analysis(sample, list(barcodes))
    path = loompy.create_from_cellranger(sample / "outs" / "filtered_feature_bc_matrix.h5", str(tmp_path / "a.loom"))
    with loompy.connect(path, "r") as ds:
        assert {"X", "Y", "ClusterID"} <= set(ds.ca.keys()) and ds.attrs.Cmdline.startswith("cellranger count")
        assert ds.ca.ClusterID[:3].tolist() == [0, 1, 2]
    (tmp_path / "current").symlink_to(sample)
    path = loompy.create_from_cellranger(tmp_path / "current", tmp_path)
    assert path == str(tmp_path / "current.loom")
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0] == f"current:{barcodes[0]}" and "X" in ds.ca


def test_selected_cellids_that_match_nothing_are_refused_and_missing_ones_named(tmp_path):
    sample = tmp_path / "s3"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    with pytest.raises(ValueError, match="none of the 2 selected_cellids.*s3:AAACCCAAGGAGAGTA-1"):
        loompy.create_from_cellranger(sample, tmp_path, selected_cellids=["AAACCCAAGGAGAGTA-1", "x"])
    assert not (tmp_path / "s3.loom").exists()
    with pytest.warns(UserWarning, match="1 of the 2 selected_cellids is not a cell id.*'s3:nope'"):
        path = loompy.create_from_cellranger(sample, tmp_path, selected_cellids=["s3:AAACCCAAGGAGAGTA-1", "s3:nope"])
    with loompy.connect(path, "r") as ds:
        assert list(ds.ca.CellID) == ["s3:AAACCCAAGGAGAGTA-1"]


@pytest.mark.parametrize("inner", ["outs", "outs/filtered_gene_bc_matrices",
                                   "outs/filtered_gene_bc_matrices/hg19_chr21"])
def test_folders_cell_ranger_made_in_a_sample_are_named_after_the_sample(tmp_path, inner):
    """Given a folder Cell Ranger made inside the sample folder, the sample is still the sample:
    its name, its secondary analysis and run record, and (no output folder given) the file's place."""
    sample = tmp_path / "donor7"
    shutil.copytree(CR2 / "filtered_gene_bc_matrices", sample / "outs" / "filtered_gene_bc_matrices")
    barcodes = list(read_10x(sample).barcodes)
    _with_analysis(sample, barcodes)
    path = loompy.create_from_cellranger(sample / inner)
    assert path == str(sample / "donor7.loom")
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0] == f"donor7:{barcodes[0]}" and {"X", "Y", "ClusterID"} <= set(ds.ca.keys())
        assert ds.attrs.Cmdline.startswith("cellranger count") and ds.attrs.Genome == "hg19_chr21"


def test_genome_in_a_sample_folder_reads_the_source_that_tells_genomes_apart(tmp_path):
    """A Cell Ranger 3 sample holds MEX files (no genome per feature) and the .h5 (with it): with
    genome= the .h5 is read, so the features are that genome's; without, the MEX files as before."""
    outs = tmp_path / "barn" / "outs"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", outs / "filtered_feature_bc_matrix")
    genomes = _two_genome_h5(outs / "filtered_feature_bc_matrix.h5")
    path = loompy.create_from_cellranger(tmp_path / "barn", genome="mm10")
    with loompy.connect(path, "r") as ds:
        assert ds.shape == ((genomes == "mm10").sum(), 1107) and ds.attrs.Genome == "mm10"
    with pytest.raises(ValueError, match="genome 'hg19' not found"):
        loompy.create_from_cellranger(tmp_path / "barn", str(tmp_path / "x.loom"), genome="hg19")
    path = loompy.create_from_cellranger(tmp_path / "barn", str(tmp_path / "all.loom"))
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (507, 1107) and "Genome" not in ds.attrs


def test_a_folder_the_user_named_gets_no_genome_unless_given_and_raw_matrices_name_the_sample(tmp_path):
    shutil.copytree(CR2 / "filtered_gene_bc_matrices/hg19_chr21", tmp_path / "mydata")
    path = loompy.create_from_cellranger(tmp_path / "mydata", str(tmp_path / "a.loom"))
    with loompy.connect(path, "r") as ds:
        assert "Genome" not in ds.attrs  # (it was the folder's name: "mydata")
    sample = tmp_path / "donor8"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "raw_feature_bc_matrix")
    path = loompy.create_from_cellranger(sample / "outs" / "raw_feature_bc_matrix")
    assert path == str(sample / "donor8.loom")
    with loompy.connect(path, "r") as ds:
        assert ds.ca.CellID[0].startswith("donor8:")


def test_a_cell_ranger_h5_is_never_replaced_by_its_own_import(tmp_path):
    source = tmp_path / "f.h5"
    shutil.copy(CR3 / "filtered_feature_bc_matrix.h5", source)
    before = source.read_bytes()
    with pytest.raises(loompy.LoomFileError, match="is the 10x source being imported"):
        loompy.create_from_cellranger(source, loom_file=source)
    assert source.read_bytes() == before


def test_no_file_the_import_reads_is_replaced_by_its_output(tmp_path):
    """The output was checked against the source given (a folder) alone: naming the folder's
    matrix.mtx, genes list, analysis table or run record as the new file replaced it."""
    sample = tmp_path / "sample"
    shutil.copytree(CR2, sample / "outs")
    matrix_folder = sample / "outs" / "filtered_gene_bc_matrices" / "hg19_chr21"
    _with_analysis(sample, lines(matrix_folder / "barcodes.tsv"))
    for read in (matrix_folder / "matrix.mtx", matrix_folder / "genes.tsv", sample / "_cmdline",
                 sample / "outs" / "analysis" / "clustering" / "graphclust" / "clusters.csv"):
        before = read.read_bytes()
        with pytest.raises(loompy.LoomFileError, match=f"{read}: is a file of the 10x output being imported"):
            loompy.create_from_cellranger(sample, loom_file=read)
        assert read.read_bytes() == before
    written = loompy.create_from_cellranger(sample, loom_file=sample / "sample.loom")  # (beside them: fine)
    with loompy.connect(written, "r") as ds:
        assert ds.shape == scipy.io.mmread(matrix_folder / "matrix.mtx").shape and "ClusterID" in ds.ca


@pytest.mark.parametrize("damage", ["matrix not gzip", "features not UTF-8", "h5 without barcodes",
                                    "h5 row index past the last", "h5 barcodes short"])
def test_a_malformed_10x_source_is_refused_naming_its_file(tmp_path, damage):
    """A row index past the last in a .h5 was dropped (one count fewer) or raised a bare IndexError;
    a short list of barcodes there was blamed on the new file's CellID."""
    if damage.startswith("h5"):
        source = tmp_path / "f.h5"
        shutil.copy(CR3 / "filtered_feature_bc_matrix.h5", source)
        with h5py.File(source, "r+") as f:
            if damage == "h5 without barcodes":
                del f["matrix/barcodes"]
            elif damage == "h5 barcodes short":
                short = f["matrix/barcodes"][:-3]
                del f["matrix/barcodes"]
                f["matrix/barcodes"] = short
            else:
                f["matrix/indices"][5] = f["matrix/shape"][0]
        culprit = source
    else:
        source = tmp_path / "mex"
        shutil.copytree(CR3 / "filtered_feature_bc_matrix", source)
        if damage == "matrix not gzip":
            culprit = source / "matrix.mtx.gz"
            culprit.write_bytes(b"%%MatrixMarket matrix coordinate integer general\n")
        else:
            culprit = source / "features.tsv.gz"
            culprit.write_bytes(gzip.compress(b"\xff\xfe gene\tname\n"))
    (tmp_path / "out").mkdir()
    message = "matrix shape .* does not match" if damage == "h5 barcodes short" else \
        "not a readable 10x Genomics matrix"
    with pytest.raises(loompy.LoomValueError, match=f"{culprit}: {message}"):
        loompy.create_from_cellranger(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("selection", ["s3:AAACCCAAGGAGAGTA-1", b"s3:AAACCCAAGGAGAGTA-1", [True, False],
                                       np.ones(3, dtype=bool), [1, 2], 5, ["s3:AAACCCAAGGAGAGTA-1", None]])
def test_selected_cellids_that_are_not_a_list_of_ids_are_refused_before_reading(tmp_path, selection, monkeypatch):
    sample = tmp_path / "s3"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    monkeypatch.setattr(loompy.importers, "read_10x", lambda *a: pytest.fail("read before the check"))
    with pytest.raises(TypeError, match="selected_cellids must be a list of cell ids"):
        loompy.create_from_cellranger(sample, tmp_path, selected_cellids=selection)
    assert not (tmp_path / "s3.loom").exists()


def test_file_attrs_that_are_not_a_dict_are_refused_naming_the_output(tmp_path):
    sample = tmp_path / "s3"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    with pytest.raises(TypeError, match=r"s3.loom: file_attrs must be a mapping \(a dict\)"):
        loompy.create_from_cellranger(sample, tmp_path, file_attrs=["title"])
    assert not (tmp_path / "s3.loom").exists()


def test_a_truncated_h5_and_an_empty_selection_are_refused_naming_the_file(tmp_path):
    source = tmp_path / "f.h5"
    data = (CR3 / "filtered_feature_bc_matrix.h5").read_bytes()
    source.write_bytes(data[:len(data) // 2])
    (tmp_path / "out").mkdir()
    with pytest.raises(loompy.LoomValueError, match=f"{source}: not a readable 10x Genomics matrix"):
        loompy.create_from_cellranger(source, tmp_path / "out")
    (tmp_path / "empty.h5").write_bytes(b"not HDF5 at all")
    with pytest.raises(loompy.LoomValueError, match="empty.h5: not a Cell Ranger .h5 file"):
        loompy.create_from_cellranger(tmp_path / "empty.h5", tmp_path / "out")
    sample = tmp_path / "s3"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", sample / "outs" / "filtered_feature_bc_matrix")
    with pytest.raises(ValueError, match="selected_cellids is empty"):
        loompy.create_from_cellranger(sample, tmp_path, selected_cellids=[])


def test_a_10x_file_that_cannot_be_opened_keeps_its_own_error(tmp_path, monkeypatch):
    """Not being allowed to read a file is not a malformed matrix: the system's error stays."""
    source = tmp_path / "mex"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", source)

    def refused(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loompy.importers.gzip, "open", refused)
    (tmp_path / "out").mkdir()
    with pytest.raises(PermissionError, match="Permission denied"):
        loompy.create_from_cellranger(source, tmp_path / "out")


def test_matrix_market_counts_become_int32_before_the_matrix_is_converted(monkeypatch):
    """scipy reads Matrix Market integers as int64: converting to CSC, then to int32, held three
    copies of the counts at once (3x their size)."""
    import scipy.sparse as sp

    converted = []
    original = sp.coo_matrix.tocsc
    monkeypatch.setattr(sp.coo_matrix, "tocsc",
                        lambda self, copy=False: converted.append(self.dtype) or original(self, copy=copy))
    data = read_10x(CR3 / "filtered_feature_bc_matrix")
    assert converted == [np.int32] and data.matrix.dtype == np.int32
    expected = scipy.io.mmread(str(CR3 / "filtered_feature_bc_matrix/matrix.mtx.gz")).toarray()
    np.testing.assert_array_equal(data.matrix.toarray(), expected)


def test_repeated_matrix_market_entries_summed_beyond_int32_stay_exact(tmp_path):
    """Counts cast to int32 before the conversion that sums repeated entries overflowed:
    two entries of 2e9 in one cell came back as -294967296."""
    folder = tmp_path / "mex"
    folder.mkdir()
    (folder / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n"
                                       "2 2 3\n1 1 2000000000\n1 1 2000000000\n2 2 5\n")
    (folder / "features.tsv").write_text("E1\tG1\tGene Expression\nE2\tG2\tGene Expression\n")
    (folder / "barcodes.tsv").write_text("AAA-1\nCCC-1\n")
    data = read_10x(folder)
    np.testing.assert_array_equal(data.matrix.toarray(), [[4000000000, 0], [0, 5]])
    (folder / "matrix.mtx").write_text("%%MatrixMarket matrix coordinate integer general\n"
                                       "2 2 3\n1 1 2\n1 1 3\n2 2 5\n")
    data = read_10x(folder)
    assert data.matrix.dtype == np.int32
    np.testing.assert_array_equal(data.matrix.toarray(), [[5, 0], [0, 5]])


def test_a_sample_with_only_raw_matrices_is_refused_naming_the_raw_folder_to_give(tmp_path):
    raw = tmp_path / "sample" / "outs" / "raw_feature_bc_matrix"
    shutil.copytree(CR3 / "filtered_feature_bc_matrix", raw)
    with pytest.raises(loompy.LoomValueError, match=r"sample: no 10x Genomics matrix found .*of filtered barcodes; "
                                                    r"the raw matrices are read only when named: give .*"
                                                    r"outs/raw_feature_bc_matrix\)"):
        loompy.create_from_cellranger(tmp_path / "sample", str(tmp_path / "s.loom"))
    out = loompy.create_from_cellranger(raw, str(tmp_path / "raw.loom"))
    with loompy.connect(out, "r") as ds:
        assert ds.shape == read_10x(CR3 / "filtered_feature_bc_matrix").matrix.shape
