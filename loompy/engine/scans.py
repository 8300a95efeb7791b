"""A scan's batches of one layer, filled by the engine's helper processes in memory shared with
them (:mod:`.batches`), handed to the caller without a copy.

The ring of slots grows only when no slot is free: a slot is free once nothing refers to the batch
it last held (reference counts, as :class:`~.memory.Recycler` reads them), so a batch the caller
keeps is never written over, and a loop that lets go of each batch uses four slots. It stops at
``MOST_SLOTS``: a caller keeping more batches gets the rest from the threads.

A process forked while batches live (``multiprocessing``'s workers, say) gets its own copy of
every slot, as it would of any array (:func:`_copy_slots_before_fork`): writes on either side do
not reach the other, nor do the helpers' later batches reach the forked process.

Nothing here is needed for correctness: where the helpers cannot run (not Linux, no memfd, fewer
than ``MIN_CHUNKS`` chunks, a filter the engine does not decode), once any write to the file
began after the scan did (the children read the chunks as they were listed), or once a helper
failed, :meth:`BatchReads.batch` returns None and the scan reads the batch on this process's threads.
"""

from __future__ import annotations

import mmap
import os
import sys
import warnings
import weakref
from collections.abc import Callable

import h5py
import numpy as np

from . import processes
from .batches import BatchPlan
from .codecs import DamagedChunk
from .memory import _COUNTS_EXACT, copy_pages, drop_pages, move_pages
from .storage import chunk_layout, damaged, direct_reads, readable_directly

AHEAD = 2  # batches the children may fill beyond the one asked for
MOST_SLOTS = 16  # a ring grows to this many slots at most (each is a mapping, which holds a file
# descriptor): a caller that keeps more batches gets the later ones from the threads


