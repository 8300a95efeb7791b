"""Matrix I/O for every layer: the one place that reads and writes matrix elements.

Callers pass *sorted, unique* row and column index arrays (see :mod:`loompy.indexing`);
the engine reads each needed chunk once and returns the dense block for those indices.
"""

from __future__ import annotations

import h5py
import numpy as np
import scipy.sparse as sp


def _strip_height(dataset: h5py.Dataset) -> int:
    return dataset.chunks[0] if dataset.chunks else 64


def read_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dense ``dataset[np.ix_(rows, cols)]`` for sorted unique ``rows`` and ``cols``."""
    out = np.empty((rows.size, cols.size), dtype=dataset.dtype)
    if out.size == 0:
        return out
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    cols_contiguous = c1 - c0 == cols.size
    rows_contiguous = int(rows[-1]) - int(rows[0]) + 1 == rows.size
    if rows_contiguous and cols_contiguous:
        dataset.read_direct(out, np.s_[int(rows[0]):int(rows[-1]) + 1, c0:c1])
        return out
    height = _strip_height(dataset)
    strip_ids = rows // height
    bounds = np.flatnonzero(np.diff(strip_ids)) + 1
    for part in np.split(np.arange(rows.size), bounds):
        r = rows[part]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        block = dataset[r0:r1, c0:c1]
        out[part] = block[np.ix_(r - r0, cols - c0)] if not cols_contiguous else block[r - r0]
    return out


def write_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """Store ``values`` (shape ``(len(rows), len(cols))``) at ``np.ix_(rows, cols)``."""
    if rows.size == 0 or cols.size == 0:
        return
    values = np.asarray(values, dtype=dataset.dtype)
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    r0_all, r1_all = int(rows[0]), int(rows[-1]) + 1
    if r1_all - r0_all == rows.size and c1 - c0 == cols.size:
        dataset[r0_all:r1_all, c0:c1] = values
        return
    height = _strip_height(dataset)
    bounds = np.flatnonzero(np.diff(rows // height)) + 1
    for part in np.split(np.arange(rows.size), bounds):
        r = rows[part]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        block = dataset[r0:r1, c0:c1]
        block[np.ix_(r - r0, cols - c0)] = values[part]
        dataset[r0:r1, c0:c1] = block


def write_matrix(dataset: h5py.Dataset, matrix: np.ndarray | sp.spmatrix, col_offset: int = 0) -> None:
    """Write a whole dense or sparse matrix into ``dataset[:, col_offset:col_offset + m]``.

    Sparse input is densified one strip of chunk columns at a time, never as a whole.
    """
    n, m = matrix.shape
    if n == 0 or m == 0:
        return
    width = dataset.chunks[1] if dataset.chunks else 64
    strip = max(width, (width * max(1, (64 << 20) // max(1, n * width * dataset.dtype.itemsize))))
    strip = min(strip, m)
    if sp.issparse(matrix):
        matrix = sp.csc_matrix(matrix)
    for start in range(0, m, strip):
        stop = min(m, start + strip)
        block = matrix[:, start:stop]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        dataset[:, col_offset + start:col_offset + stop] = block.astype(dataset.dtype, copy=False)


def read_sparse(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
    """``dataset[np.ix_(rows, cols)]`` as a COO matrix in the stored dtype, read a strip at a time."""
    shape = (rows.size, cols.size)
    if rows.size == 0 or cols.size == 0:
        return sp.coo_matrix(shape, dtype=dataset.dtype)
    height = max(_strip_height(dataset), 1)
    parts_r, parts_c, parts_v = [], [], []
    bounds = np.flatnonzero(np.diff(rows // (height * 16))) + 1
    offset = 0
    for part in np.split(np.arange(rows.size), bounds):
        block = read_block(dataset, rows[part], cols)
        r, c = np.nonzero(block)
        parts_r.append(r + offset)
        parts_c.append(c)
        parts_v.append(block[r, c])
        offset += part.size
    return sp.coo_matrix(
        (np.concatenate(parts_v), (np.concatenate(parts_r), np.concatenate(parts_c))), shape=shape, dtype=dataset.dtype
    )
