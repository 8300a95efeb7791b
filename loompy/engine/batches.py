"""A scan's batches (512 rows, say, each across every column) filled by the engine's helper
processes (:mod:`.processes`) straight into memory this process shares with them.

A scan of a large matrix inflates every chunk once, and on this process's threads each of the
hundred thousand inflate calls hands the GIL over: a scan of the rows of 20,000 x 20,000 float32
took 1.5-1.7 s, where two processes inflate the same chunks in 0.74 s. Sending the batches back
through pipes copies them twice more (1.3-1.5 s); here the children place each band's chunks in
the batch itself, in a shared *ring* of batch-sized slots (a memfd), and only a few bytes say a
part is done (0.9-1.1 s in a prototype).

The ring's first bytes are its *control*: for each batch, the slot it is to fill (plus one; 0
while not yet given). This process gives a batch its slot only once the slot's earlier batch is
no longer referred to by anyone (see :class:`~.scans.BatchReads`), so the children never write
over a batch the caller still holds, and a child that gets ahead of the caller waits for a slot.

The children run this module (see :mod:`.child`): it imports numpy and :mod:`.codecs` only.
"""

from __future__ import annotations

import functools
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import codecs
from .child import BandedPlan, unpack_plan

PIECE_CHUNKS = 64  # chunks inflated at once before they are placed (1 MB of 64 x 64 float32: in the cache)
LONGEST_NAP = 0.0005  # seconds a child waiting for a slot sleeps between looks at the control
IDLE_AFTER, IDLE_NAP = 1.0, 0.05  # after this long waiting (a caller that holds a scan unfinished), longer naps


