"""The file on disk: the one place that turns a user's path into the file written, and keeps it safe.

Whole-file writes (create, combine, permute, repack) build the new file beside the target and
rename it into place, so the target always holds its old content or the complete new one. Before
any work starts, :func:`target_path` and :func:`check_replaceable` refuse what that rename would
get wrong: a symlink is followed (the file it names is replaced, the link stays), and a target
that is read-only, has other hard links (they would keep the old content), or is open for
writing by another connection or program (its later writes would go to the replaced file and
be lost), or another user's file in a sticky folder (only its owner may replace it) is refused
with a :class:`~loompy.errors.LoomFileError`.

In-place writes (appends, layer replacements) cannot be made safe against a full disk that way:
:func:`~.handles.check_free_space` refuses them first when the disk clearly lacks the room. And a file a
writer left longer than its superblock records (killed, or out of space, mid-write) is counted
whole before HDF5 opens it for writing (:func:`extend_allocation`), which would trim it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import h5py
import numpy as np
import scipy.sparse as sp

from . import forks
from .engine import forget_opening
from .errors import LoomError, LoomFileError, LoomFileNotFoundError, LoomFormatError, LoomLockError, LoomValueError
from .handles import SPARE_BYTES, check_free_space
from .validator import looks_like_loom

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: there HDF5 takes no locks loompy could test
    fcntl = None

NAME_MAX = 255  # bytes in a file name on the usual file systems


def target_path(path: str | os.PathLike | bytes) -> str:
    """The absolute path of the file a write to ``path`` must replace (symlinks followed)."""
    text = os.fsdecode(os.fspath(path))
    if text.endswith(os.sep) or (os.altsep and text.endswith(os.altsep)):
        raise LoomFileError(f"{text}: names a folder (it ends with a separator), not a Loom file")
    return os.path.realpath(os.path.expanduser(text))


# every LoomConnection opened in this process (or, after a fork, in its parent): the process that opened it
_connections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(connection: Any) -> None:
    """Note an open connection, so that rewrites of its file know it is there."""
    _connections[connection] = os.getpid()


OPEN_FILES_STAY = os.name == "nt"  # Windows cannot replace a file open anywhere, even only for reading


def _writers_here(target: str, own: Any) -> int:
    """How many connections of this process (besides ``own``) have ``target`` open for writing (on
    Windows, open at all)."""
    try:
        wanted = os.stat(target)
    except OSError:
        return 0
    count = 0
    for connection, pid in list(_connections.items()):
        if connection is own or pid != os.getpid() or connection.closed or (
                connection.mode != "r+" and not OPEN_FILES_STAY):
            continue
        try:
            found = os.stat(connection._path)
        except OSError:
            continue
        count += (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino)
    return count


def _locked_by_a_writer(target: str) -> bool:
    """Whether another program holds HDF5's write lock on ``target`` (False when locks cannot be tested)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(target, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # HDF5 writers hold LOCK_EX, readers LOCK_SH
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError as error:
        return error.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)


def check_not_input(out_file: str | os.PathLike | bytes, inputs: Sequence[str | os.PathLike], what: str) -> str:
    """The target of ``out_file`` (see :func:`target_path`), refused when it is one of ``inputs``
    under any name (a symlink, a hard link, another spelling): writing there would replace data
    being read. ``what`` names the inputs' part in the message."""
    target = target_path(out_file)
    if os.path.exists(target):
        for source in inputs:
            if os.path.exists(source) and os.path.samefile(target, source):
                raise LoomFileError(f"{target}: is {what} ({os.fsdecode(os.fspath(source))}); write to another file")
    return target


def check_replaceable(target: str, own: Any = None) -> None:
    """Refuse, before anything is written, a rewrite of ``target`` that would lose or split users' data.

    ``own`` is the caller's own connection to ``target`` (permute's), which is allowed.
    """
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise LoomFileNotFoundError(errno.ENOENT, "the folder for the Loom file does not exist", directory)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LoomFileError(f"{target}: cannot write in its folder {directory} (permission denied)")
    if os.path.isdir(target):
        raise LoomFileError(f"{target}: is a folder; a Loom file cannot replace it")
    if not os.path.exists(target):
        return
    folder, info, me = os.stat(directory), os.stat(target), os.geteuid() if hasattr(os, "geteuid") else None
    # (root may write anything: a file nobody may write, made so on purpose, is refused to root too)
    if not os.access(target, os.W_OK) or not info.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise LoomFileError(f"{target}: the file is read-only")
    if folder.st_mode & stat.S_ISVTX and me not in (None, 0, info.st_uid, folder.st_uid):
        raise LoomFileError(f"{target}: it belongs to another user in a folder where only owners may replace "
                            "files (sticky bit)")
    links = info.st_nlink
    if links > 1:
        raise LoomFileError(f"{target}: the file has {links} hard links, and rewriting it would leave the "
                            "other names with the old content; make it a file of its own first")
    if _writers_here(target, own):
        if OPEN_FILES_STAY:
            raise LoomFileError(f"{target}: the file is open in another connection, and Windows cannot replace "
                                "a file that is open; close it first")
        raise LoomFileError(f"{target}: the file is open for writing by another connection; close it first "
                            "(its later writes would be lost)")
    if own is None and _locked_by_a_writer(target):
        raise LoomFileError(f"{target}: another program has the file open for writing; close it first")


