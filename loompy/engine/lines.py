"""numpy reductions of every row or every column (map with np.mean, np.std, np.sum, ...), a chunk
row or chunk column (a *band*) at a time, where its chunks are inflated: in the engine's helper
processes for large matrices (:mod:`.processes`), on this process's threads otherwise
(:func:`.read.reduce_lines`).

In helper processes, map([np.mean, np.std]) over the rows of 20,000 x 20,000 float32 took
0.74-0.82 s where two threads took 0.81-0.87 s in the same calm hour, and 1.27-1.35 s in a busy
one (the helpers still 0.74-0.82 s): the threads' hundred thousand inflate calls each hand the GIL
over. Only the values cross back (a few bytes per line).

Each line (row or column) is reduced from a contiguous copy of its values, so every value is
exactly what the function gives for that line alone, as loompy 3's map gives it.

The children run this module (see :mod:`.child`): it imports numpy and :mod:`.codecs` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .child import BandedPlan, placed, unpack_plan

CACHE_BYTES = 1 << 20  # rows reduced together: numpy's passes over them stay in the CPU's cache
SLAB_BYTES = CACHE_BYTES // 2  # rows joined at once in helper processes (with numpy's temporary, in the cache)
TRANSPOSED_CHUNKS = 2  # chunks a column band is joined by at once (each pair stays in the CPU's cache)
WHOLE_BAND_BYTES = 8 << 20  # column bands up to this size are joined whole (a copy held beside the band)
PART_CHUNKS = 64  # narrow matrices: a part is as many whole bands as hold at most this many chunks (at least one)

# numpy 2 lets np.std and np.var take the means they would compute first (``mean=``): the same
# values with one pass fewer over the data, when np.mean is asked for as well (map's 0.28 s of
# worker time for np.mean and np.std over 20,000 x 20,000 float32 became 0.21 s)
_FROM_MEAN = {np.std, np.var} if int(np.__version__.split(".")[0]) >= 2 else set()


def reduce_block(functions: list[Callable], block: np.ndarray) -> list[np.ndarray]:
    """Each of ``functions`` (numpy reductions) on every row of ``block``, a few rows at a time (they
    stay in the CPU's cache: 1.6x faster than one pass over a block far larger than it); np.std
    and np.var start from np.mean's values when it is asked for too. Rows must be contiguous: then
    each value is exactly what the function gives for that row alone."""
    share = np.mean in functions and any(f in _FROM_MEAN for f in functions) and \
        block.dtype.kind in "fiu" and block.dtype != np.float16  # (float16: numpy's mean sums in float32)
    step = max(1, CACHE_BYTES // max(1, block.shape[1] * block.dtype.itemsize))
    parts: list[list[np.ndarray]] = [[] for _ in functions]
    for a in range(0, block.shape[0], step):
        rows = block[a:a + step]
        mean = np.mean(rows, axis=1, keepdims=True) if share else None
        for part, f in zip(parts, functions):
            if share and f is np.mean:
                part.append(mean[:, 0])
            elif share and f in _FROM_MEAN:
                part.append(f(rows, axis=1, mean=mean))
            else:
                part.append(np.asarray(f(rows, axis=1)))
    return [np.concatenate(part) for part in parts]


def reduce_columns(functions: list[Callable], block: np.ndarray) -> list[np.ndarray]:
    """:func:`reduce_block` on every column of ``block``: a few columns at a time are copied into
    contiguous lines (in a buffer that stays in the CPU's cache), so each value is exactly what the
    function gives for that column alone (not what a sum down the whole block would give)."""
    step = max(1, SLAB_BYTES // max(1, block.shape[0] * block.dtype.itemsize))
    slab = np.empty((min(step, block.shape[1]), block.shape[0]), dtype=block.dtype)
    parts: list[list[np.ndarray]] = [[] for _ in functions]
    for a in range(0, block.shape[1], step):
        lines = slab[:min(step, block.shape[1] - a)]
        np.copyto(lines, block[:, a:a + step].T)
        for part, values in zip(parts, reduce_block(functions, lines)):
            part.append(values)
    return [np.concatenate(part) if part else np.zeros(0) for part in parts]


def numpy_name(f: Callable) -> str | None:
    """The name ``f`` has in numpy's namespace (how a function crosses to a child), or None."""
    name = getattr(f, "__name__", None)
    return name if isinstance(name, str) and getattr(np, name, None) is f else None


@dataclass
class LinePlan(BandedPlan):
    """Everything needed to reduce every row (``axis`` 0) or column (1) of a matrix, each taken at
    ``others`` (repeats allowed): the functions (numpy's, by name) with the dtypes their values are
    returned in."""

    KIND = "lines"  # (see .child.plan_class)

    functions: list[str]
    result_dtypes: list[str]
    bands_per_part: int = 0  # 0: as many as hold PART_CHUNKS chunks (decided here, sent to the children)

    def __post_init__(self) -> None:
        if not self.bands_per_part:
            self.bands_per_part = max(1, PART_CHUNKS // max(1, self.needed.size))

    @property
    def bands(self) -> int:
        return -(-self.shape[self.axis] // self.depth)

    @property
    def parts(self) -> int:
        return -(-self.bands // self.bands_per_part)

    def part_bands(self, number: int) -> range:
        """The bands of part ``number``."""
        first = number * self.bands_per_part
        return range(first, min(first + self.bands_per_part, self.bands))

    def part_lines(self, number: int) -> range:
        """The lines of part ``number``."""
        bands = self.part_bands(number)
        return range(bands.start * self.depth, min(bands.stop * self.depth, self.shape[self.axis]))

    def worker(self, fd: int) -> LineReducer:
        return LineReducer(self, fd)

    def read_frame(self, part: int, lines: int, arrays: int, read: Callable[[int], bytes]) -> list[np.ndarray]:
        """A child's values for ``part`` (frame counts: ``lines``, and ``arrays``, one per function;
        ``read(n)`` gives the payload's next ``n`` bytes), one array per function; ValueError when
        the counts do not fit."""
        if lines != len(self.part_lines(part)) or arrays != len(self.functions):
            raise ValueError(f"part {part} with {lines} lines and {arrays} functions")
        return [np.frombuffer(read(lines * np.dtype(d).itemsize), dtype=d) for d in self.result_dtypes]

    def to_bytes(self) -> bytes:
        return self.packed(("functions", "result_dtypes", "bands_per_part"), self.others)

    @classmethod
    def from_bytes(cls, data: bytes) -> LinePlan:
        header, offset, size, mask, others = unpack_plan(data)
        return cls(offset=offset, size=size, mask=mask, others=others, **header)


class LineReducer:
    """Reduces the lines of a plan's parts, reading the chunks through ``fd``; it keeps buffers a
    band wide."""

    def __init__(self, plan: LinePlan, fd: int):
        self.plan, self.fd = plan, fd
        self.functions = [getattr(np, name) for name in plan.functions]
        h, w = plan.chunks
        dtype = np.dtype(plan.dtype)
        needed, across = plan.needed, plan.chunks[1 - plan.axis]
        self.inflated = np.empty((needed.size, h, w), dtype=dtype)  # a band's chunks
        # rows: a few lines at a time are joined from the band's chunks and reduced: with numpy's
        # temporary they stay in the CPU's cache (4% less CPU than joining the whole band first);
        # columns: the whole band is joined first, two chunks at a time, each pair transposed while
        # in the CPU's cache (0.6-0.8 ms a band of the benchmark matrix, against 1.1 ms taking a few
        # columns of every chunk at a time; map over columns 7% less CPU in all), when that copy of
        # the band is small enough (WHOLE_BAND_BYTES), else a few columns at a time as rows are
        self.whole = plan.axis == 1 and self.inflated.nbytes <= WHOLE_BAND_BYTES
        self.step = max(1, SLAB_BYTES // (needed.size * across * dtype.itemsize))
        self.slab = np.empty((plan.depth if self.whole else min(self.step, plan.depth), needed.size * across),
                             dtype=dtype)
        self.run, self.local = placed(plan)  # (where the lines' positions are in the joined chunks)
        if self.run is None:
            self.gathered = np.empty((self.slab.shape[0], plan.others.size), dtype=dtype)

    def reduce(self, part: int) -> list[np.ndarray]:
        """Each function's values for the lines of part ``part``, in its result dtype."""
        plan, depth = self.plan, self.plan.depth
        values: list[list[np.ndarray]] = [[] for _ in self.functions]
        for band in plan.part_bands(part):
            plan.inflate_band(self.inflated, self.fd, band)
            for slab in self._joined(min(depth, plan.shape[plan.axis] - band * depth)):
                if self.run is not None:
                    block = slab[:, self.run]
                else:
                    block = self.gathered[:len(slab)]
                    np.take(slab, self.local, axis=1, out=block, mode="clip")
                for line_values, v in zip(values, reduce_block(self.functions, block)):
                    line_values.append(v)
        return [np.concatenate(v).astype(d, copy=False) for v, d in zip(values, plan.result_dtypes)]

    def _joined(self, lines: int) -> Iterator[np.ndarray]:
        """The first ``lines`` lines of the band just inflated, each one contiguous: a few at a time,
        or for columns all at once (see ``WHOLE_BAND_BYTES``)."""
        h, w = self.plan.chunks
        if self.whole:
            joined = self.slab.reshape(w, -1, h)
            for c in range(0, len(self.inflated), TRANSPOSED_CHUNKS):
                joined[:, c:c + TRANSPOSED_CHUNKS] = self.inflated[c:c + TRANSPOSED_CHUNKS].transpose(2, 0, 1)
            yield self.slab[:lines]
            return
        for a in range(0, lines, self.step):
            n = min(self.step, lines - a)
            slab = self.slab[:n]
            if self.plan.axis == 0:  # rows a:a+n of every chunk, side by side
                slab.reshape(n, -1, w)[...] = self.inflated[:, a:a + n].transpose(1, 0, 2)
            else:  # columns a:a+n of every chunk, one under another
                slab.reshape(n, -1, h)[...] = self.inflated[:, :, a:a + n].transpose(2, 0, 1)
            yield slab

    def result(self, part: int) -> list[np.ndarray]:
        """What :meth:`LinePlan.read_frame` makes of a child's frame for ``part``: :meth:`reduce`'s."""
        return self.reduce(part)

    def frame(self, part: int) -> tuple[int, int, list[bytes]]:
        """Part ``part`` as a child sends it: counts and payload for :meth:`LinePlan.read_frame`."""
        values = self.reduce(part)
        return len(values[0]), len(values), [np.ascontiguousarray(v).tobytes() for v in values]
