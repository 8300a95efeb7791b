"""Re-encoding a matrix a chunk row (a *band*) at a time: the CPU-bound core of combine, where an
input lands at an offset that does not line up with the output's chunks, and of permutes of columns.

For each band of the output, the source's chunks under it are read by byte offset, inflated, cut
into the output's chunks (moved along by the offset, or gathered in a new column order) and
deflated again: 22-26 us of CPU per chunk (deflate 13, inflate 6) in half a dozen short calls. On
two cores, two threads doing it took longer than one here (every call hands the GIL over), so
:mod:`.processes` runs bands in child interpreters, and on this process's threads only when
those cannot start.

The children run this module (see :mod:`.child`): it imports numpy and :mod:`.codecs` only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import codecs
from .child import inflate_band, joined_columns, pack_plan, unpack_plan

PIECE_TILES = 1024  # a band of combine is encoded in parts of at most this many tiles (16 MB of 64 x 64
# float32), so that wide matrices need no more memory; permute's parts are whole bands (any tile may
# need any of the band's source chunks)


@dataclass
class BandPlan:
    """Everything needed to encode bands: the source's chunks and where its columns go.

    The ``width`` columns a band's tiles cover (from a chunk boundary of the output) hold the
    source's columns from ``source_start`` (combine), or with ``order`` its columns ``order[k]``
    (permute); both matrices have chunks of ``chunks`` and ``rows`` rows. Tiles past the last row
    or the last of those columns are zero-padded.
    """

    KIND = "bands"  # (see .child.plan_class)

    chunks: tuple[int, int]
    rows: int
    source_dtype: str
    target_dtype: str
    compressed: bool  # the source's chunks are deflated (unless their filter mask says not)
    level: int | None  # the output's deflate level, None when stored raw
    source_fill: float | int
    target_fill: float | int
    source_start: int
    width: int
    offset: np.ndarray  # the source's chunk index, by (chunk row, chunk column); offset -1: never written
    size: np.ndarray
    mask: np.ndarray
    order: np.ndarray | None = None
    piece_tiles: int = field(default_factory=lambda: PIECE_TILES)

    @functools.cached_property
    def fill(self) -> bytes:
        """The raw bytes of a source chunk never written."""
        return codecs.fill_bytes(self.chunks, self.source_fill, self.source_dtype)

    @property
    def bands(self) -> int:
        return -(-self.rows // self.chunks[0])

    @property
    def tiles_per_band(self) -> int:
        return -(-self.width // self.chunks[1])

    @property
    def piece(self) -> int:
        """Tiles per part (the last part of a band may have fewer)."""
        return self.tiles_per_band if self.order is not None else max(1, min(self.piece_tiles, self.tiles_per_band))

    @property
    def parts(self) -> int:
        """Units of work: every band, cut into parts of :attr:`piece` tiles."""
        return self.bands * -(-self.tiles_per_band // self.piece)

    def part(self, number: int) -> tuple[int, int, int]:
        """(band, first tile, end tile) of part ``number``; parts go band by band, left to right."""
        per_band = -(-self.tiles_per_band // self.piece)
        band, k = divmod(number, per_band)
        return band, k * self.piece, min((k + 1) * self.piece, self.tiles_per_band)

    def worker(self, fd: int) -> BandEncoder:
        return BandEncoder(self, fd)

    def read_frame(self, part: int, count: int, empty: int, read: Callable[[int], bytes]) -> tuple:
        """A child's result for ``part`` (frame counts ``count`` and ``empty``; ``read(n)`` gives the
        payload's next ``n`` bytes) as (tile numbers stored, their bytes, all-zero tile numbers);
        ValueError when the counts do not fit the part."""
        _, start, stop = self.part(part)
        if count < 0 or empty < 0 or count + empty != stop - start:
            raise ValueError(f"part {part} with {count} + {empty} tiles")
        numbers = np.frombuffer(read(8 * (2 * count + empty)), dtype=np.int64)
        tiles = np.sort(np.concatenate([numbers[:count], numbers[2 * count:]]))
        if not np.array_equal(tiles, np.arange(start, stop)) or (numbers[count:2 * count] < 0).any():
            raise ValueError(f"part {part}: tile numbers or lengths that do not fit it")
        stored, lengths = numbers[:count].tolist(), numbers[count:2 * count].tolist()
        blob = memoryview(read(sum(lengths)))
        bounds = np.cumsum([0, *lengths]).tolist()
        return stored, [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])], numbers[2 * count:].tolist()

    def to_bytes(self) -> bytes:
        header = {k: getattr(self, k) for k in ("chunks", "rows", "source_dtype", "target_dtype", "compressed",
                                                "level", "source_start", "width", "piece_tiles")}
        header.update(source_fill=np.asarray(self.source_fill).item(), target_fill=np.asarray(self.target_fill).item())
        return pack_plan(header, (self.offset, self.size, self.mask), self.order)

    @classmethod
    def from_bytes(cls, data: bytes) -> BandPlan:
        header, offset, size, mask, order = unpack_plan(data)
        return cls(offset=offset, size=size, mask=mask, order=order, **header)


class BandEncoder:
    """Encodes parts of a plan's bands, reading the source through ``fd``; one per thread (it keeps
    buffers the size of a part)."""

    def __init__(self, plan: BandPlan, fd: int):
        self.plan, self.fd = plan, fd
        h, w = plan.chunks
        self.tiles = np.empty((plan.piece, h, w), dtype=plan.target_dtype)
        self.deflate = codecs.compressor(plan.level)
        if plan.order is None:  # the source chunks under a part's tiles, and one more
            self.row = np.empty((plan.piece + 1, h, w), dtype=plan.source_dtype)
            return
        # permute: every source chunk column a tile needs, then one of zeros for the padding
        count = plan.tiles_per_band
        needed = np.unique(plan.order // w)
        self.needed = needed
        self.local = np.full(count * w, needed.size * w, dtype=np.int64)  # columns of the joined chunks
        self.local[:plan.width] = joined_columns(plan.order, needed, plan.offset.shape[1], w)
        self.row = np.empty((needed.size + 1, h, w), dtype=plan.source_dtype)
        self.joined = np.empty((h, self.row.shape[0] * w), dtype=plan.source_dtype)
        self.gathered = np.empty((h, count * w), dtype=plan.source_dtype)

    def _inflate(self, band: int, chunk_cols: slice | np.ndarray) -> None:
        """The source chunks of chunk row ``band`` at ``chunk_cols`` into ``self.row`` (zeros after them)."""
        plan = self.plan
        count = inflate_band(self.row, self.fd, (plan.offset, plan.size, plan.mask), band, chunk_cols,
                             plan.compressed, plan.fill)
        self.row[count:] = 0

    def encode(self, part: int) -> tuple[list[int], list[bytes], list[int]]:
        """Part ``part`` as (tile numbers in its band stored, their bytes, tile numbers left all-zero)."""
        plan = self.plan
        h, w = plan.chunks
        band, start, stop = plan.part(part)
        count = stop - start
        tiles = self.tiles[:count]
        if plan.order is None:  # each tile from two neighbouring source chunks
            first, shift = divmod(plan.source_start + start * w, w)
            self._inflate(band, slice(first, min(first + count + 1, plan.offset.shape[1])))
            tiles[:, :, :w - shift] = self.row[:count, :, shift:]
            tiles[:, :, w - shift:] = self.row[1:count + 1, :, :shift]
        else:  # rows of the joined chunks gathered (in the cache: 80 KB a row here), then cut into tiles
            self._inflate(band, self.needed)
            self.joined.reshape(h, -1, w)[...] = self.row.transpose(1, 0, 2)
            np.take(self.joined, self.local, axis=1, out=self.gathered, mode="clip")
            tiles[...] = self.gathered.reshape(h, count, w).transpose(1, 0, 2)
        # padding, below the last row and right of the last column: the fill value, as HDF5 pads
        tiles[:, plan.rows - band * h:] = plan.target_fill
        if stop == plan.tiles_per_band:
            tiles[count - 1, :, plan.width - (plan.tiles_per_band - 1) * w:] = plan.target_fill
        keep = codecs.tiles_to_store(tiles, plan.target_fill)
        payloads = codecs.compress_kept(tiles, keep, self.deflate)
        return (start + np.flatnonzero(keep)).tolist(), payloads, (start + np.flatnonzero(~keep)).tolist()

    def result(self, part: int) -> tuple[list[int], list[bytes], list[int]]:
        """What :meth:`BandPlan.read_frame` makes of a child's frame for ``part``: :meth:`encode`'s."""
        return self.encode(part)

    def frame(self, part: int) -> tuple[int, int, list[bytes]]:
        """Part ``part`` as a child sends it: counts and payload for :meth:`BandPlan.read_frame`."""
        stored, payloads, empty = self.encode(part)
        lengths = [len(p) for p in payloads]
        return len(stored), len(empty), [np.array(stored + lengths + empty, dtype=np.int64).tobytes(), *payloads]