def _temporary_name(directory: str, base: str) -> str:
    """A hidden, unused-looking name beside the target, short enough for any file name the target has
    (names that are not UTF-8 included)."""
    token = secrets.token_hex(8)
    stem = base
    while len(os.fsencode(stem)) > NAME_MAX - len(token) - 12:
        stem = stem[:-1]  # (a character at a time: cutting its bytes could split one, a name no system takes)
    return os.path.join(directory, f".{stem}.{token}.loom-tmp")


_replacements = threading.Condition()
_being_replaced: dict[str, list[int]] = {}  # target path -> the threads replacing it in this process


@contextlib.contextmanager
def _replacement_of(target: str) -> Iterator[None]:
    with _replacements:
        _being_replaced.setdefault(target, []).append(threading.get_ident())
    try:
        yield
    finally:
        with _replacements:
            threads = _being_replaced[target]
            threads.remove(threading.get_ident())
            if not threads:
                del _being_replaced[target]
            _replacements.notify_all()


def wait_while_replaced(path: str | os.PathLike) -> None:
    """Wait until no other thread of this process is replacing the file at ``path`` (a permute,
    combine or create): a file opened meanwhile may be the old one, its writes lost with it."""
    target, me = target_path(path), threading.get_ident()
    with _replacements:
        _replacements.wait_for(lambda: all(thread == me for thread in _being_replaced.get(target, ())))


def _after_fork_in_child() -> None:
    """Replacements by the parent's other threads never end in a forked child."""
    global _replacements
    _replacements = threading.Condition()
    _being_replaced.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def replacing(path: str | os.PathLike | bytes, own: Any = None, size: int = 0) -> Iterator[h5py.File]:
    """Write a new HDF5 file that replaces ``path`` (the file it names) on success.

    The target always holds either its old content or the complete new file; a failure (or a
    kill) leaves at most a stray ``.*.loom-tmp`` file, never a broken target. The new file keeps
    the old one's permission bits and, where allowed, its owner and group. ``size``: about what the
    new file takes; a disk without room for it (and 2 MB) is refused before anything is written,
    as HDF5 running out of space has been seen to bring down the process, not just fail.
    """
    target = target_path(path)
    check_replaceable(target, own)
    check_free_space(target, size + SPARE_BYTES, f"{target}: the new file")
    with _replacement_of(target):  # (a connect(r+) of the path meanwhile waits: see wait_while_replaced)
        tmp = _temporary_name(*os.path.split(target))
        try:
            f = h5py.File(tmp, "x")  # a new file: it gets the umask's permissions like any (mkstemp: 0600)
        except OSError as error:
            with contextlib.suppress(OSError):  # HDF5 may have made the file before failing (a full disk)
                os.remove(tmp)
            raise LoomFileError(f"{target}: cannot write a new file beside it ({error})") from error
        try:
            with contextlib.ExitStack() as stack:
                stack.callback(_close_quietly, f)  # (should the flusher's start be interrupted: f is closed below)
                flusher = stack.enter_context(_EarlyFlush(tmp))
                forks.watch(f, f, tmp)
                stack.callback(forget_opening, f.id.fileno)  # (the engine's turns for its datasets, once it is closed)
                try:
                    with f:
                        try:
                            yield f
                        finally:
                            forks.unwatch(f)  # (before its descriptor goes)
                except (OSError, RuntimeError) as error:  # HDF5's (a full disk): the target is untouched
                    if isinstance(error, LoomError):
                        raise
                    raise LoomFileError(f"{target}: the new file could not be written ({error}); the file is "
                                        "unchanged") from error
                try:
                    flusher.sync()
                    if os.path.exists(target):
                        _keep_ownership(target, tmp)
                    os.replace(tmp, target)
                except OSError as error:
                    raise LoomFileError(f"{target}: the new file could not replace it ({error}); it is "
                                        "unchanged") from error
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def _close_quietly(f: h5py.File) -> None:
    """Close ``f`` if it is still open, whatever HDF5 says: a last resort on the way out of a failure."""
    forks.unwatch(f)
    with contextlib.suppress(Exception):
        f.close()


