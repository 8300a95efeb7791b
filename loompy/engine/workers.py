"""The engine's worker threads, and the arrays each of them reuses.

A few threads do the inflating and deflating (both release the GIL). Work that already runs on one
of them stays on it: a read started by a worker (combine and permute read inside their write tasks)
does not start threads of its own, as on the small machines this library targets more threads only
contend for the cores and the GIL.

Fresh memory costs more than copying there too: every large new array is page-faulted in again
(1.6 GB of fresh memory took 0.5 to 3.4 s of system time on the benchmark machine). So the engine,
and the producers that feed it, keep their working arrays in a :class:`Scratch`.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

THREADS = 2  # this library's target machines are small; more threads only contend for the GIL

_local = threading.local()


def _mark_worker() -> None:
    _local.worker = True


def worker_pool() -> ThreadPoolExecutor:
    """A pool of ``THREADS`` workers, marked as such (see :func:`on_worker`)."""
    return ThreadPoolExecutor(max_workers=THREADS, initializer=_mark_worker)


def on_worker() -> bool:
    """True on a thread of a :func:`worker_pool`: work started there stays on that thread."""
    return getattr(_local, "worker", False)


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
            array = self.arrays[name] = np.empty(count, dtype)
        return array[:count].reshape(shape)
