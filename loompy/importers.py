"""Importers for 10x Genomics Cell Ranger output (MEX folders and HDF5 files, versions 2 and 3).

Each source format is a small reader with a ``can_open`` sniffing check and a ``read`` that returns
:class:`TenXData`; :func:`read_10x` finds the data below a folder (``outs/...`` or the matrix folder
itself) and picks the reader. Matrices stay sparse from file to Loom.
"""

from __future__ import annotations

import csv
import gzip
import os
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import h5py
import numpy as np
import scipy.sparse as sp

from . import format as fmt
from .errors import LoomError, LoomFileNotFoundError, LoomTypeError, LoomValueError
from .files import check_not_input


@dataclass
class TenXData:
    """One 10x count matrix: genes in rows, cells in columns."""

    matrix: sp.csc_matrix
    genes: np.ndarray  # gene symbols
    accessions: np.ndarray  # Ensembl ids
    barcodes: np.ndarray
    feature_types: np.ndarray | None = None  # Cell Ranger 3 only
    genomes: np.ndarray | None = None  # per feature (Cell Ranger 3 .h5)
    genome: str | None = None  # the genome folder/group (Cell Ranger 2), or the one chosen
    genome_checked: bool = False  # the source says which genome its features belong to (genome= was checked)
    sources: list[Path] = field(default_factory=list)  # the files read (a new file must not replace one)

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the features where ``keep`` is True (one genome's, of several)."""
        self.matrix = sp.csc_matrix(self.matrix[keep, :])
        self.genes, self.accessions = self.genes[keep], self.accessions[keep]
        if self.feature_types is not None:
            self.feature_types = self.feature_types[keep]
        if self.genomes is not None:
            self.genomes = self.genomes[keep]

    def row_attrs(self) -> dict[str, np.ndarray]:
        attrs = {"Gene": self.genes, "Accession": self.accessions}
        if self.feature_types is not None:
            attrs["FeatureType"] = self.feature_types
        if self.genomes is not None:
            attrs["Genome"] = self.genomes
        return attrs


def _counts(matrix: sp.spmatrix) -> sp.csc_matrix:
    """Counts as int32 when they fit (the .h5 files' own type), so MEX and .h5 give the same file.
    When even all counts together fit, they are cast before the matrix is converted, so no int64
    copy of it is made on the way (a Matrix Market file reads as int64: three copies at once took
    3x the counts' size); else after (the conversion sums repeated entries, which might not fit)."""
    data, limit = matrix.data, np.iinfo(np.int32)
    if data.dtype.kind in "iu" and data.dtype != np.int32 and np.abs(data).sum(dtype=np.float64) < 2e9:
        matrix.data = data.astype(np.int32)  # (the caller's matrix: it lets go of it)
    del data
    m = sp.csc_matrix(matrix)
    if m.dtype.kind in "iu" and m.dtype != np.int32 and (m.nnz == 0 or (m.data.min() >= limit.min
                                                                        and m.data.max() <= limit.max)):
        m = m.astype(np.int32)
    return m


@contextmanager
def reading_source(path: str | os.PathLike, what: str = "10x Genomics matrix") -> Iterator[str | os.PathLike]:
    """Around the reading of ``path`` (a ``what``): the errors gzip, Matrix Market, text decoding or
    HDF5 raise on a malformed file become one that names it; the system's own (a missing file,
    permissions, I/O) stay what they are."""
    try:
        yield path
    except LoomError:
        raise
    except (OSError, ValueError, KeyError, IndexError, EOFError, zlib.error) as exc:
        if isinstance(exc, OSError) and (exc.errno is not None or isinstance(exc, FileNotFoundError)):
            raise  # the system's own (a missing file, permission, I/O): not about the file's contents
        raise LoomValueError(f"{os.fsdecode(os.fspath(path))}: not a readable {what} ({type(exc).__name__}: {exc})"
                             ) from exc


def open_text(path: str | os.PathLike) -> TextIO:
    """UTF-8 text, gzipped (``.gz``) or not; a byte-order mark (Excel's) is not part of the first line."""
    return gzip.open(path, "rt", encoding="utf-8-sig") if os.fspath(path).endswith(".gz") \
        else open(path, encoding="utf-8-sig")


def _table(path: Path) -> list[list[str]]:
    with open_text(path) as handle:
        return [line.rstrip("\r\n").split("\t") for line in handle if line.strip()]


def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values], dtype=object)


