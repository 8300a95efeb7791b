"""Jobs in child processes: bands re-encoded (:mod:`.bands`; stored here as they come), lines
reduced (:mod:`.lines`), lines picked (:mod:`.picks`) or a scan's batches filled in memory shared
with this process (:mod:`.batches`). Their frames come through pipes widened to 1 MB where the
system allows.

The children are fresh interpreters (``sys.executable``, when it is a Python) that load
:mod:`.child`, the plans and :mod:`.codecs` from this package's folder without running
``loompy/__init__.py`` (no h5py, and never the user's ``__main__``, as multiprocessing's spawned
workers would). They are started before the source's chunks are listed and wait for their stdin
to close; then a temporary file they share holds their orders (which file to read: they check it
is the one listed) and the plan, and a counter from which each claims the next part when it is
ready for one (:func:`.child.claim`), so a child slowed down does fewer. This process handles
each part's result as its frame arrives. Children work as soon as they have their orders, so a
caller can start a job before other long work (combine: before it writes attributes and HDF5
copies its first input). Nothing is ever written to a child's pipe: a child that died would raise
SIGPIPE, which kills programs that do not ignore it.

Nothing here is needed for correctness: when children cannot be started (no ``pread``, a frozen
interpreter or one that is not Python, one core, fewer than ``MIN_CHUNKS`` chunks, a temporary
folder without file locks) the same parts are worked on this process's threads, and the parts
children did not give (one failed, or none sent anything for ``PATIENCE`` seconds) are worked on
them at the end. A chunk a child finds damaged raises :class:`~.codecs.DamagedChunk` here, as it
would on a thread.
"""

from __future__ import annotations

import functools
import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows (where no helper process is started)
    fcntl = None

from . import codecs
from .child import COUNTER, DAMAGED, DATA, FAILED, FRAME, LENGTH_PREFIX, check_locks
from .memory import POPULATE_FROM, populate
from .workers import QUEUED_TASKS, THREADS, run_in_order

if TYPE_CHECKING:  # (the plans are only named here; the children load them)
    from .bands import BandPlan
    from .batches import BatchPlan
    from .lines import LinePlan
    from .picks import PickPlan

MIN_CHUNKS = 20000  # jobs over fewer chunks than this run on threads: starting children costs about
# 0.1 s of CPU each, re-encoding about 25 us per chunk, inflating and reducing about 10 us
AHEAD_BYTES = 32 << 20  # a child's finished frames may wait for this process up to this many bytes (and
# the one it is sending: the part it is working on then waits)
PATIENCE = 120.0  # seconds without a byte from any child (or within a frame) before this process does the rest

# numpy's BLAS starts a thread per core that spins for a while (0.1 s of CPU in each child, which
# never uses it): one thread, with OpenBLAS, MKL or OpenMP
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}

Store = Callable[[int, list, list, list], None]  # (band, tile numbers, their bytes, all-zero tile numbers)

_BOOT = """import sys, types
sys.path[:] = {path!r}
for name, folder in (("loompy", {package!r}), ("loompy.engine", {engine!r})):
    module = types.ModuleType(name); module.__path__ = [folder]; sys.modules[name] = module
from loompy.engine.child import child_main
child_main()
"""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _can_start_children() -> bool:
    """Whether children can run here: a POSIX system, more than one core, and ``sys.executable``
    a Python (not a frozen program, nor a host that embeds one, such as uWSGI)."""
    name = os.path.basename(sys.executable or "").lower()
    return (os.name == "posix" and hasattr(os, "pread") and name.startswith(("python", "pypy"))
            and not getattr(sys, "frozen", False) and THREADS > 1 and _cores() > 1)


