"""Matrix I/O for every layer: the one place that reads and writes matrix elements.

Callers pass *sorted, unique* row and column index arrays (see :mod:`loompy.indexing`). For the
datasets Loom files normally hold (chunked; no filter or a single deflate filter; numeric dtype) the
engine works on raw chunks: each needed chunk is read once with ``read_direct_chunk``, inflated with
libdeflate (:mod:`loompy.codecs`) and only the requested elements are copied out; unallocated chunks
read as the fill value. Whole-column writes compress full chunks and store them with
``write_direct_chunk``, leaving all-zero chunks unallocated in new datasets. Anything else (shuffle,
other codecs, checksums, contiguous storage, unaligned partial chunks) goes through h5py's own path,
so every valid file still reads and writes correctly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp

from . import codecs

STRIP_BYTES = 64 << 20  # dense bytes held at once when writing or scanning


@dataclass(frozen=True)
class ChunkLayout:
    """What the fast path needs to know about a dataset's storage."""

    chunks: tuple[int, int]
    dtype: np.dtype
    compressed: bool
    level: int | None
    fill: float | int

    @property
    def nbytes(self) -> int:
        return self.chunks[0] * self.chunks[1] * self.dtype.itemsize


def chunk_layout(dataset: h5py.Dataset) -> ChunkLayout | None:
    """The dataset's layout when the fast path can handle it, else None (use h5py)."""
    if dataset.chunks is None or dataset.ndim != 2 or dataset.dtype.kind not in "iuf":
        return None
    dcpl = dataset.id.get_create_plist()
    filters = [dcpl.get_filter(i)[:3:2] for i in range(dcpl.get_nfilters())]
    if not codecs.supported_pipeline(filters):
        return None
    level = int(filters[0][1][0]) if filters and filters[0][1] else (4 if filters else None)
    return ChunkLayout(tuple(dataset.chunks), dataset.dtype, bool(filters), level, dataset.fillvalue)


def _groups(indices: np.ndarray, size: int) -> list[tuple[int, slice, slice | np.ndarray]]:
    """Split sorted indices by chunk: (chunk number, positions in the result, offsets inside the chunk)."""
    ids = indices // size
    bounds = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [indices.size]])
    out = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        chunk = int(ids[a])
        local = indices[a:b] - chunk * size
        if int(local[-1]) - int(local[0]) + 1 == b - a:
            local = slice(int(local[0]), int(local[-1]) + 1)
        out.append((chunk, slice(a, b), local))
    return out


def read_chunk(dataset: h5py.Dataset, layout: ChunkLayout, row: int, col: int) -> np.ndarray | None:
    """One stored chunk as a (chunk rows, chunk cols) array, or None when it was never written."""
    try:
        mask, data = dataset.id.read_direct_chunk((row, col))
    except (MemoryError, OSError, KeyError, RuntimeError):  # how HDF5 reports an unallocated chunk
        return None
    raw = codecs.decompress(data, layout.nbytes, layout.compressed and not (mask & 1))
    return np.frombuffer(raw, dtype=layout.dtype).reshape(layout.chunks)


def _refresh(dataset: h5py.Dataset) -> None:
    """Make writes still in HDF5's chunk cache visible to raw chunk reads."""
    if dataset.file.mode == "r+":
        dataset.flush()


