"""An open Loom file as every part of loompy shares it: the matrix shape the managers of a
connection see (:class:`Dims`), whether the file may be written through this handle
(:func:`writable`, :func:`check_writable`), what a closed connection's managers hold instead
of the file (:class:`ClosedFile`), the lock threads take turns at (:class:`SharedOrAlone`: each
file's write gate, :func:`writing_to` and :func:`rewriting`, and the engine's dataset turns), and
whether the file's disk has room for a write (:func:`check_room`, :func:`check_free_space`)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

import h5py
import numpy as np

from . import forks
from .errors import LoomError, LoomFileError, LoomReadOnlyError


class Dims:
    """The matrix shape, shared (not copied) between a connection and its managers."""

    __slots__ = ("shape", "on_sync")

    def __init__(self, shape: tuple[int, int], on_sync: Callable[[], None] | None = None) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.on_sync = on_sync  # the connection's: takes the shape on disk (see sync)

    def sync(self, on_disk: bool = False) -> None:
        """Take the shape the file has now: another connection to it in this process may have
        appended columns (writes at the old shape would leave attributes of the wrong length).
        Reads ask only whether loompy changed the matrix's shape since (:func:`changed` ``"shape"``: a
        look at the file took 40-50 us, and every ``ds.ra.Gene`` asks); writes (``on_disk``)
        look at the file itself."""
        if self.on_sync is not None:
            self.on_sync(on_disk)

    @classmethod
    def along(cls, axis: int, length: int) -> Dims:
        """The shape of a selection of ``length`` rows (axis 0) or columns (1) alone, in memory."""
        return cls((length, 0) if axis == 0 else (0, length))


_counts: dict[tuple, dict[str, int]] = {}  # HDF5's number of an open file -> what loompy changed in it, counted
_counts_lock = threading.Lock()


def changed(file: h5py.File, what: str) -> None:
    """Count a change of ``what`` in ``file``, seen by all of its connections in this process
    (HDF5 shares one opening among them), so that what they keep of it is looked up again:

    - ``"shape"``: the matrix's shape (see :meth:`Dims.sync`);
    - ``"layers"``: a layer was created, replaced or deleted;
    - ``"graphs"``, ``"globals"``: a graph or global attribute was written or deleted;
    - ``"writes"``: any of loompy's writes began or ended (see :func:`writing_to`).
    """
    with _counts_lock:
        counts = _counts.setdefault(file.id.fileno, {})
        counts[what] = counts.get(what, 0) + 1


def changes(file: h5py.File | tuple, what: str) -> int:
    """How many times ``what`` changed in ``file`` (or the open file HDF5 numbers so, ``file.id.fileno``)
    since it was opened: a key for what is kept of it."""
    number = file if isinstance(file, tuple) else file.id.fileno
    return _counts.get(number, {}).get(what, 0)


@contextmanager
def changing(file: h5py.File, what: str) -> Iterator[None]:
    """Around a write of ``what``: counted before and after, so that what a read in another thread
    kept meanwhile, under a count the write has passed by its end, is looked up again."""
    changed(file, what)
    try:
        yield
    finally:
        changed(file, what)


def kept_since(file: h5py.File, what: str) -> tuple[int, int]:
    """The key of what a connection keeps of ``what`` in ``file`` (names, values, a dataset found):
    HDF5's id of this opening of the file, and its count of changes of ``what``."""
    return file.id.id, changes(file, what)


class KeptNames:
    """Names listed from a file (its layers, or its graphs of one axis), listed again only once a
    change of ``what`` was counted (see :func:`changed`) or the file was opened anew."""

    __slots__ = ("what", "kept")

    def __init__(self, what: str) -> None:
        self.what = what
        self.kept: tuple[tuple[int, int], list[str]] | None = None

    def get(self, file: h5py.File, listing: Callable[[], list[str]]) -> list[str]:
        """The names ``listing()`` gives, listed now only if what was kept is out of date (a copy)."""
        state = kept_since(file, self.what)  # (read first: a change as it lists, listed again next time)
        if self.kept is None or self.kept[0] != state:
            self.kept = (state, listing())
        return list(self.kept[1])


def forget_changes(number: tuple) -> None:
    """The file HDF5 numbers ``number`` is closed for good in this process: its counts go."""
    with _counts_lock:
        _counts.pop(number, None)


READ_ONLY = "_loompy_read_only"  # set on the h5py.File of a connection opened with mode 'r'


def writable(file: h5py.File) -> bool:
    """Whether loompy may write through this handle: HDF5 opened it for writing and the connection
    did not ask for 'r' (HDF5 hands a second opening of a file open for writing in this process
    that same writable file)."""
    return file.mode == "r+" and not getattr(file, READ_ONLY, False)


