"""Reading matrix elements: any sorted selection of rows and columns, a strip of chunks at a time.

The work is cut into units of up to ``LARGEST_UNIT`` chunks: a chunk row's worth of the needed
chunks, or part of it (so that a unit's buffer stays in the CPU's cache and even one strip of rows
keeps both workers busy), or, for reads a few chunks wide, several whole chunk rows. A unit's
chunks are fetched, inflated, joined into one ``(chunks, height, width)`` buffer and placed into
the result with one or a few numpy copies, so the per-chunk Python work is a read and an inflate
call. With a :class:`~.storage.ChunkIndex` two workers read the chunks themselves (``os.pread``
and deflate both release the GIL); without one (smaller reads, see :func:`~.storage.chunk_index`)
this thread reads a batch of chunks with ``read_direct_chunk`` and then the workers inflate them.
Reads one to three chunks wide, and a few rows of one chunk row (a single row, say), stay on this
thread: there the hand-overs cost more than the inflating they share. Large reads of a few rows
from each of many chunk rows (or columns of chunk columns) go to the engine's helper processes
instead (:mod:`.picks`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp

from . import codecs, processes
from .codecs import DamagedChunk
from .lines import LinePlan, numpy_name
from .memory import POPULATE_FROM, Populated, Scratch, fresh
from .picks import PickPlan, worth_picking
from .processes import LineJob, PickJob
from .storage import (
    ChunkLayout,
    chunk_grid,
    chunk_index,
    chunk_layout,
    damaged,
    direct_reads,
    groups,
    held_index,
    open_index,
    raw_chunk,
    readable_directly,
    reading,
    refresh,
    reports_closed_file,
)
from .workers import THREADS, on_worker, run_all

STRIP_BYTES = 64 << 20  # dense bytes held at once when writing or scanning
PARALLEL_CHUNKS = 64  # reads of fewer chunks stay on the calling thread and never build an index
UNIT_CHUNKS = 16  # a row strip is split so that units keep at least this many chunks
LARGEST_UNIT = 128  # chunks: wide reads split chunk rows into units of at most this many, narrow
# ones stack whole chunk rows up to it (2 MB for 64 x 64 float32: larger units lost the CPU's cache,
# smaller ones cost more Python work per chunk; measured on row and column scans)
READ_BATCH = 1024  # chunks read by this thread before the workers inflate them (no index)
CLOSE_ROWS = 4  # contiguous storage: rows this close are read in one run with the rows between
MANY_RUNS = 64  # contiguous storage: more runs than this are read as one selection of rows
RUN_BYTES = 1 << 20  # contiguous storage: a run of rows is read in parts of at most this many bytes (in cache)


@dataclass
class _Unit:
    """One or more chunk rows' share of a read: its chunks are fetched, joined and placed together."""

    chunk_row: int  # the first one
    stacked: int  # chunk rows in the unit; more than one only when each is wanted whole
    rows: slice  # positions in the result
    local_rows: slice | np.ndarray  # rows inside the chunk
    first: int  # first needed chunk column (position in the read's list of needed chunk columns)
    stop: int
    cols: slice  # positions in the result
    raws: list | None = None  # (mask, bytes) or None per chunk, when read by the calling thread