def read_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dense ``dataset[np.ix_(rows, cols)]`` for sorted unique ``rows`` and ``cols``."""
    out = np.empty((rows.size, cols.size), dtype=dataset.dtype)
    if out.size == 0:
        return out
    layout = chunk_layout(dataset)
    if layout is None:
        return _read_block_h5py(dataset, rows, cols, out)
    _refresh(dataset)
    c0, c1 = layout.chunks
    col_groups = _groups(cols, c1)
    for ri, rpos, rloc in _groups(rows, c0):
        for cj, cpos, cloc in col_groups:
            chunk = read_chunk(dataset, layout, ri * c0, cj * c1)
            if chunk is None:
                out[rpos, cpos] = layout.fill
            elif isinstance(rloc, slice) and isinstance(cloc, slice):
                out[rpos, cpos] = chunk[rloc, cloc]
            else:
                out[rpos, cpos] = chunk[rloc][:, cloc]
    return out


def _read_block_h5py(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> np.ndarray:
    """h5py's own path: one bounding-box read per strip of chunk rows, then pick the elements."""
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    cols_contiguous = c1 - c0 == cols.size
    if cols_contiguous and int(rows[-1]) - int(rows[0]) + 1 == rows.size:
        dataset.read_direct(out, np.s_[int(rows[0]):int(rows[-1]) + 1, c0:c1])
        return out
    height = dataset.chunks[0] if dataset.chunks else 64
    for _, part, _ in _groups(rows, height):
        r = rows[part]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        block = dataset[r0:r1, c0:c1]
        out[part] = block[r - r0] if cols_contiguous else block[np.ix_(r - r0, cols - c0)]
    return out


def write_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """Store ``values`` (shape ``(len(rows), len(cols))``) at ``np.ix_(rows, cols)``."""
    if rows.size == 0 or cols.size == 0:
        return
    values = np.asarray(values, dtype=dataset.dtype)
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    if int(rows[-1]) - int(rows[0]) + 1 == rows.size and c1 - c0 == cols.size:
        dataset[int(rows[0]):int(rows[-1]) + 1, c0:c1] = values
        return
    height = dataset.chunks[0] if dataset.chunks else 64
    for _, part, _ in _groups(rows, height):
        r = rows[part]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        block = read_block(dataset, np.arange(r0, r1), np.arange(c0, c1))
        block[np.ix_(r - r0, cols - c0)] = values[part]
        dataset[r0:r1, c0:c1] = block


