"""A few rows from each of many chunk rows (``ds[rows, :]`` for 500 random rows, or a gene mask),
or a few columns from each of many chunk columns: inflated and picked in the engine's helper
processes (:mod:`.processes`), which send back only the wanted values.

Such a read inflates most of the matrix to keep a small part of it. On the engine's threads the
hundred thousand inflate calls each hand the GIL over, so two threads did little better than one:
500 random rows of 20,000 x 20,000 float32 took 0.98-1.13 s, where the file's chunks inflate in
0.27 s per core in two processes. Only the picked values cross back (a band's share of the result:
its few wanted lines, each at the wanted positions of the other axis).

The children run this module (see :mod:`.child`): it imports numpy and :mod:`.codecs` only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .child import BandedPlan, placed, unpack_plan

MIN_PART_CHUNKS = 64  # a part is as many bands holding wanted lines as hold at least this many needed chunks
MIN_PARTS = 8  # but there are at least this many parts where there are bands enough (the helpers share them)
PART_COLUMNS = 64  # and, for columns, about this many wanted ones (placed in the result's rows a part at a
# time: a few columns at a time took 0.48 s of 2,000 random columns' 1.2 s)
MOST_PICKED = 0.25  # lines are picked in children when at most this share of their bands' lines is wanted
# (rows of 20,000 x 20,000 float32, a fraction of them at random: 1/64 took 0.49 s in children
# against 0.77-0.80 on threads, 1/4 1.0 s against 1.5, 1/2 2.3-2.6 s against 1.3-1.7)


def worth_picking(lines: np.ndarray, depth: int) -> bool:
    """Whether ``lines`` (rows or columns: sorted, unique) are few in the bands (chunk rows or
    columns, ``depth`` lines each) that hold them, so that most of what is inflated would be thrown
    away: then children pay off, as only the wanted values cross back."""
    return 0 < lines.size <= MOST_PICKED * np.unique(lines // depth).size * depth


@dataclass
class PickPlan(BandedPlan):
    """Everything needed to read rows (``axis`` 0) or columns (1) ``lines`` at positions ``others``
    on the other axis (both sorted, unique) of a matrix. A part is one or more bands (chunk rows or
    columns) holding wanted lines; its result is its share of the result, rows by columns."""

    KIND = "picks"  # (see .child.plan_class)

    lines: np.ndarray
    bands_per_part: int = 0  # 0: see __post_init__ (decided here, sent to the children)

    def __post_init__(self) -> None:
        if not self.bands_per_part:
            by_chunks = -(-MIN_PART_CHUNKS // max(1, self.needed.size))
            by_columns = -(-PART_COLUMNS * self.bands.size // self.lines.size) if self.axis == 1 else 1
            at_most = -(-self.bands.size // MIN_PARTS)  # (so that there are MIN_PARTS parts)
            self.bands_per_part = max(1, min(at_most, max(by_chunks, by_columns)))

    @functools.cached_property
    def bands(self) -> np.ndarray:
        """The bands that hold ``lines``."""
        return np.unique(self.lines // self.depth)

    @functools.cached_property
    def band_starts(self) -> np.ndarray:
        """Where each of ``bands`` begins in ``lines`` (and, last, the number of lines)."""
        return np.searchsorted(self.lines, np.append(self.bands, self.bands[-1] + 1) * self.depth)

    @property
    def parts(self) -> int:
        return -(-self.bands.size // self.bands_per_part)

    def part_lines(self, number: int) -> range:
        """Positions in ``lines`` (and so in the result) of part ``number``'s lines."""
        first = number * self.bands_per_part
        stop = min(first + self.bands_per_part, self.bands.size)
        return range(int(self.band_starts[first]), int(self.band_starts[stop]))

    def worker(self, fd: int) -> LinePicker:
        return LinePicker(self, fd)

    def read_frame(self, part: int, lines: int, width: int, read: Callable[[int], bytes]) -> np.ndarray:
        """A child's block for ``part``: its share of the result, rows by columns (frame counts:
        ``lines`` lines of ``width`` values; ``read(n)`` gives the payload's next ``n`` bytes);
        ValueError when the counts do not fit."""
        if lines != len(self.part_lines(part)) or width != self.others.size:
            raise ValueError(f"part {part} with {lines} lines of {width} values")
        dtype = np.dtype(self.dtype)
        block = np.frombuffer(read(lines * width * dtype.itemsize), dtype=dtype)
        return block.reshape((lines, width) if self.axis == 0 else (width, lines))

    def to_bytes(self) -> bytes:
        return self.packed(("bands_per_part",), np.concatenate([self.lines, self.others]), lines=self.lines.size)

    @classmethod
    def from_bytes(cls, data: bytes) -> PickPlan:
        header, offset, size, mask, both = unpack_plan(data)
        count = header.pop("lines")
        return cls(offset=offset, size=size, mask=mask, lines=both[:count], others=both[count:], **header)


class LinePicker:
    """Picks the lines of a plan's parts, reading the chunks through ``fd``; it keeps a buffer a
    band wide."""

    def __init__(self, plan: PickPlan, fd: int):
        self.plan, self.fd = plan, fd
        self.inflated = np.empty((plan.needed.size, *plan.chunks), dtype=np.dtype(plan.dtype))  # a band's chunks
        self.run, self.local = placed(plan)  # (where the ``others`` are in the joined chunks)

    def pick(self, part: int) -> np.ndarray:
        """Part ``part``'s share of the result, rows by columns, C-ordered: its lines at the plan's
        ``others`` (columns: copied to rows by columns here, in the child, rather than by the parent
        as it places them)."""
        plan = self.plan
        lines = plan.part_lines(part)
        block = np.empty((len(lines), plan.others.size), dtype=self.inflated.dtype)
        first_band = part * plan.bands_per_part
        for k in range(first_band, min(first_band + plan.bands_per_part, plan.bands.size)):
            band = int(plan.bands[k])
            a, b = int(plan.band_starts[k]), int(plan.band_starts[k + 1])
            plan.inflate_band(self.inflated, self.fd, band)
            local = plan.lines[a:b] - band * plan.depth
            if plan.axis == 0:  # the rows, each across the band's chunks side by side
                joined = self.inflated[:, local, :].transpose(1, 0, 2).reshape(b - a, -1)
            else:  # the columns, each down the band's chunks one under another
                joined = self.inflated[:, :, local].transpose(2, 0, 1).reshape(b - a, -1)
            target = block[a - lines.start:b - lines.start]
            if self.run is not None:
                target[...] = joined[:, self.run]
            else:
                np.take(joined, self.local, axis=1, out=target, mode="clip")
        return block if plan.axis == 0 else np.ascontiguousarray(block.T)

    def result(self, part: int) -> np.ndarray:
        """What :meth:`PickPlan.read_frame` makes of a child's frame for ``part``: :meth:`pick`'s."""
        return self.pick(part)

    def frame(self, part: int) -> tuple[int, int, list]:
        """Part ``part`` as a child sends it: counts and payload for :meth:`PickPlan.read_frame`."""
        block = self.pick(part)
        lines, width = block.shape if self.plan.axis == 0 else block.shape[::-1]
        return lines, width, [memoryview(block.reshape(-1).view(np.uint8))]
