"""What a process forked from one with Loom files open for writing may do with them.

A child made by ``fork`` (multiprocessing's default on Linux) inherits the parent's open HDF5
files together with a copy of HDF5's state of them: caches, changes not yet written, the file's
size. HDF5 in the child writes that state out whenever it flushes, evicts a cache entry or closes
the file (also when the child exits normally), over what the parent has written since, and the
file is damaged. So, at the fork:

- the parent first writes out what HDF5 holds for each file it has open for writing (connections
  and the new files that create, combine and permute write), so that the child's copy has nothing
  left to write;
- in the child, HDF5's descriptor of each such file is swapped for a read-only one on the same
  file: reads work as before, and any write HDF5 attempts there fails instead of landing; the
  handles are kept for good, so that HDF5 never closes them there (it does when the process ends,
  and that write fails too);
- loompy refuses every write through them (naming the file), skips the flushes its reads make,
  refuses to open them again, and refuses reads of the matrix, layers, attributes and graphs not
  read before once the parent has written to the file (its size or modification time changed):
  HDF5 here would read it as it was at the fork.

(A scan's batches, in memory shared with the engine's helper processes, are copied for the child
by :mod:`loompy.engine.scans`.)
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import h5py

from .errors import LoomFileError

# owner (a connection, or the h5py file being written) -> (file, path, fd or None, number, device, inode)
_watched: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # taken around the fork: no thread is changing _watched as it is copied
# HDF5's number of each file inherited open for writing -> (path, fd, its size and modification time at the fork)
_inherited: dict[int, tuple[str, int | None, tuple[int, int] | None]] = {}
_inherited_files: set[tuple[int, int]] = set()  # (device, inode) of the files inherited open for writing
_kept: list[Any] = []  # (only where the interpreter's own reference counting cannot be used)


def watch(owner: Any, file: h5py.File, path: str) -> None:
    """Note a file open for writing (``owner`` holds it at ``path``), so that a fork protects it;
    called when it is opened or reopened. Files open read-only need nothing."""
    if file.mode != "r+":
        unwatch(owner)
        return
    fd = None
    try:
        if file.driver == "sec2":
            fd = file.id.get_vfd_handle()
            found = os.fstat(fd)
        else:
            found = os.stat(path)
        entry = (file, path, fd, file.id.fileno, found.st_dev, found.st_ino)
    except (OSError, ValueError, RuntimeError, AttributeError):
        unwatch(owner)
        return
    with _lock:
        _watched[owner] = entry


def unwatch(owner: Any) -> None:
    """``owner``'s file is about to be closed: its descriptor may then be another file's."""
    with _lock:
        _watched.pop(owner, None)


def inherited(file: h5py.File) -> bool:
    """Whether ``file`` is one this process inherited open for writing from the process it was forked from."""
    return bool(_inherited) and file.id.fileno in _inherited


def refuse_inherited(path: str) -> None:
    """Refuse to open ``path`` when it names a file this process inherited open for writing: HDF5
    here would hand over that inherited file, with the parent's state of it at the fork."""
    if not _inherited_files:
        return
    try:
        found = os.stat(path)
    except OSError:
        return
    if (found.st_dev, found.st_ino) in _inherited_files:
        raise LoomFileError(f"{path}: this process was forked from one that had the file open for writing, "
                            "and HDF5 cannot open it again safely here: have that process close the file (or "
                            "open it read-only) before it starts workers, with any start method, and connect in "
                            "each worker")


def check_current(file: h5py.File) -> None:
    """Before values are read from ``file``: refuse when it is an inherited one that the parent has
    written to since the fork (see :func:`check_unchanged`)."""
    if inherited(file):
        check_unchanged(file)


def _state(path: str, fd: int | None) -> tuple[int, int] | None:
    """What changes when a file is written to: its size and modification time (None: unknown)."""
    try:
        found = os.fstat(fd) if fd is not None else os.stat(path)
    except OSError:
        return None
    return found.st_size, found.st_mtime_ns


def check_unchanged(file: h5py.File) -> None:
    """Refuse to read an inherited file that the parent has written to since the fork."""
    path, fd, then = _inherited[file.id.fileno]
    now = _state(path, fd)
    if then is not None and now is not None and now != then:
        raise LoomFileError(f"{file.filename}: the process this one was forked from has written to the file since "
                            "the fork, and HDF5 here would read it as it was then (to read it as it is, have that "
                            "process close the file before it starts workers, and connect in each worker)")


def _before_fork() -> None:
    _lock.acquire()
    for file, *_ in list(_watched.values()):  # (file, path, fd, number, device, inode)
        try:
            file.flush()
        except Exception:  # (a failing flush is reported by the parent's own next flush or close)
            pass


def _after_in_parent() -> None:
    _lock.release()


def _after_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # (the parent's is held by the forking thread, which is this one)
    for file, path, fd, number, dev, ino in list(_watched.values()):
        _inherited_files.add((dev, ino))
        _inherited[number] = (path, fd, _state(path, fd))
        _keep_forever(file)
        if fd is not None:
            try:
                _read_only(fd, path, dev, ino)
            except OSError:  # (loompy still refuses to write; HDF5 keeps its writable descriptor)
                pass
    _watched.clear()


def _read_only(fd: int, path: str, dev: int, ino: int) -> None:
    """Put a read-only descriptor of the same file (opened through Linux's /proc, else by its path,
    when that still names it) in place of ``fd``. (Not through /dev/fd: on macOS and the BSDs that
    gives the same open file again, still writable.)"""
    for where in ([f"/proc/self/fd/{fd}"] if os.path.isdir("/proc/self/fd") else []) + [path]:
        try:
            reading = os.open(where, os.O_RDONLY)
        except OSError:
            continue
        try:
            found = os.fstat(reading)
            if (found.st_dev, found.st_ino) == (dev, ino):
                os.dup2(reading, fd)
                return
        finally:
            os.close(reading)


def _keep_forever(file: h5py.File) -> None:
    """Hold a reference to ``file``'s HDF5 handle that nothing drops, not even the interpreter's
    shutdown: dropping the last one makes HDF5 close the file, whose write here fails (and is
    reported at exit). HDF5 itself lets go of it when the process ends, silently."""
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(file.id))
    except (ImportError, AttributeError, OSError):
        _kept.append(file)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_in_parent, after_in_child=_after_in_child)
