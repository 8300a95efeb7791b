"""What the engine's helper processes run (see :mod:`.processes`): claim a part of a job, work it,
send the result as a frame, until no part is left.

A job is a *plan*: :class:`~.bands.BandPlan` (re-encode chunk rows: combine, permute),
:class:`~.lines.LinePlan` (numpy reductions of every row or column: map),
:class:`~.picks.PickPlan` (a few rows or columns from each of many chunk rows or columns) or
:class:`~.batches.BatchPlan` (a scan's batches, placed in memory shared with the parent). Each
plan crosses to the children as bytes and makes a worker (``plan.worker(fd)``) whose
``frame(part)`` gives the part's result; the parent reads it back with ``plan.read_frame``.

This module and the plans import numpy and :mod:`.codecs` only, never h5py or the rest of
loompy: a child starts in 0.07 s instead of 0.25 s.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import sys
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np  # (loaded while the parent lists the source's chunks, not after)

from . import codecs

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows, where no child is started
    fcntl = None

# frames a child writes: (part, kind, count, second count) then the kind's payload (see the plans)
FRAME = struct.Struct("<qqqq")
DATA, DAMAGED, FAILED = range(3)
# the file a job's children share starts with the number of the next part to claim, then their
# orders' length, the orders (JSON) and the plan (its to_bytes: see pack_plan)
COUNTER = struct.Struct("<q")
LENGTH_PREFIX = struct.Struct("<q")  # before the orders, and before a plan's header


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
class BandedPlan:
    """What a plan over the bands of a matrix (its chunk rows, ``axis`` 0, or chunk columns, 1)
    holds: the chunks and their index, and the positions ``others`` on the other axis its lines are
    taken at. :class:`~.lines.LinePlan` and :class:`~.picks.PickPlan` add what they do with them."""

    chunks: tuple[int, int]
    shape: tuple[int, int]
    axis: int
    dtype: str
    compressed: bool
    source_fill: float | int  # what chunks never written hold
    others: np.ndarray  # positions on the other axis, in order
    offset: np.ndarray  # the chunk index, by (chunk row, chunk column); offset -1: never written
    size: np.ndarray
    mask: np.ndarray

    HEADER = ("chunks", "shape", "axis", "dtype", "compressed")  # (and source_fill) what to_bytes sends first

    @property
    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The chunk index by (band, chunk across it)."""
        arrays = (self.offset, self.size, self.mask)
        return arrays if self.axis == 0 else tuple(a.T for a in arrays)

    @property
    def depth(self) -> int:
        """Lines in a band."""
        return self.chunks[self.axis]

    @functools.cached_property
    def needed(self) -> np.ndarray:
        """The chunks across a band that hold ``others``."""
        return np.unique(self.others // self.chunks[1 - self.axis])

    @functools.cached_property
    def fill(self) -> bytes:
        """The raw bytes of a chunk never written."""
        return codecs.fill_bytes(self.chunks, self.source_fill, self.dtype)

    def inflate_band(self, into: np.ndarray, fd: int, band: int) -> None:
        """The needed chunks of ``band`` into ``into`` (needed chunks, height, width), read through ``fd``."""
        inflate_band(into, fd, self.index, band, self.needed, self.compressed, self.fill)

    def packed(self, names: tuple[str, ...], extra: np.ndarray, **more: int) -> bytes:
        """The plan as bytes (see :func:`pack_plan`): its geometry, the fields ``names``, ``more`` (for
        the header) and ``extra`` (an array)."""
        header = {k: getattr(self, k) for k in (*self.HEADER, *names)}
        header.update(source_fill=np.asarray(self.source_fill).item(), **more)
        return pack_plan(header, (self.offset, self.size, self.mask), extra)


def placed(plan: BandedPlan) -> tuple[slice | None, np.ndarray | None]:
    """Where a plan's ``others`` are once a band's needed chunks are joined (side by side for rows,
    one under another for columns): a slice when they are a run (a view of the joined chunks),
    else None and their places (a gather)."""
    across, others = plan.chunks[1 - plan.axis], plan.others
    first = int(plan.needed[0]) * across
    start = int(others[0])
    if np.array_equal(others, np.arange(start, start + others.size)):
        return slice(start - first, start + others.size - first), None
    return None, joined_columns(others, plan.needed, plan.index[0].shape[1], across)


def pack_plan(header: dict, index: tuple[np.ndarray, ...], extra: np.ndarray | None) -> bytes:
    """How a plan crosses to the children: its ``header`` (JSON), then its chunk index (offsets,
    sizes, filter masks, by chunk row and column) and perhaps one more array, as int64."""
    header = {**header, "grid": list(index[0].shape), "extra": None if extra is None else int(extra.size)}
    body = json.dumps(header).encode()
    arrays = [np.ascontiguousarray(a, dtype=np.int64).tobytes() for a in (*index, *([] if extra is None else [extra]))]
    return LENGTH_PREFIX.pack(len(body)) + body + b"".join(arrays)


def unpack_plan(data: bytes) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """What :func:`pack_plan` packed: (header, offsets, sizes, filter masks, the extra array or None)."""
    (length,) = LENGTH_PREFIX.unpack_from(data)
    header = json.loads(data[LENGTH_PREFIX.size:LENGTH_PREFIX.size + length])
    grid, extra = tuple(header.pop("grid")), header.pop("extra")
    arrays = np.frombuffer(data, dtype=np.int64, offset=LENGTH_PREFIX.size + length)
    cells = grid[0] * grid[1]
    offset, size, mask = (arrays[k * cells:(k + 1) * cells].reshape(grid) for k in range(3))
    for key in ("chunks", "shape"):  # (JSON gave lists)
        if key in header:
            header[key] = tuple(header[key])
    return header, offset, size, mask, None if extra is None else arrays[3 * cells:3 * cells + extra]


def inflate_band(into: np.ndarray, fd: int, index: tuple[np.ndarray, np.ndarray, np.ndarray], band: int,
                 chunk_cols: slice | np.ndarray, compressed: bool, fill: bytes) -> int:
    """The chunks of chunk row ``band`` at ``chunk_cols`` (by the chunk index: offsets, sizes,
    filter masks) into ``into`` (chunks, height, width), one after another; returns how many."""
    stored = tuple(a[band, chunk_cols].tolist() for a in index)
    codecs.inflate_into(memoryview(into.reshape(-1).view(np.uint8)), fd, stored, into[0].nbytes, compressed, fill)
    return len(stored[0])


def joined_columns(cols: np.ndarray, needed: np.ndarray, grid_cols: int, width: int) -> np.ndarray:
    """Where columns ``cols`` are once the chunk columns ``needed`` (sorted, holding them all; of
    ``grid_cols``, each ``width`` wide) are joined side by side."""
    where = np.zeros(grid_cols, dtype=np.int64)
    where[needed] = np.arange(needed.size)
    return where[cols // width] * width + cols % width


def plan_class(kind: str) -> type:
    """The plan class a job of ``kind`` uses (imported here: the plans' modules import this one)."""
    if kind == "bands":
        from .bands import BandPlan

        return BandPlan
    if kind == "lines":
        from .lines import LinePlan

        return LinePlan
    if kind == "picks":
        from .picks import PickPlan

        return PickPlan
    if kind == "batches":
        from .batches import BatchPlan

        return BatchPlan
    raise ValueError(f"no job of kind {kind!r}")


def child_main() -> None:
    """A child's whole life. Its command line gives the descriptor of the file it shares with its
    parent and the other children. Once stdin closes, that file holds its orders (the kind of job,
    the source's path and identity, how many bytes of frames may wait for the parent) and the plan;
    it claims parts (:func:`claim`) until none is left, and writes one frame for each to stdout."""
    for kind in ("bands", "lines", "picks", "batches"):  # (loaded before the orders come, as numpy is)
        plan_class(kind)
    shared = int(sys.argv[1])
    sys.stdin.buffer.read()  # the parent closes stdin once the shared file holds the orders and plan
    # (the descriptor's offset is shared with the parent and the other children: read at fixed places)
    (length,) = LENGTH_PREFIX.unpack(os.pread(shared, LENGTH_PREFIX.size, COUNTER.size))
    orders = json.loads(os.pread(shared, length, COUNTER.size + LENGTH_PREFIX.size))
    start = COUNTER.size + LENGTH_PREFIX.size + length
    plan = plan_class(orders["kind"]).from_bytes(os.pread(shared, os.fstat(shared).st_size - start, start))
    fd = os.open(orders["source"], os.O_RDONLY)
    info = os.fstat(fd)
    if [info.st_dev, info.st_ino] != orders["file"]:
        return  # replaced on disk since the parent listed its chunks: no frame, so the parent reads it itself
    # a writer thread sends finished frames, so that work goes on while the parent is busy
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
    worker = plan.worker(fd)
    while (part := claim(shared)) < plan.parts:
        try:
            count, second, payload = worker.frame(part)
        except codecs.DamagedChunk as error:
            message = str(error).encode()
            put(FRAME.pack(part, DAMAGED, len(message), 0) + message)
            break
        except Exception:
            # anything else: the parent works the part itself (and meets the error again, unless
            # it was this child's alone, such as running out of memory)
            put(FRAME.pack(part, FAILED, 0, 0))
            break
        put(b"".join([FRAME.pack(part, DATA, count, second), *payload]))
    put(None)
    writer.join()
