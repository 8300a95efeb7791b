"""Turn any ``ds[rows, cols]`` key into per-axis index arrays (numpy only, no HDF5).

Selections are *outer* (orthogonal): ``ds[rows, cols]`` equals ``m[np.ix_(rows, cols)]`` on
the dense matrix, and an integer on an axis drops that axis, as in numpy. Readers fetch the
sorted unique indices once and then reorder/repeat in memory (:func:`expand`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.sparse as sp

from .encoding import matrix_values
from .errors import LoomIndexError, LoomTypeError, LoomValueError
from .format import cast_values

AXIS_NAMES = ("row", "column")


@dataclass(frozen=True)
class AxisSelection:
    """The selection on one axis: indices in requested order, and whether the axis is dropped."""

    indices: np.ndarray  # int64, non-negative, requested order (may repeat)
    length: int  # length of the axis selected from
    drop: bool = False  # an integer key: the axis disappears from the result

    @cached_property
    def is_sorted_unique(self) -> bool:
        idx = self.indices
        return bool(idx.size < 2 or np.all(idx[1:] > idx[:-1]))

    @cached_property
    def unique(self) -> np.ndarray:
        """Sorted unique indices: what must be read from disk."""
        return self.indices if self.is_sorted_unique else np.unique(self.indices)

    @cached_property
    def is_reversed(self) -> bool:
        """Whether the request is its unique indices backwards (``::-1`` steps): a reversed view of
        the block read gives it, with no second copy."""
        if self.is_sorted_unique:  # (the usual case, known already: nothing to compute)
            return False
        idx = self.indices
        return bool(np.all(idx[1:] < idx[:-1]))

    @cached_property
    def inverse(self) -> np.ndarray | None:
        """Positions in :attr:`unique` giving the requested order, or None when it is the identity."""
        if self.is_sorted_unique:
            return None
        return np.searchsorted(self.unique, self.indices)

    @cached_property
    def last_occurrence(self) -> np.ndarray | None:
        """For writes: for each unique index, the position of its last occurrence in the request."""
        if self.is_sorted_unique:
            return None
        n = len(self.indices)
        order = np.argsort(self.indices, kind="stable")
        sorted_idx = self.indices[order]
        is_last = np.ones(n, dtype=bool)
        is_last[:-1] = sorted_idx[1:] != sorted_idx[:-1]
        return order[is_last]

    def __len__(self) -> int:
        return int(self.indices.size)


def _is_int_like(key: Any) -> bool:
    if isinstance(key, (bool, np.bool_)):
        return False
    if isinstance(key, np.ndarray):
        return key.ndim == 0 and key.dtype.kind in "iu"
    try:
        operator.index(key)
        return True
    except TypeError:
        return False


def axis_number(axis: Any, where: str) -> int:
    """``axis`` as 0 (rows) or 1 (columns); 1.0 and np.int64(1) are axes too, as in loompy 3."""
    if axis not in (0, 1) or isinstance(axis, bool):
        raise LoomValueError(f"{where}: axis must be 0 (rows) or 1 (columns), got {axis!r}")
    return int(axis)


def batch_count(value: Any, where: str) -> int:
    """A batch size (``batch_size``, ``chunksize``): a positive whole number of rows or columns."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise LoomValueError(f"{where} must be a positive number of rows or columns, got {value!r}")
    return int(value)


def permutation(ordering: Any, length: int, where: str) -> np.ndarray:
    """``ordering`` as int64 positions, when it lists each of ``length`` positions once (a column
    vector too, as loompy 3 takes it)."""
    order = np.asarray(ordering)
    if order.shape == (length, 1):
        order = order.ravel()
    wanted = f"{where}: ordering must be a permutation of 0..{length - 1}, each of its {length} positions once"
    if order.dtype.kind not in "iu" or order.shape != (length,):
        raise LoomValueError(f"{wanted} (got shape {order.shape}, dtype {order.dtype})")
    if not np.array_equal(np.sort(order), np.arange(length)):
        outside = order[(order < 0) | (order >= length)]
        counts = np.bincount(order[(order >= 0) & (order < length)], minlength=length)
        why = f"{int(outside[0])} is out of range" if outside.size else \
            f"{int(np.flatnonzero(counts > 1)[0])} is repeated and {int(np.flatnonzero(counts == 0)[0])} missing"
        raise LoomValueError(f"{wanted} ({why})")
    return order.astype(np.int64)


def positions(items: Any, length: int, axis: int, *, unique: bool = False) -> np.ndarray:
    """Positions along an axis of ``length`` that ``items`` selects (None: all of them; a slice, an
    index array in its order and with its repeats, or a boolean mask in file order), as int64;
    sorted and unique with ``unique``."""
    if items is None:
        return np.arange(length, dtype=np.int64)
    chosen = select_axis(items if isinstance(items, slice) else np.asarray(items), length, axis).indices
    return np.unique(chosen) if unique else chosen.astype(np.int64, copy=False)


