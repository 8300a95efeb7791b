"""The engine's workers: the calling thread and ``THREADS - 1`` helper threads.

They inflate and deflate (both release the GIL), and the calling thread works as one of them
rather than waiting while a pool works: on the small machines this library targets, every extra
thread only competes for the cores and the GIL. Work that already runs on a worker stays on it: a
read started inside a task (combine and permute read inside their write tasks) starts no threads
of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

THREADS = 2  # this library's target machines are small; more threads only contend for the GIL
QUEUED_TASKS = 2 * THREADS  # finished write tasks that may wait to be stored

_local = threading.local()
T = TypeVar("T")


def _mark_worker() -> None:
    _local.worker = True


def on_worker() -> bool:
    """True while this thread runs a task of :func:`run_in_order`: work started there stays on it."""
    return getattr(_local, "worker", False)


def run_all(tasks: Sequence[Callable[[], object]]) -> None:
    """Run every task, on this thread and ``THREADS - 1`` helpers (see :func:`run_in_order`)."""
    run_in_order(tasks, lambda _: None, len(tasks))


def run_in_order(tasks: Sequence[Callable[[], T]], consume: Callable[[T], None], ahead: int) -> None:
    """Run every task, on this thread and ``THREADS - 1`` helpers, and ``consume`` each result on
    this thread, in the tasks' order; at most ``ahead`` results wait to be consumed.

    This thread works as one of the workers (taking the next task whenever the result it must
    consume next is not ready), instead of waiting while a pool works: one thread fewer competes
    for the cores and the GIL (permute and combine about 5% faster than with a pool of two and
    this thread only consuming). The first failure stops all tasks not yet started and is raised.
    """
    state = threading.Condition()
    results: dict[int, T] = {}
    failures: list[BaseException] = []
    started = consumed = 0

    def claim(limit: int) -> int | None:
        """Under ``state``: the number of the next task to run, or None when none may start yet."""
        nonlocal started
        if failures or started >= len(tasks) or started - consumed >= limit:
            return None
        started += 1
        return started - 1

    def run(k: int) -> None:
        try:
            result = tasks[k]()
        except BaseException as error:
            with state:
                failures.append(error)
                state.notify_all()
            raise
        with state:
            results[k] = result
            state.notify_all()

    def helper() -> None:
        _mark_worker()
        while True:
            with state:
                k = claim(ahead)
                while k is None and not failures and started < len(tasks):
                    state.wait()
                    k = claim(ahead)
            if k is None:
                return
            try:
                run(k)
            except BaseException:  # (run recorded it in failures: the calling thread raises it)
                return

    helpers = [threading.Thread(target=helper, daemon=True) for _ in range(min(THREADS - 1, len(tasks) - 1))]
    for thread in helpers:
        thread.start()
    was_worker = on_worker()
    _local.worker = True
    try:
        for k in range(len(tasks)):
            while True:
                with state:
                    if failures:
                        raise failures[0]
                    if k in results:
                        result = results.pop(k)
                        break
                    mine = claim(ahead + 1)  # this thread may run one past the limit: it is about to consume
                    if mine is None:
                        state.wait()
                        continue
                run(mine)
            consume(result)
            with state:
                consumed = k + 1
                state.notify_all()
    except BaseException as error:
        with state:
            failures.append(error)
            state.notify_all()
        raise
    finally:
        _local.worker = was_worker
        for thread in helpers:
            thread.join()