class _Columns:
    """How the needed chunk columns map to result columns: a contiguous run, or a gather."""

    def __init__(self, cols: np.ndarray, width: int, height: int):
        self.width, self.height = width, height
        self.groups = groups(cols, width)
        self.chunk_cols = [g[0] for g in self.groups]
        self.contiguous = int(cols[-1]) - int(cols[0]) + 1 == cols.size
        self.chunk_col_array = np.asarray(self.chunk_cols)
        self.first_offset = int(cols[0]) - self.chunk_cols[0] * width
        if not self.contiguous:  # for each result column: its chunk (in the read's list) and column in it
            self.which = np.repeat(np.arange(len(self.groups)), [g[1].stop - g[1].start for g in self.groups])
            self.local = cols - self.chunk_col_array[self.which] * width

    def chunk_cols_between(self, first: int, stop: int) -> slice | np.ndarray:
        """Needed chunk columns ``first:stop`` (positions in this read's list), to index a grid of
        chunks with: a slice when the columns are a run."""
        if self.contiguous:
            return slice(self.chunk_cols[first], self.chunk_cols[first] + stop - first)
        return self.chunk_col_array[first:stop]

    def parts(self, pieces: int) -> list[tuple[int, int, slice]]:
        """Split the needed chunk columns into ``pieces`` runs: (first, stop, result columns)."""
        n = len(self.groups)
        bounds = np.linspace(0, n, min(n, pieces) + 1).astype(int).tolist()
        return [(a, b, slice(self.groups[a][1].start, self.groups[b - 1][1].stop))
                for a, b in zip(bounds[:-1], bounds[1:])]

    def place(self, target: np.ndarray, unit: _Unit, buf: np.ndarray) -> None:
        """Copy the unit's elements from ``buf`` (its chunks, joined, chunk row by chunk row; perhaps
        only the wanted rows) into ``target`` (the unit's share of the result)."""
        chosen = buf.shape[1] != self.height  # inflate kept only the wanted rows
        if chosen or (isinstance(unit.local_rows, slice) and unit.local_rows == slice(0, self.height)):
            part = buf
        else:
            part = buf[:, unit.local_rows, :]
        if not self.contiguous:  # units of a gather are one chunk row each
            part = np.ascontiguousarray(part)
            _, height, w = part.shape
            columns = (self.which[unit.cols] - unit.first) * (height * w) + self.local[unit.cols]
            where = columns[None, :] + (np.arange(height) * w)[:, None]
            if target.dtype == part.dtype:
                np.take(part.reshape(-1), where, out=target, mode="clip")
            else:
                target[...] = np.take(part.reshape(-1), where)
            return
        # as (stacked chunk rows, chunk columns, rows, columns) and (stacked chunk rows, rows, columns)
        k, height, w, ncols = unit.stacked, part.shape[1], self.width, target.shape[1]
        part = part.reshape(k, -1, height, w)
        target = target.reshape(k, height, ncols)  # splitting an axis: always a view
        x, g = 0, 0
        if unit.first == 0 and self.first_offset:  # the run starts inside its first chunk
            x, g = min(w - self.first_offset, ncols), 1
            target[:, :, :x] = part[:, 0, :, self.first_offset:self.first_offset + x]
        full = (ncols - x) // w
        if full:
            dest = target[:, :, x:x + full * w]
            s0, s1, s2 = dest.strides
            dest = np.lib.stride_tricks.as_strided(dest, (k, height, full, w), (s0, s1, w * s2, s2))
            np.copyto(dest, part[:, g:g + full].transpose(0, 2, 1, 3), casting="unsafe")
            x, g = x + full * w, g + full
        if x < ncols:
            target[:, :, x:] = part[:, g, :, :ncols - x]


@reports_closed_file
def read_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
    """Dense ``dataset[np.ix_(rows, cols)]`` for sorted unique ``rows`` and ``cols`` (into ``out`` if given)."""
    new = out is None
    if out is None:
        out = fresh((rows.size, cols.size), dataset.dtype)
    if out.size == 0:
        return out
    layout = chunk_layout(dataset)
    if layout is None:
        return _read_block_h5py(dataset, rows, cols, out)
    if _picked_in_children(dataset, layout, rows, cols, out):
        return out
    with reading(dataset):  # (writes from other threads wait: they would move chunks under the read)
        read = _ChunkRead(dataset, layout, rows, cols)
        if new and out.nbytes >= POPULATE_FROM:
            populated = Populated(out)

            def place(unit: _Unit, buf: np.ndarray) -> None:
                populated.rows(unit.rows)
                read.columns.place(out[unit.rows, unit.cols], unit, buf)

            read.run(place)
        else:
            read.run(lambda unit, buf: read.columns.place(out[unit.rows, unit.cols], unit, buf))
    return out