class _EarlyFlush:
    """Sends a new file's bytes to the disk while it is written, from a helper thread that syncs it
    whenever it has grown by ``GROWTH`` bytes (looking every ``EVERY`` seconds), so that the sync
    before its rename has little left to wait for: the disk works while the cores do (a combine's
    200 MB took 0.1 s to sync at the end, with the cores idle).

    :meth:`sync` syncs the rest and closes the file, and raises any error a flush met (the kernel
    reports a failed write once: the final sync would not see it again). Leaving the ``with``
    block otherwise does not wait for a flush under way: the thread closes the file after it.
    """

    EVERY = 0.25
    GROWTH = 32 << 20

    def __init__(self, path: str):
        self.path, self.fd, self.thread = path, None, None
        self.error: OSError | None = None
        self.done = threading.Event()
        self.lock = threading.Lock()  # who closes the file: this side, or the thread while it flushes
        self.running = self.abandoned = False

    def __enter__(self) -> _EarlyFlush:
        try:
            self.fd = os.open(self.path, os.O_RDWR)  # (Windows syncs only what may be written: fsync needs it)
            self.thread = threading.Thread(target=self._run, name="loompy-flush", daemon=True)
            self.thread.start()
        except (OSError, RuntimeError):  # no early flushes: the final sync does it all
            self.thread = None
            self._release()
        except BaseException:  # (an interrupt): nothing may be left behind
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _run(self) -> None:
        with self.lock:
            if self.done.is_set():
                return
            self.running = True
        try:
            flushed = 0
            while not self.done.wait(self.EVERY):
                size = os.fstat(self.fd).st_size
                if size - flushed >= self.GROWTH:
                    os.fsync(self.fd)
                    flushed = size
        except OSError as error:
            self.error = error
        finally:
            with self.lock:
                self.running = False
                if self.abandoned:
                    self._close()

    def _release(self) -> None:
        """Stop the thread and close the file, or leave closing it to the thread if it is flushing."""
        self.done.set()
        with self.lock:
            if self.running:
                self.abandoned = True
            else:
                self._close()

    def _close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def sync(self) -> None:
        """Every byte of the file on disk, then the file closed; OSError if this or an earlier flush failed."""
        self.done.set()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR)
        try:
            os.fsync(self.fd)
        finally:
            self._close()


def _keep_ownership(old: str, new: str) -> None:
    """Give ``new`` the permission bits of ``old``, and its owner and group where this process may."""
    info = os.stat(old)
    os.chmod(new, stat.S_IMODE(info.st_mode))
    if hasattr(os, "chown") and (info.st_uid, info.st_gid) != (os.getuid(), os.getgid()):
        for uid, gid in ((info.st_uid, info.st_gid), (-1, info.st_gid)):  # a group alone may be allowed
            with contextlib.suppress(OSError):
                os.chown(new, uid, gid)
                break