def select_axis(key: Any, length: int, axis: int) -> AxisSelection:
    """Normalise one axis's key (int, slice, list/array of ints, bool mask) against ``length``."""
    name = AXIS_NAMES[axis]
    if key is None:
        raise LoomTypeError("np.newaxis / None is not supported when indexing a Loom matrix")
    if isinstance(key, (bool, np.bool_)):
        raise LoomTypeError(f"a single boolean is not a valid {name} selection; use a boolean mask array")
    if _is_int_like(key):
        i = operator.index(key)
        if not -length <= i < length:
            raise LoomIndexError(f"{name} index {i} is out of bounds for {length} {name}s")
        return AxisSelection(np.array([i % length], dtype=np.int64), length, drop=True)
    if isinstance(key, slice):
        if key.step is not None and operator.index(key.step) == 0:
            raise LoomValueError(f"{name} slice step cannot be zero")
        start, stop, step = key.indices(length)
        return AxisSelection(np.arange(start, stop, step, dtype=np.int64), length)
    if isinstance(key, range):
        key = list(key)
    arr = np.asarray(key)
    if arr.ndim == 0:  # (a float, a string: numpy refuses them as indices too)
        raise LoomIndexError(f"a {name} index must be an integer, a slice, a list or a mask, got {key!r}")
    if arr.ndim != 1:
        raise LoomIndexError(f"{name} selection must be one-dimensional, got shape {arr.shape}")
    if arr.dtype.kind == "b":
        if arr.size != length:
            raise LoomIndexError(f"boolean {name} mask has length {arr.size}, expected {length}")
        return AxisSelection(np.flatnonzero(arr).astype(np.int64), length)
    if arr.size == 0:
        return AxisSelection(np.zeros(0, dtype=np.int64), length)
    if arr.dtype.kind not in "iu":
        raise LoomIndexError(f"{name} indices must be integers or booleans, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and (arr >= length).any():  # (before int64, where 2**64 - 1 would read as -1)
        raise LoomIndexError(f"{name} index {int(arr[arr >= length][0])} is out of bounds for {length} {name}s")
    idx = arr.astype(np.int64)
    bad = (idx < -length) | (idx >= length)
    if bad.any():
        raise LoomIndexError(f"{name} index {int(idx[bad][0])} is out of bounds for {length} {name}s")
    idx = np.where(idx < 0, idx + length, idx)
    return AxisSelection(idx, length)


def select(key: Any, shape: tuple[int, int]) -> tuple[AxisSelection, AxisSelection]:
    """Normalise a full ``ds[...]`` key into (rows, cols)."""
    if not isinstance(key, tuple):
        key = (key,)
    if sum(1 for k in key if k is Ellipsis) > 1:
        raise LoomIndexError("an index can only have a single ellipsis ('...')")
    parts = [k for k in key if k is not Ellipsis]
    if len(parts) > 2:
        raise LoomIndexError(f"too many indices for a 2-dimensional matrix: {len(parts)} were given")
    if key and key[0] is Ellipsis and len(parts) == 1:
        parts = [slice(None), parts[0]]
    while len(parts) < 2:
        parts.append(slice(None))
    return select_axis(parts[0], shape[0], 0), select_axis(parts[1], shape[1], 1)


def reversed_steps(rows: AxisSelection, cols: AxisSelection) -> tuple[slice, slice] | None:
    """When an axis is reversed and neither needs a gather: the steps (``::-1`` on each reversed
    axis) that make a block of (rows.unique, cols.unique) the request, as a view to read into."""
    if not (rows.is_reversed or cols.is_reversed) or any(
            s.inverse is not None and not s.is_reversed for s in (rows, cols)):
        return None
    return slice(None, None, -1 if rows.is_reversed else 1), slice(None, None, -1 if cols.is_reversed else 1)


def expand(block: np.ndarray, rows: AxisSelection, cols: AxisSelection) -> np.ndarray:
    """From a block read at (rows.unique, cols.unique) to the requested result (order, repeats, drops)."""
    if rows.inverse is not None and cols.inverse is not None:
        block = block[np.ix_(rows.inverse, cols.inverse)]
    elif rows.inverse is not None:
        block = block[rows.inverse]
    elif cols.inverse is not None:
        block = block[:, cols.inverse]
    return dropped(block, rows, cols)


def dropped(block: np.ndarray, rows: AxisSelection, cols: AxisSelection) -> np.ndarray:
    """``block``, in the request's order, without the axes an integer selected."""
    if rows.drop and cols.drop:
        return block[0, 0]
    if rows.drop:
        return block[0]
    if cols.drop:
        return block[:, 0]
    return block


def result_shape(rows: AxisSelection, cols: AxisSelection) -> tuple[int, ...]:
    """The shape numpy gives the selection: an axis selected by an integer is dropped."""
    return tuple(len(s) for s in (rows, cols) if not s.drop)


def values_for_unique(values: Any, rows: AxisSelection, cols: AxisSelection, dtype: np.dtype, where: str
                      ) -> np.ndarray:
    """For writes: broadcast ``values`` to the selection and keep, per unique cell, the last value given."""
    target = result_shape(rows, cols)
    values = matrix_values(values, where)
    if sp.issparse(values):  # (the selection's size, dense: what is written anyway)
        values = values.toarray()
    try:
        arr = np.broadcast_to(values, target)
    except ValueError as exc:
        raise LoomValueError(  # (a ValueError, as numpy's "could not broadcast")
            f"{where}: cannot assign values of shape {np.shape(values)} to a selection of shape {target}"
        ) from exc
    arr = arr.reshape(len(rows), len(cols))
    if rows.last_occurrence is not None:
        arr = arr[rows.last_occurrence]
    if cols.last_occurrence is not None:
        arr = arr[:, cols.last_occurrence]
    return np.ascontiguousarray(cast_values(arr, dtype, where))
