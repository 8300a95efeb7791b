"""Importers for matrices kept as text: Matrix Market files with their row and column lists, and
tab-separated tables (a header of cell ids, then a gene id and its values per line).

Both check everything they read before the new file is written (a malformed line is named with its
file and line number), keep the matrix sparse from text to Loom, and write the file as ``create``
does: to a temporary path, renamed into place when complete.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from . import format as fmt
from .errors import LoomTypeError, LoomValueError
from .files import check_not_input
from .importers import open_text, reading_source

_QUOTED = re.compile(r'^"(.*)"$')  # R's write.table quotes names: "Gapdh" is Gapdh


def _unquoted(field: str) -> str:
    return _QUOTED.sub(r"\1", field.strip())


def _split(line: str, delim: str) -> list[str]:
    return line.rstrip("\r\n").split(delim)


def _trimmed(fields: list[str]) -> list[str]:
    """``fields`` without empty ones at the end (lines ending in a delimiter, as spreadsheets write them)."""
    end = len(fields)
    while end > 1 and not fields[end - 1].strip():
        end -= 1
    return fields[:end]


def _lines(path: str | os.PathLike, delim: str, skip_header: bool, trim: bool = True) -> list[list[str]]:
    """The non-empty lines of a list file, split at ``delim``, names unquoted; ``trim``: without
    empty fields at the end."""
    with reading_source(path, "list"), open_text(path) as handle:
        rows = [[_unquoted(f) for f in (_trimmed if trim else list)(_split(line, delim))]
                for line in handle if line.strip()]
    return rows[1:] if skip_header else rows


def _checked_target(out_file: str | os.PathLike, inputs: list[str | os.PathLike], file_attrs: Any) -> str:
    target = check_not_input(out_file, [p for p in inputs if p is not None], "one of the files being imported")
    fmt.normalize_globals(file_attrs, target)
    return target


def create_from_matrix_market(out_file: str | os.PathLike, sample_id: str, layer_paths: Mapping[str, str],
                              row_metadata_path: str | os.PathLike, column_metadata_path: str | os.PathLike,
                              delim: str = "\t", skip_row_headers: bool = False, skip_colums_headers: bool = False,
                              file_attrs: Mapping[str, Any] | None = None, matrix_transposed: bool = False) -> str:
    """Create a ``.loom`` file from Matrix Market files, one per layer, and the row and column lists.

    ``layer_paths`` maps layer names to ``.mtx`` files (``""``: the main matrix; without it, the main
    matrix is the sum of the layers, e.g. spliced + unspliced). Rows get ``Accession`` (first field
    of each line of ``row_metadata_path``) and ``Gene`` (second field, when there is one); columns get
    ``CellID`` = ``{sample_id}:{first field}``. ``skip_row_headers`` / ``skip_colums_headers`` (loompy
    3's spelling) skip a header line; ``matrix_transposed``: the files hold cells x genes.
    Returns the new file's path.
    """
    import scipy.io  # (only importers need it: ``import loompy`` stays light)

    if not isinstance(layer_paths, Mapping) or not layer_paths:
        raise LoomTypeError("create_from_matrix_market: layer_paths must map layer names to .mtx files, "
                            f"e.g. {{'': 'matrix.mtx'}} (got {layer_paths!r})")
    target = _checked_target(out_file, [*layer_paths.values(), row_metadata_path, column_metadata_path], file_attrs)
    rows = _lines(row_metadata_path, delim, skip_row_headers)
    cols = _lines(column_metadata_path, delim, skip_colums_headers)
    layers: dict[str, sp.csr_matrix] = {}
    for name, path in layer_paths.items():
        with reading_source(path, "Matrix Market file"):
            matrix = scipy.io.mmread(os.fspath(path))
        if matrix.dtype.kind not in "biuf":
            raise LoomValueError(f"{path}: layer '{name}' holds {matrix.dtype} values; a Loom layer holds real numbers")
        matrix = sp.csr_matrix(matrix.T if matrix_transposed else matrix)
        if matrix.shape != (len(rows), len(cols)):
            raise LoomValueError(f"{path}: layer '{name}' is {matrix.shape[0]} x {matrix.shape[1]}"
                                 f"{' once transposed' if matrix_transposed else ''}, but {row_metadata_path} "
                                 f"lists {len(rows)} rows and {column_metadata_path} {len(cols)} columns")
        layers[name] = matrix
    if "" not in layers:
        layers = {"": sum(layers.values()), **layers}
    row_attrs = {"Accession": np.array([r[0] for r in rows], dtype=object)}
    if rows and any(len(r) > 1 for r in rows):
        short = next((k for k, r in enumerate(rows) if len(r) < 2), None)
        if short is not None:
            raise LoomValueError(f"{row_metadata_path}: row {short + 1} has no second field (the gene name) where "
                                 "others have one")
        row_attrs["Gene"] = np.array([r[1] for r in rows], dtype=object)
    col_attrs = {"CellID": np.array([f"{sample_id}:{c[0]}" for c in cols], dtype=object)}
    from .create import create

    create(target, layers, row_attrs, col_attrs, file_attrs=file_attrs).close()
    return target


def _table_header(path: str | os.PathLike, delim: str) -> tuple[list[str], bool]:
    """The cell ids of a table's header, and whether the header starts with a corner field (it has as
    many fields as the data lines, which start with the gene id)."""
    with reading_source(path, "table"), open_text(path) as handle:
        header = _split(handle.readline(), delim)
        first = _split(handle.readline(), delim)
    if _trimmed(header) == [""]:
        raise LoomValueError(f"{path}: the table is empty (its first line should list the cell ids)")
    if _trimmed(first) == [""]:
        raise LoomValueError(f"{path}: the table has no line of values after its header")
    corner = len(first) == len(header)  # (as written: a missing last value is still a field)
    names = _trimmed(header)
    cells = [_unquoted(f) for f in (names[1:] if corner else names)]
    if not cells:  # (one field per line: most likely another separator than delim)
        raise LoomValueError(f"{path}: its header lists no cell ids when split at {delim!r}; is the table "
                             "separated by another character? (pass it as delim=)")
    return cells, corner


def _read_table(path: str | os.PathLike, delim: str, n_cells: int, dtype: np.dtype
                ) -> tuple[list[str], sp.csr_matrix]:
    """Gene ids and values (as ``dtype``, kept sparse) of every data line of a table."""
    genes: list[str] = []
    indptr, indices, data = [0], [], []
    with reading_source(path, "table"), open_text(path) as handle:
        handle.readline()
        for number, line in enumerate(handle, start=2):
            if not line.strip():
                continue
            fields = _split(line, delim)
            if len(fields) > n_cells + 1:
                fields = _trimmed(fields)
            if len(fields) != n_cells + 1:
                raise LoomValueError(f"{path}: line {number} has {len(fields) - 1} values after its gene id; "
                                     f"the header lists {n_cells} cells")
            try:
                values = np.array(fields[1:], dtype=np.float64)
            except ValueError as exc:
                raise LoomValueError(f"{path}: line {number} holds a value that is not a number ({exc})") from None
            where = np.flatnonzero(values).astype(np.int32)
            indices.append(where)
            # (only the non-zeros need the check: 0.5 into integers is refused, and 0 fits any dtype)
            data.append(fmt.cast_values(values[where], dtype, f"{path}: line {number}"))
            indptr.append(indptr[-1] + where.size)
            genes.append(_unquoted(fields[0]))
    matrix = sp.csr_matrix((np.concatenate(data) if data else np.zeros(0, dtype),
                            np.concatenate(indices) if indices else np.zeros(0, np.int32), indptr),
                           shape=(len(genes), n_cells), dtype=dtype)
    return genes, matrix


def _column_metadata(path: str | os.PathLike, delim: str, cell_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Column attributes from a table with a header of attribute names and a line per cell, in the
    matrix's order, each starting with the cell's id (kept as text, as loompy 3 keeps them)."""
    rows = _lines(path, delim, skip_header=False, trim=False)
    if not rows:
        raise LoomValueError(f"{path}: the cell metadata is empty (its first line should name the attributes)")
    names, lines = _trimmed(rows[0]), rows[1:]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise LoomValueError(f"{path}: attributes named more than once: {twice}")
    if len(lines) != len(cell_ids):
        headless = len(lines) + 1 == len(cell_ids) and rows[0][:1] == [cell_ids[0]]
        raise LoomValueError(f"{path}: {len(lines)} cells described, the matrix has {len(cell_ids)}" + (
            f" (its first line, which should name the attributes, describes cell '{cell_ids[0]}')" if headless else ""))
    columns: dict[str, list[str]] = {name: [] for name in names}
    for k, (fields, cell_id) in enumerate(zip(lines, cell_ids)):
        if fields[0] != cell_id:
            raise LoomValueError(f"{path}: line {k + 2} describes cell '{fields[0]}' where the matrix has "
                                 f"'{cell_id}' (the lines must follow the matrix's columns)")
        if len(fields) > len(names) + 1:
            fields = _trimmed(fields)
        skip = 0 if len(fields) == len(names) else 1  # the line's first field is the id, unnamed in the header
        if len(fields) - skip != len(names):
            raise LoomValueError(f"{path}: line {k + 2} has {len(fields)} fields for {len(names)} attributes")
        for name, value in zip(names, fields[skip:]):
            columns[name].append(value)
    return {name: np.array(values, dtype=object) for name, values in columns.items()}


