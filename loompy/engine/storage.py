"""Where a dataset's chunks are and how to get their stored bytes: what the read and write paths share.

Two ways to reach a chunk's bytes. ``read_direct_chunk`` asks HDF5 for one chunk at a time (about
3.5 us each, holding the GIL). A :class:`ChunkIndex` lists every chunk's file offset, size and filter
mask, read from HDF5's B-tree in the file (:mod:`.btree`, about 0.3 us per chunk) or else from one
``chunk_iter`` pass (about 1.5 us per chunk); with it, worker threads read chunks with
``os.pread``, which releases the GIL. An index is built once reads have asked for a tenth of a
dataset's chunks and kept until loompy next writes to that dataset (every engine write calls
:func:`forget` first) or the file is closed (HDF5 numbers each opening of a file afresh), or, in a
file open for writing, until the file's size or free space has changed (h5py moved chunks) or
the name leads to another dataset (h5py renamed one): see :func:`_moved`.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import h5py
import numpy as np

from .. import forks
from ..errors import LoomFileError
from ..handles import SharedOrAlone, closed_meanwhile, forget_changes, reads_held, would_wait_for_own_read
from . import btree, codecs
from .workers import on_worker

INDEX_SHARE = 10  # build an index once a tenth of a dataset's chunks have been asked for: listing
# costs about 0.3 us a chunk of the dataset, a chunk read through HDF5 2.5-7 us more than through the
# index (200 single rows of the benchmark matrix: 0.62-0.71 s, against 0.71-0.75 s waiting for a third)
CACHED_INDEXES = 8  # indexes kept at once (each about 24 bytes per chunk)


@dataclass(frozen=True)
class ChunkLayout:
    """What the fast path needs to know about a dataset's storage."""

    chunks: tuple[int, int]
    dtype: np.dtype
    level: int | None  # the deflate level; None when chunks are stored as they are
    fill: float | int

    @property
    def compressed(self) -> bool:
        return self.level is not None

    @property
    def nbytes(self) -> int:
        return self.chunks[0] * self.chunks[1] * self.dtype.itemsize

    def decode(self, data: bytes, mask: int) -> bytes:
        return codecs.decode(data, self.nbytes, self.compressed, mask)

    def fill_bytes(self) -> bytes:
        return codecs.fill_bytes(self.chunks, self.fill, self.dtype)


@dataclass(frozen=True)
class _Facts:
    """What never changes about a dataset while an h5py object of it exists (kept on that object:
    asking h5py again took 45 us per read, a tenth of a small read)."""

    layout: ChunkLayout | None
    writable: bool  # its file is open for writing: raw reads must first see what HDF5 still caches


_FACTS = "_loompy_facts"  # (the attribute of the h5py.Dataset holding them)


def _facts(dataset: h5py.Dataset) -> _Facts:
    facts = dataset.__dict__.get(_FACTS)
    if facts is None:
        facts = _Facts(_layout_of(dataset), dataset.file.mode == "r+")
        dataset.__dict__[_FACTS] = facts
    return facts


def chunk_layout(dataset: h5py.Dataset) -> ChunkLayout | None:
    """The dataset's layout when the fast path can handle it, else None (use h5py)."""
    return _facts(dataset).layout


def _layout_of(dataset: h5py.Dataset) -> ChunkLayout | None:
    if dataset.chunks is None or dataset.ndim != 2 or dataset.dtype.kind not in "iuf":
        return None
    dcpl = dataset.id.get_create_plist()
    filters = [dcpl.get_filter(i)[:3:2] for i in range(dcpl.get_nfilters())]
    if not codecs.supported_pipeline(filters):
        return None
    level = int(filters[0][1][0]) if filters and filters[0][1] else (4 if filters else None)
    return ChunkLayout(tuple(dataset.chunks), dataset.dtype, level, dataset.fillvalue)


