"""The module loompy 3 kept its small helpers in, so that imports of that path
(``from loompy.utils import timestamp``) work as they did. The names are the package's own."""

from __future__ import annotations

import warnings

from .format import compare_loom_spec_version, get_loom_spec_version, timestamp


def deprecated(message: str) -> None:
    """Warn that the caller uses something deprecated (loompy 3's helper): a DeprecationWarning
    pointing at the caller's caller."""
    warnings.warn(message, DeprecationWarning, stacklevel=3)


__all__ = ["compare_loom_spec_version", "deprecated", "get_loom_spec_version", "timestamp"]
