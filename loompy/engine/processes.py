"""Encoding bands (see :mod:`.bands`) in child processes, storing them here in order.

The children are fresh interpreters (``sys.executable``, when it is a Python) that load
:mod:`.bands` and :mod:`.codecs` from this package's folder without running
``loompy/__init__.py`` (no h5py, and never the user's ``__main__``, as multiprocessing's spawned
workers would). They are started before the source's chunks are listed and wait for their stdin
to close; then a temporary file they share holds their orders (which file to read: they check it
is the one listed) and the plan, and their command line says which parts are theirs
(:func:`.bands.owner`). This process reads their frames in order and stores the chunks. Children
encode as soon as they have their orders, so a caller can start a job before other long work
(combine: before it writes attributes and HDF5 copies its first input). Nothing is ever written to
a child's pipe: a child that died would raise SIGPIPE, which kills programs that do not ignore it.

Nothing here is needed for correctness: when children cannot be started (no ``pread``, a frozen
interpreter or one that is not Python, one core, fewer than ``MIN_TILES`` chunks) the same parts
are encoded on this process's threads, and a part a child cannot give (it failed, or sent nothing
for ``PATIENCE`` seconds) is encoded here. A chunk a child finds damaged raises
:class:`~.codecs.DamagedChunk` here, as it would on a thread.
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

import numpy as np

from . import codecs
from .bands import DAMAGED, DATA, FRAME, BandEncoder, BandPlan, owner
from .workers import THREADS, run_in_order

MIN_TILES = 20000  # fewer output chunks than this are encoded on threads: starting children costs
# about 0.1 s of CPU each, the re-encoding about 25 us per chunk
AHEAD_BYTES = 64 << 20  # a child may run ahead of this process by this much raw data (2 to 32 parts)
PATIENCE = 120.0  # seconds this process waits for a child's next bytes before it does the part itself

Store = Callable[[int, list, list, list], None]  # (band, tile numbers, their bytes, all-zero tile numbers)

_BOOT = """import sys, types
sys.path[:] = {path!r}
for name, folder in (("loompy", {package!r}), ("loompy.engine", {engine!r})):
    module = types.ModuleType(name); module.__path__ = [folder]; sys.modules[name] = module
from loompy.engine.bands import child_main
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