def groups(indices: np.ndarray, size: int) -> list[tuple[int, slice, slice | np.ndarray]]:
    """Split sorted indices by chunk: (chunk number, positions in the result, offsets inside the chunk)."""
    first, stop = (int(indices[0]), int(indices[-1]) + 1) if indices.size else (0, 0)
    if stop - first == indices.size:  # a run (a whole axis, say): bounds by arithmetic, 2-3x faster
        chunks = np.arange(first // size, -(-stop // size))
        starts = chunks * size
        lo, hi = np.maximum(starts, first), np.minimum(starts + size, stop)
        return [(chunk, slice(a, b), slice(c, d)) for chunk, a, b, c, d in
                zip(chunks.tolist(), (lo - first).tolist(), (hi - first).tolist(), (lo - starts).tolist(),
                    (hi - starts).tolist())]
    ids = indices // size
    bounds = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [indices.size]])
    out = []
    for a, b in zip(starts.tolist(), stops.tolist()):
        chunk = int(ids[a])
        local = indices[a:b] - chunk * size
        if int(local[-1]) - int(local[0]) + 1 == b - a:
            local = slice(int(local[0]), int(local[-1]) + 1)
        out.append((chunk, slice(a, b), local))
    return out


def raw_chunk(dataset: h5py.Dataset, row: int, col: int) -> tuple[int, bytes] | None:
    """(filter mask, stored bytes) of the chunk at element (row, col), or None when it was never written.

    Raises :class:`~loompy.errors.LoomFileError` when the chunk exists but cannot be read (a damaged
    or truncated file): such a chunk must never read as the fill value.
    """
    try:
        return dataset.id.read_direct_chunk((row, col))
    except MemoryError:  # h5py's answer when HDF5 gives a stored size of 0: never written
        return None
    except (OSError, KeyError, RuntimeError) as error:  # never written (so HDF5 says), or worse
        if "not allocated" in str(error) or _unallocated(dataset, row, col) or _no_storage(dataset):
            return None
        raise LoomFileError(f"{dataset.file.filename}: the chunk of {dataset.name} at ({row}, {col}) "
                            f"cannot be read (is the file damaged or truncated?): {error}") from error


def damaged(dataset: h5py.Dataset, error: Exception) -> LoomFileError:
    """The error to raise for a chunk of ``dataset`` that cannot be read (see :class:`~.codecs.DamagedChunk`)."""
    return LoomFileError(f"{dataset.file.filename}: {dataset.name}: {error}; the file is damaged (or, read "
                         "without file locks, another program was writing it: read it once that program is done)")


def _unallocated(dataset: h5py.Dataset, row: int, col: int) -> bool:
    """Whether HDF5's chunk index says the chunk at (row, col) was never written (slow: walks the index)."""
    if not btree.chunk_queries_trusted(dataset):
        return False
    try:
        return dataset.id.get_chunk_info_by_coord((row, col)).byte_offset is None
    except (OSError, KeyError, RuntimeError, ValueError):
        return False


def _no_storage(dataset: h5py.Dataset) -> bool:
    """Whether HDF5 never stored any chunk of the dataset (an all-zero layer, say), so that none can be
    damaged: HDF5 then says "storage is not initialized", and where :func:`_unallocated` cannot ask
    (no ``os.pread``: Windows) every read of it was taken for a damaged file."""
    try:
        return dataset.id.get_storage_size() == 0
    except (OSError, RuntimeError, ValueError):
        return False


def refresh(dataset: h5py.Dataset) -> None:
    """Make writes still in HDF5's chunk cache (and its index) visible to raw chunk reads. In a file
    inherited from the process this one was forked from, refuse instead if that process has written
    to it since (see :mod:`loompy.forks`)."""
    if not _facts(dataset).writable:
        return
    file = dataset.file
    if forks.inherited(file):
        forks.check_unchanged(file)
    else:
        dataset.flush()


