"""Shared fixtures: real files from the field, the reference loompy, the engine's helper processes
forced on, and the --run-slow switch."""

from __future__ import annotations

import importlib
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


@pytest.fixture
def children(monkeypatch):
    """The engine's helper processes for every job, however small (combine, permute, map); yields
    the list of those started."""
    processes = importlib.import_module("loompy.engine.processes")
    started = []
    start = processes.ChildJob._start_children

    def spy(job):
        start(job)
        started.extend(c for c in job.children if c is not None)

    monkeypatch.setattr(processes, "MIN_CHUNKS", 0)
    monkeypatch.setattr(processes.ChildJob, "_start_children", spy)
    return started