class ChildJob:
    """The parts of a plan (:class:`~.bands.BandPlan`, :class:`~.lines.LinePlan`, :class:`~.picks.PickPlan`),
    worked by children when there are at least ``MIN_CHUNKS`` chunks.

    Children start when the job is made; :meth:`begin` gives them the plan, :meth:`collect` hands
    each part's result over as it comes, and :meth:`close` (or leaving the ``with`` block) ends
    any still running.
    """

    def __init__(self, chunks: int, passed: tuple[int, ...] = ()):
        """Start the children for a job over ``chunks`` chunks, when that many are worth it; they
        inherit the descriptors ``passed`` (under the same numbers)."""
        self.plan: BandPlan | LinePlan | PickPlan | BatchPlan | None = None
        self.passed = passed
        self.fd = -1
        self.children: list[subprocess.Popen | None] = []
        self.shared = None  # the temporary file the orders and plan go into
        if chunks >= MIN_CHUNKS and _can_start_children():
            self._start_children()

    def __enter__(self) -> ChildJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_children(self) -> None:
        engine_folder = os.path.dirname(os.path.abspath(__file__))
        boot = _BOOT.format(path=[p for p in sys.path if p], package=os.path.dirname(engine_folder),
                            engine=engine_folder)
        count = min(THREADS, _cores())
        env = {**os.environ, **ONE_THREAD}
        try:
            self.shared = tempfile.TemporaryFile()
            check_locks(self.shared.fileno())  # (children take parts under a lock on this file)
            for _ in range(count):
                self.children.append(subprocess.Popen(
                    [sys.executable, "-I", "-c", boot, str(self.shared.fileno())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    pass_fds=(self.shared.fileno(), *self.passed), bufsize=0, env=env))
                _widen(self.children[-1].stdout.fileno())
        except (OSError, ValueError):  # no children here: threads do it all
            self.close()
        except BaseException:  # (Ctrl-C between two starts: the first child would wait on its stdin for good)
            self.close()
            raise

    def begin(self, plan: BandPlan | LinePlan | PickPlan | BatchPlan, fd: int, path: str,
              file_id: tuple[int, int]) -> None:
        """Work ``plan``'s parts, reading the source through ``fd`` here and by ``path`` (which must
        still be the file ``file_id`` names) in the children."""
        self.plan, self.fd = plan, fd
        if not self.children:
            return
        orders = json.dumps({"kind": plan.KIND, "source": path, "file": list(file_id),
                             "ahead": AHEAD_BYTES}).encode()
        try:
            self.shared.write(COUNTER.pack(0) + LENGTH_PREFIX.pack(len(orders)) + orders + plan.to_bytes())
            self.shared.flush()
        except OSError:
            self.close()
            return
        for child in self.children:  # closing (never writing: a dead child would raise SIGPIPE) says go
            child.stdin.close()

    def work_all(self, handle: Callable[[int, object], None]) -> None:
        """``handle(part, result)`` on this thread for every part: the children's as their frames
        come (:meth:`collect`), then the parts they did not give, worked here on the workers (each
        thread keeps the worker ``plan.worker`` makes: it holds buffers)."""
        plan, fd = self.plan, self.fd
        done = self.collect(handle)
        mine = threading.local()

        def work(part: int) -> tuple[int, object]:
            if not hasattr(mine, "worker"):
                mine.worker = plan.worker(fd)
            return part, mine.worker.result(part)

        tasks = [functools.partial(work, p) for p in np.flatnonzero(~done).tolist()]
        run_in_order(tasks, lambda finished: handle(*finished), QUEUED_TASKS)

    def collect(self, handle: Callable[[int, object], None]) -> np.ndarray:
        """``handle(part, result)`` for each part a child works (``result``: what the plan's
        ``read_frame`` makes of its frame), as the frames come, until every part is handled, every
        child has ended or failed, or none has sent a byte for ``PATIENCE`` s; then end them all.
        Returns which parts were handled: the caller works the others."""
        done = np.zeros(self.plan.parts, dtype=bool)
        listening = select.poll()  # (select.select cannot wait on descriptors past 1023)
        by_fd = {}
        for k, child in enumerate(self.children):
            if child is not None:
                by_fd[child.stdout.fileno()] = k
                listening.register(child.stdout.fileno(), select.POLLIN)
        left = self.plan.parts
        while by_fd and left:  # (once all are stored, a child still starting up is not waited for)
            ready = listening.poll(PATIENCE * 1000)
            if not ready:  # nothing from any child for PATIENCE seconds: this process does the rest
                break
            for fd, _ in ready:
                k = by_fd[fd]
                try:
                    frame = self._next_frame(fd, done)
                except codecs.DamagedChunk:  # (a ValueError, but the source's fault, not the child's)
                    raise
                except (EOFError, OSError, ValueError, struct.error):  # ended, or failed: others go on
                    frame = None
                if frame is None:
                    listening.unregister(fd)
                    del by_fd[fd]
                    self._end(k)
                    continue
                part, result = frame
                handle(part, result)
                done[part] = True
                left -= 1
        self.close()
        return done

    def _next_frame(self, fd: int, done: np.ndarray) -> tuple[int, object] | None:
        """The next frame a child sends, as (part, its result); None when it has ended or failed a part."""
        head = _read(fd, FRAME.size, allow_end=True)
        if head is None:
            return None
        part, kind, count, second = FRAME.unpack(head)
        if kind == DAMAGED:
            raise codecs.DamagedChunk(_read(fd, count).decode(errors="replace"))
        if kind == FAILED:
            return None
        if not 0 <= part < len(done) or done[part]:
            raise ValueError(f"a frame for part {part}, which is not due")
        if kind != DATA:
            raise ValueError(f"a frame of kind {kind}")
        return part, self.plan.read_frame(part, count, second, functools.partial(_read, fd))

    def _end(self, k: int) -> None:
        child, self.children[k] = self.children[k], None
        if child is not None:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if not stream.closed:
                    stream.close()

    def close(self) -> None:
        """End every child still running (none is needed once its parts are handled) and forget them."""
        self._end_from(0)

    def _end_from(self, first: int) -> None:
        """End the children from the ``first`` on, then forget them all; an interrupt while one is
        ended still ends the others."""
        if first < len(self.children):
            try:
                self._end(first)
            finally:
                self._end_from(first + 1)
            return
        self.children = []
        if self.shared is not None:
            self.shared.close()
            self.shared = None


PIPE_BYTES = 1 << 20  # a child's pipe holds this much (Linux's default most; its own default is 64 KB)


def _widen(fd: int) -> None:
    """Let the pipe ``fd`` (a child's output, in any job) hold ``PIPE_BYTES``, where the system allows:
    a quarter of the rows of 20,000 x 20,000 float32 (400 MB picked) took 1.5 s through 64 KB pipes,
    1.0 s through 1 MB ones."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):  # (not Linux, or a lower limit: the pipe stays as it was)
        pass


def _read(fd: int, n: int, allow_end: bool = False) -> bytes | None:
    """``n`` bytes from a child's pipe; EOFError when it ends first or sends nothing for ``PATIENCE``
    s (with ``allow_end``, None when it ends before the first byte)."""
    parts, left = [], n
    waiting = select.poll()  # (select.select cannot wait on descriptors past 1023)
    waiting.register(fd, select.POLLIN)
    while left:
        if not waiting.poll(PATIENCE * 1000):
            raise EOFError(f"a helper process sent nothing for {PATIENCE:.0f} s")
        data = os.read(fd, min(left, 1 << 20))
        if not data and allow_end and left == n:
            return None
        if not data:
            raise EOFError(f"a helper process ended early ({n - left} of {n} bytes)")
        parts.append(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class BandJob(ChildJob):
    """A :class:`ChildJob` of bands, each part's chunks stored as they come."""

    def store_all(self, store: Store) -> None:
        """Hand every part to ``store`` as (band, tile numbers, their bytes, all-zero tile numbers),
        each as soon as it is encoded (see :meth:`ChildJob.work_all`)."""
        plan = self.plan
        self.work_all(lambda part, result: store(plan.part(part)[0], *result))


class LineJob(ChildJob):
    """A :class:`ChildJob` of lines, each part's values placed as they come."""

    def reduce_all(self, results: list[np.ndarray]) -> None:
        """Fill ``results`` (one array per function of the plan, a value per line) with every part's
        values (see :meth:`ChildJob.work_all`)."""
        plan = self.plan

        def place(part: int, values: list[np.ndarray]) -> None:
            lines = plan.part_lines(part)
            for result, v in zip(results, values):
                result[lines.start:lines.stop] = v

        self.work_all(place)


class PickJob(ChildJob):
    """A :class:`ChildJob` of picked lines, each part's lines placed as they come."""

    def pick_all(self, out: np.ndarray) -> None:
        """Fill ``out`` (the plan's wanted lines by its other wanted positions, as rows by columns)
        with every part's block (see :meth:`ChildJob.work_all`)."""
        plan = self.plan
        # this process only waits for the children meanwhile (2,000 columns of 20,000: 1.05-1.08 s
        # against 1.25-1.38 with the result's pages faulted one by one as its columns came in)
        if out.nbytes >= POPULATE_FROM:
            populate(out)

        def place(part: int, block: np.ndarray) -> None:
            lines = plan.part_lines(part)
            if plan.axis == 0:
                out[lines.start:lines.stop] = block
            else:
                out[:, lines.start:lines.stop] = block

        self.work_all(place)


class BatchJob(ChildJob):
    """A :class:`ChildJob` filling a scan's batches in a ring shared with the children (see
    :mod:`.batches`); this process waits for each batch's parts in turn."""

    def __init__(self, chunks: int, ring: int):
        super().__init__(chunks, passed=(ring,))
        self.left: np.ndarray | None = None  # parts still to come, by batch
        self.damage: dict[int, str] = {}  # what a child found damaged, by batch (an error once it is asked for)

    def wait_for(self, batch: int) -> bool:
        """Take the children's frames until every part of ``batch`` is in its slot: True then;
        False, with the children ended, when one failed a part, all have ended, or none sent a
        byte for ``PATIENCE`` s (the caller reads the batch itself). DamagedChunk when a chunk of
        ``batch`` is damaged."""
        if self.left is None:
            self.left = self.plan.parts_per_batch.copy()
        listening, by_fd = select.poll(), {}
        for k, child in enumerate(self.children):
            if child is not None:
                by_fd[child.stdout.fileno()] = k
                listening.register(child.stdout.fileno(), select.POLLIN)
        while self.left[batch]:
            if batch in self.damage:
                raise codecs.DamagedChunk(self.damage[batch])
            ready = listening.poll(PATIENCE * 1000) if by_fd else []
            if not ready:
                self.close()
                return False
            for fd, _ in ready:
                try:
                    head = _read(fd, FRAME.size, allow_end=True)
                    if head is None:  # ended: done (it claimed past the last part) unless it failed
                        listening.unregister(fd)
                        child = self.children[by_fd.pop(fd)]
                        if child.wait(PATIENCE) != 0:  # (died: a part it claimed will never come)
                            raise EOFError(f"a helper process ended with status {child.returncode}")
                        continue
                    part, kind, count, second = FRAME.unpack(head)
                    if not 0 <= part < self.plan.parts or kind not in (DATA, DAMAGED):
                        raise ValueError(f"a frame of kind {kind} for part {part}")
                    if kind == DAMAGED:  # (the batches before it are whole: they are handed over first)
                        self.damage[int(self.plan.part_table[part, 0])] = _read(fd, count).decode(errors="replace")
                        continue
                    self.plan.read_frame(part, count, second, functools.partial(_read, fd))
                except (EOFError, OSError, ValueError, struct.error, subprocess.TimeoutExpired):
                    self.close()
                    return False
                self.left[self.plan.part_table[part, 0]] -= 1
        return True