def _picked_in_children(dataset: h5py.Dataset, layout: ChunkLayout, rows: np.ndarray, cols: np.ndarray,
                        out: np.ndarray) -> bool:
    """Read ``dataset[np.ix_(rows, cols)]`` into ``out`` in the engine's helper processes (:mod:`.picks`)
    when the rows are a few of each of many chunk rows, or the columns of chunk columns; False, with
    nothing read, where that does not pay (fewer than ``MIN_CHUNKS`` chunks; called from a worker),
    where a band's needed chunks would take over ``STRIP_BYTES`` inflated, or children cannot start."""
    (h, w), n, m = layout.chunks, rows.size, cols.size  # (most reads stop here: nothing counted, h5py not asked)
    if min(n, int(rows[-1]) // h - int(rows[0]) // h + 1) * min(m, int(cols[-1]) // w - int(cols[0]) // w + 1) \
            < processes.MIN_CHUNKS:
        return False
    if on_worker() or not readable_directly(dataset):
        return False
    for axis, (lines, others) in enumerate(((rows, cols), (cols, rows))):
        needed = np.unique(others // layout.chunks[1 - axis]).size
        if worth_picking(lines, layout.chunks[axis]) and layout.nbytes * needed <= STRIP_BYTES:
            break
    else:
        return False
    # (children start before the chunks are listed: they load numpy meanwhile)
    with PickJob(np.unique(lines // layout.chunks[axis]).size * needed) as job:
        if not job.children:
            return False
        with direct_reads(dataset) as direct:
            if direct is None:
                return False
            index, fd = direct
            job.begin(PickPlan(chunks=layout.chunks, shape=dataset.shape, axis=axis, dtype=dataset.dtype.str,
                               compressed=layout.compressed, source_fill=layout.fill, lines=lines, others=others,
                               offset=index.offset, size=index.size, mask=index.mask), fd, index.path, index.file_id)
            try:
                job.pick_all(out)
            except DamagedChunk as error:
                raise damaged(dataset, error) from error
    return True


class _ChunkRead:
    """One read: its units, and the fetching, inflating and hand-over of each unit's chunks."""

    def __init__(self, dataset: h5py.Dataset, layout: ChunkLayout, rows: np.ndarray, cols: np.ndarray,
                 whole_rows: bool = False):
        """``whole_rows``: each worker gets every unit of a chunk row, in order (sparse() needs a
        chunk row complete before it takes its non-zeros)."""
        refresh(dataset)
        self.whole_rows = whole_rows
        self.dataset, self.layout = dataset, layout
        h, w = layout.chunks
        self.columns = _Columns(cols, w, h)
        row_groups = [(chunk, 1, pos, local) for chunk, pos, local in groups(rows, h)]
        needed = len(row_groups) * len(self.columns.groups)
        # narrow runs of columns stack several chunk rows per unit: fewer units, less Python work
        # (single columns 1.3x faster since units reuse one buffer; before, stacking them was slower)
        if self.columns.contiguous and 2 * len(self.columns.groups) <= LARGEST_UNIT:
            row_groups = _stack(row_groups, h, LARGEST_UNIT // len(self.columns.groups))
        # workers pay off for many chunks, unless each chunk row gives them just a chunk or two
        # (not from a worker: a read inside a write task stays on that task's thread)
        # (nor for a few rows of one chunk row, a single row say: 4.4 ms a row of 20,000 columns on
        # this thread against 5.6 on both, whose hand-overs of the GIL cost more than they share)
        self.parallel = needed >= PARALLEL_CHUNKS and len(self.columns.groups) >= 4 and not on_worker() \
            and not (len(row_groups) == 1 and _few(row_groups[0][3], h))
        # units of a few chunk columns' width at most; enough of them for every worker
        pieces = max(-(-2 * THREADS // len(row_groups)) if self.parallel and not whole_rows else 1,
                     -(-len(self.columns.groups) // LARGEST_UNIT))
        parts = self.columns.parts(max(1, min(pieces, len(self.columns.groups) // UNIT_CHUNKS)))
        self.units = [_Unit(ri, k, rpos, rloc, a, b, cpos) for ri, k, rpos, rloc in row_groups for a, b, cpos in parts]
        self.index = chunk_index(dataset, needed) if needed >= PARALLEL_CHUNKS else None
        self.fill = layout.fill_bytes()
        self.scratch = Scratch()  # each worker's unit buffer (see inflate)

    def run(self, consume: Callable[[_Unit, np.ndarray], None]) -> None:
        """Call ``consume(unit, buffer)`` for every unit, on worker threads for large reads.

        With an index the workers (this thread and a helper, see :func:`~.workers.run_all`) read,
        inflate and hand over. Without one this thread reads a batch of chunks with HDF5 (which holds
        the GIL) and only then do the workers inflate them: reading while they inflate was slower,
        as the threads queue for the GIL behind each other.
        """
        fd = open_index(self.dataset, self.index) if self.index is not None else None

        def work(task: list[_Unit]) -> None:
            for unit in task:
                if unit.raws is None and fd is None:
                    self.fetch(unit)
                consume(unit, self.inflate(unit, fd))

        try:
            if not self.parallel:
                work(self.units)
                return
            tasks, task, size = [], [], 0  # runs of units, so that each hand-over carries enough chunks
            last = len(self.columns.groups)
            for unit in self.units:
                task.append(unit)
                size += unit.stop - unit.first
                if size >= UNIT_CHUNKS and (unit.stop == last or not self.whole_rows):
                    tasks.append(task)
                    task, size = [], 0
            tasks += [task] if task else []
            if fd is not None:
                run_all([functools.partial(work, task) for task in tasks])
                return
            batch, size = [], 0
            for k, task in enumerate(tasks):
                for unit in task:
                    self.fetch(unit)
                    size += unit.stop - unit.first
                batch.append(functools.partial(work, task))
                if size >= READ_BATCH or k == len(tasks) - 1:
                    run_all(batch)
                    batch, size = [], 0
        except DamagedChunk as error:
            raise damaged(self.dataset, error) from error
        finally:
            if fd is not None:
                os.close(fd)

    def fetch(self, unit: _Unit) -> None:
        """Read the unit's stored chunks on this thread with HDF5."""
        h, w = self.layout.chunks
        unit.raws = [raw_chunk(self.dataset, r * h, c * w)
                     for r in range(unit.chunk_row, unit.chunk_row + unit.stacked)
                     for c in self.columns.chunk_cols[unit.first:unit.stop]]

    def inflate(self, unit: _Unit, fd: int | None) -> np.ndarray:
        """The unit's chunks, inflated and joined: shape (chunks, rows, width), with only the wanted
        rows when they are few (copying whole chunks for a row or two cost more than inflating).
        Whole chunks are joined in this thread's reused buffer, valid until its next unit.

        Each chunk is let go of (or copied in) as soon as it is inflated, so one chunk's worth of
        memory serves them all: holding a unit's inflated chunks until the join made the heap grow
        and shrink back to the system every unit, and the page faults took a third of the time
        of single-row reads.
        """
        decode, fill = self.layout.decode, self.fill
        h, w = self.layout.chunks
        dtype, line = self.layout.dtype, w * self.layout.dtype.itemsize
        rows = unit.local_rows
        wanted = range(h)[rows] if isinstance(rows, slice) else rows.tolist()
        few = _few(rows, h)  # a few rows: join just those (byte ranges of each chunk)
        if unit.raws is None:  # read them from the file through the index
            where = (slice(unit.chunk_row, unit.chunk_row + unit.stacked),
                     self.columns.chunk_cols_between(unit.first, unit.stop))
            stored = tuple(a[where].ravel().tolist() for a in (self.index.offset, self.index.size, self.index.mask))
            count = len(stored[0])
            if not few:  # whole chunks, into this thread's reused buffer
                out = self.scratch.get("unit", (count, h, w), dtype)
                codecs.inflate_into(memoryview(out.reshape(-1).view(np.uint8)), fd, stored, h * line,
                                    self.layout.compressed, fill)
                return out
            chunks = codecs.each_inflated(fd, stored, h * line, self.layout.compressed, fill)
        else:
            raws, unit.raws = unit.raws, None
            chunks = (fill if raw is None else decode(raw[1], raw[0]) for raw in raws)
            count = len(raws)
        if few:
            if isinstance(rows, slice):
                joined = b"".join(data[rows.start * line:rows.stop * line] for data in chunks)
            else:
                joined = b"".join(data[r * line:(r + 1) * line] for data in chunks for r in wanted)
            return np.frombuffer(joined, dtype=dtype).reshape(count, len(wanted), w)
        out = self.scratch.get("unit", (count, h, w), dtype)
        target, size = memoryview(out.reshape(-1).view(np.uint8)), h * line
        for k, data in enumerate(chunks):
            target[k * size:(k + 1) * size] = data
        return out


def _few(local_rows: slice | np.ndarray, height: int) -> bool:
    """Whether ``local_rows`` are a few of a chunk's ``height`` rows: then a unit joins only those."""
    return len(range(height)[local_rows] if isinstance(local_rows, slice) else local_rows) * 4 <= height


def _stack(row_groups: list[tuple], height: int, most: int) -> list[tuple]:
    """Merge runs of consecutive, wholly wanted chunk rows (up to ``most`` each) into one group.

    Fewer, larger units: for a read a few chunks wide the per-unit Python work, not inflating,
    was what took the time (column scans 1.7x faster with units of 128 chunks than of 8).
    """
    whole = slice(0, height)
    merged: list[tuple] = []
    for chunk, one, pos, local in row_groups:
        if merged and isinstance(local, slice) and local == whole:
            first, k, rows, previous = merged[-1]
            if isinstance(previous, slice) and previous == whole and k < most and first + k == chunk \
                    and rows.stop == pos.start:
                merged[-1] = (first, k + 1, slice(rows.start, pos.stop), whole)
                continue
        merged.append((chunk, one, pos, local))
    return merged


def _read_block_h5py(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray, out: np.ndarray) -> np.ndarray:
    """h5py's own path: one bounding-box read per strip of chunk rows (contiguous storage: per run of
    rows close together), then pick the elements."""
    c0, c1 = int(cols[0]), int(cols[-1]) + 1
    cols_contiguous = c1 - c0 == cols.size
    span = max(1, RUN_BYTES // max(1, (c1 - c0) * dataset.dtype.itemsize))  # rows read at once, at most
    if cols_contiguous and int(rows[-1]) - int(rows[0]) + 1 == rows.size:
        r0 = int(rows[0])
        if out.flags.c_contiguous:
            dataset.read_direct(out, np.s_[r0:r0 + rows.size, c0:c1])
            return out
        for a in range(0, rows.size, span):  # (into a reversed view, say: a strip at a time)
            out[a:a + span] = dataset[r0 + a:r0 + min(rows.size, a + span), c0:c1]
        return out
    if dataset.chunks is None:  # (strips of 64 rows read 10x the rows of 500 scattered ones of 5,000)
        starts = np.flatnonzero(np.diff(rows, prepend=-CLOSE_ROWS - 1) > CLOSE_ROWS)
        if starts.size > MANY_RUNS:  # h5py's own selection of the rows, one read (500 rows: 6 ms, by run 9)
            if cols_contiguous and out.flags.c_contiguous:
                dataset.read_direct(out, np.s_[rows, c0:c1])
            else:
                block = dataset[rows, c0:c1]
                out[...] = block if cols_contiguous else block[:, cols - c0]
            return out
        runs = []
        for a, b in zip(starts.tolist(), [*starts[1:].tolist(), rows.size]):
            while a < b:  # (every 4th row of 40,000 would be one read of all of them)
                stop = a + int(np.searchsorted(rows[a:b], rows[a] + span))
                runs.append(slice(a, stop))
                a = stop
    else:
        runs = [part for _, part, _ in groups(rows, dataset.chunks[0])]
    for part in runs:
        r = rows[part]
        r0, r1 = int(r[0]), int(r[-1]) + 1
        block = dataset[r0:r1, c0:c1]
        out[part] = block[r - r0] if cols_contiguous else block[np.ix_(r - r0, cols - c0)]
    return out


@reports_closed_file
def each_row_block(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray,
                   handle: Callable[[int, int, np.ndarray], None]) -> None:
    """Call ``handle(k, first, block)`` with ``dataset[np.ix_(rows, cols)]`` a chunk row at a time:
    ``block`` holds the ``k``-th group of rows, result rows ``first`` onwards, all of ``cols``.

    For large reads the calls come from worker threads, in any order, each right after its block
    is assembled (still in the CPU's cache). Blocks are reused: ``handle`` must not keep them.
    """
    if rows.size == 0 or cols.size == 0:
        return
    layout = chunk_layout(dataset)
    if layout is None:
        step = max(64, STRIP_BYTES // max(1, cols.size * dataset.dtype.itemsize))
        for k, a in enumerate(range(0, rows.size, step)):
            block = np.empty((rows[a:a + step].size, cols.size), dataset.dtype)
            handle(k, a, _read_block_h5py(dataset, rows[a:a + step], cols, block))
        return
    with held_index(dataset):  # (which also keeps writes from other threads out)
        read = _ChunkRead(dataset, layout, rows, cols, whole_rows=True)
        last = len(read.columns.groups)
        number = {id(unit): k for k, unit in enumerate(u for u in read.units if u.stop == last)}
        scratch = Scratch()  # each worker's block, reused chunk row after chunk row

        def consume(unit: _Unit, buf: np.ndarray) -> None:
            block = scratch.get("block", (unit.rows.stop - unit.rows.start, cols.size), dataset.dtype)
            read.columns.place(block[:, unit.cols], unit, buf)
            if unit.stop == last:  # the chunk row is complete
                handle(number[id(unit)], unit.rows.start, block)

        read.run(consume)


@reports_closed_file
def reduce_lines(dataset: h5py.Dataset, axis: int, functions: list[Callable], others: np.ndarray,
                 result_dtypes: list[np.dtype]) -> list[np.ndarray] | None:
    """Each of ``functions`` (numpy reductions) on every row (``axis`` 0) or column (1) of
    ``dataset``, taken at ``others`` (positions on the other axis, in the order and with the
    repeats each line is taken in), as arrays of ``result_dtypes``: exactly the values each
    function gives for each line alone. None, with nothing done, where chunks cannot be read
    directly (the caller reads batches instead).

    A chunk row or column is reduced as its chunks are inflated (:mod:`.lines`): in the engine's
    helper processes for large matrices, else (and for parts a failed helper did not give) on the
    workers.
    """
    layout = chunk_layout(dataset)
    names = [numpy_name(f) for f in functions]
    if layout is None or None in names or not readable_directly(dataset) or not others.size:
        return None
    needed = np.unique(others // layout.chunks[1 - axis]).size
    if layout.nbytes * needed > STRIP_BYTES:  # a band is held inflated (twice): past this, batches
        return None
    results = [np.empty(dataset.shape[axis], dtype=d) for d in result_dtypes]
    # (children start before the chunks are listed: they load numpy meanwhile)
    with LineJob(chunk_grid(dataset)[axis] * needed) as job, direct_reads(dataset) as direct:
        if direct is None:
            return None
        index, fd = direct
        job.begin(LinePlan(chunks=layout.chunks, shape=dataset.shape, axis=axis, dtype=dataset.dtype.str,
                           compressed=layout.compressed, source_fill=layout.fill, functions=names,
                           result_dtypes=[r.dtype.str for r in results], others=others, offset=index.offset,
                           size=index.size, mask=index.mask), fd, index.path, index.file_id)
        try:
            job.reduce_all(results)
        except DamagedChunk as error:
            raise damaged(dataset, error) from error
    return results


@reports_closed_file
def read_sparse(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
    """``dataset[np.ix_(rows, cols)]`` as a COO matrix in the stored dtype, entries in row-major order.

    The non-zeros of each chunk row are taken right after it is assembled (on the workers, in a
    small reused block), so no dense strip of the whole width is ever built.
    scipy.sparse has no float16: such layers come back as float32 (exactly the same values).
    """
    shape = (rows.size, cols.size)
    dtype = np.dtype(np.float32) if dataset.dtype == np.float16 else dataset.dtype.newbyteorder("=")  # (scipy)
    index = np.int32 if max(shape) < 2**31 else np.int64  # what scipy would convert to anyway
    collected = _Collector(index, dtype)
    each_row_block(dataset, rows, cols,
                   lambda k, first, block: collected.add(k, _entries(block, first, index, dtype)))
    r, c, v = collected.result()
    return sp.coo_matrix((v, (r, c)), shape=shape, dtype=dtype)


class _Collector:
    """Entries of numbered parts, appended in part order as soon as they can be, into arrays that
    grow in place (``ndarray.resize``: no copying of what is there), so parts are freed early and
    nothing is concatenated at the end."""

    def __init__(self, index: type, dtype: np.dtype):
        self.arrays = [np.empty(1 << 16, dtype=index), np.empty(1 << 16, dtype=index), np.empty(1 << 16, dtype=dtype)]
        self.size, self.next, self.waiting = 0, 0, {}
        self.lock = threading.Lock()

    def add(self, number: int, part: tuple[np.ndarray, ...]) -> None:
        with self.lock:
            self.waiting[number] = part
            while self.next in self.waiting:
                part = self.waiting.pop(self.next)
                n = part[0].size
                if self.size + n > self.arrays[0].size:
                    capacity = max(2 * self.arrays[0].size, self.size + n)
                    for array in self.arrays:
                        array.resize(capacity, refcheck=False)
                for array, values in zip(self.arrays, part):
                    array[self.size:self.size + n] = values
                self.size += n
                self.next += 1

    def result(self) -> list[np.ndarray]:
        for array in self.arrays:
            array.resize(self.size, refcheck=False)
        return self.arrays


def _entries(block: np.ndarray, first_row: int, index: type, dtype: np.dtype) -> tuple[np.ndarray, ...]:
    """Row, column and value of every non-zero of ``block`` (rows numbered from ``first_row``), row-major."""
    flat = np.flatnonzero(block != 0)  # a boolean mask first: numpy finds its non-zeros ~3x faster
    width = block.shape[1]
    bounds = np.searchsorted(flat, np.arange(block.shape[0] + 1) * width)
    per_row = np.diff(bounds)
    r = np.repeat(np.arange(first_row, first_row + block.shape[0], dtype=index), per_row)
    c = (flat - np.repeat(np.arange(block.shape[0]) * width, per_row)).astype(index)
    return r, c, block.ravel()[flat].astype(dtype, copy=False)
