"""An open Loom file as every part of loompy shares it: the matrix shape the managers of a
connection see (:class:`Dims`), whether the file may be written through this handle
(:func:`writable`, :func:`check_writable`), and what a closed connection's managers hold instead
of the file (:class:`ClosedFile`)."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import h5py
import numpy as np

from . import forks
from .errors import LoomFileError


class Dims:
    """The matrix shape, shared (not copied) between a connection and its managers."""

    __slots__ = ("shape", "on_sync")

    def __init__(self, shape: tuple[int, int], on_sync: Callable[[], None] | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.on_sync = on_sync  # the connection's: takes the shape on disk (see sync)

    def sync(self) -> None:
        """Take the shape the file has now: another connection to it in this process may have
        appended columns (writes at the old shape would leave attributes of the wrong length)."""
        if self.on_sync is not None:
            self.on_sync()

    @classmethod
    def along(cls, axis: int, length: int) -> Dims:
        """The shape of a selection of ``length`` rows (axis 0) or columns (1) alone, in memory."""
        return cls((length, 0) if axis == 0 else (0, length))


READ_ONLY = "_loompy_read_only"  # set on the h5py.File of a connection opened with mode 'r'


def writable(file: h5py.File) -> bool:
    """Whether loompy may write through this handle: HDF5 opened it for writing and the connection
    did not ask for 'r' (HDF5 hands a second opening of a file open for writing in this process
    that same writable file)."""
    return file.mode == "r+" and not getattr(file, READ_ONLY, False)


class ClosedFile:
    """What a closed connection's managers hold instead of its file: any use says the connection is
    closed (or, while ``permute`` swaps the file in, that it is being replaced)."""

    def __init__(self, filename: str, why: str = "the connection is closed") -> None:
        self.filename = filename
        self.why = why

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        raise LoomFileError(f"{self.filename}: {self.why}")

    def __contains__(self, name: object) -> bool:
        raise LoomFileError(f"{self.filename}: {self.why}")

    def __getitem__(self, name: object) -> Any:
        raise LoomFileError(f"{self.filename}: {self.why}")


class _Gate:
    """loompy's writes to one open file (any number, from any threads) and a rewrite of the whole
    file (permute, close), which waits for those under way and holds off new ones until it is done."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.writers: dict[int, int] = {}  # thread -> depth
        self.rewriter: int | None = None
        self.waiting = 0  # rewrites waiting for their turn: new writes wait behind them


# by HDF5's number of the open file; a gate nobody holds has nothing to remember, and goes
_gates: weakref.WeakValueDictionary[int, _Gate] = weakref.WeakValueDictionary()
_gates_lock = threading.Lock()
_reads = threading.local()  # how many reading turns of datasets this thread holds (see engine.storage)


def reads_held() -> int:
    """How many reading turns of datasets (:func:`loompy.engine.storage.reading`) this thread holds."""
    return getattr(_reads, "depth", 0)


def count_read(step: int) -> None:
    _reads.depth = reads_held() + step


def would_wait_for_own_read(what: str) -> LoomFileError:
    """The refusal of a write from a thread inside a read (a function given to map or aggregate,
    say) that would wait for another thread, which may itself be waiting for that read to end."""
    return LoomFileError(f"cannot write {what} now: this thread is inside a read of the file (a function given to "
                         "map or aggregate?) while another thread writes, permutes or closes it, and each would "
                         "wait for the other for good; write after the read")


def _gate(file: h5py.File) -> _Gate:
    with _gates_lock:
        gate = _gates.get(file.id.fileno)
        if gate is None:
            gate = _gates[file.id.fileno] = _Gate()
        return gate


@contextmanager
def writing_to(file: h5py.File) -> Iterator[None]:
    """Around one of loompy's writes to ``file``: it waits for a rewrite of the file under way (or
    waiting) in another thread, and is refused if that replaced the file meanwhile (what it would
    write was meant for the file as it was)."""
    gate, me, name = _gate(file), threading.get_ident(), file.filename
    with gate.changed:
        def may_go() -> bool:  # (a thread already writing goes on: the rewrite waits for it anyway)
            return me in gate.writers or (gate.rewriter in (None, me) and not gate.waiting)

        if not may_go() and reads_held():
            raise would_wait_for_own_read(name)
        gate.changed.wait_for(may_go)
        if not file:
            raise LoomFileError(f"{name}: the file was replaced by permute (or the connection closed) in "
                                "another thread while this write waited for it; nothing was written")
        gate.writers[me] = gate.writers.get(me, 0) + 1
    try:
        yield
    finally:
        with gate.changed:
            gate.writers[me] -= 1
            if not gate.writers[me]:
                del gate.writers[me]
                gate.changed.notify_all()


