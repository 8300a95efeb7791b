"""Bytes of one stored chunk to and from arrays: the HDF5 deflate filter, done with libdeflate.

Pure functions, no HDF5: the engine asks :func:`supported_pipeline` whether a dataset's filters are
ones it can decode itself, and falls back to h5py for anything else (shuffle, other codecs, checksums).
"""

from __future__ import annotations

import zlib

import numpy as np

try:  # libdeflate: about 2.5x faster than zlib here (see benchmarks/README.md)
    import deflate as _deflate
except ImportError:  # pragma: no cover - deflate is a dependency; keep working without it
    _deflate = None

FILTER_DEFLATE = 1  # HDF5's filter id for gzip/deflate


def supported_pipeline(filters: list[tuple[int, tuple[int, ...]]]) -> bool:
    """True when the filter pipeline is empty or a single deflate filter."""
    return not filters or (len(filters) == 1 and filters[0][0] == FILTER_DEFLATE)


def decompress(data: bytes, nbytes: int, compressed: bool) -> bytes:
    """Raw chunk bytes (``nbytes`` long once decoded) from what is stored."""
    if not compressed:
        return data
    if _deflate is not None:
        return _deflate.zlib_decompress(data, nbytes)
    return zlib.decompress(data)


def compress(chunk: np.ndarray, level: int | None) -> bytes:
    """Stored bytes for a full chunk: zlib-wrapped deflate (what HDF5's gzip filter writes), or raw."""
    raw = np.ascontiguousarray(chunk).tobytes()
    if level is None:
        return raw
    if _deflate is not None:
        return _deflate.zlib_compress(raw, max(1, int(level)))
    return zlib.compress(raw, int(level))