def why_closed(file: Any) -> str:
    """What to say of a file that is no longer open: a :class:`ClosedFile` says why."""
    return getattr(file, "why", "the connection is closed")


class closed_meanwhile:  # noqa: N801 (used as a function: ``with closed_meanwhile(check):``)
    """Around work that touches an open file through h5py: h5py's own error (ValueError,
    RuntimeError, KeyError, OSError), met because another thread closed the file as the work ran
    (``close`` does not wait for reads), becomes ``check()``'s :class:`LoomFileError` saying so;
    ``check`` raises nothing while the file is open, and any other error passes unchanged.
    (A class, not a generator: it is on the path of every small read.)"""

    __slots__ = ("check",)

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> bool:
        if isinstance(error, (ValueError, RuntimeError, KeyError, OSError)) and not isinstance(error, LoomError):
            self.check()
        return False


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


class SharedOrAlone:
    """A lock held by any number of threads at once (shared) or by one alone, which may also take
    it shared; both reentrant. Dataset turns (reads shared, a write alone) and file write gates
    (writes shared, a permute or close alone) are such locks.

    ``alone_first``: threads new to the lock wait behind one waiting to hold it alone (a steady
    stream of shared holders would otherwise keep it waiting for good). ``refuse(lock, me)``, given
    to the two ways in, may return an error to raise instead of waiting (a wait that could be endless).
    Whatever ``refuse`` says, a thread whose wait would close a circle of threads waiting for each
    other, through any of these locks, is refused (:class:`LoomFileError`) instead of waiting for good.

    Each turn is a token in a dict, put there and taken out by plain subscripting (no call
    between the steps, where Python could raise a KeyboardInterrupt) inside the ``try`` that takes it
    out, again if an interrupt lands as it is given back. So an interrupt (Ctrl-C) leaves a turn
    behind only if it lands as that ``finally`` begins (1.3% of real SIGINTs in a review's loop), and
    turns given back in any order (generators closed late) take out only their own.
    """

    def __init__(self, alone_first: bool = False, name: str = "", acts: tuple[str, str] = ("read", "write"),
                 guards_reads: bool = False) -> None:
        self.name = name  # (what it guards, for messages)
        self.acts = acts  # what taking it shared and taking it alone do (for messages)
        self.guards_reads = guards_reads  # a dataset's turns: its shared turns are reads (see reads_held)
        self.changed = threading.Condition()
        self.shared: dict[int, dict[object, None]] = {}  # thread -> its shared turns
        self.owned: dict[object, None] = {}  # the turns of the thread holding it alone
        self.owner: int | None = None  # that thread (set once it has a turn)
        self.waiters: set[int] = set()  # threads waiting to hold it alone
        self.alone_first = alone_first
        self.owner_at_fork: int | None = None  # in a forked child: the parent's other thread that held it alone
        with _every_lock_guard:
            _every_lock.add(self)

    @property
    def waiting(self) -> int:
        """How many threads wait to hold it alone."""
        return len(self.waiters)

    @property
    def idle(self) -> bool:
        """Whether no thread holds it or waits for it."""
        return not self.shared and not self.owned and self.owner is None and not self.waiters

    @property
    def depth(self) -> int:
        """How many turns the thread holding it alone has taken."""
        return len(self.owned)

    def shared_by(self, me: int) -> int:
        """How many shared turns thread ``me`` holds."""
        return len(self.shared.get(me, ()))

    def _may_share(self, me: int) -> bool:
        # (its owner may always share it: waiting behind a thread that waits for the owner would be for good)
        return me in self.shared or self.owner == me or (
            self.owner is None and not self.owned and not (self.alone_first and self.waiters))

    def _may_own(self, me: int) -> bool:
        return (self.owner == me or (self.owner is None and not self.owned)) and not set(self.shared) - {me}

    def blockers(self, me: int, alone: bool) -> set[int]:
        """The threads thread ``me`` waits for to take it (alone or shared): none when it may."""
        if alone:
            return ({self.owner} | set(self.shared)) - {None, me}
        if me in self.shared or self.owner == me or self.owner is None and not (self.alone_first and self.waiters):
            return set()
        return ({self.owner} | (set(self.waiters) if self.alone_first else set())) - {None, me}

    def _enter(self, may: Callable[[int], bool], refuse: Callable[..., Exception | None] | None, me: int,
               alone: bool) -> None:
        if may(me):
            return
        if refuse is not None:
            error = refuse(self, me)
            if error is not None:
                raise error
        try:
            with _waits_lock:
                if _waits_for_itself(self, me, alone):
                    act = self.acts[alone]
                    raise LoomFileError(f"{self.name or 'the file'}: cannot {act} now: this thread would wait for "
                                        "another thread that waits for this one (two threads that each read a "
                                        "layer and then write it, say), each for good; nothing was done, "
                                        f"{act} again once the other thread is done")
                _waiting_on[me] = (self, alone)
            self.changed.wait_for(lambda: may(me))
        finally:
            with _waits_lock:
                _waiting_on.pop(me, None)

    def _after_fork(self, me: int) -> None:
        """In a forked child only thread ``me`` runs: the other threads' turns and waits went with them
        (and the condition may have been copied held by one of them)."""
        self.changed = threading.Condition()
        self.shared = {me: self.shared[me]} if me in self.shared else {}
        if self.owner != me:
            self.owner_at_fork, self.owner, self.owned = self.owner, None, {}
        self.waiters = set()

    @contextmanager
    def sharing(self, refuse: Callable[..., Exception | None] | None = None) -> Iterator[None]:
        me, token = threading.get_ident(), object()
        try:
            with self.changed:
                self._enter(self._may_share, refuse, me, alone=False)
                if me in self.shared:
                    self.shared[me][token] = None
                else:
                    self.shared[me] = {token: None}
            yield
        finally:
            def take_out() -> None:
                if me in self.shared and token in self.shared[me]:
                    del self.shared[me][token]
                    if not self.shared[me]:
                        del self.shared[me]
                        self.changed.notify_all()

            self._give_back(take_out)

    @contextmanager
    def alone(self, refuse: Callable[..., Exception | None] | None = None) -> Iterator[None]:
        me, token = threading.get_ident(), object()
        try:
            with self.changed:
                self.waiters.add(me)
                try:
                    self._enter(self._may_own, refuse, me, alone=True)
                except BaseException:
                    self.waiters.discard(me)
                    self.changed.notify_all()  # (sharers held behind a waiter that gave up may go on)
                    raise
                self.waiters.discard(me)
                self.owned[token] = None  # (before the owner: an interrupt between leaves no owner behind)
                self.owner = me
            yield
        finally:
            def take_out() -> None:
                if token in self.owned:
                    del self.owned[token]
                    if not self.owned:
                        self.owner = None
                        self.changed.notify_all()

            self._give_back(take_out)

    def _give_back(self, take_out: Callable[[], None]) -> None:
        """``take_out()`` (which does nothing the second time) under the condition, again if an
        interrupt landed as the condition was taken; the interrupt is raised once it is done."""
        interrupted: BaseException | None = None
        while True:
            try:
                with self.changed:
                    take_out()
                break
            except KeyboardInterrupt as error:
                interrupted = error
        if interrupted is not None:
            raise interrupted