@contextmanager
def rewriting(file: h5py.File) -> Iterator[None]:
    """Around a rewrite of the whole of ``file`` (permute): waits for loompy's writes to it under
    way in other threads, and holds off new ones (which would be lost with the old file)."""
    gate, me = _gate(file), threading.get_ident()
    with gate.changed:
        gate.waiting += 1
        try:
            gate.changed.wait_for(lambda: gate.rewriter is None and not set(gate.writers) - {me})
        finally:
            gate.waiting -= 1
        gate.rewriter = me
    try:
        yield
    finally:
        with gate.changed:
            gate.rewriter = None
            gate.changed.notify_all()


T = TypeVar("T")


def one_of_the_writes(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` of an object with a ``_file`` (a manager, a layer, a connection) as one of the
    file's writes (see :func:`writing_to`); objects held in memory (``_file`` None) pass through."""
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        file = self._file
        if not isinstance(file, h5py.File) or not file:
            return method(self, *args, **kwargs)  # (in memory, or closed: the method says so)
        with writing_to(file):
            return method(self, *args, **kwargs)
    return wrapper


def _after_fork_in_child() -> None:
    """Gates held by other threads of the parent are never given back in a forked child."""
    global _gates_lock, _gates
    _gates_lock = threading.Lock()
    _gates = weakref.WeakValueDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


SPARE_BYTES = 2 << 20  # room every in-place write wants besides its own data: HDF5 metadata it writes out


def check_writable(file: h5py.File | None, what: str) -> None:
    """Refuse a write before anything is touched when the file is open read-only (or closed).
    (Room on its disk is asked for once the size of the write is known: :func:`check_room`.)"""
    if file is not None and not file:
        raise LoomFileError(f"cannot write {what}: the connection is closed")
    if file is not None and not writable(file):
        raise LoomFileError(f"cannot write {what}: {file.filename} is open read-only (mode 'r')")
    if file is not None and forks.inherited(file):
        raise LoomFileError(f"cannot write {what}: {file.filename} was open for writing in the process this one "
                            "was forked from, and HDF5's state of the file here is a copy of that process's: writing "
                            "through it would damage the file (let that process write, or have it close the file "
                            "before it starts workers, and connect in each worker)")


def check_deletable(file: h5py.File | None, what: str) -> None:
    """Refuse a delete as :func:`check_writable` refuses a write, and when the disk lacks room for
    the metadata HDF5 rewrites to delete (``file`` None: an in-memory manager, nothing to ask)."""
    check_writable(file, what)
    if file is not None:
        check_room(file, 0, what)


def check_room(file: h5py.File, nbytes: int, what: str) -> None:
    """Refuse an in-place write of about ``nbytes`` whose file's disk lacks room for twice that and
    HDF5's metadata (a full disk mid-write can damage an HDF5 file beyond repair)."""
    where = what if file.filename in what else f"{file.filename}: {what}"
    check_free_space(file.filename, 2 * nbytes + SPARE_BYTES, where)


def approximate_nbytes(values: np.ndarray) -> int:
    """About how many bytes ``values`` take stored (text: a little per string and per character)."""
    if values.dtype == object:
        return 16 * values.size + 3 * sum(len(v) for v in values.ravel().tolist() if isinstance(v, (str, bytes)))
    return int(values.nbytes)


def check_free_space(path: str, needed: int, where: str) -> None:
    """Refuse an in-place write the file's disk has no room for: HDF5 running out of space mid-write
    can leave the file's index pointing at metadata it never wrote, damaged beyond repair."""
    try:
        info = os.statvfs(os.path.dirname(os.path.realpath(path)))  # the disk the file is on, links followed
    except (AttributeError, OSError):  # no statvfs (Windows), or it failed: nothing to go by
        return
    free = info.f_bavail * info.f_frsize
    if free < needed:
        raise LoomFileError(f"{where}: about {needed / 1e6:.2f} MB may be needed on the file's disk and only "
                            f"{free / 1e6:.2f} MB are free; a write running out of space can damage the file "
                            "beyond repair, so nothing was written")
