"""What a process forked from one with Loom files open for writing may do with them.

A child made by ``fork`` (multiprocessing's default on Linux) inherits the parent's open HDF5
files together with a copy of HDF5's state of them: caches, changes not yet written, the file's
size. HDF5 in the child writes that state out whenever it flushes, evicts a cache entry or closes
the file (also when the child exits normally), over what the parent has written since, and the
file is damaged. So, at the fork:

- the parent first writes out what HDF5 holds for each file it has open for writing, so that the
  child's copy has nothing left to write;
- in the child, HDF5's descriptor of each such file is swapped for a read-only one on the same
  file: reads work as before, and any write HDF5 attempts there fails instead of landing;
- loompy refuses every write through such a connection (naming the file), skips the flushes its
  reads make, and its ``close`` lets go of the file without HDF5 closing it.

The child sees the file as it was at the fork; once the parent changes it, the child's reads may
fail. Nothing here calls h5py in the child: a lock h5py held in another thread of the parent at
the fork stays held there.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import h5py

_guarded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # connection -> (fd, number, dev, ino)
_inherited_numbers: set[int] = set()  # HDF5's numbers of the files this process inherited open for writing
_inherited_files: set[tuple[int, int]] = set()  # and their (device, inode)
_abandoned: list[h5py.File] = []  # inherited files let go of without HDF5 closing them


def watch(connection: Any) -> None:
    """Note how to reach the HDF5 descriptor of a connection's file at a fork (open for writing, in
    HDF5's default driver); called when it opens or reopens its file."""
    file = connection._file
    _guarded.pop(connection, None)
    if file.mode != "r+" or file.driver != "sec2":
        return
    try:
        fd = file.id.get_vfd_handle()
        found = os.fstat(fd)
    except (OSError, ValueError, RuntimeError, AttributeError):
        return
    _guarded[connection] = (fd, file.id.fileno, found.st_dev, found.st_ino)


def unwatch(connection: Any) -> None:
    """The connection's file is closed: its descriptor may now be another file's."""
    _guarded.pop(connection, None)


def inherited(file: h5py.File) -> bool:
    """Whether ``file`` is one this process inherited open for writing from the process it was forked from."""
    return bool(_inherited_numbers) and file.id.fileno in _inherited_numbers


def inherited_path(path: str) -> bool:
    """Whether ``path`` names a file this process inherited open for writing (HDF5 here would hand
    that inherited file over to a new connection)."""
    if not _inherited_files:
        return False
    try:
        found = os.stat(path)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) in _inherited_files


def abandon(file: h5py.File) -> None:
    """Let go of an inherited file without HDF5 closing it (which would write its state out)."""
    _keep_forever(file)


def _keep_forever(file: h5py.File) -> None:
    """Hold a reference to ``file``'s HDF5 handle that nothing drops, not even the interpreter's
    shutdown: dropping the last one closes the file, and here that write fails (and is reported at
    exit). HDF5 itself lets go of it when the process ends, silently."""
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(file.id))
    except (ImportError, AttributeError, OSError):  # (then only this module's list holds it)
        _abandoned.append(file)


def stale_note(file: h5py.File) -> str:
    """What to add to a message about an unreadable part of ``file`` when it is an inherited one."""
    if not inherited(file):
        return ""
    return (" (or the process this one was forked from has changed the file since the fork: here HDF5 "
            "sees it as it was then)")


def _before_fork() -> None:
    for connection in list(_guarded):
        try:
            connection._file.flush()
        except Exception:  # (a failing flush is reported by the parent's own next flush or close)
            pass


def _in_child() -> None:
    for connection, (fd, number, dev, ino) in list(_guarded.items()):
        _inherited_numbers.add(number)
        _inherited_files.add((dev, ino))
        _keep_forever(connection._file)  # (a connection dropped unclosed must not let HDF5 close it)
        try:
            reading = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY) if os.path.isdir("/proc/self/fd") \
                else os.open(connection._path, os.O_RDONLY)
            try:
                found = os.fstat(reading)
                if (found.st_dev, found.st_ino) == (dev, ino):
                    os.dup2(reading, fd)
            finally:
                os.close(reading)
        except OSError:  # (loompy still refuses to write; HDF5 keeps its writable descriptor)
            pass
    _guarded.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_in_child)