def page_rounded(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole number of the mappings' granularity (a slot's offset must be one)."""
    return -(-max(1, nbytes) // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY


@dataclass
class BatchPlan(BandedPlan):
    """Everything needed to fill a scan's batches of ``batch_size`` rows (``axis`` 0) or columns
    (1), each across every position of the other axis, in the ring open as descriptor ``ring`` (the
    same number in the children). A part is one band (chunk row or column) within one batch."""

    KIND = "batches"  # (see .child.plan_class)

    batch_size: int = 0
    ring: int = -1
    parent: int = 0  # the process that gives the slots (a child's parent may have gone before it looks)

    @property
    def length(self) -> int:
        """Lines along the scanned axis."""
        return self.shape[self.axis]

    @property
    def batches(self) -> int:
        return -(-self.length // self.batch_size)

    def batch_lines(self, batch: int) -> range:
        """The lines of ``batch``."""
        return range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.length))

    def batch_shape(self, batch: int) -> tuple[int, int]:
        """``batch``'s shape as handed to the caller (rows by columns, C-ordered)."""
        lines = len(self.batch_lines(batch))
        return (lines, self.shape[1]) if self.axis == 0 else (self.shape[0], lines)

    def batch_chunk_cols(self, batch: int) -> range:
        """The chunk columns a batch's values are in: all of them for rows, else the batch's."""
        width = self.chunks[1]
        if self.axis == 0:
            return range(-(-self.shape[1] // width))
        lines = self.batch_lines(batch)
        return range(lines.start // width, (lines.stop - 1) // width + 1)

    @functools.cached_property
    def part_table(self) -> np.ndarray:
        """For every part, its batch and its chunk rows (first, stop), in the order parts are
        claimed (batch by batch): for rows, one chunk row each; for columns, as many as hold about
        ``PIECE_CHUNKS`` of the batch's chunks (a chunk column's chunks lie apart in the file, a
        chunk row's side by side: read a chunk row's few at a time, they come in one read)."""
        rows, height = [], self.chunks[0]
        for batch in range(self.batches):
            if self.axis == 0:
                lines = self.batch_lines(batch)
                rows += [(batch, r, r + 1) for r in range(lines.start // height, (lines.stop - 1) // height + 1)]
            else:
                grid_rows = -(-self.shape[0] // height)
                step = -(-PIECE_CHUNKS // len(self.batch_chunk_cols(batch)))
                rows += [(batch, r, min(r + step, grid_rows)) for r in range(0, grid_rows, step)]
        return np.array(rows, dtype=np.int64).reshape(-1, 3)

    @property
    def parts(self) -> int:
        return len(self.part_table)

    @functools.cached_property
    def parts_per_batch(self) -> np.ndarray:
        return np.bincount(self.part_table[:, 0], minlength=self.batches)

    @property
    def control_bytes(self) -> int:
        """The ring's control: a slot (plus one) per batch, in whole pages."""
        return page_rounded(8 * self.batches)

    @property
    def slot_bytes(self) -> int:
        """A slot: the largest batch, in whole pages."""
        return page_rounded(self.batch_size * self.shape[1 - self.axis] * np.dtype(self.dtype).itemsize)

    def slot_offset(self, slot: int) -> int:
        return self.control_bytes + slot * self.slot_bytes

    def inflate_piece(self, into: np.ndarray, fd: int, chunk_rows: slice, chunk_cols: slice) -> None:
        """The chunks at ``chunk_rows`` x ``chunk_cols`` into ``into`` (chunks, height, width), row
        after row, read through ``fd``."""
        stored = tuple(a[chunk_rows, chunk_cols].ravel().tolist() for a in (self.offset, self.size, self.mask))
        codecs.inflate_into(memoryview(into.reshape(-1).view(np.uint8)), fd, stored, into[0].nbytes,
                            self.compressed, self.fill)

    def worker(self, fd: int) -> BatchFiller:
        return BatchFiller(self, fd)

    def read_frame(self, part: int, count: int, second: int, read: Callable[[int], bytes]) -> None:
        """A child's frame says part ``part`` is in its slot; it carries nothing else."""
        if count or second:
            raise ValueError(f"part {part} with counts {count}, {second}")

    def to_bytes(self) -> bytes:
        return self.packed(("batch_size", "ring", "parent"), self.others)  # (others: every position)

    @classmethod
    def from_bytes(cls, data: bytes) -> BatchPlan:
        header, offset, size, mask, others = unpack_plan(data)
        return cls(offset=offset, size=size, mask=mask, others=others, **header)


class ParentGone(RuntimeError):
    """The process that gave a child its job has ended: nobody will give it a slot."""


class BatchFiller:
    """Fills parts of a plan's batches in the ring, reading the chunks through ``fd``; it keeps a
    buffer a band wide and the slots it has mapped."""

    def __init__(self, plan: BatchPlan, fd: int):
        self.plan, self.fd = plan, fd
        self.inflated = np.empty((PIECE_CHUNKS, *plan.chunks), dtype=np.dtype(plan.dtype))
        self.control = np.frombuffer(mmap.mmap(plan.ring, plan.control_bytes), dtype=np.int64)
        self.slots: dict[int, np.ndarray] = {}

    def slot_of(self, batch: int) -> int:
        """The slot ``batch`` goes into, once this process's parent has given it one."""
        nap, began = 0.00002, time.monotonic()
        while not (given := int(self.control[batch])):
            if os.getppid() != self.plan.parent:
                raise ParentGone("the parent process has ended")
            time.sleep(nap)
            nap = min(2 * nap, LONGEST_NAP if time.monotonic() - began < IDLE_AFTER else IDLE_NAP)
        return given - 1

    def batch_array(self, batch: int) -> np.ndarray:
        """Where ``batch`` goes: its slot, mapped here, as the batch's shape."""
        plan, slot = self.plan, self.slot_of(batch)
        if slot not in self.slots:
            self.slots[slot] = np.frombuffer(mmap.mmap(plan.ring, plan.slot_bytes, offset=plan.slot_offset(slot)),
                                             dtype=np.dtype(plan.dtype))
        shape = plan.batch_shape(batch)
        return self.slots[slot][:shape[0] * shape[1]].reshape(shape)

    def fill(self, part: int) -> None:
        """Inflate part ``part``'s chunks, about ``PIECE_CHUNKS`` at a time (they stay in the CPU's
        cache until placed), and place their values in its batch."""
        plan = self.plan
        batch, first_row, stop_row = (int(v) for v in plan.part_table[part])
        height, width = plan.chunks
        lines, chunk_cols = plan.batch_lines(batch), plan.batch_chunk_cols(batch)
        into = self.batch_array(batch)
        skip = lines.start if plan.axis == 0 else 0  # (the batch's first row)
        origin = 0 if plan.axis == 0 else lines.start  # (its first column)
        step = max(1, PIECE_CHUNKS // len(chunk_cols))  # (chunk rows inflated at once)
        for r0 in range(first_row, stop_row, step):
            r1 = min(r0 + step, stop_row)
            for a in range(chunk_cols.start, chunk_cols.stop, PIECE_CHUNKS):
                b = min(a + PIECE_CHUNKS, chunk_cols.stop)
                piece = self.inflated[:(r1 - r0) * (b - a)]
                plan.inflate_piece(piece, self.fd, slice(r0, r1), slice(a, b))
                if plan.axis == 1 and r1 * height <= plan.shape[0]:  # (whole chunk rows: placed at once)
                    place_piece(into[r0 * height:r1 * height].reshape(r1 - r0, height, -1),
                                piece.reshape(r1 - r0, b - a, height, width), slice(0, height), a * width - origin)
                    continue
                for k, r in enumerate(range(r0, r1)):
                    top, bottom = r * height, min((r + 1) * height, plan.shape[0])
                    if plan.axis == 0:
                        top, bottom = max(top, lines.start), min(bottom, lines.stop)
                    place_piece(into[top - skip:bottom - skip], piece[k * (b - a):(k + 1) * (b - a)],
                                slice(top - r * height, bottom - r * height), a * width - origin)

    def frame(self, part: int) -> tuple[int, int, list]:
        self.fill(part)
        return 0, 0, []


def place_piece(into: np.ndarray, inflated: np.ndarray, local: slice, first: int) -> None:
    """Rows ``local`` of chunks ``inflated`` (chunks, height, width), side by side, into ``into``
    (those rows, by the batch's columns), where the chunks' first column is the batch's ``first``
    (negative: it begins before the batch); whatever falls outside the batch is left out. Both may
    have leading axes (several chunk rows at once: ``into`` by chunk row, ``inflated`` too)."""
    count, _, width = inflated.shape[-3:]
    n = into.shape[-1]
    whole_first = max(0, -(first // width)) if first < 0 else 0  # (chunks wholly within the batch)
    whole_stop = min(count, (n - first) // width) if n >= first else 0
    if whole_stop > whole_first:
        target = into[..., first + whole_first * width:first + whole_stop * width]
        target.shape = (*target.shape[:-1], whole_stop - whole_first, width)  # (a view, never a copy: else raises)
        target[...] = np.swapaxes(inflated[..., whole_first:whole_stop, local, :], -3, -2)
    for k in [*range(0, min(whole_first, count)), *range(max(whole_stop, whole_first), count)]:  # (cut by an edge)
        start, stop = max(first + k * width, 0), min(first + (k + 1) * width, n)
        if stop > start:
            into[..., start:stop] = inflated[..., k, local, start - first - k * width:stop - first - k * width]