_every_lock: weakref.WeakSet[SharedOrAlone] = weakref.WeakSet()  # (see reads_held, _after_fork_in_child)
_every_lock_guard = threading.Lock()  # (a lock made as another thread lists them would stop the listing)
_waits_lock = threading.Lock()
_waiting_on: dict[int, tuple[SharedOrAlone, bool]] = {}  # thread -> the lock it waits for, and whether alone


def _waits_for_itself(lock: SharedOrAlone, me: int, alone: bool) -> bool:
    """Whether thread ``me``, waiting for ``lock``, would wait for itself: for a thread that waits,
    maybe through others, for a lock ``me`` holds. (Under ``_waits_lock``: every wait is checked as it
    begins, so the thread that would close such a circle is the one refused.)"""
    seen: set[int] = set()
    ahead = lock.blockers(me, alone)
    while ahead:
        thread = ahead.pop()
        if thread == me:
            return True
        if thread not in seen:
            seen.add(thread)
            if thread in _waiting_on:
                other, other_alone = _waiting_on[thread]
                ahead |= other.blockers(thread, other_alone)
    return False


# a file's write gate, by HDF5's number of the open file; one nobody holds has nothing to remember, and goes
_gates: weakref.WeakValueDictionary[int, SharedOrAlone] = weakref.WeakValueDictionary()
_gates_lock = threading.Lock()


def reads_held(me: int | None = None) -> int:
    """How many reading turns of datasets (:func:`loompy.engine.storage.reading`) thread ``me`` (this
    one by default) holds, wherever they will be given back from."""
    me = threading.get_ident() if me is None else me
    with _every_lock_guard:
        locks = list(_every_lock)
    return sum(lock.shared_by(me) for lock in locks if lock.guards_reads)