def chunk_grid(dataset: h5py.Dataset) -> tuple[int, int]:
    """How many chunks the dataset has along each axis."""
    (n, m), (h, w) = dataset.shape, dataset.chunks
    return -(-n // h), -(-m // w)


def _listing(dataset: h5py.Dataset) -> np.ndarray | None:
    """One row per stored chunk (chunk row, chunk column, byte offset, size, filter mask), read from
    HDF5's B-tree in the file (:mod:`.btree`) or else listed by one ``chunk_iter`` pass; None when
    HDF5 cannot list chunks."""
    table = btree.list_chunks(dataset)
    if table is not None:
        return table
    if not hasattr(dataset.id, "chunk_iter") or not btree.chunk_queries_trusted(dataset):
        return None
    found: list[tuple[int, int, int, int, int]] = []
    try:
        dataset.id.chunk_iter(lambda c: found.append((*c.chunk_offset, c.byte_offset, c.size, c.filter_mask)))
    except (RuntimeError, OSError, ValueError):
        return None
    table = np.array(found, dtype=np.int64).reshape(-1, 5)
    cells = btree.chunk_cells(table[:, 0], table[:, 1], dataset.chunks, dataset.shape)
    if cells is None:
        return None  # (HDF5 listed a chunk off the grid, or twice: believe none of it)
    table[:, 0], table[:, 1] = cells
    return table


def stored_chunks(dataset: h5py.Dataset) -> np.ndarray | bool:
    """Which chunks have been written, by (chunk row, chunk column); False when HDF5 cannot list them."""
    refresh(dataset)
    table = _listing(dataset)
    if table is None:
        return False
    grid = np.zeros(chunk_grid(dataset), dtype=bool)
    grid[table[:, 0], table[:, 1]] = True
    return grid


@dataclass(frozen=True)
class ChunkIndex:
    """Every chunk's place in the file, by (chunk row, chunk column); offset -1 means never written."""

    path: str
    file_id: tuple[int, int]  # (device, inode) of the file HDF5 has open
    space: tuple[int, int, int]  # the file's size and free space, the dataset's address, then (see _moved)
    offset: np.ndarray
    size: np.ndarray
    mask: np.ndarray

    def open(self) -> int:
        """A file descriptor to read the chunks through (:func:`~.codecs.read_stored`; the caller closes it).

        Raises OSError when the path no longer names the file the index was built from (the file
        was replaced on disk while open): the caller then reads through HDF5 instead.
        """
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) != self.file_id:
            os.close(fd)
            raise OSError(f"{self.path} was replaced on disk while open")
        return fd


def readable_directly(dataset: h5py.Dataset) -> bool:
    """Whether ``dataset``'s chunks may be read from its file by byte offset: a plain file (HDF5's
    default driver) on a system with ``os.pread``. (Its index may still show otherwise.)"""
    return hasattr(os, "pread") and dataset.file.driver == "sec2"