class BandJob:
    """The parts of a plan being encoded, by children when there are at least ``MIN_TILES`` tiles.

    Children start when the job is made; :meth:`begin` gives them the plan, :meth:`store_all`
    hands every part to a store function in order, and :meth:`close` (or leaving the ``with``
    block) ends any still running.
    """

    def __init__(self, tiles: int):
        self.plan: BandPlan | None = None
        self.fd = -1
        self.children: list[subprocess.Popen | None] = []
        self.shared = None  # the temporary file the orders and plan go into
        if tiles >= MIN_TILES and _can_start_children():
            self._start_children()

    def __enter__(self) -> BandJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start_children(self) -> None:
        engine_folder = os.path.dirname(os.path.abspath(__file__))
        boot = _BOOT.format(path=[p for p in sys.path if p], package=os.path.dirname(engine_folder),
                            engine=engine_folder)
        count = min(THREADS, _cores())
        try:
            self.shared = tempfile.TemporaryFile()
            for k in range(count):
                self.children.append(subprocess.Popen(
                    [sys.executable, "-I", "-c", boot, str(self.shared.fileno()), str(k), str(count)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    pass_fds=(self.shared.fileno(),), bufsize=0))
        except (OSError, ValueError):  # no children here: threads do it all
            self.close()

    def begin(self, plan: BandPlan, fd: int, path: str, file_id: tuple[int, int]) -> None:
        """Encode ``plan``'s parts, reading the source through ``fd`` here and by ``path`` (which must
        still be the file ``file_id`` names) in the children."""
        self.plan, self.fd = plan, fd
        if not self.children:
            return
        part_bytes = plan.piece * plan.chunks[0] * plan.chunks[1] * np.dtype(plan.target_dtype).itemsize
        ahead = max(2, min(32, AHEAD_BYTES // part_bytes))
        orders = json.dumps({"source": path, "file": list(file_id), "ahead": ahead}).encode()
        try:
            self.shared.write(struct.pack("<q", len(orders)) + orders + plan.to_bytes())
            self.shared.flush()
        except OSError:
            self.close()
            return
        for child in self.children:  # closing (never writing: a dead child would raise SIGPIPE) says go
            child.stdin.close()

    def _frame(self, part: int) -> tuple | None:
        """Part ``part``'s result from its child, or None when the child cannot give it."""
        k = owner(part, len(self.children))
        child = self.children[k]
        if child is None:
            return None
        fd = child.stdout.fileno()
        try:
            got, kind, count, empty = FRAME.unpack(_read(fd, FRAME.size))
            if kind == DAMAGED:
                message = _read(fd, count).decode(errors="replace")
            else:
                _, start, stop = self.plan.part(part)
                if kind != DATA or got != part or count + empty != stop - start:
                    raise EOFError(f"part {got} of kind {kind} with {count} + {empty} tiles where {part} was due")
                numbers = np.frombuffer(_read(fd, 8 * (2 * count + empty)), dtype=np.int64)
                stored, lengths = numbers[:count].tolist(), numbers[count:2 * count].tolist()
                blob = memoryview(_read(fd, sum(lengths)))
                bounds = np.cumsum([0, *lengths]).tolist()
                return stored, [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])], numbers[2 * count:].tolist()
        except (EOFError, OSError, ValueError, struct.error):  # the child failed: this process takes over
            self._end(k)
            return None
        raise codecs.DamagedChunk(message)

    def store_all(self, store: Store) -> None:
        """Hand every part to ``store`` as (band, tile numbers, their bytes, all-zero tile numbers), in order."""
        plan, fd = self.plan, self.fd
        for k, child in enumerate(self.children):
            if child is not None and child.poll() not in (None, 0):  # failed already (could not start, say;
                self._end(k)                                         # one that is done has its frames sent)
        if not any(self.children):
            mine = threading.local()  # each thread's encoder (it keeps buffers)

            def encode(part: int) -> tuple:
                if not hasattr(mine, "encoder"):
                    mine.encoder = BandEncoder(plan, fd)
                return (plan.part(part)[0], *mine.encoder.encode(part))

            tasks = [functools.partial(encode, p) for p in range(plan.parts)]
            run_in_order(tasks, lambda result: store(*result), 2 * THREADS)
            return
        local = None
        for part in range(plan.parts):
            result = self._frame(part)
            if result is None:
                local = local or BandEncoder(plan, fd)
                result = local.encode(part)
            store(plan.part(part)[0], *result)

    def _end(self, k: int) -> None:
        child, self.children[k] = self.children[k], None
        if child is not None:
            child.kill()
            child.wait()
            for stream in (child.stdin, child.stdout):
                if not stream.closed:
                    stream.close()

    def close(self) -> None:
        """End every child still running (none is needed once its bands are stored) and forget them."""
        for k in range(len(self.children)):
            self._end(k)
        self.children = []
        if self.shared is not None:
            self.shared.close()
            self.shared = None


def _read(fd: int, n: int) -> bytes:
    """``n`` bytes from a child's pipe; EOFError when it ends first or sends nothing for ``PATIENCE`` s."""
    parts, left = [], n
    waiting = select.poll()  # (select.select cannot wait on descriptors past 1023)
    waiting.register(fd, select.POLLIN)
    while left:
        if not waiting.poll(PATIENCE * 1000):
            raise EOFError(f"a helper process sent nothing for {PATIENCE:.0f} s")
        data = os.read(fd, min(left, 1 << 20))
        if not data:
            raise EOFError(f"a helper process ended early ({n - left} of {n} bytes)")
        parts.append(data)
        left -= len(data)
    return parts[0] if len(parts) == 1 else b"".join(parts)
