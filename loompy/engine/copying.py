"""Copying another dataset's chunks into a matrix being written (combine's inputs, a permute's
columns): as they are stored when the layouts and column offsets agree, else re-encoded chunk row by
chunk row in helper processes (:mod:`.bands`, :mod:`.processes`) and stored as they arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h5py
import numpy as np

from . import codecs
from .bands import BandPlan
from .processes import BandJob
from .read import STRIP_BYTES
from .storage import ChunkLayout, chunk_layout, damaged, direct_reads, forget, raw_chunk, readable_directly, refresh
from .write import ChunkStore, writes_dataset


@contextmanager
def copying_columns(src: h5py.Dataset, target: ChunkLayout | None, shape: tuple[int, int], col_offset: int
                    ) -> Iterator[Callable[[h5py.Dataset], tuple[int, int]]]:
    """Prepare to copy ``src`` (all of it) into columns ``col_offset:`` of a matrix of ``shape`` stored
    as ``target`` (none of its chunks there stored yet), as far as whole chunks of it go; yields
    ``finish(dst)``, which does the copy and returns the columns ``a:b`` of ``dst`` now holding
    ``src``'s values. Its columns outside them (edges sharing a chunk with other values) are left
    to the caller.

    When ``col_offset`` is on a chunk boundary and the stored layouts agree, the stored chunks are
    copied as they are, never inflated. Otherwise each chunk of ``dst`` is cut from the inflated
    chunks of ``src`` under it and compressed again (:mod:`.bands`): in helper processes that start
    at once when there are enough chunks (see :mod:`.processes`), so that work done before calling
    ``finish`` (HDF5 copying another input) overlaps with theirs; else on threads, inside ``finish``.
    """
    layout, nothing = chunk_layout(src), (lambda _dst: (col_offset, col_offset))
    if not _reencodable(src, layout, target, shape[0]):
        yield nothing
        return
    w = layout.chunks[1]
    end = col_offset + src.shape[1]
    first = -(-col_offset // w) * w
    last = end if end == shape[1] else end // w * w  # a partial last chunk of dst is src's alone
    if layout == target and col_offset % w == 0:
        yield lambda dst: (col_offset, col_offset + _copy_stored(src, dst, col_offset))
    elif first >= last:
        yield nothing
    else:
        with _band_job(src, layout, target, first - col_offset, last - first) as job:
            yield nothing if job is None else (lambda dst: _store_bands(dst, src, job, target, first))


def _reencodable(src: h5py.Dataset, layout: ChunkLayout | None, target: ChunkLayout | None, rows: int) -> bool:
    """Whether the engine can write ``src``'s chunks again as ``target``'s (same chunk shape and
    rows, values that fit ``target``'s dtype)."""
    return (layout is not None and target is not None and layout.chunks == target.chunks and src.shape[0] == rows
            and src.size > 0 and np.can_cast(src.dtype, target.dtype, "safe"))


@contextmanager
def _band_job(src: h5py.Dataset, layout: ChunkLayout, target: ChunkLayout, source_start: int, width: int,
              order: np.ndarray | None = None) -> Iterator[BandJob | None]:
    """A started :class:`~.processes.BandJob` encoding ``width`` columns of the output as ``target``
    from ``src``'s (stored as ``layout``) from ``source_start``, or its columns ``order`` (all its
    rows); None when ``src``'s chunks cannot be read directly."""
    h, w = layout.chunks
    tiles = -(-src.shape[0] // h) * -(-width // w) if readable_directly(src) else 0
    # children start now (when worth it): they import numpy while this process lists the source's chunks
    with BandJob(tiles) as job, direct_reads(src) as direct:
        if direct is None:
            yield None
            return
        index, fd = direct
        job.begin(BandPlan(chunks=layout.chunks, rows=src.shape[0], source_dtype=src.dtype.str,
                           target_dtype=target.dtype.str, compressed=layout.compressed, level=target.level,
                           source_fill=layout.fill, target_fill=target.fill, source_start=source_start,
                           width=width, offset=index.offset, size=index.size, mask=index.mask, order=order),
                  fd, index.path, index.file_id)
        yield job


@writes_dataset
def _store_bands(dst: h5py.Dataset, src: h5py.Dataset, job: BandJob, target: ChunkLayout, first: int
                 ) -> tuple[int, int]:
    """Store a job's bands into ``dst``'s columns from ``first`` (nothing stored there yet); returns
    the columns filled."""
    h, w = target.chunks
    refresh(dst)
    store = ChunkStore(dst, target, fresh=True)

    def place(band: int, tiles: list[int], payloads: list, empty: list[int]) -> None:
        top = band * h
        store([(top, first + k * w) for k in tiles], payloads, [(top, first + k * w) for k in empty])

    try:
        job.store_all(place)
    except codecs.DamagedChunk as error:  # (read by a child or here)
        raise damaged(src, error) from error
    return first, first + job.plan.width


def reorder_columns(src: h5py.Dataset, dst: h5py.Dataset, order: np.ndarray) -> bool:
    """Fill ``dst`` (the shape of ``src``, nothing stored yet) with ``src``'s columns in ``order`` (a
    permutation of them, checked by the caller: other values would wrap or clip), each chunk row
    re-encoded in the engine's helper processes (on threads when they cannot start or there are
    too few chunks). False, with nothing written, when the layouts do not allow it (other chunks,
    filters the engine does not handle) or a chunk row holds more than ``STRIP_BYTES`` (it would
    be in memory whole, four times over)."""
    layout, target = chunk_layout(src), chunk_layout(dst)
    if not _reencodable(src, layout, target, dst.shape[0]) or src.shape != dst.shape \
            or layout.chunks[0] * src.shape[1] * src.dtype.itemsize > STRIP_BYTES:
        return False
    with _band_job(src, layout, target, 0, dst.shape[1], np.asarray(order, dtype=np.int64)) as job:
        if job is None:
            return False
        _store_bands(dst, src, job, target, 0)
    return True


def copy_columns(src: h5py.Dataset, dst: h5py.Dataset, col_offset: int) -> tuple[int, int]:
    """:func:`copying_columns` at once: copy ``src`` into ``dst`` from column ``col_offset``; returns the
    columns ``a:b`` of ``dst`` now holding ``src``'s values."""
    with copying_columns(src, chunk_layout(dst), dst.shape, col_offset) as finish:
        return finish(dst)


def _copy_stored(src: h5py.Dataset, dst: h5py.Dataset, col_offset: int) -> int:
    """Copy the stored chunks lying wholly inside ``src`` to ``dst`` at the chunk-aligned ``col_offset``;
    returns how many leading columns that covers."""
    forget(dst)
    h, w = src.chunks
    full = src.shape[1] // w * w
    write = dst.id.write_direct_chunk
    with direct_reads(src) as direct:
        try:
            if direct is None:
                for r in range(0, src.shape[0], h):
                    for c in range(0, full, w):
                        raw = raw_chunk(src, r, c)
                        if raw is not None:  # a chunk never stored stays unallocated in the copy too
                            write((r, c + col_offset), raw[1], filter_mask=raw[0])
                return full
            index, fd = direct
            i, j = np.nonzero(index.offset[:, :full // w] >= 0)
            for r, c, o, size, mask in zip((i * h).tolist(), (j * w + col_offset).tolist(), index.offset[i, j].tolist(),
                                           index.size[i, j].tolist(), index.mask[i, j].tolist()):
                write((r, c), codecs.read_stored(fd, o, size), filter_mask=mask)
        except codecs.DamagedChunk as error:
            raise damaged(src, error) from error
    return full