def build_index(dataset: h5py.Dataset) -> ChunkIndex | None:
    """The chunk index of ``dataset``, or None when its chunks cannot be read from the file directly."""
    if not readable_directly(dataset):
        return None
    table = _listing(dataset)
    if table is None:
        return None
    shape = chunk_grid(dataset)
    offset = np.full(shape, -1, dtype=np.int64)
    size = np.zeros(shape, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    r, c = table[:, 0], table[:, 1]
    offset[r, c], size[r, c], mask[r, c] = table[:, 2], table[:, 3], table[:, 4]
    path = os.path.abspath(dataset.file.filename)  # the working directory may change later
    try:
        stat = os.stat(path)
    except OSError:
        return None
    index = ChunkIndex(path, (stat.st_dev, stat.st_ino), _space(dataset), offset, size, mask)
    return index if _agrees(dataset, index, table) else None


def _agrees(dataset: h5py.Dataset, index: ChunkIndex, table: np.ndarray) -> bool:
    """Check on the first and last stored chunks that the offsets HDF5 reported are plain offsets in
    the file at ``path`` (no userblock shift, not another file under the same name)."""
    fd = open_index(dataset, index)
    if fd is None:
        return False
    (h, w) = dataset.chunks
    try:
        for row, col, offset, size, _ in table[[0, -1]].tolist() if len(table) else []:
            raw = raw_chunk(dataset, row * h, col * w)
            if raw is None or os.pread(fd, size, offset) != raw[1]:
                return False
        return True
    finally:
        os.close(fd)


def open_index(dataset: h5py.Dataset, index: ChunkIndex) -> int | None:
    """A file descriptor for reading ``dataset``'s chunks through ``index`` (the caller closes it), or
    None when the file was replaced on disk: its index is then dropped and reads go through HDF5."""
    try:
        return index.open()
    except OSError:
        forget(dataset)
        return None


_cache: OrderedDict[tuple, ChunkIndex | None] = OrderedDict()
_asked: dict[tuple, int] = {}
_held: dict[tuple, ChunkIndex | None] = {}
_turns: dict[tuple, SharedOrAlone] = {}  # per dataset: its readers and writer (see reading, writing)
_lock = threading.RLock()  # loompy may be used from several threads; HDF5 calls are serialised anyway


def _key(dataset: h5py.Dataset) -> tuple:
    # HDF5 numbers each opening of a file afresh, so a reopened (perhaps rewritten) file starts over
    return dataset.id.fileno, dataset.name


def chunk_index(dataset: h5py.Dataset, needed: int) -> ChunkIndex | None:
    """An index for a read of ``needed`` chunks, when one exists or is worth building; else None.

    One is built once reads of the dataset have asked for a tenth of its chunks in all (a single
    large read, or the first batches of a scan), then kept until loompy writes to the dataset
    (:func:`forget`) or the file is closed; :func:`held_index` keeps one around a loop of reads.
    """
    key = _key(dataset)
    with _lock:
        if key in _held:
            return _held[key]
        index = _kept(dataset, key)
        if index is not None:
            _cache.move_to_end(key)
            return index
        if key in _cache:
            return None  # known not to work for this dataset
        total = int(np.prod(chunk_grid(dataset)))  # (HDF5's get_num_chunks walks the whole index: slow)
        _asked[key] = _asked.get(key, 0) + needed
        if _asked[key] * INDEX_SHARE < total:
            return None
    return _remember(dataset)


def _space(dataset: h5py.Dataset) -> tuple[int, int, int]:
    f = dataset.file.id
    return f.get_filesize(), f.get_freespace(), btree.header_address(dataset)


def _moved(dataset: h5py.Dataset, index: ChunkIndex) -> bool:
    """Whether chunks may have moved since ``index`` was built by writes loompy did not make (h5py
    on the same open file): a chunk rewritten at another size is freed and placed elsewhere, at
    the end of the file or in space freed before, and the file's size or free space changes; a
    dataset renamed in its place has another object header. loompy's own writes drop the index
    themselves; in a file open read-only nothing moves."""
    return dataset.file.mode != "r" and _space(dataset) != index.space


def _kept(dataset: h5py.Dataset, key: tuple) -> ChunkIndex | None:
    """The kept index of ``dataset`` while it still describes it; a stale one (the dataset grew,
    or chunks moved) is dropped. (Called under ``_lock``, after :func:`refresh`: chunks h5py still
    holds in its cache, written through another handle of the dataset, move as they are written out.)"""
    index = _cache.get(key)
    if index is not None and (index.offset.shape != chunk_grid(dataset) or _moved(dataset, index)):
        del _cache[key]
        return None
    return index


def _remember(dataset: h5py.Dataset) -> ChunkIndex | None:
    key = _key(dataset)
    with _lock:
        _asked.pop(key, None)
        if _kept(dataset, key) is None:
            refresh(dataset)
            _cache[key] = build_index(dataset)
            while len(_cache) > CACHED_INDEXES:
                _cache.popitem(last=False)
        return _cache[key]


def forget(dataset: h5py.Dataset) -> None:
    """Drop what is known about where the dataset's chunks are: every write may move them."""
    key = _key(dataset)
    with _lock:
        _cache.pop(key, None)
        _asked.pop(key, None)
        _held.pop(key, None)


def _refuse_inside_a_read(turns: SharedOrAlone, me: int) -> LoomFileError | None:
    """A write that would wait for another thread's write while this thread reads other datasets (a
    function given to map or aggregate): that thread may be waiting for the read this one is in."""
    if turns.owner not in (None, me) and reads_held(me) > turns.shared_by(me):
        return would_wait_for_own_read(turns.name)
    return None


def _turns_for(dataset: h5py.Dataset) -> SharedOrAlone:
    """Who may use a dataset's chunks: any number of reading threads, or one writing thread.

    A read through the chunk index takes positions the engine listed; a write from another thread
    meanwhile moves chunks, and the read would take another chunk's bytes or half-written ones.
    The writing thread may also read (a write merges its edges with what is stored), and a thread
    may read within its own read, or write within it when it reads alone. Reads never wait for a
    writer that only waits (a reader's helpers must get in, or it could not finish).
    """
    key = _key(dataset)  # (dropped when the last connection sharing the file's opening closes)
    with _lock:
        if key not in _turns:
            # (named: messages name the file once it has gone)
            _turns[key] = SharedOrAlone(name=dataset.file.filename, guards_reads=True)
        return _turns[key]


def reading(dataset: h5py.Dataset) -> AbstractContextManager[None]:
    """Hold ``dataset``'s chunks still while the block reads them: writes from other threads wait.

    On the engine's workers nothing is taken: they read for a thread that waits for them and holds
    what it needs (taking it again there could wait on a writer that waits on that thread)."""
    if _written_at_fork and _key(dataset) in _written_at_fork:
        raise LoomFileError(f"{dataset.file.filename}: {dataset.name} was being written (or the file permuted) by "
                            "another thread of the process this one was forked from, and HDF5 here may hold it half "
                            "written (connect again once that process has closed the file)")
    return nullcontext() if on_worker() else _still_there(_turns_for(dataset), dataset)


T = TypeVar("T")


def reports_closed_file(read: Callable[..., T]) -> Callable[..., T]:
    """For the engine's reads (their first argument the dataset): h5py's own errors, met because the
    file was closed in another thread as the read ran (``close`` does not wait for reads), become a
    :class:`~loompy.errors.LoomFileError` saying so."""
    @functools.wraps(read)
    def reading_or_saying_why_not(dataset: h5py.Dataset, *args: Any, **kwargs: Any) -> T:
        def check() -> None:  # (callers that know the file name it: see errors.naming_the_file)
            if not dataset.id.valid:
                raise LoomFileError("the connection was closed (or the file replaced by permute) in "
                                    "another thread as this read ran; nothing was read")

        with closed_meanwhile(check):
            return read(dataset, *args, **kwargs)
    return reading_or_saying_why_not


@contextmanager
def _still_there(turns: SharedOrAlone, dataset: h5py.Dataset) -> Iterator[None]:
    """A reading turn, then a refusal if the file went while it waited (permute replaced it in another thread)."""
    with turns.sharing():
        if not dataset.id.valid:
            raise LoomFileError(f"{turns.name}: the file was replaced by permute (or the connection closed) "
                                "in another thread while this read waited for it; read again")
        yield


def writing(dataset: h5py.Dataset) -> AbstractContextManager[None]:
    """Have ``dataset``'s chunks to this thread while the block writes them: reads from other threads wait."""
    return _turns_for(dataset).alone(_refuse_inside_a_read)


@contextmanager
def writing_all(datasets: list[h5py.Dataset]) -> Iterator[None]:
    """:func:`writing` for several datasets at once, through a write of several steps (an append
    resizes, then writes, layer after layer): reads from other threads see all of it or none. Turns
    are taken in one order, so two threads doing this never wait for each other crosswise."""
    with ExitStack() as stack:
        for dataset in sorted(datasets, key=_key):
            stack.enter_context(writing(dataset))
        yield


_written_at_fork: set[tuple] = set()  # in a forked child: datasets other threads of the parent were writing


def _after_fork_in_child() -> None:
    """A forked child runs only the thread that forked: the lock and the turns that other threads of
    the parent held are theirs, never to be given back here (the child would wait for them for good).
    Start afresh, remembering the datasets those threads were writing: their chunks here are half
    old, half new."""
    global _lock
    me = threading.get_ident()
    _written_at_fork.update(key for key, turns in _turns.items()
                            if turns.owner not in (None, me) or turns.owner_at_fork is not None)
    _lock = threading.RLock()
    for table in (_turns, _held, _asked, _cache):
        table.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forget_file(file: h5py.File) -> None:
    """Drop the indexes of every dataset of a file being closed (they hold memory, not handles)."""
    number = file.id.fileno
    with _lock:
        for table in (_cache, _asked, _held):
            for key in [key for key in table if key[0] == number]:
                del table[key]


def forget_opening(number: tuple) -> bool:
    """After a close: once nothing in this process has the opening HDF5 numbers ``number`` open (a
    connection made meanwhile shares it), drop its datasets' turns that nobody holds or waits for,
    its counts of changes (see :func:`~loompy.handles.changed`), and say True. (They were kept for
    good: 2.5 KB per file opened; a turn still held, by a read the close did not wait for, stays.)"""
    with _lock:
        try:
            if any(f.fileno == number for f in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)):
                return False
        except (ValueError, RuntimeError):
            return False
        for key in [key for key in _turns if key[0] == number]:
            if _turns[key].idle:
                del _turns[key]
        forget_changes(number)
        return True


