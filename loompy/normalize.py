"""loompy 3's conversions of attribute values, both ways, kept for code that calls them; this
library's own rules are :mod:`.encoding`'s (see the README: strings are stored as UTF-8)."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from . import encoding


def normalize_attr_values(a: Any, use_object_strings: bool = False) -> Any:
    """Values as an attribute stores them: text as ``str`` (``use_object_strings``, which loompy 3
    also took, changes nothing: this library stores text as UTF-8, not as escaped ASCII), booleans
    as uint8, numbers as they are; a scalar gives a scalar."""
    scalar = np.isscalar(a)
    values = encoding.normalize_values([a] if scalar else a, "normalize_attr_values")
    return values[0] if scalar else values


def materialize_attr_values(a: Any) -> Any:
    """Stored attribute values as a user sees them, as loompy 3 makes them: bytes and objects as
    ``str`` with HTML character references decoded (``&#233;``, ``&amp;``), ``str`` arrays as they
    are, in object arrays; numbers as they are. Unlike loompy 3 it keeps non-ASCII bytes (as UTF-8)."""
    scalar = np.isscalar(a)
    values = np.asarray([a] if scalar else a)
    if values.dtype.kind in "SO":
        texts = encoding.decode_strings(values).ravel().tolist()
        values = np.array([html.unescape(text) for text in texts], dtype=object).reshape(values.shape)
    elif values.dtype.kind == "U":
        values = values.astype(object)
    return values[0] if scalar else values


__all__ = ["materialize_attr_values", "normalize_attr_values"]
