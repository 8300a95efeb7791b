"""Shared fixtures: real files from the field, the reference loompy, the engine's helper processes
forced on, a file held open for writing by another process, and the --run-slow switch."""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REAL = Path(__file__).parent / "data" / "real"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run long campaigns (marker 'slow')")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long campaign: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def reference():
    """The reference loompy 3.0.8 in its own cached venv (see tests/reference.py)."""
    from . import reference as ref

    ref.ensure_reference()
    return ref


@contextlib.contextmanager
def held_for_writing(path):
    """Another process has ``path`` open for writing with h5py (and so its HDF5 lock) meanwhile."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import h5py, time
        f = h5py.File({str(path)!r}, "r+")
        print("open", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        yield
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def held_in_another_thread(context):
    """``context`` (a dataset's turn, say) entered on another thread and held there until the block
    ends, or until the event the block is given is set."""
    import threading

    inside, leave = threading.Event(), threading.Event()

    def hold():
        with context:
            inside.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert inside.wait(10)
        yield leave
    finally:
        leave.set()
        holder.join()


def helpers_dying_in(monkeypatch, module: str, worker: str, method: str, parts: tuple[int, ...]) -> list[int]:
    """Make the engine's helper processes die (exit status 5, half a second in) as they start on
    ``parts`` in ``loompy.engine.<module>.<worker>.<method>(self, part)``; returns the parts this
    process then works itself, as they are worked."""
    processes = importlib.import_module("loompy.engine.processes")
    dying = (f"import os, time\nfrom loompy.engine import {module}\nreal = {module}.{worker}.{method}\n"
             f"{module}.{worker}.{method} = lambda self, part: (time.sleep(0.5), os._exit(5)) if part in {parts!r} "
             "else real(self, part)\n")
    boot = processes._BOOT.replace("from loompy.engine.child import child_main\n",
                                   dying + "from loompy.engine.child import child_main\n")
    assert boot != processes._BOOT
    monkeypatch.setattr(processes, "_BOOT", boot)
    here, cls = [], getattr(importlib.import_module(f"loompy.engine.{module}"), worker)
    real = getattr(cls, method)
    monkeypatch.setattr(cls, method, lambda self, part: here.append(part) or real(self, part))
    return here


class Helpers(list):
    """The helper processes started; ``left``: how many parts of their jobs this process's threads
    did instead (0 when the helpers did everything)."""

    left = 0


@pytest.fixture
def children(monkeypatch):
    """The engine's helper processes for every job, however small (combine, permute, map); yields
    the :class:`Helpers` started."""
    processes = importlib.import_module("loompy.engine.processes")
    started = Helpers()
    start, collect = processes.ChildJob._start_children, processes.ChildJob.collect

    def spy(job):
        start(job)
        started.extend(c for c in job.children if c is not None)

    def counting(job, handle):
        done = collect(job, handle)
        started.left += int((~done).sum())
        return done

    monkeypatch.setattr(processes, "MIN_CHUNKS", 0)
    monkeypatch.setattr(processes.ChildJob, "_start_children", spy)
    monkeypatch.setattr(processes.ChildJob, "collect", counting)
    return started