def stored_size_bound(matrix: Any) -> int:
    """A generous estimate of the bytes ``matrix`` takes once compressed into a Loom file: twice what
    its non-zeros need plus a little per element for the runs of zeros, but never more than its raw
    size and 1% (deflate stores what it cannot shrink), plus 100 bytes a chunk of index. (HDF5's other
    metadata: see :data:`~.handles.SPARE_BYTES`, which callers add once.)"""
    if matrix is None:
        return 0
    size = int(np.prod(matrix.shape))
    nonzero = int(matrix.nnz) if sp.issparse(matrix) else int(np.count_nonzero(matrix))
    itemsize = np.dtype(matrix.dtype).itemsize
    data = min(2 * (nonzero * (itemsize + 2) + size // 64), size * itemsize + size // 100)
    return data + size // 4096 * 100


def _short_allocation(fh: BinaryIO) -> tuple[int, int] | None:
    """(position of the end-of-allocation field, file size past the base address) when the open file
    ``fh`` is longer than its superblock says HDF5 allocated, else None. Only version 0/1 superblocks
    at the start of the file (what h5py writes by default); later versions carry a checksum and are
    left alone."""
    head = fh.read(64)
    if len(head) < 56 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (0, 1) or head[13] != 8:
        return None
    base_at = 24 if head[8] == 0 else 28
    end_at = base_at + 16
    base = int.from_bytes(head[base_at:base_at + 8], "little")
    allocated = int.from_bytes(head[end_at:end_at + 8], "little")
    actual = os.fstat(fh.fileno()).st_size - base
    return (end_at, actual) if actual > allocated else None


def allocation_short(path: str) -> bool:
    """True when the file is longer than its superblock says HDF5 allocated: a writer died mid-write.

    HDF5 trims a file to its allocation when it closes it, so this only happens after a crash; and
    opening such a file read-write, then closing it, would trim away what the writer had stored.
    """
    with open(path, "rb") as fh:
        return _short_allocation(fh) is not None


def extend_allocation(path: str) -> bool:
    """Count the whole file as allocated (raise the superblock's end-of-allocation address to its size).

    A writer killed between HDF5's metadata writes and its next superblock write leaves metadata
    pointing into space the superblock does not yet count as allocated; HDF5 then refuses to open
    or change those objects ("addr overflow"). The bytes are on disk, so counting them as allocated
    (what HDF5's ``h5clear --increment`` does) lets the interrupted append be rolled back. Returns
    True if the superblock changed.
    """
    with open(path, "r+b") as fh:
        short = _short_allocation(fh)
        if short is None:
            return False
        end_at, actual = short
        fh.seek(end_at)
        fh.write(actual.to_bytes(8, "little"))
        fh.flush()
        os.fsync(fh.fileno())
    return True


# ----------------------------------------------------------------------------- opening
_LOCK_HINT = (
    "HDF5 could not lock the file (another process may be writing it, or the file system does not "
    "support locks, as on some NFS mounts). To read anyway, open read-only without locking: "
    "loompy.connect(path, 'r', locking=False) or set HDF5_USE_FILE_LOCKING=FALSE."
)


def _is_lock_error(exc: OSError) -> bool:
    text = str(exc).lower()  # "lock" as a word: HDF5 also speaks of its superblock ("sblock")
    return bool(re.search(r"\block(ing|ed)?\b", text)) or \
        getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOLCK)


def replaced_since_opened(file: h5py.File, path: str) -> bool:
    """Whether the file at ``path`` is no longer the one ``file`` has open (a permute in another
    thread renamed a new one over it). False when that cannot be told (a driver without a descriptor)."""
    try:
        opened, now = os.fstat(file.id.get_vfd_handle()), os.stat(path)
    except (OSError, ValueError, RuntimeError, TypeError):
        return False
    return (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino)


def open_h5(filename: str | os.PathLike, mode: str, *, locking: bool | None = None) -> h5py.File:
    """Open the HDF5 file behind a Loom file, turning HDF5's errors into loompy's."""
    path = os.fspath(filename)
    if mode not in ("r", "r+"):
        raise LoomValueError(f"{path}: mode must be 'r' (read-only) or 'r+' (read/write), got {mode!r}")
    if not os.path.exists(path):
        raise LoomFileNotFoundError(errno.ENOENT, "no such Loom file", path)
    if os.path.isdir(path):
        raise LoomFileError(f"{path}: is a folder, not a Loom file")
    if os.path.getsize(path) == 0:  # HDF5 would write a header into it when opening it for writing
        raise LoomFileError(f"{path}: the file is empty, not a Loom file")
    forks.refuse_inherited(path)
    kwargs: dict[str, Any] = {}
    if locking is not None:
        kwargs["locking"] = locking
    if mode == "r+" and allocation_short(path):  # HDF5, opening it for writing, would trim it
        if not _loom_or_unreadable(path, kwargs):
            raise LoomFormatError(f"{path}: not a Loom file (and HDF5 would cut off its last bytes if it were "
                                  "opened for writing)")
        extend_allocation(path)  # a writer died, or its disk filled up, mid-write: keep what it stored
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        if _is_lock_error(exc):
            raise LoomLockError(f"{path}: {_LOCK_HINT} ({exc})") from exc
        if "truncated file" in str(exc):
            raise LoomFileError(f"{path}: the file is shorter than HDF5 recorded it (an incomplete copy or "
                                f"download?) ({exc})") from exc
        if "addr overflow" in str(exc):  # a writer died before HDF5 recorded the space it had used
            raise unreadable(path, exc) from exc
        raise LoomFileError(f"{path}: cannot open as a Loom (HDF5) file: {exc}") from exc


def _loom_or_unreadable(path: str, kwargs: dict[str, Any]) -> bool:
    """Whether a file may be repaired before it is opened for writing: it looks like a Loom file, or
    HDF5 cannot even read it (metadata past its recorded end: a writer's)."""
    try:
        with h5py.File(path, "r", **kwargs) as f:
            return looks_like_loom(f)
    except OSError:
        return True


def unreadable(path: str, exc: Exception) -> LoomFileError:
    """The error for a file HDF5 opened but cannot read the structure of."""
    if "addr overflow" in str(exc):  # a writer died (or its disk filled up) before HDF5 recorded its space
        return LoomFileError(f"{path}: a write was interrupted; open it once with mode 'r+' to repair it ({exc})")
    return LoomFileError(f"{path}: the file is damaged; HDF5 cannot read its structure ({exc})")