class MexReader:
    """A Matrix Market folder: matrix.mtx, barcodes.tsv and genes.tsv (v2) or features.tsv (v3), maybe gzipped."""

    @staticmethod
    def can_open(path: Path) -> bool:
        return path.is_dir() and _find(path, "matrix.mtx") is not None and _find(path, "barcodes.tsv") is not None \
            and _find(path, "features.tsv", "genes.tsv") is not None

    @staticmethod
    def read(path: Path, genome: str | None = None) -> TenXData:
        import scipy.io  # only importers need it; keep ``import loompy`` light

        sources = [_find(path, "matrix.mtx"), _find(path, "features.tsv", "genes.tsv"), _find(path, "barcodes.tsv")]
        with reading_source(sources[0]) as source:
            matrix = sp.coo_matrix(scipy.io.mmread(str(source)))
        with reading_source(sources[1]) as source:
            features = _table(source)
        with reading_source(sources[2]) as source:
            barcodes = np.array([row[0] for row in _table(source)], dtype=object)
        if matrix.shape != (len(features), len(barcodes)):
            raise LoomValueError(f"{path}: matrix shape {matrix.shape} does not match {len(features)} features "
                                 f"x {len(barcodes)} barcodes")
        accessions = np.array([row[0] for row in features], dtype=object)
        genes = np.array([row[1] if len(row) > 1 else row[0] for row in features], dtype=object)
        types = np.array([row[2] for row in features], dtype=object) if all(len(r) > 2 for r in features) else None
        checked = types is None and path.parent.name in V2_FOLDERS  # Cell Ranger 2: a folder per genome
        label = _choose_genome([path.name], genome, path.parent) if checked else genome  # (else: as given)
        return TenXData(_counts(matrix), genes, accessions, barcodes, feature_types=types, genome=label,
                        genome_checked=checked, sources=sources)


class H5Reader:
    """A Cell Ranger HDF5 file: v3 (``/matrix`` with ``features/``) or v2 (one group per genome)."""

    @staticmethod
    def can_open(path: Path) -> bool:
        if not path.is_file() or not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            groups = [f["matrix"]] if isinstance(f.get("matrix"), h5py.Group) else list(f.values())
            return any(isinstance(g, h5py.Group) and {"data", "indices", "indptr", "shape"} <= set(g.keys())
                       for g in groups)

    @staticmethod
    def read(path: Path, genome: str | None = None) -> TenXData:
        with h5py.File(path, "r") as f:
            if isinstance(f.get("matrix"), h5py.Group) and "features" in f["matrix"]:
                g = f["matrix"]
                feats = g["features"]
                data = TenXData(None, _strings(feats["name"][...]), _strings(feats["id"][...]),
                                _strings(g["barcodes"][...]),
                                feature_types=_strings(feats["feature_type"][...]) if "feature_type" in feats else None,
                                genomes=_strings(feats["genome"][...]) if "genome" in feats else None)
                if genome is not None and data.genomes is not None:  # that genome's features only
                    data.genome = _choose_genome(sorted(set(data.genomes.tolist()) - {""}), genome, path)
                    data.genome_checked = True
            else:
                names = [k for k, v in f.items() if isinstance(v, h5py.Group) and "indptr" in v]
                chosen = _choose_genome(names, genome, path)
                g = f[chosen]
                data = TenXData(None, _strings(g["gene_names"][...]), _strings(g["genes"][...]),
                                _strings(g["barcodes"][...]), genome=chosen, genome_checked=True)
            shape = tuple(int(x) for x in g["shape"][...])
            if (len(data.genes), len(data.barcodes)) != shape:
                raise LoomValueError(f"{path}: matrix shape {shape} does not match {len(data.genes)} features x "
                                     f"{len(data.barcodes)} barcodes")
            # 10x stores CSC with genes in rows: column pointers index cells (scipy checks no index: we do)
            counts = sp.csc_matrix((g["data"][...], g["indices"][...], g["indptr"][...]), shape=shape)
            counts.check_format(full_check=True)  # (a ValueError: reading_source names the file)
            data.matrix, data.sources = _counts(counts), [path]
        if data.genome is not None and data.genomes is not None:  # (and those of none: antibodies, guides)
            data.keep_rows((data.genomes == data.genome) | (data.genomes == ""))
        return data


