"""Bytes of one stored chunk to and from arrays: the HDF5 deflate filter, inflated with libdeflate
and deflated with ISA-L (gzip levels 1-3) or libdeflate (higher levels).

Pure functions, no HDF5: the engine asks :func:`supported_pipeline` whether a dataset's filters are
ones it can decode itself, and falls back to h5py for anything else (shuffle, other codecs, checksums).
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

try:  # libdeflate inflates fastest (measured here: 1.25x ISA-L, 2-3x zlib; see benchmarks/README.md)
    import deflate as _deflate
except ImportError:  # pragma: no cover - deflate is a dependency; keep working without it
    _deflate = None
try:  # ISA-L compresses at levels 1-3 about 2.3x faster than libdeflate, output 11% larger
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal is a dependency; keep working without it
    _isal = None

FAST_LEVELS = 3  # gzip levels up to this go to ISA-L (its levels 1-3); higher ones to libdeflate

FILTER_DEFLATE = 1  # HDF5's filter id for gzip/deflate


def supported_pipeline(filters: list[tuple[int, tuple[int, ...]]]) -> bool:
    """True when the filter pipeline is empty or a single deflate filter."""
    return not filters or (len(filters) == 1 and filters[0][0] == FILTER_DEFLATE)


class DamagedChunk(ValueError):
    """A stored chunk that cannot be what it claims to be (does not inflate, wrong size, cut short)."""


def decompress(data: bytes, nbytes: int, compressed: bool) -> bytes:
    """Raw chunk bytes (``nbytes`` long once decoded) from what is stored; DamagedChunk when they
    cannot be had (the file is damaged: such a chunk must never read as anything)."""
    try:
        raw = data if not compressed else _deflate.zlib_decompress(data, nbytes) if _deflate is not None \
            else zlib.decompress(data)
    except Exception as error:  # deflate.DeflateError, zlib.error: the libraries' own kinds
        raise DamagedChunk(f"a stored chunk does not inflate ({error})") from error
    if len(raw) != nbytes:
        raise DamagedChunk(f"a stored chunk holds {len(raw)} bytes, not {nbytes}")
    return raw


def zero_bits(value: float | int, dtype: np.dtype | str) -> bool:
    """Whether ``value`` as ``dtype`` is all zero bits: only then may an all-zero chunk stay
    unwritten (a fill value of -0.0 equals 0 but would read back with its sign)."""
    return not np.array([value], dtype=dtype).view(np.uint8).any()


def tiles_to_store(tiles: np.ndarray, fill: float | int) -> np.ndarray:
    """Which of ``tiles`` (whole chunks along the last two axes) must be stored: those with any
    non-zero bit (-0.0 counts), or all of them when the fill value is not all zero bits (an
    unwritten chunk reads as the fill value)."""
    if not zero_bits(fill, tiles.dtype):
        return np.ones(tiles.shape[:-2], dtype=bool)
    return tiles.view(f"u{tiles.dtype.itemsize}").any(axis=(-2, -1))


def decode(data: bytes, nbytes: int, compressed: bool, mask: int) -> bytes:
    """A chunk's raw bytes from what is stored (filter mask bit 0 set: stored uncompressed)."""
    return decompress(data, nbytes, compressed and not (mask & 1))


def fill_bytes(shape: tuple[int, int], fill: float | int, dtype: np.dtype | str) -> bytes:
    """The raw bytes of a chunk never written: its fill value everywhere."""
    return np.full(shape, fill, dtype=dtype).tobytes()


def read_stored(fd: int, offset: int, size: int) -> bytes:
    """The ``size`` stored bytes of a chunk at byte ``offset`` of the file open as ``fd``."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _cut_short(offset)
    return data


def _cut_short(offset: int) -> DamagedChunk:
    return DamagedChunk(f"the chunk at byte {offset} is cut short (is the file truncated?)")


RUN_BYTES = 4 << 20  # chunks stored back to back are read together, up to about this many bytes at once


def inflate_into(target: memoryview, fd: int, stored: tuple[list[int], list[int], list[int]], nbytes: int,
                 compressed: bool, fill: bytes) -> None:
    """Chunks one after another into ``target`` (``nbytes`` each), read through ``fd`` at the
    offsets, sizes and filter masks in ``stored`` (offset -1: never written, ``fill`` instead)."""
    for k, data in enumerate(each_inflated(fd, stored, nbytes, compressed, fill)):
        target[k * nbytes:(k + 1) * nbytes] = data


def each_inflated(fd: int, stored: tuple[list[int], list[int], list[int]], nbytes: int, compressed: bool,
                  fill: bytes) -> Iterator[bytes]:
    """The raw bytes (``nbytes``) of each chunk in ``stored`` (offsets, sizes and filter masks; offset
    -1: never written, ``fill`` instead), in order, read through ``fd``.

    Chunks stored back to back (as the engine writes a chunk row) are read with one call: 4% less
    CPU than one read per chunk in the helper processes that inflate whole matrices, and single
    rows of 20,000 columns read 313 chunks in one call instead of 313 (8 us each here).
    """
    offsets, sizes, masks = stored
    if not offsets:
        return
    o = np.asarray(offsets, dtype=np.int64)
    ends = o + np.asarray(sizes, dtype=np.int64)
    # a run ends where the next chunk does not follow on, at a chunk never written, or where the
    # file crosses a multiple of RUN_BYTES (so that a run's bytes stay few)
    apart = (o[1:] != ends[:-1]) | (o[1:] < 0) | (o[:-1] < 0) | (o[1:] // RUN_BYTES != o[:-1] // RUN_BYTES)
    bounds = [0, *(np.flatnonzero(apart) + 1).tolist(), len(offsets)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if offsets[a] < 0:  # (a run of one)
            yield fill
            continue
        start = offsets[a]
        run = memoryview(os.pread(fd, int(ends[b - 1]) - start, start))
        for k in range(a, b):
            at = offsets[k] - start
            if at + sizes[k] > len(run):
                raise _cut_short(offsets[k])
            yield decode(run[at:at + sizes[k]], nbytes, compressed, masks[k])


def compress_kept(tiles: np.ndarray, keep: np.ndarray, deflate: Callable[[Any], bytes | bytearray]) -> list:
    """The stored bytes (``deflate``, from :func:`compressor`) of each of ``tiles`` (whole chunks
    along the last two axes) where ``keep`` (their shape but the last two axes) is True, in order."""
    flat = memoryview(np.ascontiguousarray(tiles).reshape(-1).view(np.uint8))
    size = tiles.shape[-2] * tiles.shape[-1] * tiles.itemsize
    return [deflate(flat[k * size:(k + 1) * size]) for k in np.flatnonzero(keep).tolist()]


def compress(chunk: np.ndarray | memoryview, level: int | None) -> bytes:
    """Stored bytes for a full chunk (an array, or its raw bytes): zlib-wrapped deflate, as HDF5's
    gzip filter writes, or raw when ``level`` is None.

    Any deflate encoder's output decodes with HDF5's gzip filter; the level picks speed against size.
    """
    return compressor(level)(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk)


def compressor(level: int | None) -> Callable[[Any], bytes | bytearray]:
    """What :func:`compress` does at ``level``, as one function of a chunk's raw bytes (for loops
    over thousands of chunks: a quarter of a microsecond less per chunk)."""
    if level is None:
        return bytes
    level = max(1, int(level))
    if _isal is not None and level <= FAST_LEVELS:
        return functools.partial(_isal.compress, level=level)
    if _deflate is not None:
        return functools.partial(_deflate.zlib_compress, compresslevel=level)
    return functools.partial(zlib.compress, level=level)
