"""Re-encoding a matrix a chunk row (a *band*) at a time: the CPU-bound core of combine, where an
input lands at an offset that does not line up with the output's chunks, and of permutes of columns.

For each band of the output, the source's chunks under it are read by byte offset, inflated, cut
into the output's chunks (moved along by the offset, or gathered in a new column order) and
deflated again: 22-26 us of CPU per chunk (deflate 13, inflate 6) in half a dozen short calls. On
two cores, two threads doing it took longer than one here (every call hands the GIL over), so
:mod:`.processes` runs bands in child interpreters, and on this process's threads only when
those cannot start.

This module is what the children run. It imports numpy and :mod:`.codecs` only, never h5py or the
rest of loompy: a child starts in 0.07 s instead of 0.25 s.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import sys
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import codecs

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows, where no child is started
    fcntl = None

PIECE_TILES = 1024  # a band of combine is encoded in parts of at most this many tiles (16 MB of 64 x 64
# float32), so that wide matrices need no more memory; permute's parts are whole bands (any tile may
# need any of the band's source chunks)
# frames a child writes: (part, kind, count, second count) then the kind's payload
FRAME = struct.Struct("<qqqq")
DATA, DAMAGED, FAILED = range(3)
# the file a job's children share starts with the number of the next part to claim, then their
# orders' length, the orders (JSON) and the plan (see BandPlan.to_bytes)
COUNTER = struct.Struct("<q")


def check_locks(shared: int) -> None:
    """OSError unless the file open as ``shared`` takes the locks :func:`claim` needs (where the
    temporary folder has none, as on some network file systems, threads do the work instead)."""
    if fcntl is None:
        raise OSError("no file locks on this system")
    fcntl.lockf(shared, fcntl.LOCK_EX | fcntl.LOCK_NB, COUNTER.size, 0)
    fcntl.lockf(shared, fcntl.LOCK_UN, COUNTER.size, 0)


def claim(shared: int) -> int:
    """The number of the next part nobody has taken, from the counter at the start of the file open
    as ``shared`` (locked meanwhile: the children take parts as they get to them, so one that is
    slowed down, by sharing a core with its parent say, does fewer)."""
    fcntl.lockf(shared, fcntl.LOCK_EX, COUNTER.size, 0)  # (a POSIX lock: one process at a time)
    try:
        (part,) = COUNTER.unpack(os.pread(shared, COUNTER.size, 0))
        os.pwrite(shared, COUNTER.pack(part + 1), 0)
    finally:
        fcntl.lockf(shared, fcntl.LOCK_UN, COUNTER.size, 0)
    return part


@dataclass
class BandPlan:
    """Everything needed to encode bands: the source's chunks and where its columns go.

    The ``width`` columns a band's tiles cover (from a chunk boundary of the output) hold the
    source's columns from ``source_start`` (combine), or with ``order`` its columns ``order[k]``
    (permute); both matrices have chunks of ``chunks`` and ``rows`` rows. Tiles past the last row
    or the last of those columns are zero-padded.
    """

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

    # the plan crosses to a child as a JSON header followed by its arrays' bytes
    def to_bytes(self) -> bytes:
        header = {k: getattr(self, k) for k in ("chunks", "rows", "source_dtype", "target_dtype", "compressed",
                                                "level", "source_start", "width", "piece_tiles")}
        header.update(source_fill=np.asarray(self.source_fill).item(), target_fill=np.asarray(self.target_fill).item())
        header["grid"] = list(self.offset.shape)
        header["ordered"] = self.order is not None
        body = json.dumps(header).encode()
        arrays = [np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in
                  (self.offset, self.size, self.mask, *([] if self.order is None else [self.order]))]
        return struct.pack("<q", len(body)) + body + b"".join(arrays)

    @classmethod
    def from_bytes(cls, data: bytes) -> BandPlan:
        (length,) = struct.unpack_from("<q", data)
        header = json.loads(data[8:8 + length])
        grid, ordered = tuple(header.pop("grid")), header.pop("ordered")
        arrays = np.frombuffer(data, dtype=np.int64, offset=8 + length)
        cells = grid[0] * grid[1]
        offset, size, mask = (arrays[k * cells:(k + 1) * cells].reshape(grid) for k in range(3))
        order = arrays[3 * cells:3 * cells + header["width"]] if ordered else None
        header["chunks"] = tuple(header["chunks"])
        return cls(offset=offset, size=size, mask=mask, order=order, **header)


class BandEncoder:
    """Encodes parts of a plan's bands, reading the source through ``fd``; one per thread (it keeps
    buffers the size of a part)."""

    def __init__(self, plan: BandPlan, fd: int):
        self.plan, self.fd = plan, fd
        h, w = plan.chunks
        self.nbytes = h * w * np.dtype(plan.source_dtype).itemsize
        self.tiles = np.empty((plan.piece, h, w), dtype=plan.target_dtype)
        self.deflate = codecs.compressor(plan.level)
        if plan.order is None:  # the source chunks under a part's tiles, and one more
            self.row = np.empty((plan.piece + 1, h, w), dtype=plan.source_dtype)
            return
        # permute: every source chunk column a tile needs, then one of zeros for the padding
        count = plan.tiles_per_band
        needed = np.unique(plan.order // w)
        self.needed = needed
        where = np.zeros(plan.offset.shape[1], dtype=np.int64)
        where[needed] = np.arange(needed.size)
        self.local = np.full(count * w, needed.size * w, dtype=np.int64)  # columns of the joined chunks
        self.local[:plan.width] = where[plan.order // w] * w + plan.order % w
        self.row = np.empty((needed.size + 1, h, w), dtype=plan.source_dtype)
        self.joined = np.empty((h, self.row.shape[0] * w), dtype=plan.source_dtype)
        self.gathered = np.empty((h, count * w), dtype=plan.source_dtype)

    def _inflate(self, band: int, chunk_cols: slice | np.ndarray) -> None:
        """The source chunks of chunk row ``band`` at ``chunk_cols`` into ``self.row`` (zeros after them)."""
        plan, size = self.plan, self.nbytes
        into = memoryview(self.row.reshape(-1).view(np.uint8))
        offsets, sizes, masks = (a[band, chunk_cols].tolist() for a in (plan.offset, plan.size, plan.mask))
        for k, (o, s, m) in enumerate(zip(offsets, sizes, masks)):
            if o < 0:
                into[k * size:(k + 1) * size] = plan.fill
            else:
                stored = codecs.read_stored(self.fd, o, s)
                into[k * size:(k + 1) * size] = codecs.decode(stored, size, plan.compressed, m)
        self.row[len(offsets):] = 0

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
        tiles[:, plan.rows - band * h:] = 0  # padding: below the last row, right of the last column
        if stop == plan.tiles_per_band:
            tiles[count - 1, :, plan.width - (plan.tiles_per_band - 1) * w:] = 0
        keep = codecs.tiles_to_store(tiles, plan.target_fill)
        flat, size = memoryview(tiles.reshape(-1).view(np.uint8)), tiles[0].nbytes
        payloads = [self.deflate(flat[k * size:(k + 1) * size]) for k in np.flatnonzero(keep).tolist()]
        return (start + np.flatnonzero(keep)).tolist(), payloads, (start + np.flatnonzero(~keep)).tolist()


def child_main() -> None:
    """A child's whole life. Its command line gives the descriptor of the file it shares with its
    parent and the other children. Once stdin closes, that file holds its orders (the source's path
    and identity, how many bytes of frames may wait for the parent) and the plan; it claims parts
    (:func:`claim`) until none is left, and writes one frame for each to stdout (see
    :mod:`.processes`)."""
    shared = int(sys.argv[1])
    sys.stdin.buffer.read()  # the parent closes stdin once the shared file holds the orders and plan
    # (the descriptor's offset is shared with the parent and the other children: read at fixed places)
    (length,) = struct.unpack("<q", os.pread(shared, 8, COUNTER.size))
    orders = json.loads(os.pread(shared, length, COUNTER.size + 8))
    start = COUNTER.size + 8 + length
    plan = BandPlan.from_bytes(os.pread(shared, os.fstat(shared).st_size - start, start))
    fd = os.open(orders["source"], os.O_RDONLY)
    info = os.fstat(fd)
    if [info.st_dev, info.st_ino] != orders["file"]:
        return  # replaced on disk since the parent listed its chunks: no frame, so the parent reads it itself
    # a writer thread sends finished frames, so that encoding goes on while the parent is busy
    # elsewhere (copying the first input of a combine, say), until ``ahead`` bytes of them wait
    frames: deque[bytes | None] = deque()
    waiting = threading.Condition()
    held = 0

    def send() -> None:
        nonlocal held
        try:
            while True:
                with waiting:
                    while not frames:
                        waiting.wait()
                    frame = frames.popleft()
                if frame is None:
                    break
                view = memoryview(frame)
                while view:  # (unbuffered: whatever is written reaches the parent, even if this child dies)
                    view = view[os.write(1, view):]
                with waiting:
                    held -= len(frame)
                    waiting.notify_all()
        except OSError:  # the parent has gone: nothing is left to do
            os._exit(1)

    def put(frame: bytes | None) -> None:  # (one frame is always let in: it may be larger than ``ahead``)
        nonlocal held
        with waiting:
            while frames and frame is not None and held + len(frame) > orders["ahead"]:
                waiting.wait()
            frames.append(frame)
            held += len(frame or b"")
            waiting.notify_all()

    writer = threading.Thread(target=send, daemon=True)
    writer.start()
    encoder = BandEncoder(plan, fd)
    while (part := claim(shared)) < plan.parts:
        try:
            stored, payloads, empty = encoder.encode(part)
        except codecs.DamagedChunk as error:
            message = str(error).encode()
            put(FRAME.pack(part, DAMAGED, len(message), 0) + message)
            break
        except Exception:
            # anything else: the parent encodes the part itself (and meets the error again, unless
            # it was this child's alone, such as running out of memory)
            put(FRAME.pack(part, FAILED, 0, 0))
            break
        lengths = [len(p) for p in payloads]
        put(b"".join([FRAME.pack(part, DATA, len(stored), len(empty)),
                      np.array(stored + lengths + empty, dtype=np.int64).tobytes(), *payloads]))
    put(None)
    writer.join()
