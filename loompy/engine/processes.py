"""Encoding bands (see :mod:`.bands`) in child processes, storing them here in order.

The children are fresh interpreters (``sys.executable``) that load :mod:`.bands` and
:mod:`.codecs` from this package's folder without running ``loompy/__init__.py`` (no h5py, and
never the user's ``__main__``, as multiprocessing's spawned workers would). They are started
before the source's chunks are even listed (they import numpy meanwhile) and wait for their stdin
to close: then a temporary file they share holds their orders (which file to read: they check it
is the one listed) and the plan. Which bands are theirs (every other block of ``BLOCK``) the
number on their command line says. This process reads their frames in band order and stores the
chunks. Children encode as soon as they have their orders, so a caller can start a job before
other long work (combine: before HDF5 copies its first input). Nothing is ever written to a
child's pipe: a child that died would raise SIGPIPE, which kills programs that do not ignore it.

Nothing here is needed for correctness: when children cannot be started (no ``pread``, a frozen
or embedded interpreter, too few cores) the same bands are encoded on this process's threads, and
a child that fails leaves its bands to this process. A chunk a child finds damaged raises
:class:`~.codecs.DamagedChunk` here, as it would on a thread.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable

import numpy as np

from . import codecs
from .bands import BLOCK, DAMAGED, DATA, FRAME, BandEncoder, BandPlan
from .workers import THREADS, run_in_order

MIN_TILES = 20000  # fewer output chunks than this are encoded on threads: starting children costs
# about 0.1 s of CPU each, the re-encoding about 25 us per chunk
AHEAD_FRAMES = 32  # finished bands a child may hold for this process (a few MB)

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
    return (os.name == "posix" and hasattr(os, "pread") and bool(sys.executable)
            and not getattr(sys, "frozen", False) and THREADS > 1 and _cores() > 1)


class BandJob:
    """Bands being encoded, by children when there are at least ``tiles`` (``MIN_TILES``) to do.

    Children start at once; :meth:`begin` gives them the plan, :meth:`store_all` hands each band
    to a store function in order, and :meth:`close` (or leaving the ``with`` block) ends any
    still running.
    """

    def __init__(self, tiles: int):
        self.plan: BandPlan | None = None
        self.fd = -1
        self.children: list[subprocess.Popen | None] = []
        self.shared = None  # the temporary file the plan goes into
        if tiles >= MIN_TILES and _can_start_children():
            self._start_children()

    def __enter__(self) -> BandJob:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def owner(self, band: int) -> int:
        return band // BLOCK % max(1, len(self.children))

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
                    pass_fds=(self.shared.fileno(),)))
        except (OSError, ValueError):  # no children here: threads do it all
            self.close()

    def begin(self, plan: BandPlan, fd: int, path: str, file_id: tuple[int, int]) -> None:
        """Encode ``plan``'s bands, reading the source through ``fd`` here and by ``path`` (which must
        still be the file ``file_id`` names) in the children."""
        self.plan, self.fd = plan, fd
        if not self.children:
            return
        orders = json.dumps({"source": path, "file": list(file_id), "ahead": AHEAD_FRAMES}).encode()
        try:
            self.shared.write(struct.pack("<q", len(orders)) + orders + plan.to_bytes())
            self.shared.flush()
        except OSError:
            self.close()
            return
        for child in self.children:  # closing (never writing: a dead child would raise SIGPIPE) says go
            child.stdin.close()

    def _frame(self, band: int) -> tuple | None:
        """Band ``band``'s result from its child, or None when the child cannot give it."""
        k = self.owner(band)
        child = self.children[k]
        if child is None:
            return None
        stream = child.stdout
        try:
            got, kind, count, empty = FRAME.unpack(_read(stream, FRAME.size))
            if kind == DAMAGED:
                message = _read(stream, count).decode(errors="replace")
            elif kind != DATA or got != band or count + empty != self.plan.tiles_per_band:
                raise EOFError(f"band {got} of kind {kind} with {count} + {empty} tiles where band {band} was due")
            numbers = np.frombuffer(_read(stream, 8 * (2 * count + empty)), dtype=np.int64)
            stored, lengths, zeros = numbers[:count].tolist(), numbers[count:2 * count].tolist(), numbers[2 * count:]
            blob = memoryview(_read(stream, sum(lengths)))
            bounds = np.cumsum([0, *lengths]).tolist()
            return stored, [blob[a:b] for a, b in zip(bounds[:-1], bounds[1:])], zeros.tolist()
        except (EOFError, OSError, ValueError, struct.error):  # the child failed: this process takes over
            self._end(k)
            return None
        raise codecs.DamagedChunk(message)

    def store_all(self, store: Store) -> None:
        """Hand every band to ``store``, in order."""
        plan, fd = self.plan, self.fd
        for k, child in enumerate(self.children):
            if child is not None and child.poll() not in (None, 0):  # failed already (could not start, say;
                self._end(k)                                         # one that is done has its frames sent)
        if not any(self.children):
            mine = threading.local()  # each thread's encoder (it keeps buffers)

            def encode(band: int) -> tuple:
                if not hasattr(mine, "encoder"):
                    mine.encoder = BandEncoder(plan, fd)
                return (band, *mine.encoder.encode(band))

            tasks = [functools.partial(encode, b) for b in range(plan.bands)]
            run_in_order(tasks, lambda result: store(*result), 2 * THREADS)
            return
        local = None
        for band in range(plan.bands):
            result = self._frame(band)
            if result is None:
                local = local or BandEncoder(plan, fd)
                result = local.encode(band)
            store(band, *result)

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


def _read(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"a helper process ended early ({len(data)} of {n} bytes)")
    return data