class BatchReads:
    """The batches (``batch_size`` lines along ``axis``, each across the whole other axis) of
    ``dataset``, filled by helper processes; see :meth:`start`."""

    def __init__(self, dataset: h5py.Dataset, ring: int, job: processes.BatchJob, changed: Callable[[], bool]):
        self.dataset, self.ring, self.job, self.changed = dataset, ring, job, changed
        self.plan: BatchPlan = job.plan
        self.control = np.frombuffer(mmap.mmap(ring, self.plan.control_bytes), dtype=np.int64)
        self.owners: list[np.ndarray] = []  # each slot's memory (a batch handed out is a view of one)
        self.pid = os.getpid()  # (a process forked from this one leaves the helpers to it)
        self.holds: list[int] = []  # the batch each slot was last given

    @classmethod
    def start(cls, dataset: h5py.Dataset, axis: int, batch_size: int, changed: Callable[[], bool]
              ) -> BatchReads | None:
        """Helpers filling the batches of a scan of all of ``dataset`` along ``axis``, from its
        first line; None where they do not pay or cannot run. ``changed()`` tells whether any write
        to the file began since the scan did."""
        layout = chunk_layout(dataset)
        if layout is None or not _COUNTS_EXACT or not hasattr(os, "memfd_create") or 0 in dataset.shape:
            return None
        grid = [-(-n // c) for n, c in zip(dataset.shape, layout.chunks)]
        if grid[0] * grid[1] < processes.MIN_CHUNKS or not readable_directly(dataset):
            return None
        try:
            ring = os.memfd_create("loompy-scan", os.MFD_CLOEXEC)
        except OSError:
            return None
        job = None
        try:
            job = processes.BatchJob(grid[0] * grid[1], ring)
            with direct_reads(dataset) as direct:
                if not job.children or direct is None:
                    raise OSError("no helpers")
                index, fd = direct
                plan = BatchPlan(chunks=layout.chunks, shape=dataset.shape, axis=axis, dtype=dataset.dtype.str,
                                 compressed=layout.compressed, source_fill=layout.fill,
                                 others=np.arange(dataset.shape[1 - axis], dtype=np.int64), offset=index.offset,
                                 size=index.size, mask=index.mask, batch_size=batch_size, ring=ring,
                                 parent=os.getpid())
                os.ftruncate(ring, plan.control_bytes)
                job.begin(plan, fd, index.path, index.file_id)
            if not job.children:
                raise OSError("no helpers")
            return cls(dataset, ring, job, changed)
        except OSError:
            if job is not None:
                job.close()
            os.close(ring)
            return None
        except BaseException:
            if job is not None:
                job.close()
            os.close(ring)
            raise

    def batch(self, number: int) -> np.ndarray | None:
        """Batch ``number``, rows by columns, in memory nothing else refers to; None when the
        helpers stopped (the caller reads it itself). Batches are asked for in order."""
        if self.job is None:
            return None
        if os.getpid() != self.pid:
            self.close()
            return None
        if self.changed():  # (the chunks may have moved since the children listed them)
            self.close()
            return None
        try:
            for later in range(number, min(number + AHEAD + 1, self.plan.batches)):
                if not self.control[later]:
                    slot = self._free_slot(number)
                    self.holds[slot] = later
                    self.control[later] = slot + 1  # (the children may fill it from now on)
        except OSError:  # (no slot: MOST_SLOTS kept, no memory or descriptors left for one)
            if not self.control[number]:
                self.close()
                return None
        try:
            ready = self.job.wait_for(number)
        except DamagedChunk as error:
            self.close()
            if self.changed():
                return None
            raise damaged(self.dataset, error) from error
        if not ready or self.changed():
            self.close()
            return None
        slot = int(self.control[number]) - 1
        shape = self.plan.batch_shape(number)
        return self.owners[slot][:shape[0] * shape[1]].reshape(shape)

    def _free_slot(self, asked: int) -> int:
        """A slot for a batch after ``asked``: one whose batch was handed out (before ``asked``) and
        is referred to by nothing but this list, else a new one."""
        for k in range(len(self.owners)):
            if self.holds[k] < asked and sys.getrefcount(self.owners[k]) == 2:  # (this list, the call)
                return k
        k = len(self.owners)
        if k >= MOST_SLOTS:
            raise OSError(f"{MOST_SLOTS} slots kept")
        os.ftruncate(self.ring, self.plan.slot_offset(k + 1))
        memory = mmap.mmap(self.ring, self.plan.slot_bytes, offset=self.plan.slot_offset(k))
        self.owners.append(np.frombuffer(memory, dtype=np.dtype(self.plan.dtype)))
        _SLOTS[id(memory)] = (self.owners[-1].ctypes.data, self.plan.slot_bytes)
        weakref.finalize(memory, _SLOTS.pop, id(memory), None)
        self.holds.append(asked)
        return k

    def close(self) -> None:
        """End the helpers (batches already handed out stay the caller's); in a process forked
        from the one that started them, only forget them: they are its parent's."""
        job, self.job = self.job, None
        if job is not None and os.getpid() != self.pid:
            os.close(self.ring)
        elif job is not None:
            try:
                job.close()
            finally:
                os.close(self.ring)


_SLOTS: dict[int, tuple[int, int]] = {}  # every slot mapped in this process: address and length, by mapping
_COPIES: list[tuple[int, int, int | None]] = []  # while this process forks: each slot's address, length, copy


def _copy_slots_before_fork() -> None:
    """Copy every slot just before this process forks: the forked process takes the copies as
    its slots (:func:`_own_slots_after_fork`). Shared, a batch it changed would change for this
    process too, and this process's helpers would write new batches into slots the forked
    process still sees as its batches. (Copied here, not there: there, this process would go on
    writing while the copy was made.)"""
    _COPIES[:] = [(address, length, copy_pages(address, length)) for address, length in list(_SLOTS.values())]


def _own_slots_after_fork() -> None:
    copies, _COPIES[:] = list(_COPIES), []
    failed = sum(1 for address, length, copy in copies if copy is None or not move_pages(copy, address, length))
    if failed:
        warnings.warn(f"loompy: {failed} slots of scan batches are still shared with the process this one was "
                      "forked from: copy batches kept through the fork (np.array) before changing them",
                      RuntimeWarning, stacklevel=1)


def _drop_copies_after_fork() -> None:
    copies, _COPIES[:] = list(_COPIES), []
    for _, length, copy in copies:
        if copy is not None:
            drop_pages(copy, length)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_copy_slots_before_fork, after_in_child=_own_slots_after_fork,
                        after_in_parent=_drop_copies_after_fork)