def _dense(matrix: np.ndarray | sp.spmatrix, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
    block = matrix[:, start:stop]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return block.astype(dtype, copy=False)


def write_matrix(dataset: h5py.Dataset, matrix: np.ndarray | sp.spmatrix, col_offset: int = 0) -> None:
    """Write a whole dense or sparse matrix into ``dataset[:, col_offset:col_offset + m]``.

    Sparse input is densified one strip of chunk columns at a time, never as a whole.
    """
    n, m = matrix.shape
    if n == 0 or m == 0:
        return
    if sp.issparse(matrix):
        matrix = sp.csc_matrix(matrix)
    layout = chunk_layout(dataset)
    width = dataset.chunks[1] if dataset.chunks else 64
    strip = max(width, STRIP_BYTES // max(1, n * dataset.dtype.itemsize) // width * width)
    start, stop = col_offset, col_offset + m
    if layout is None:
        body = (stop, stop)
    else:
        first_full = -(-start // width) * width
        last_full = stop if stop == dataset.shape[1] else stop // width * width
        body = (first_full, last_full) if first_full < last_full else (stop, stop)
    # unaligned edges go through h5py (it merges them with what the chunks already hold)
    for a, b in ((start, min(body[0], stop)), (max(body[1], start), stop)):
        for s in range(a, b, strip):
            e = min(b, s + strip)
            dataset[:, s:e] = _dense(matrix, s - col_offset, e - col_offset, dataset.dtype)
    if body[0] < body[1]:
        _refresh(dataset)
        _write_direct(dataset, layout, matrix, col_offset, body, strip)


def _write_direct(dataset: h5py.Dataset, layout: ChunkLayout, matrix: np.ndarray | sp.spmatrix,
                  col_offset: int, body: tuple[int, int], strip: int) -> None:
    """Compress and store whole chunks for columns ``body`` (chunk-aligned, or ending at the edge).

    Works a few chunk columns at a time (small dense strips stay in cache); compression, which
    releases the GIL, runs on two threads while this thread densifies and stores.
    """
    c0, c1 = layout.chunks
    n = dataset.shape[0]
    fresh = dataset.id.get_num_chunks() == 0
    level = layout.level if layout.compressed else None
    width = max(c1, min(strip, 4 * c1))
    with ThreadPoolExecutor(max_workers=2) as pool:
        for s in range(body[0], body[1], width):
            e = min(body[1], s + width)
            block = _dense(matrix, s - col_offset, e - col_offset, dataset.dtype)
            coords, pieces = [], []
            for r in range(0, n, c0):
                for c in range(s, e, c1):
                    piece = block[r:r + c0, c - s:c - s + c1]
                    if piece.shape != (c0, c1):  # edge chunk: HDF5 stores it full size
                        padded = np.zeros((c0, c1), dtype=dataset.dtype)
                        padded[:piece.shape[0], :piece.shape[1]] = piece
                        piece = padded
                    if not piece.any() and layout.fill == 0 and \
                            (fresh or dataset.id.get_chunk_info_by_coord((r, c)).byte_offset is None):
                        continue  # all zero and never stored: leave unallocated, it reads as 0
                    coords.append((r, c))
                    pieces.append(piece)
            half = (len(pieces) + 1) // 2
            parts = pool.map(lambda batch: [codecs.compress(p, level) for p in batch], [pieces[:half], pieces[half:]])
            for coord, data in zip(coords, (d for part in parts for d in part)):
                dataset.id.write_direct_chunk(coord, data)


def copy_chunks(src: h5py.Dataset, dst: h5py.Dataset, col_offset: int) -> int:
    """Copy ``src``'s stored chunks into ``dst`` at ``col_offset`` without inflating them, where possible.

    Possible when both use the same chunk shape, dtype and filters and ``col_offset`` is chunk-aligned;
    only chunks lying wholly inside ``src`` are copied. Returns how many leading columns were handled
    (a multiple of the chunk width; 0 when nothing could be copied).
    """
    layout, target = chunk_layout(src), chunk_layout(dst)
    if layout is None or layout != target or col_offset % layout.chunks[1] or src.shape[0] != dst.shape[0]:
        return 0
    c0, c1 = layout.chunks
    full = src.shape[1] // c1 * c1
    _refresh(src)
    for r in range(0, src.shape[0], c0):
        for c in range(0, full, c1):
            try:
                mask, data = src.id.read_direct_chunk((r, c))
            except (MemoryError, OSError, KeyError, RuntimeError):
                continue  # never stored: stays unallocated in the copy too
            dst.id.write_direct_chunk((r, c + col_offset), data, filter_mask=mask)
    return full


def read_sparse(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
    """``dataset[np.ix_(rows, cols)]`` as a COO matrix in the stored dtype, read a strip at a time.

    scipy.sparse has no float16: such layers come back as float32 (exactly the same values).
    """
    shape = (rows.size, cols.size)
    dtype = np.dtype(np.float32) if dataset.dtype == np.float16 else dataset.dtype
    if rows.size == 0 or cols.size == 0:
        return sp.coo_matrix(shape, dtype=dtype)
    height = dataset.chunks[0] if dataset.chunks else 64
    step = max(height, STRIP_BYTES // max(1, cols.size * dataset.dtype.itemsize) // height * height)
    parts_r, parts_c, parts_v = [], [], []
    offset = 0
    for _, part, _ in _groups(rows, step):
        block = read_block(dataset, rows[part], cols)
        flat = np.flatnonzero(block)  # faster than a 2-D nonzero
        r = flat // cols.size
        parts_r.append(r + offset)
        parts_c.append(flat - r * cols.size)
        parts_v.append(block.ravel()[flat].astype(dtype, copy=False))
        offset += part.stop - part.start
    return sp.coo_matrix(
        (np.concatenate(parts_v), (np.concatenate(parts_r), np.concatenate(parts_c))), shape=shape, dtype=dtype
    )
