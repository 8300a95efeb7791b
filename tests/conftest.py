"""Shared fixtures: real files from the field, the reference loompy, and the --run-slow switch."""

from __future__ import annotations

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