def create_from_tsv(out_file: str | os.PathLike, tsv_file: str | os.PathLike,
                    row_metadata_loomfile: str | os.PathLike | None = None, row_metadata_attr: str = "Accession",
                    delim: str = "\t", dtype: str = "float32", sample_id: str = "",
                    file_attrs: Mapping[str, Any] | None = None, col_metadata_tsv: str | os.PathLike | None = None,
                    metadata_delim: str = "\t") -> str:
    """Create a ``.loom`` file from a table: a header of cell ids, then per line a gene id and its values.

    Cell ids become ``CellID`` (prefixed with ``sample_id``), gene ids ``Gene``. With
    ``row_metadata_loomfile``, the rows follow that file's genes instead (matched by its
    ``row_metadata_attr``; genes it lacks are left out with a warning, genes the table lacks are zero)
    and take its Accession, Gene, Chromosome, Start and End. ``col_metadata_tsv`` adds column
    attributes (header: their names; a line per cell, in the table's order, starting with its id).
    ``.gz`` files are read as gzip. Returns the new file's path.
    """
    try:
        wanted = np.dtype(dtype)
    except TypeError as exc:
        raise LoomTypeError(f"create_from_tsv: dtype={dtype!r} is not a dtype") from exc
    if wanted.kind not in "biuf":
        raise LoomValueError(f"create_from_tsv: dtype={dtype!r}: a Loom matrix holds real numbers")
    dtype = wanted
    target = _checked_target(out_file, [tsv_file, row_metadata_loomfile, col_metadata_tsv], file_attrs)
    header, _ = _table_header(tsv_file, delim)
    cell_ids = np.array([sample_id + c for c in header], dtype=object)
    genes, matrix = _read_table(tsv_file, delim, len(header), dtype)
    col_attrs = {"CellID": cell_ids}
    if col_metadata_tsv is not None:
        col_attrs.update(_column_metadata(col_metadata_tsv, metadata_delim, cell_ids))
    if row_metadata_loomfile is None:
        row_attrs = {"Gene": np.array(genes, dtype=object)}
    else:
        matrix, row_attrs = _follow_rows(row_metadata_loomfile, row_metadata_attr, genes, matrix, tsv_file)
    from .create import create

    create(target, matrix, row_attrs, col_attrs, file_attrs=file_attrs).close()
    return target


