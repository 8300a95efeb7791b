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

from .child import BandedPlan, unpack_plan

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

    @functools.cached_property
    def part_table(self) -> np.ndarray:
        """For every part, its batch and its band, in the order parts are claimed (batch by batch)."""
        rows = []
        for batch in range(self.batches):
            lines = self.batch_lines(batch)
            rows += [(batch, band) for band in range(lines.start // self.depth, (lines.stop - 1) // self.depth + 1)]
        return np.array(rows, dtype=np.int64).reshape(-1, 2)

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

    def worker(self, fd: int) -> BatchFiller:
        return BatchFiller(self, fd)

    def read_frame(self, part: int, count: int, second: int, read: Callable[[int], bytes]) -> None:
        """A child's frame says part ``part`` is in its slot; it carries nothing else."""
        if count or second:
            raise ValueError(f"part {part} with counts {count}, {second}")

    def to_bytes(self) -> bytes:
        return self.packed(("batch_size", "ring", "parent"), self.others)

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
        self.inflated = np.empty((plan.needed.size, *plan.chunks), dtype=np.dtype(plan.dtype))
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
        """Inflate part ``part``'s band and place its lines in its batch."""
        plan = self.plan
        batch, band = (int(v) for v in plan.part_table[part])
        plan.inflate_band(self.inflated, self.fd, band)
        lines = plan.batch_lines(batch)
        first, stop = max(band * plan.depth, lines.start), min((band + 1) * plan.depth, lines.stop)
        local = slice(first - band * plan.depth, stop - band * plan.depth)
        into = self.batch_array(batch)
        into = into[first - lines.start:stop - lines.start] if plan.axis == 0 else \
            into[:, first - lines.start:stop - lines.start]
        place_band(into, self.inflated, local, plan.axis)

    def result(self, part: int) -> None:
        self.fill(part)

    def frame(self, part: int) -> tuple[int, int, list]:
        self.fill(part)
        return 0, 0, []


def place_band(into: np.ndarray, inflated: np.ndarray, local: slice, axis: int) -> None:
    """Lines ``local`` of a band's chunks ``inflated`` (chunks, height, width: side by side for
    rows, ``axis`` 0, one under another for columns) into ``into`` (those lines, across the whole
    other axis)."""
    count, height, width = inflated.shape
    if axis == 0:
        whole = into.shape[1] // width  # (chunks entirely within the matrix; the last may not be)
        target = into[:, :whole * width]
        target.shape = (target.shape[0], whole, width)  # (a view, never a copy: else this raises)
        target[...] = inflated[:whole, local].transpose(1, 0, 2)
        if whole < count:
            into[:, whole * width:] = inflated[whole, local, :into.shape[1] - whole * width]
    else:
        whole = into.shape[0] // height
        target = into[:whole * height]
        target.shape = (whole, height, target.shape[1])
        target[...] = inflated[:whole, :, local]
        if whole < count:
            into[whole * height:] = inflated[whole, :into.shape[0] - whole * height, local]
