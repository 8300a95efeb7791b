"""Reusing memory instead of asking the operating system for more, and asking well when we must.

Fresh memory costs more than copying on the machines this library targets: every large new array
is page-faulted in again (1.6 GB of fresh memory took 0.5 to 3.4 s of system time on the benchmark
machine). So the engine and the producers that feed it keep their working arrays in a
:class:`Scratch`, and scans hand out batches from a :class:`Recycler`; new large arrays come from
:func:`fresh`, in small pages; a large result's pages are faulted in many at a time just before
they are written (:func:`populate`, :class:`Populated`).
"""

from __future__ import annotations

import functools
import mmap
import sys
import sysconfig
import threading
from collections.abc import Callable, Hashable

import numpy as np

SMALL_PAGES_FROM = 256 << 20  # arrays of this many bytes or more are kept out of huge pages (see fresh)
POPULATE_FROM = 16 << 20  # new results of this many bytes or more are faulted in ahead (see Populated)
_POPULATE_WRITE = 23  # Linux's MADV_POPULATE_WRITE (5.14 on; refused before): Python 3.11's mmap lacks it


@functools.cache
def _advise() -> Callable[[int, int, int], int] | None:
    """libc's madvise where Linux's MADV_NOHUGEPAGE exists, else None."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return None
    try:
        import ctypes

        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (ImportError, OSError, AttributeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def fresh(shape: int | tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """``np.empty(shape, dtype)``, in 4 KB pages when very large.

    numpy asks Linux for transparent huge pages for large arrays. On the benchmark machine (a
    virtual machine) ``ds[:, :]`` of the benchmark matrix (1.6 GB) took 0.84-2.40 s in huge pages
    against 0.99-1.11 s in small ones (alternating runs). Not from compaction (``/proc/vmstat``
    counted none): new memory costs what the host takes to back it, 0.8-1.9 s of system time per
    1.6 GB either way, and huge pages varied more. Arrays of tens of MB (a scan's batches) do
    better in huge pages (scans 3-8% slower in small ones), hence ``SMALL_PAGES_FROM``.
    """
    array = np.empty(shape, dtype)
    advise = _advise() if array.nbytes >= SMALL_PAGES_FROM else None
    if advise is not None:
        first = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            advise(first, end - first, mmap.MADV_NOHUGEPAGE)  # (a refusal changes nothing but the speed)
    return array


def populate(array: np.ndarray) -> bool:
    """Fault in the whole pages of C-contiguous ``array`` with one call, ready to be written; False
    where Linux cannot (before 5.14, other systems, other layouts: the pages then fault in as written).

    Pages already there keep what they hold. The benchmark machine's host takes back memory the
    guest frees (free page reporting), so each new page costs the host's fault as well as the
    guest's; one call for many pages saved a part of that (1.6 GB in fresh processes: 0.7-3.8 s of
    system time written page by page, 0.4-2.1 s faulted in ahead).
    """
    advise = _advise()
    if advise is None or not array.flags.c_contiguous:
        return False
    first = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (array.ctypes.data + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    return end <= first or advise(first, end - first, _POPULATE_WRITE) == 0


class Populated:
    """A new C-contiguous result faulted in a band of rows at a time, by whichever worker is about to
    write the band first, so that the faulting is shared by the workers and overlaps the inflating
    (``ds[:, :]`` of the benchmark matrix, alternating runs: 1.36-1.72 s against 1.66-2.08 s faulted
    page by page; all faulted ahead, before the reading, 1.53-2.0 s)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.started: set[int] = set()

    def rows(self, rows: slice) -> None:
        """Make rows ``rows`` ready to be written (the first call for a band's first row does it)."""
        if rows.start not in self.started:
            self.started.add(rows.start)  # (two workers doing it at once would only do it twice)
            populate(self.array[rows])


@functools.cache
def _mapping_calls() -> tuple[Callable, Callable, Callable] | None:
    """libc's mmap, mremap and munmap where Linux has them, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        new_map, remap, unmap = libc.mmap, libc.mremap, libc.munmap
    except (ImportError, OSError, AttributeError):
        return None
    new_map.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    remap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    new_map.restype = remap.restype = ctypes.c_void_p
    return new_map, remap, unmap


def _whole_pages(length: int) -> int:
    return -(-length // mmap.PAGESIZE) * mmap.PAGESIZE


def copy_pages(address: int, length: int) -> int | None:
    """A new private mapping holding the bytes of the ``length`` bytes (whole pages) at ``address``;
    None where it cannot be had. Give it to :func:`move_pages` or :func:`drop_pages`."""
    calls = _mapping_calls()
    if calls is None:
        return None
    import ctypes

    length = _whole_pages(length)
    copy = calls[0](None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if copy in (None, ctypes.c_void_p(-1).value):  # (MAP_FAILED)
        return None
    advise = _advise()
    if advise is not None:
        advise(copy, length, _POPULATE_WRITE)  # (faulted in ahead: see populate)
    ctypes.memmove(copy, address, length)
    return copy


def move_pages(copy: int, address: int, length: int) -> bool:
    """Put the pages of ``copy`` (from :func:`copy_pages`) at ``address``, in place of what is mapped
    there, in one call (arrays viewing ``address`` then view the copy); False, with the copy let
    go of, where that fails."""
    _, remap, unmap = _mapping_calls()
    length = _whole_pages(length)
    if remap(copy, length, length, 1 | 2, address) == address:  # (MREMAP_MAYMOVE | MREMAP_FIXED)
        return True
    unmap(copy, length)
    return False


def drop_pages(copy: int, length: int) -> None:
    """Let go of ``copy`` (from :func:`copy_pages`)."""
    _mapping_calls()[2](copy, _whole_pages(length))


class Scratch(threading.local):
    """Named arrays, one set per thread, each grown when a request is larger than what it holds.

    An array handed out stays valid until the same thread asks for the same name again.
    """

    def __init__(self) -> None:
        self.arrays: dict[Hashable, np.ndarray] = {}

    def get(self, name: Hashable, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, in memory reused under ``name``."""
        count = int(np.prod(shape))
        array = self.arrays.get(name)
        if array is None or array.size < count or array.dtype != dtype:
            array = self.arrays[name] = fresh(count, dtype)
        return array[:count].reshape(shape)


# reference counts tell whether anyone still refers to an array only where they are exact
_COUNTS_EXACT = sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")


class Recycler:
    """Arrays handed to a caller one after another (a scan's batches), each taking the memory of an
    earlier one that nothing refers to any more.

    Every numpy view of an array, however derived, refers to the array that owns the memory, so an
    owner whose only reference is this recycler's is free. A loop that lets go of each batch keeps
    three in turn: the one it works on, the one before (still bound to its loop variables when the
    next is asked for) and the one read ahead. A batch that is kept stays the caller's; the
    recycler forgets it.
    """

    KEPT = 3  # owners remembered: the batch in use, the one before it and the one read ahead

    def __init__(self) -> None:
        self.owners: list[np.ndarray] = []

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, in reused memory when some is free."""
        count, dtype = int(np.prod(shape)), np.dtype(dtype)
        owner = None
        for k in range(len(self.owners) if _COUNTS_EXACT else 0):
            if sys.getrefcount(self.owners[k]) == 2:  # this list's reference and the call's argument
                free = self.owners.pop(k)
                if free.dtype == dtype and free.size >= count:
                    owner = free
                break
        if owner is None:
            owner = fresh(count, dtype)
        self.owners.append(owner)
        del self.owners[:-self.KEPT]
        return owner[:count].reshape(shape)