def _follow_rows(loom_file: str | os.PathLike, attr: str, genes: list[str], matrix: sp.csr_matrix,
                 tsv_file: str | os.PathLike) -> tuple[sp.csr_matrix, dict[str, np.ndarray]]:
    """The table's rows placed as ``loom_file``'s genes are (by its ``attr``), and that file's gene attributes."""
    from .connection import connect

    with connect(loom_file, "r") as ds:
        if attr not in ds.ra:
            raise LoomValueError(f"{loom_file}: has no row attribute '{attr}' to match the genes of {tsv_file} "
                                 f"with (it has {ds.ra.keys()})")
        row_attrs = {name: ds.ra[name] for name in ("Accession", "Gene", "Chromosome", "Start", "End")
                     if name in ds.ra}
        reference = [str(v) for v in ds.ra[attr]]
        if not row_attrs:
            row_attrs[attr] = ds.ra[attr]
    position = {name: k for k, name in enumerate(reference)}  # a name given twice: its last row (as in loompy 3)
    found = np.array([position.get(g, -1) for g in genes], dtype=np.int64)
    missing = int((found < 0).sum())
    if missing:
        warnings.warn(f"{tsv_file}: {missing} of its {len(genes)} genes are not in {loom_file} ('{attr}'); "
                      f"they are left out", UserWarning, stacklevel=3)
    # a gene listed twice: its last line counts (as in loompy 3)
    last = len(found) - 1 - np.unique(found[::-1], return_index=True)[1]
    keep = np.sort(last[found[last] >= 0])
    placed = sp.csr_matrix((np.ones(keep.size, dtype=matrix.dtype), (found[keep], keep)),
                           shape=(len(reference), len(genes))) @ matrix
    return sp.csr_matrix(placed, dtype=matrix.dtype), row_attrs
