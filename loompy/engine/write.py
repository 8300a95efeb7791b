"""Writing matrix elements: whole chunks compressed on worker threads and stored directly.

Worker threads produce the values a task of whole chunks at a time, cut them into tiles and compress
those (deflate releases the GIL); this thread stores the finished chunks with ``write_direct_chunk``,
in order; all-zero chunks stay unallocated. Chunk rows re-encoded from another dataset's chunks
(combine's inputs at an offset, permutes of columns) are compressed in helper processes instead
and stored by :class:`ChunkStore` as they arrive (:mod:`.copying`). The chunks a write covers only
in part are read, changed and stored whole (:func:`_patch`). Datasets the fast path does not handle
(see :func:`~.storage.chunk_layout`) go through h5py, which merges writes with what chunks hold.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp

from ..errors import LoomFileError
from ..handles import changed
from . import codecs
from .memory import Scratch
from .read import STRIP_BYTES, read_block
from .storage import (
    ChunkLayout,
    chunk_layout,
    forget,
    groups,
    raw_chunk,
    refresh,
    stored_chunks,
    writing,
)
from .workers import QUEUED_TASKS, THREADS, run_in_order

TASK_BYTES = STRIP_BYTES // THREADS  # dense bytes a write task produces and compresses at once


def writes_dataset(function: Callable) -> Callable:
    """Mark a function that writes to its first argument's dataset: reads from other threads wait
    until it is done (see :func:`~.storage.writing`), and its chunk index is dropped before and
    after (chunks may move), so no read uses a stale one."""

    @functools.wraps(function)
    def wrapper(dataset: h5py.Dataset, *args, **kwargs):
        with writing(dataset):
            forget(dataset)
            try:
                return function(dataset, *args, **kwargs)
            finally:
                forget(dataset)

    return wrapper


@writes_dataset
def write_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """Store ``values`` (shape ``(len(rows), len(cols))``) at ``np.ix_(rows, cols)``: all of them,
    or, when the write fails or is interrupted, none (see :func:`_restored_on_failure`)."""
    if rows.size == 0 or cols.size == 0:
        return
    values = np.asarray(values, dtype=dataset.dtype)
    with _restored_on_failure(dataset, rows, cols):
        _write_block(dataset, rows, cols, values)


def _write_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    if r1 - r0 == rows.size and c1 - c0 == cols.size:
        _write_region(dataset, r0, c0, values)
        return
    layout = chunk_layout(dataset)
    if layout is None:  # (h5py merges each band with what its chunks hold)
        height = dataset.chunks[0] if dataset.chunks else 64
        for _, part, _ in groups(rows, height):
            r = rows[part]
            r0, r1 = int(r[0]), int(r[-1]) + 1
            block = read_block(dataset, np.arange(r0, r1), np.arange(c0, c1))
            block[np.ix_(r - r0, cols - c0)] = values[part]
            dataset[r0:r1, c0:c1] = block
        return
    # scattered: the runs of whole chunks the selection touches are read, changed and stored again
    # through the engine (through h5py, one zlib stream at a time, half the rows and columns of a
    # 20,000 x 5,000 matrix took 4.7 s, against 0.66 s for a block of the same chunks)
    # (the chunks between the columns' chunks too, as they are: one store per run of chunk rows, not
    # per chunk, where rows and columns are far apart: every 128th of 8,000 each, 2.0 s against 0.6 s)
    (h, w), (n, m) = layout.chunks, dataset.shape
    left, right = c0 // w * w, min(m, -(-c1 // w) * w)
    tall = max(1, STRIP_BYTES // max(1, h * (right - left) * dataset.dtype.itemsize))
    for top, bottom, row_part in _chunk_runs(rows, h, n, tall):
        block = read_block(dataset, np.arange(top, bottom), np.arange(left, right))
        block[np.ix_(rows[row_part] - top, cols - left)] = values[row_part]
        _write_region(dataset, top, left, block)


def _chunk_runs(indices: np.ndarray, size: int, length: int, most: int) -> list[tuple[int, int, slice]]:
    """Sorted unique ``indices`` as runs of consecutive chunks (of ``size``; at most ``most`` each):
    (first index of the run's first chunk, end of its last chunk or ``length``, positions in ``indices``)."""
    chunks = indices // size
    starts = np.flatnonzero(np.concatenate([[True], np.diff(chunks) > 1]))  # a chunk skipped: a new run
    runs = []
    for a, b in zip(starts.tolist(), [*starts[1:].tolist(), indices.size]):
        first, last = int(chunks[a]), int(chunks[b - 1])
        for c in range(first, last + 1, most):
            lo, hi = np.searchsorted(chunks[a:b], [c, c + most]) + a
            runs.append((c * size, min(length, (c + most) * size, (last + 1) * size), slice(int(lo), int(hi))))
    return runs


def _write_region(dataset: h5py.Dataset, r0: int, c0: int, values: np.ndarray) -> None:
    """Store ``values`` at rows ``r0:`` and columns ``c0:``: the whole chunks inside through the
    engine, the strips around them (parts of chunks, merged with what those hold) through h5py,
    after them (HDF5's cache was written out by :func:`_restored_on_failure`, before)."""
    r1, c1 = r0 + values.shape[0], c0 + values.shape[1]
    layout = chunk_layout(dataset)
    if layout is None:
        dataset[r0:r1, c0:c1] = values
        return
    (h, w), (n, m) = layout.chunks, dataset.shape
    # the whole chunks inside: from the first chunk boundary to the last (or the dataset's end)
    a0, a1 = -(-r0 // h) * h, (r1 if r1 == n else r1 // h * h)
    b0, b1 = -(-c0 // w) * w, (c1 if c1 == m else c1 // w * w)
    if a0 >= a1 or b0 >= b1:
        _patch(dataset, layout, r0, c0, values)
        return
    core = values[a0 - r0:a1 - r0, b0 - c0:b1 - c0]
    store_region(dataset, layout, a0, b0, a1 - a0, b1 - b0, lambda a, b: core[:, a:b])
    for (top, bottom, left, right) in ((r0, a0, c0, c1), (a1, r1, c0, c1), (a0, a1, c0, b0), (a0, a1, b1, c1)):
        if top < bottom and left < right:
            _patch(dataset, layout, top, left, values[top - r0:bottom - r0, left - c0:right - c0])


@contextmanager
def _restored_on_failure(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> Iterator[None]:
    """Keep what a write to ``rows`` x ``cols`` replaces (the stored bytes of the chunks it touches:
    compressed, so for counts a fraction of the values' size, for random floats nearly all of it),
    and put it back if the write raises (a full disk, Ctrl-C): the dataset never holds part of a
    write. A process killed mid-write is not covered: that would take a journal on disk."""
    refresh(dataset)  # (HDF5's cache written out: the stored bytes are current)
    kept = _Kept.of(dataset, rows, cols)
    try:
        yield
    except BaseException as error:
        try:
            with deferred_interrupts():
                kept.put_back(dataset)
        except Exception as second:
            raise LoomFileError(f"{dataset.file.filename}: {dataset.name} holds part of a write that failed "
                                f"({error!r}), and its old values could not be put back ({second})") from error
        raise


@dataclass
class _Kept:
    """What a write replaces: each touched chunk's (corner, stored bytes or None when never written),
    or for a dataset stored without chunks, the touched rows' values in the columns written."""

    chunks: list[tuple[tuple[int, int], tuple[int, bytes] | None]]
    rows: np.ndarray | None = None
    cols: slice | None = None
    values: np.ndarray | None = None

    @classmethod
    def of(cls, dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> _Kept:
        if dataset.chunks is None:
            span = slice(int(cols[0]), int(cols[-1]) + 1)
            return cls([], rows, span, dataset[rows, span])
        h, w = dataset.chunks
        chunk_rows, chunk_cols = np.unique(rows // h).tolist(), np.unique(cols // w).tolist()
        return cls([((r * h, c * w), raw_chunk(dataset, r * h, c * w)) for r in chunk_rows for c in chunk_cols])

    def put_back(self, dataset: h5py.Dataset) -> None:
        """Store again what was kept. A chunk never written before gets its fill value (it reads as
        before, but stays stored: HDF5 cannot take a chunk back)."""
        dataset.flush()  # (what the failed write left in HDF5's chunk cache goes out first, not after)
        if self.values is not None:
            dataset[self.rows, self.cols] = self.values
        for (r, c), stored in self.chunks:
            if stored is not None:
                dataset.id.write_direct_chunk((r, c), stored[1], filter_mask=stored[0])
            elif raw_chunk(dataset, r, c) is not None:  # written by the failed write: its fill value again
                h, w = dataset.chunks
                dataset[r:r + h, c:c + w] = dataset.fillvalue
        dataset.flush()


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold Ctrl-C back until the block is done, then deliver it as it would have been: to the
    handler in place (Python's raises KeyboardInterrupt), or by the signal again when that is the
    system's default. Only on the main thread (no other gets signals) and when Python set the handler."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    caught: list[tuple] = []
    signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def _dense(block: np.ndarray | sp.spmatrix, dtype: np.dtype) -> np.ndarray:
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    return block.astype(dtype, copy=False)


Producer = Callable[[int, int], "np.ndarray | sp.csc_matrix"]


def write_matrix(dataset: h5py.Dataset, matrix: np.ndarray | sp.spmatrix, col_offset: int = 0) -> None:
    """Write a whole dense or sparse matrix into ``dataset[:, col_offset:col_offset + m]``.

    Sparse input is never densified as a whole: whole chunks are filled straight from it.
    """
    if not sp.issparse(matrix):
        write_columns(dataset, col_offset, matrix.shape[1], lambda a, b: matrix[:, a:b])
        return
    if matrix.format == "csr" and col_offset == 0 and matrix.shape[1] == dataset.shape[1]:
        csr = sp.csr_matrix(matrix)  # (strips of rows from its arrays: no copy of the whole, as CSC would be)
        write_rows(dataset, lambda a, b: _rows(csr, a, b))
        return
    csc = sp.csc_matrix(matrix)  # shares the caller's arrays when it is CSC already
    write_columns(dataset, col_offset, csc.shape[1], lambda a, b: _columns(csc, a, b))


def _rows(matrix: sp.csr_matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows a:b of a CSR matrix, sharing its arrays (as :func:`_columns`)."""
    start, stop = matrix.indptr[a], matrix.indptr[b]
    return sp.csr_matrix((matrix.data[start:stop], matrix.indices[start:stop], matrix.indptr[a:b + 1] - start),
                         shape=(b - a, matrix.shape[1]), copy=False)


def _columns(matrix: sp.csc_matrix, a: int, b: int) -> sp.csc_matrix:
    """Columns a:b of a CSC matrix, sharing its arrays (slicing would copy them: fresh memory per task)."""
    start, stop = matrix.indptr[a], matrix.indptr[b]
    return sp.csc_matrix((matrix.data[start:stop], matrix.indices[start:stop], matrix.indptr[a:b + 1] - start),
                         shape=(matrix.shape[0], b - a), copy=False)


@writes_dataset
def write_columns(dataset: h5py.Dataset, col_offset: int, ncols: int, produce: Producer) -> None:
    """Write ``ncols`` full-height columns from ``col_offset``; ``produce(a, b)`` gives relative columns a:b.

    Whole chunks go through :func:`store_region` (``produce`` then runs on its worker threads), the
    chunks of unaligned edges through :func:`_patch`; without an engine layout, all through h5py.
    """
    n = dataset.shape[0]
    if n == 0 or ncols == 0:
        return
    layout = chunk_layout(dataset)
    width = dataset.chunks[1] if dataset.chunks else 64
    strip = max(width, STRIP_BYTES // max(1, n * dataset.dtype.itemsize) // width * width)
    start, stop = col_offset, col_offset + ncols
    if layout is None:
        body = (stop, stop)
    else:
        first_full = -(-start // width) * width
        last_full = stop if stop == dataset.shape[1] else stop // width * width
        body = (first_full, last_full) if first_full < last_full else (stop, stop)
    for a, b in ((start, min(body[0], stop)), (max(body[1], start), stop)):
        if layout is not None and a < b:
            _patch(dataset, layout, 0, a, _dense(produce(a - col_offset, b - col_offset), dataset.dtype))
            continue
        for s in range(a, b, strip):
            e = min(b, s + strip)
            dataset[:, s:e] = _dense(produce(s - col_offset, e - col_offset), dataset.dtype)
    if body[0] < body[1]:
        refresh(dataset)
        shift = body[0] - col_offset
        store_region(dataset, layout, 0, body[0], n, body[1] - body[0],
                     lambda a, b: produce(shift + a, shift + b))


def _patch(dataset: h5py.Dataset, layout: ChunkLayout, r0: int, c0: int, values: np.ndarray) -> None:
    """Store ``values`` at rows ``r0:`` and columns ``c0:`` where they cover chunks only in part: the
    chunks they touch are read, changed and stored again whole, a strip of chunk rows at a time
    (through h5py, one zlib stream at a time, the edge of 10 columns appended to 30,000 rows took
    56 ms, against 9 here). Interrupted, the strips stored so far stay (as h5py's would)."""
    (h, w), (n, m) = layout.chunks, dataset.shape
    r1, c1 = r0 + values.shape[0], c0 + values.shape[1]
    top, left = r0 // h * h, c0 // w * w
    bottom, right = min(n, -(-r1 // h) * h), min(m, -(-c1 // w) * w)
    cols = np.arange(left, right)
    tall = max(h, STRIP_BYTES // max(1, (right - left) * dataset.dtype.itemsize) // h * h)
    for a in range(top, bottom, tall):
        b = min(bottom, a + tall)
        block = read_block(dataset, np.arange(a, b), cols)
        x0, x1 = max(a, r0), min(b, r1)  # (the rows of values in this strip)
        block[x0 - a:x1 - a, c0 - left:c1 - left] = values[x0 - r0:x1 - r0]
        store_region(dataset, layout, a, left, b - a, right - left, lambda p, q, part=block: part[:, p:q])


@writes_dataset
def write_rows(dataset: h5py.Dataset, produce: Producer, columns: np.ndarray | None = None) -> None:
    """Write the whole dataset a strip of full-width rows at a time; ``produce(a, b)`` gives rows a:b
    (dense), or with ``columns`` rows a:b of which those columns, in that order, are written.
    ``produce`` runs on the worker threads of :func:`store_region`."""
    n, m = dataset.shape
    layout = chunk_layout(dataset)
    if layout is not None:
        refresh(dataset)
        store_region(dataset, layout, 0, 0, n, m, produce, axis=0, columns=columns)
        return
    height = dataset.chunks[0] if dataset.chunks else 64
    step = max(height, STRIP_BYTES // max(1, m * dataset.dtype.itemsize) // height * height)
    for a in range(0, n, step):
        block = _dense(produce(a, min(n, a + step)), dataset.dtype)
        dataset[a:min(n, a + step), :] = block if columns is None else np.take(block, columns, axis=1)


@writes_dataset
def resize(dataset: h5py.Dataset, size: int, axis: int) -> None:
    """Resize a matrix along ``axis`` (shrinking may rewrite its edge chunks, so reads forget them)."""
    dataset.resize(size, axis=axis)
    changed(dataset.file, "shape")


@writes_dataset
def store_region(dataset: h5py.Dataset, layout: ChunkLayout, row0: int, col0: int, nrows: int, ncols: int,
                 produce: Producer, axis: int = 1, columns: np.ndarray | None = None) -> None:
    """Store the chunks covering ``nrows`` x ``ncols`` from the chunk boundary ``(row0, col0)``.

    ``produce(a, b)`` returns the values of relative columns ``a:b`` (dense, or scipy.sparse CSC),
    or with ``axis=0`` of relative rows ``a:b`` (dense). With ``axis=0`` and ``columns``, the values
    stored are those columns of each block, in that order (permute); ``columns`` must already be
    checked, as out-of-range entries wrap around instead of failing.

    The region is cut into tasks of whole chunks along ``axis``. Each task produces its values,
    cuts them into chunks and compresses those, on this thread or a helper (see
    :func:`~.workers.run_in_order`); this thread stores the finished tasks' chunks in order. So
    ``produce`` is called on several threads at once, for different ranges; what it returns may
    live in a buffer of the calling thread (a :class:`~.memory.Scratch`) that its next call reuses.
    All-zero chunks never stored stay unallocated (they read as 0); stored ones are overwritten
    with zeros.
    """
    if nrows <= 0 or ncols <= 0:
        return  # (an empty matrix: no chunk to store)
    h, w = layout.chunks
    length, across, unit = (nrows, ncols, h) if axis == 0 else (ncols, nrows, w)
    step = max(unit, TASK_BYTES // max(1, across * layout.dtype.itemsize) // unit * unit)
    deflate = codecs.compressor(layout.level)
    scratch = Scratch()  # each worker's tiles (and gathered columns), reused task after task

    def task(a: int, b: int) -> tuple[list, list, list]:
        """Relative rows or columns a:b as compressed chunks: (coords, payloads, all-zero coords)."""
        block = produce(a, b)
        block = block.tocsc(copy=False) if sp.issparse(block) else np.asarray(block)
        top, left = (row0 + a, col0) if axis == 0 else (row0, col0 + a)
        tiles, keep = _tiles(block, layout, scratch, columns)
        numbers = np.flatnonzero(keep)
        wide = keep.shape[1]
        coords = list(zip((top + numbers // wide * h).tolist(), (left + numbers % wide * w).tolist()))
        payloads = codecs.compress_kept(tiles, keep, deflate)
        i, j = np.nonzero(~keep)
        return coords, payloads, list(zip((top + i * h).tolist(), (left + j * w).tolist()))

    tasks = [functools.partial(task, a, min(length, a + step)) for a in range(0, length, step)]
    store = ChunkStore(dataset, layout)
    run_in_order(tasks, lambda result: store(*result), QUEUED_TASKS)


class ChunkStore:
    """Stores finished chunks of a dataset on the calling thread, in the order given: compressed
    bytes with ``write_direct_chunk``; an all-zero chunk stays unallocated, unless one is stored
    there already (it is then overwritten with zeros). With ``fresh``, nothing is stored where the
    chunks go, so all-zero ones are simply left out (no listing of what the dataset holds)."""

    def __init__(self, dataset: h5py.Dataset, layout: ChunkLayout, fresh: bool = False):
        self.dataset, self.layout, self.fresh = dataset, layout, fresh
        self.write = dataset.id.write_direct_chunk
        self.zero_chunk: bytes | None = None
        self.stored: np.ndarray | bool | None = None  # which chunks hold something, listed when first needed

    def __call__(self, coords: list, payloads: list, empty: list) -> None:
        write = self.write
        for coord, payload in zip(coords, payloads):
            write(coord, payload)
        h, w = self.layout.chunks
        for coord in [] if self.fresh else empty:
            if self.stored is None:  # listed once, when the first all-zero chunk turns up
                self.stored = stored_chunks(self.dataset)
            stored = self.stored
            if stored[coord[0] // h, coord[1] // w] if stored is not False else raw_chunk(self.dataset, *coord):
                if self.zero_chunk is None:
                    zeros = np.zeros(self.layout.chunks, self.layout.dtype)
                    self.zero_chunk = codecs.compress(zeros, self.layout.level)
                write(coord, self.zero_chunk)


def _tiles(block: np.ndarray | sp.spmatrix, layout: ChunkLayout, scratch: Scratch,
           columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``block`` (corner on a chunk boundary), or those ``columns`` of it in that order, as contiguous
    (chunk row, chunk col, h, w) tiles, edges padded with the fill value, and which tiles to store: those with any
    non-zero bit (-0.0 counts), or all of them when the fill value is not all zero bits. Tiles go into this
    thread's ``scratch``."""
    keep = None
    h, w = layout.chunks
    n, m = block.shape[0], block.shape[1] if columns is None else columns.size
    out = scratch.get("tiles", (-(-n // h) * -(-m // w) * h * w,), layout.dtype)
    if sp.issparse(block):
        tiles, keep = _sparse_tiles(block, h, w, out, scratch)
    elif columns is None:
        tiles = _dense_tiles(np.asarray(block, dtype=layout.dtype), h, w, out)
    else:  # gathered a chunk row at a time, then tiled while in cache: 2-3% faster permute
        tiles = out.reshape(-1, -(-m // w), h, w)
        for k, top in enumerate(range(0, n, h)):
            rows = block[top:top + h]  # np.take with out=: 4x faster than fancy indexing
            gathered = np.take(rows, columns, axis=1, mode="wrap",
                               out=scratch.get("gathered", (rows.shape[0], m), rows.dtype))
            _dense_tiles(gathered.astype(layout.dtype, copy=False), h, w, tiles[k])
    zero_fill = codecs.zero_bits(layout.fill, layout.dtype)
    if not zero_fill:  # edges padded as HDF5 pads them: the fill value
        tiles[-1, :, n - (tiles.shape[0] - 1) * h:] = layout.fill
        tiles[:, -1, :, m - (tiles.shape[1] - 1) * w:] = layout.fill
    if keep is None or not zero_fill:  # (the scatter knows its non-zeros)
        keep = codecs.tiles_to_store(tiles, layout.fill)
    return tiles, keep


def _sparse_tiles(block: sp.csc_matrix, h: int, w: int, out: np.ndarray, scratch: Scratch
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Tiles (as :func:`_dense_tiles`) of a CSC block by scattering its entries, and which tiles hold any.

    Skips the dense intermediate: each stored entry goes straight to its place in its chunk. The
    per-entry arithmetic works in place in reused arrays (fresh ones cost page faults per task).
    """
    if not block.has_canonical_format:  # duplicates add up, as toarray() would; in a copy, as the
        block = block.copy()             # block may share the caller's arrays (see write_matrix)
        block.sum_duplicates()
    n, m = block.shape
    nr, nc = -(-n // h), -(-m // w)
    kind = np.int32 if nr * nc * h * w < 2**31 else np.int64  # narrower indices: less memory traffic
    rows = block.indices.astype(kind, copy=False)
    col = np.arange(m, dtype=kind)
    # where each entry goes: chunk row, then chunk column and column in it, then row in the chunk
    flat = np.repeat(col // kind(w) * kind(h * w) + col % kind(w), np.diff(block.indptr))
    step = scratch.get("entries", rows.shape, kind)
    flat += np.multiply(np.floor_divide(rows, kind(h), out=step), kind(nc * h * w), out=step)
    flat += np.multiply(np.remainder(rows, kind(h), out=step), kind(w), out=step)
    out.fill(0)
    out[flat] = block.data
    keep = np.zeros(nr * nc, dtype=bool)
    keep[np.floor_divide(flat, kind(h * w), out=step)] = True
    return out.reshape(nr, nc, h, w), keep.reshape(nr, nc)


def _dense_tiles(block: np.ndarray, h: int, w: int, out: np.ndarray) -> np.ndarray:
    """``block`` as a contiguous (chunk row, chunk col, h, w) array in ``out``, edges padded with zeros."""
    n, m = block.shape
    nr, nc, fr, fc = -(-n // h), -(-m // w), n // h, m // w
    tiles = out.reshape(nr, nc, h, w)
    view = tiles.transpose(0, 2, 1, 3)  # (chunk row, row in chunk, chunk col, col in chunk)
    view[:fr, :, :fc] = block[:fr * h, :fc * w].reshape(fr, h, fc, w)
    if fr < nr:  # a last, partial chunk row
        view[fr, n - fr * h:] = 0
        view[fr, :n - fr * h, :fc] = block[fr * h:, :fc * w].reshape(n - fr * h, fc, w)
    if fc < nc:  # a last, partial chunk column
        view[:, :, fc, m - fc * w:] = 0
        view[:fr, :, fc, :m - fc * w] = block[:fr * h, fc * w:].reshape(fr, h, m - fc * w)
        if fr < nr:
            view[fr, :n - fr * h, fc, :m - fc * w] = block[fr * h:, fc * w:]
    return tiles