def would_wait_for_own_read(what: str) -> LoomFileError:
    """The refusal of a write from a thread inside a read (a function given to map or aggregate,
    say) that would wait for another thread, which may itself be waiting for that read to end."""
    return LoomFileError(f"cannot write {what} now: this thread is inside a read of the file (a function given to "
                         "map or aggregate?) while another thread writes, permutes or closes it, and each would "
                         "wait for the other for good; write after the read")


def _number_and_name(file: h5py.File) -> tuple[int, str]:
    """HDF5's number of the open ``file`` and its name, or the refusal of a write whose file another
    thread closed as it began."""
    try:
        return file.id.fileno, file.filename
    except (ValueError, RuntimeError) as error:  # (HDF5's answer for a closed file)
        raise LoomFileError("the connection was closed by another thread as this began; nothing was written"
                            ) from error


def _gate(file: h5py.File) -> SharedOrAlone:
    number, name = _number_and_name(file)
    with _gates_lock:
        gate = _gates.get(number)
        if gate is None:
            gate = _gates[number] = SharedOrAlone(alone_first=True, name=name,
                                                  acts=("write", "append to, permute or close the file"))
        return gate


@contextmanager
def writing_to(file: h5py.File, alone: bool = False) -> Iterator[None]:
    """Around one of loompy's writes to ``file``: it waits for a rewrite of the file under way (or
    waiting) in another thread, and is refused if that replaced the file meanwhile (what it would
    write was meant for the file as it was). ``alone``: also waits for the writes of other threads
    under way, and holds off new ones until done (an append: a write of another thread made
    meanwhile would be made at the old width)."""
    gate, (_, name) = _gate(file), _number_and_name(file)
    enter = gate.alone if alone else gate.sharing
    with enter(lambda _lock, _me: would_wait_for_own_read(name) if reads_held() else None):
        if not file:
            raise LoomFileError(f"{name}: the file was replaced by permute (or the connection closed) in "
                                "another thread while this write waited for it; nothing was written")
        # (a batch a scan read ahead meanwhile is read again; a file open read-only refuses every write)
        with changing(file, "writes") if writable(file) else contextlib.nullcontext():
            yield


def rewriting(file: h5py.File) -> AbstractContextManager[None]:
    """Around a rewrite of the whole of ``file`` (permute, close): waits for loompy's writes to it
    under way in other threads, and holds off new ones (which would be lost with the old file)."""
    return _gate(file).alone()


T = TypeVar("T")


def one_of_the_writes(method: Callable[..., T]) -> Callable[..., T]:
    """``method`` of an object with a ``_file`` (a manager, a layer, a connection) as one of the
    file's writes (see :func:`writing_to`); objects held in memory (``_file`` None) pass through."""
    return _a_write(method, alone=False)


def the_only_write(method: Callable[..., T]) -> Callable[..., T]:
    """:func:`one_of_the_writes`, made while no other thread writes the file (appends of columns)."""
    return _a_write(method, alone=True)


def _a_write(method: Callable[..., T], alone: bool) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        file = self._file
        if not isinstance(file, h5py.File) or not file:
            return method(self, *args, **kwargs)  # (in memory, or closed: the method says so)
        with writing_to(file, alone):
            return method(self, *args, **kwargs)
    return wrapper


def _after_fork_in_child() -> None:
    """Turns and waits of other threads of the parent are never given back in a forked child."""
    global _gates_lock, _gates, _waits_lock, _every_lock_guard, _counts_lock
    _gates_lock, _waits_lock, _every_lock_guard = threading.Lock(), threading.Lock(), threading.Lock()
    _counts_lock = threading.Lock()
    _gates = weakref.WeakValueDictionary()
    _waiting_on.clear()
    me = threading.get_ident()
    for lock in list(_every_lock):
        lock._after_fork(me)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


SPARE_BYTES = 2 << 20  # room every in-place write wants besides its own data: HDF5 metadata it writes out


def check_writable(file: h5py.File | None, what: str) -> None:
    """Refuse a write before anything is touched when the file is open read-only (or closed).
    (Room on its disk is asked for once the size of the write is known: :func:`check_room`.)"""
    if file is not None and not file:
        raise LoomFileError(f"cannot write {what}: {why_closed(file)}")
    if file is not None and not writable(file):
        named, _, rest = what.partition(": ")
        if rest and os.path.abspath(named) == os.path.abspath(file.filename):  # (named once, as the file says)
            what = rest
        raise LoomReadOnlyError(f"{file.filename}: cannot write {what}: the file is open read-only (mode 'r')")
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