READERS = (MexReader, H5Reader)


V2_FOLDERS = ("filtered_gene_bc_matrices", "raw_gene_bc_matrices")  # Cell Ranger 2: a MEX folder per genome
V3_FOLDERS = ("filtered_feature_bc_matrix", "raw_feature_bc_matrix")  # Cell Ranger 3: one MEX folder


def _choose_genome(available: Sequence[str], genome: str | None, where: Path) -> str:
    if genome is not None and genome in available:
        return genome
    if genome is None and len(available) == 1:
        return available[0]
    wanted = f"genome '{genome}' not found" if genome else "several genomes; choose one with genome= (--genome)"
    raise LoomValueError(f"{where}: {wanted} (available: {', '.join(sorted(available)) or 'none'})")


def _genome_folder(parent: Path, genome: str | None) -> Iterator[Path]:
    """The genome folder to read in a Cell Ranger 2 ``filtered_gene_bc_matrices`` folder (when ``parent`` is one)."""
    genomes = sorted(p.name for p in parent.iterdir() if MexReader.can_open(p)) if parent.is_dir() else []
    if genomes:
        yield parent / _choose_genome(genomes, genome, parent)


def _candidates(path: Path, genome: str | None) -> Iterator[Path]:
    """Where Cell Ranger puts its matrices, below ``path`` (which may be the sample or ``outs`` folder,
    or Cell Ranger 2's folder of genome folders), most likely first. A generator: a Cell Ranger 2
    genome is chosen (or found ambiguous) only when no Cell Ranger 3 matrix came before it."""
    yield path
    if path.is_file():
        return
    if path.name in V2_FOLDERS:
        yield from _genome_folder(path, genome)
    for base in (path, path / "outs"):
        yield base / "filtered_feature_bc_matrix"
        yield base / "filtered_feature_bc_matrix.h5"
        yield from _genome_folder(base / V2_FOLDERS[0], genome)
        yield base / "filtered_gene_bc_matrices_h5.h5"


def read_10x(path: str | os.PathLike, genome: str | None = None) -> TenXData:
    """Read 10x output from a sample folder, its ``outs`` folder, a matrix folder or a ``.h5`` file."""
    root = Path(path)
    if not root.exists():
        raise LoomFileNotFoundError(2, "no such 10x output", str(root))
    found = None  # with genome=, a source that cannot tell genomes apart (Cell Ranger 3's MEX files)
    for candidate in _candidates(root, genome):  # is used only when none that can follows (its .h5)
        for reader in READERS:
            with reading_source(candidate):
                if not (candidate.exists() and reader.can_open(candidate)):
                    continue
                data = reader.read(candidate, genome)
                if genome is None or data.genome_checked:
                    return data
                found = found or data
    if found is not None:
        return found
    if root.is_file():
        raise LoomValueError(f"{root}: not a Cell Ranger .h5 file (it holds a group 'matrix', or one per genome, "
                             "with data, indices, indptr and shape)")
    raw = [p for base in (root, root / "outs") for p in (base / V3_FOLDERS[1], base / V2_FOLDERS[1],
                                                         base / "raw_feature_bc_matrix.h5") if p.exists()]
    hint = f"; the raw matrices are read only when named: give {raw[0]}" if raw else ""
    raise LoomValueError(f"{root}: no 10x Genomics matrix found (looked for a Matrix Market folder with "
                         "matrix.mtx, barcodes.tsv and genes.tsv/features.tsv, or a Cell Ranger .h5 file, "
                         f"also below outs/, of filtered barcodes{hint})")