_let_go: set[tuple] = set()  # openings of connections let go of unclosed, to forget once they are closed


def forget_later(number: tuple) -> None:
    """Note that a connection with the opening ``number`` was let go of without close(): its file
    closes as the last object referring to it goes, and :func:`forget_let_go` then forgets it.

    Takes no lock: the cycle collector may call it in any thread, also one inside h5py while another
    holds ``_lock`` and waits for h5py (both waited for good). A set's ``add`` is atomic as it is."""
    _let_go.add(number)


def forget_let_go() -> None:
    """Forget the openings of connections let go of unclosed that are closed by now (a process that
    connects without closing, as the seed allows, kept 2.5 KB for each)."""
    if _let_go:
        for number in list(_let_go):
            if forget_opening(number):
                _let_go.discard(number)


@reports_closed_file
def expect_reads(dataset: h5py.Dataset, share: float = 1.0) -> None:
    """Say that reads of ``share`` of the dataset follow (a scan): if that is enough to be worth an
    index (see :func:`chunk_index`), it is built now rather than after the first batches."""
    if share * INDEX_SHARE >= 1 and chunk_layout(dataset) is not None:
        _remember(dataset)


@contextmanager
def direct_reads(dataset: h5py.Dataset) -> Iterator[tuple[ChunkIndex, int] | None]:
    """For reading all of ``dataset`` (and only reading it): its chunk index and a descriptor to
    read its chunks through (closed after), or None when its chunks cannot be read directly.
    Writes from other threads wait meanwhile (see :func:`reading`)."""
    with held_index(dataset):
        index = chunk_index(dataset, 0)
        fd = open_index(dataset, index) if index is not None else None
        if fd is None:
            yield None
            return
        try:
            yield index, fd
        finally:
            os.close(fd)


@contextmanager
def held_index(dataset: h5py.Dataset) -> Iterator[None]:
    """Use one index for every read of ``dataset`` inside the block (kept even if the cache is full),
    and keep writes from other threads out meanwhile (see :func:`reading`): the block's reads may
    run on the engine's workers, which take no turn of their own."""
    key = _key(dataset)
    with reading(dataset):
        refresh(dataset)
        with _lock:  # (threads reading one dataset at once: the first one holds it for all)
            mine = key not in _held and chunk_layout(dataset) is not None
            if mine:
                _held[key] = _remember(dataset)
        try:
            yield
        finally:
            if mine:
                with _lock:
                    _held.pop(key, None)
