"""The engine's worker threads.

A few threads do the inflating and deflating (both release the GIL). Work that already runs on one
of them stays on it: a read started by a worker (combine and permute read inside their write tasks)
does not start threads of its own, as on the small machines this library targets more threads only
contend for the cores and the GIL.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

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