def _by_barcode(path: Path) -> dict[str, list[str]]:
    """The rows of a Cell Ranger analysis table (a header line, then a barcode and values), by barcode."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return {row[0]: row[1:] for row in list(csv.reader(handle))[1:] if row}
    except UnicodeDecodeError as exc:
        raise LoomValueError(f"{path}: not a Cell Ranger analysis table (not UTF-8 text: {exc.reason})") from exc


def _analysis(outs: Path, barcodes: np.ndarray, read: list[Path]) -> dict[str, np.ndarray]:
    """What Cell Ranger's secondary analysis in ``outs`` says of each cell, as loompy 3 imports it:
    tSNE coordinates as X and Y (float32), the graph-based cluster as ClusterID (numbered from 0).
    Matched by barcode: a cell the analysis left out gets NaN, and cluster -1. The files it reads
    are added to ``read``."""
    attrs: dict[str, np.ndarray] = {}
    analysis = outs / "analysis"
    for tsne in (analysis / "tsne" / "projection.csv", analysis / "tsne" / "2_components" / "projection.csv"):
        if tsne.is_file():
            read.append(tsne)
            rows = _by_barcode(tsne)
            try:
                xy = np.array([rows[b][:2] if b in rows else ["nan", "nan"] for b in barcodes], dtype=np.float64)
            except ValueError as exc:
                raise LoomValueError(f"{tsne}: not a Cell Ranger tSNE table ({exc})") from exc
            attrs["X"], attrs["Y"] = xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32)
            break
    clusters = analysis / "clustering" / "graphclust" / "clusters.csv"
    if clusters.is_file():
        read.append(clusters)
        rows = _by_barcode(clusters)
        try:
            attrs["ClusterID"] = np.array([int(float(rows[b][0])) - 1 if b in rows else -1 for b in barcodes],
                                          dtype=np.int64)
        except (ValueError, IndexError) as exc:
            raise LoomValueError(f"{clusters}: not a Cell Ranger clusters table ({exc})") from exc
    return attrs


def _run_record(sample: Path, read: list[Path]) -> dict[str, str]:
    """Cell Ranger's record of the run in the sample folder, as loompy 3 imports it: Cmdline
    (``_cmdline``) and Versions (``_versions``, on one line). The files it reads are added to ``read``."""
    record = {}
    for name, key in (("_cmdline", "Cmdline"), ("_versions", "Versions")):
        if (sample / name).is_file():
            read.append(sample / name)
            text = (sample / name).read_text(encoding="utf-8", errors="replace").strip()
            record[key] = text.replace("\n", " ") if key == "Versions" else text
    return record


def _sample_folder(path: Path) -> Path:
    """The sample folder of a folder Cell Ranger made in it (``outs``, its matrix folders, a
    Cell Ranger 2 genome folder), or ``path`` itself when it is none of those."""
    if path.parent.name in V2_FOLDERS:  # a genome folder
        path = path.parent
    if path.name in V2_FOLDERS + V3_FOLDERS:
        path = path.parent
    return path.parent if path.name == "outs" else path


def _cell_id_list(selected_cellids: Any, where: str | os.PathLike) -> list[str]:
    """``selected_cellids`` as a list of cell ids, checked before anything is read: one id given as
    text, a mask or numbers would select nothing, or the wrong cells."""
    if isinstance(selected_cellids, (str, bytes)) or not isinstance(selected_cellids, Iterable):
        raise LoomTypeError(f"{where}: selected_cellids must be a list of cell ids (sample:barcode), "
                            f"not {type(selected_cellids).__name__}")
    ids = list(selected_cellids)
    if not ids:
        raise LoomValueError(f"{where}: selected_cellids is empty (no cell would be imported)")
    odd = [v for v in ids if not isinstance(v, (str, np.str_))]  # (None among them too)
    if odd:
        raise LoomTypeError(f"{where}: selected_cellids must be a list of cell ids (sample:barcode), "
                            f"not of {type(odd[0]).__name__} such as {odd[0]!r}")
    return [str(v) for v in ids]


def _selected(cell_ids: np.ndarray, selected_cellids: list[str], where: Path) -> np.ndarray:
    """Which cells ``selected_cellids`` keeps: refused when none (a prefix not matching is the usual
    cause), a warning naming those not found."""
    wanted = set(selected_cellids)
    keep = np.array([c in wanted for c in cell_ids.tolist()], dtype=bool)
    if not keep.any():
        example = f"; they look like '{cell_ids[0]}'" if len(cell_ids) else ""
        raise LoomValueError(f"{where}: none of the {len(wanted)} selected_cellids is a cell id of this "
                             f"sample{example}")
    missing = wanted.difference(cell_ids.tolist())
    if missing:
        warnings.warn(f"{where}: {len(missing)} of the {len(wanted)} selected_cellids "
                      f"{'is' if len(missing) == 1 else 'are'} not a cell id of this sample (e.g. "
                      f"'{sorted(missing)[0]}'); the {int(keep.sum())} found are imported", stacklevel=3)
    return keep


def create_from_cellranger(indir: str | os.PathLike | None = None, outdir: str | os.PathLike | None = None,
                           *args: Any, genome: str | None = None, file_attrs: Mapping[str, Any] | None = None,
                           selected_cellids: Sequence[str] | None = None, loom_file: str | os.PathLike | None = None,
                           cell_id_prefix: str | None = None, sample_annotation: Mapping[str, Any] | None = None,
                           folder: str | os.PathLike | None = None) -> str:
    """Create a ``.loom`` file from 10x Genomics Cell Ranger output (with its secondary analysis and
    run record, as loompy 3 reads them: see the README); returns its path.

    Two calling conventions are accepted. loompy 3's: ``create_from_cellranger(indir, outdir=None,
    genome=None, file_attrs=None, selected_cellids=None)`` writes ``{outdir}/{sample}.loom`` with cell
    ids ``{sample}:{barcode}``. The seed's: ``create_from_cellranger(folder, loom_file, cell_id_prefix='',
    sample_annotation=None, genome=None)``, recognised by ``loom_file=`` or a second argument ending in
    ``.loom`` (any case; any other second argument must be an existing folder), writes
    ``loom_file`` with cell ids ``{cell_id_prefix}{barcode}``. Arguments after the second are read in
    the order of the convention in use; keywords mean what they say in both. ``genome`` picks one
    of several genomes (None: the only one). Both return the path (a string), so code written for
    either works; ``sample_annotation`` adds column attributes (one value for all cells, or one per cell).
    """
    if loom_file is not None and outdir is not None:
        raise LoomTypeError("create_from_cellranger: pass outdir (a folder) or loom_file, not both")
    if (indir is None) == (folder is None):
        raise LoomTypeError("create_from_cellranger: pass the Cell Ranger output as indir (loompy 3's name) "
                            "or folder (the seed's), once")
    indir = indir if folder is None else folder
    if outdir is not None and os.fspath(outdir) == "":
        outdir = os.curdir  # (loompy 3 joins "" and the file's name: the current folder)
    seed = loom_file is not None or (outdir is not None and os.fspath(outdir).lower().endswith(".loom"))
    if not seed and outdir is not None and not os.path.isdir(outdir):  # (before the arguments are read as loompy 3's)
        raise LoomValueError(f"create_from_cellranger: {os.fspath(outdir)!r} is neither an existing folder "
                             "(loompy 3's outdir) nor a file name ending in .loom (the seed's loom_file)")
    order = ("cell_id_prefix", "sample_annotation", "genome") if seed else ("genome", "file_attrs", "selected_cellids")
    if len(args) > len(order):
        raise LoomTypeError(f"create_from_cellranger takes at most {2 + len(order)} positional arguments "
                            f"({', '.join(('indir', 'outdir') + order)})")
    given = {"genome": genome, "file_attrs": file_attrs, "selected_cellids": selected_cellids,
             "cell_id_prefix": cell_id_prefix, "sample_annotation": sample_annotation}
    for name, value in zip(order, args):
        if given[name] is not None:
            raise LoomTypeError(f"create_from_cellranger got '{name}' both by position and by keyword")
        given[name] = value
    genome, file_attrs, selected_cellids = given["genome"], given["file_attrs"], given["selected_cellids"]
    cell_id_prefix, sample_annotation = given["cell_id_prefix"], given["sample_annotation"]
    if seed:
        loom_file, outdir = (outdir if loom_file is None else loom_file), None
        cell_id_prefix = "" if cell_id_prefix is None else cell_id_prefix
    # ".", ".." and trailing separators name the folder they mean; a symbolic link stays the path given
    # (its sample folder, analysis and run record are where the user put the link, as in loompy 3)
    relative = not os.path.isabs(os.fspath(indir))
    indir = Path(os.path.abspath(indir))
    if indir.is_file():  # a Cell Ranger .h5, in outs/ or in a folder of its own: named after the file
        folder, sample = indir.parent, indir.stem
        sample_folder = folder.parent if folder.name == "outs" else folder
    else:  # a sample folder, or a folder Cell Ranger made in it: named after the sample
        sample_folder = _sample_folder(indir)
        folder, sample = sample_folder, sample_folder.name
    sample = sample or "sample"
    target = Path(loom_file) if loom_file is not None else Path(outdir or folder) / f"{sample}.loom"
    check_not_input(target, [indir], "the 10x source being imported")  # (before anything is read)
    fmt.normalize_globals(file_attrs, str(target))  # (checked now; stored with the run record below)
    if selected_cellids is not None:
        selected_cellids = _cell_id_list(selected_cellids, indir)
    data = read_10x(indir, genome)
    prefix = f"{sample}:" if cell_id_prefix is None else cell_id_prefix
    outs = sample_folder / "outs" if (sample_folder / "outs").is_dir() else sample_folder
    read = list(data.sources)
    col_attrs: dict[str, Any] = {"CellID": np.array([prefix + b for b in data.barcodes], dtype=object),
                                 **_analysis(outs, data.barcodes, read)}
    matrix = data.matrix
    if selected_cellids is not None:
        keep = _selected(col_attrs["CellID"], selected_cellids, indir)
        matrix, col_attrs = matrix[:, keep], {name: values[keep] for name, values in col_attrs.items()}
    cell_ids = col_attrs["CellID"]
    for name, value in (sample_annotation or {}).items():
        value = np.asarray(value)
        col_attrs[name] = np.full(len(cell_ids), value[()], dtype=value.dtype) if value.ndim == 0 else value
    single = np.setdiff1d(data.genomes, [""]) if data.genomes is not None else []
    genome_name = data.genome or (str(single[0]) if len(single) == 1 else None) or genome  # (CR3 .h5: per feature)
    attrs = {**_run_record(sample_folder, read), **dict(file_attrs or {})}
    if genome_name and "Genome" not in (file_attrs or {}):
        attrs["Genome"] = genome_name
    check_not_input(target, read, "a file of the 10x output being imported")
    from .create import create

    create(target, matrix, data.row_attrs(), col_attrs, file_attrs=attrs).close()
    if relative and loom_file is None and outdir is None:  # (beside a folder given relative: as loompy 3 says it)
        return os.path.relpath(target)
    return str(target)
