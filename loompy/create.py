"""Creating Loom files: ``new`` and ``create``, written atomically (temporary file, then rename)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from . import encoding, engine
from . import format as fmt
from .attributes import AttributeManager
from .connection import LoomConnection, connect
from .errors import LoomTypeError, LoomValueError
from .files import replacing, stored_size_bound
from .handles import approximate_nbytes
from .layers import LayerManager, LoomLayer


def as_layer_dict(layers: Any, where: str) -> dict[str, Any]:
    """``create``'s ``layers`` as a dict by layer name, ``""`` required; dense ones as checked arrays."""
    if isinstance(layers, LayerManager):
        return {name: layers[name] for name in layers.keys()}
    if isinstance(layers, Mapping):
        out = dict(layers)
    elif isinstance(layers, (np.ndarray, LoomLayer, list, tuple)) or sp.issparse(layers):
        out = {"": layers}
    else:
        raise LoomTypeError(f"{where}: layers must be an ndarray, a sparse matrix, a dict or a LayerManager, "
                            f"got {type(layers).__name__}")
    if "" not in out:
        raise LoomValueError(f"{where}: layers must include the main matrix under the name ''")
    for name, matrix in out.items():
        fmt.check_name(name, f"{where}: layer", empty=True)
        if not isinstance(matrix, LoomLayer):
            out[name] = encoding.matrix_values(matrix, f"{where}: layer '{name}'")
    return out


def as_attr_dict(attrs: Any, where: str) -> dict[str, Any]:
    """Row or column attributes as a dict by name (None: none), names checked."""
    if attrs is None:
        return {}
    if isinstance(attrs, AttributeManager):
        return attrs.to_dict()
    if isinstance(attrs, Mapping):
        return dict(attrs)
    raise LoomTypeError(f"{where}: attributes must be a dict or an attribute manager, got {type(attrs).__name__}")


def validate_contents(filename: str, layers: Any, row_attrs: Any, col_attrs: Any, file_attrs: Any,
                      dtype: Any) -> tuple[dict, dict, dict, dict, dict]:
    """Check and normalise everything ``create`` will write; nothing is written here."""
    where = os.fspath(filename)
    layer_dict = as_layer_dict(layers, where)
    shape = tuple(layer_dict[""].shape)
    if len(shape) != 2:
        raise LoomValueError(f"{where}: the main matrix must be two-dimensional, got shape {shape}")
    dtypes = {}
    for name, matrix in layer_dict.items():
        lw = f"{where}: layer '{name}'"
        if tuple(matrix.shape) != shape:
            raise LoomValueError(f"{lw}: shape {tuple(matrix.shape)} differs from the main matrix's {shape}")
        wanted = dtype if (dtype is not None and name == "") else matrix.dtype
        dtypes[name] = fmt.check_matrix_dtype(wanted, lw)
        fmt.check_fits(matrix, dtypes[name], lw)
    rows = {name: encoding.normalize_values(v, f"{where}: row attribute '{name}'", shape[0])
            for name, v in as_attr_dict(row_attrs, where).items()}
    cols = {name: encoding.normalize_values(v, f"{where}: column attribute '{name}'", shape[1])
            for name, v in as_attr_dict(col_attrs, where).items()}
    for kind, group in (("row", rows), ("column", cols)):
        for name in group:
            fmt.check_name(name, f"{where}: {kind} attribute")
    return layer_dict, dtypes, rows, cols, fmt.normalize_globals(file_attrs, where)


def write_contents(f: h5py.File, layer_dict: dict, dtypes: dict, rows: dict, cols: dict, globals_: dict, *,
                   chunks: tuple[int, int], chunk_cache: int, compression_opts: int | None) -> None:
    """Write validated contents into a freshly created (empty) HDF5 file."""
    fmt.init_file(f, globals_)
    write_layers(f, layer_dict, dtypes, chunks=chunks, chunk_cache=chunk_cache, compression_opts=compression_opts)
    for axis, values in enumerate((rows, cols)):
        group = f[fmt.ATTR_GROUPS[axis]]
        for name, arr in values.items():
            fmt.write_values(group, name, arr, resizable=axis == 1, where=f"attribute '{name}'")


def write_layers(f: h5py.File, layer_dict: dict, dtypes: dict, *, chunks: tuple[int, int] = fmt.DEFAULT_CHUNKS,
                 chunk_cache: int = fmt.DEFAULT_CHUNK_CACHE_MB,
                 compression_opts: int | None = fmt.DEFAULT_COMPRESSION_LEVEL) -> None:
    """Create and write each validated layer of a file that has none yet."""
    for name, matrix in layer_dict.items():
        group, key = fmt.layer_place(f, name)
        ds = fmt.create_matrix(group, key, matrix.shape, dtypes[name], chunks=chunks,
                               compression_opts=compression_opts, chunk_cache=chunk_cache)
        engine.write_matrix(ds, matrix[:, :] if isinstance(matrix, LoomLayer) else matrix)


def create(filename: str | os.PathLike, layers: Any = None, row_attrs: Any = None, col_attrs: Any = None,
           file_attrs: Mapping[str, Any] | None = None, chunks: tuple[int, int] = fmt.DEFAULT_CHUNKS,
           chunk_cache: int = fmt.DEFAULT_CHUNK_CACHE_MB, dtype: Any = None,
           compression_opts: int | None = fmt.DEFAULT_COMPRESSION_LEVEL, *, matrix: Any = None) -> LoomConnection:
    """Create a Loom file from a matrix (or dict of layers) and row/column attributes.

    ``layers`` is an ndarray, a scipy.sparse matrix, a dict of layers (``""`` is the main
    matrix) or a LayerManager; ``matrix=`` is the older keyword for the same thing. ``dtype=None``
    keeps the input's dtype. The file is written to a temporary path and renamed into place, so an
    existing file of that name is replaced only when the new one is complete. Returns an open
    connection (use it in a ``with`` block, or close it).
    """
    if layers is None and matrix is None:
        raise LoomTypeError(f"{filename}: create() needs the matrix: pass layers (or matrix=)")
    if layers is not None and matrix is not None:
        raise LoomTypeError(f"{filename}: create() takes either layers or matrix=, not both")
    chunks, compression_opts, chunk_cache = fmt.check_storage(chunks, compression_opts, chunk_cache, str(filename))
    contents = validate_contents(filename, layers if layers is not None else matrix, row_attrs, col_attrs,
                                 file_attrs, dtype)
    layer_dict, _, rows, cols, _ = contents
    size = sum(stored_size_bound(m) for m in layer_dict.values()) + sum(
        approximate_nbytes(v) for values in (rows, cols) for v in values.values())
    with replacing(filename, size=size) as f:
        write_contents(f, *contents, chunks=chunks, chunk_cache=chunk_cache, compression_opts=compression_opts)
    return connect(filename, "r+")


def new(filename: str | os.PathLike, *, file_attrs: Mapping[str, Any] | None = None) -> LoomConnection:
    """Create an empty Loom file (no matrix yet) and return a read/write connection to it.

    The first ``add_columns`` (or ``add_loom``, or ``ds.layers[""] = matrix``) defines the rows and
    columns; row and column attributes set before it are refused, as there is nothing to describe yet.
    """
    globals_ = fmt.normalize_globals(file_attrs, os.fspath(filename))
    with replacing(filename) as f:
        fmt.init_file(f, globals_)
    return connect(filename, "r+")
