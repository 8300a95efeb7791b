"""Row, column and global attribute managers.

All three are mutable mappings (``keys``, ``items``, ``in``, ``get``, ``update``...) with dot access.
Values are read from the file on first use and cached; assignment validates, then writes
through to the file at once. A manager made with ``file=None`` holds values in memory only
(used by views).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from . import encoding, forks
from . import format as fmt
from .errors import LoomAttributeError, LoomKeyError, LoomMixedAttributesError, LoomValueError, naming
from .handles import (
    Dims,
    approximate_nbytes,
    changing,
    check_deletable,
    check_room,
    check_writable,
    kept_since,
    one_of_the_writes,
)
from .indexing import AXIS_NAMES, select_axis


def _convert(values: Any, dtype: Any, where: str) -> np.ndarray:
    """Apply an explicit dtype; ``"string"``/``"str"`` (the seed's names) mean text. Numbers are
    converted only where that changes no value (1.5 does not become 1), as matrix writes are."""
    try:
        if dtype in ("string", "str", str):
            return np.asarray(values).astype(str)
        wanted, arr = np.dtype(dtype), np.asarray(values)
        if arr.dtype.kind in "US" and wanted.kind in "biuf":  # written out: read exactly, then as numbers
            arr = _numbers_in_text(arr, wanted, where)
        if arr.dtype.kind in "biuf" and wanted.kind in "biuf":
            return fmt.cast_values(arr, wanted, where)
        return np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, LoomValueError):
            raise
        raise LoomValueError(f"{where}: cannot convert values to dtype {dtype!r} ({exc})") from exc


_TRUTHS = {"true": True, "1": True, "false": False, "0": False}  # what text may say for a boolean


def _numbers_in_text(texts: np.ndarray, wanted: np.dtype, where: str) -> np.ndarray:
    """The numbers ``texts`` spell, as float64 for a float ``wanted``, booleans for a boolean one
    (numpy would take any non-empty text, "False" too, for True), else as exact integers (int64 or
    uint64: "1.5" is not an integer, and "300" stays 300 for the caller to refuse as uint8)."""
    if wanted.kind == "b":
        words = [(x.decode("utf-8", "replace") if isinstance(x, bytes) else x).strip().lower()
                 for x in texts.ravel().tolist()]
        wrong = [w for w in words if w not in _TRUTHS]
        if wrong:
            raise ValueError(f"'{wrong[0]}' is not a boolean (true, false, 1 or 0)")
        return np.array([_TRUTHS[w] for w in words], dtype=bool).reshape(texts.shape)
    if wanted.kind == "f" or not texts.size:
        return texts.astype(np.float64 if wanted.kind == "f" else np.int64)
    return encoding.exact_integers([int(x) for x in texts.ravel().tolist()], where).reshape(texts.shape)


class DotAccess:
    """``m.name`` reads ``m["name"]``, ``m.name = value`` writes it and ``del m.name`` deletes it; a
    missing name raises AttributeError.

    Every name assigned with a dot is written, ``_Flag`` and ``axis`` too (loompy 3 writes them);
    one that is also a method or property of the manager (``axis``, ``keys``) reads back only as
    ``m["name"]``. Subclasses set their own state with ``object.__setattr__``. Subclasses are mappings with a
    ``_where`` property naming the file and the kind of item.
    """

    _where: str

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]  # type: ignore[index]
        except KeyError:
            raise LoomAttributeError(f"{self._where} '{name}' does not exist") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value  # type: ignore[index]

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]  # type: ignore[attr-defined]
        except KeyError:
            raise LoomAttributeError(f"{self._where} '{name}' does not exist") from None


class CheckedUpdate:
    """``update`` for a manager of a file's items: every item is checked before the first is written,
    so that one bad item leaves the file as it was (MutableMapping's ``update`` would have written
    the items before it). Subclasses give ``_checked(name, value)``: the checks of one item, which
    return its write."""

    _file: h5py.File | None
    _checked: Callable[[str, Any], Callable[[], None]]

    def _checked_all(self, pairs: list[tuple[str, Any]]) -> list[Callable[[], None]]:
        return [self._checked(name, value) for name, value in pairs]

    @one_of_the_writes
    def update(self, other: Any = (), /, **more: Any) -> None:
        """Write every item of ``other`` (a mapping, or pairs) and ``more``, all checked first."""
        pairs = [(k, other[k]) for k in other.keys()] if hasattr(other, "keys") else list(other)
        writes = self._checked_all(pairs + list(more.items()))
        for write in writes:
            write()


def last_written(manager: Any, name: str | None) -> str:
    """When item ``name`` of an attribute or graph manager (None: any of them) was last written, as
    ``ds.last_modified()`` gives it; in memory, now (nothing records it)."""
    if name is not None and name not in manager:
        raise LoomKeyError(f"{manager._where} '{name}' does not exist")
    if manager._file is None:
        return fmt.timestamp()
    group = manager._group
    if group is None:
        return fmt.read_stamp(manager._file)
    return fmt.read_stamp(group if name is None else group[name])


class AttributeManager(DotAccess, CheckedUpdate, MutableMapping):
    """Attributes along one axis (``axis=0``: rows, ``axis=1``: columns)."""

    def __init__(self, file: h5py.File | None, axis: int, dims: Dims, *, group_name: str | None = None,
                 legacy: bool = False, values: dict[str, np.ndarray] | None = None) -> None:
        object.__setattr__(self, "_file", file)
        object.__setattr__(self, "_group_name", group_name or fmt.ATTR_GROUPS[axis])
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "_dims", dims)
        object.__setattr__(self, "_legacy", legacy)
        object.__setattr__(self, "_cache", dict(values or {}))
        object.__setattr__(self, "_names", list(self._cache))
        group = self._group
        if group is not None:
            self._names[:0] = [k for k, v in group.items() if isinstance(v, h5py.Dataset) and k not in self._cache]

    @property
    def _group(self) -> h5py.Group | None:
        """The HDF5 group behind this manager (None in memory, or when the file lacks it)."""
        return None if self._file is None else fmt.get_group(self._file, self._group_name)

    # --------------------------------------------------------------- reading
    @property
    def _where(self) -> str:
        file = self._file.filename if self._file is not None else "<memory>"
        return f"{file}: {AXIS_NAMES[self.axis]} attribute"

    def __getitem__(self, key: Any) -> Any:
        """An attribute's values by name; with a tuple of names, those that exist (loompy 3's
        alternative names: one, or several of one dtype side by side as columns); with a selection
        (slice, indices, mask, int), every attribute at it, as an in-memory manager."""
        self._dims.sync()  # (columns another connection appended come with their values)
        if isinstance(key, str):
            if key not in self._cache:
                if key not in self._names:
                    raise LoomKeyError(f"{self._where} '{key}' does not exist")
                forks.check_current(self._file)
                self._cache[key] = encoding.read_values(self._group[key], self._legacy)
            return self._cache[key]
        if isinstance(key, tuple) and key and all(isinstance(k, str) for k in key):
            found = [self[k] for k in key if k in self._names]
            if not found:
                raise LoomKeyError(f"{self._where}: none of {list(key)} exists")
            if len({v.dtype for v in found}) > 1:
                names = [k for k in key if k in self._names]
                raise LoomMixedAttributesError(f"{self._where}: {names} differ in dtype, so they cannot be taken "
                                               "side by side")
            return found[0] if len(found) == 1 else np.column_stack(found)
        with naming(f"{self._where}s"):
            selection = select_axis(key, self._dims.shape[self.axis], self.axis)
        index = selection.indices[0] if selection.drop else selection.indices
        return AttributeManager(None, self.axis, Dims.along(self.axis, 1 if selection.drop else len(index)),
                                values={name: self[name][index] for name in self._names})

    def last_modified(self, name: str | None = None) -> str:
        """When attribute ``name`` (None: any of them) was last written (see :func:`last_written`)."""
        return last_written(self, name)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def keys(self) -> list[str]:  # loompy 3 returns a list
        return list(self._names)

    def _ipython_key_completions_(self) -> list[str]:
        return self.keys()

    def __dir__(self) -> list[str]:
        return list(super().__dir__()) + [n for n in self._names if n.isidentifier()]

    def __repr__(self) -> str:
        return f"<{AXIS_NAMES[self.axis]} attributes: {', '.join(self._names) or 'none'}>"

    # --------------------------------------------------------------- writing
    def __setitem__(self, name: str, values: Any) -> None:
        self.set(name, values)

    @one_of_the_writes
    def set(self, name: str, values: Any, dtype: Any = None) -> None:
        """Validate ``values`` (one per row/column), then create or overwrite attribute ``name``."""
        self._checked(name, values, dtype)()

    def _checked(self, name: str, values: Any, dtype: Any = None) -> Callable[[], None]:
        fmt.check_name(name, self._where)
        where = f"{self._where} '{name}'"
        check_writable(self._file, where)
        self._dims.sync(on_disk=True)
        if self._file is not None and fmt.MATRIX not in self._file:
            raise LoomValueError(f"{where}: the file has no matrix yet, so no rows or columns to describe; "
                                 "its first add_columns (or add_loom, or ds.layers[''] = matrix) defines them")
        if dtype is not None:
            values = _convert(values, dtype, where)
        arr = encoding.normalize_values(values, where, length=self._dims.shape[self.axis])
        if isinstance(values, np.ndarray) and np.shares_memory(arr, values):
            arr = arr.copy()  # the cache must not follow later changes to the caller's array
        if self._file is not None:
            check_room(self._file, approximate_nbytes(arr), where)
        return lambda: self._store(name, arr, where)

    def _store(self, name: str, arr: np.ndarray, where: str) -> None:
        if self._file is not None:
            group = self._file.require_group(self._group_name)
            try:
                fmt.write_values(group, name, arr, resizable=self.axis == 1, where=where, legacy=self._legacy)
            except BaseException:  # the file holds the old value, or (failed after it was stored) the new one
                self._cache.pop(name, None)  # so it is read from the file next time
                if isinstance(group.get(name), h5py.Dataset) and name not in self._names:
                    self._names.append(name)
                raise
        self._cache[name] = arr
        if name not in self._names:
            self._names.append(name)

    @one_of_the_writes
    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            raise LoomKeyError(f"{self._where} '{name}' does not exist")
        check_deletable(self._file, f"{self._where} '{name}'")
        group = self._group
        if group is not None and name in group:
            del group[name]
            fmt.touch(group)
        self._names.remove(name)
        self._cache.pop(name, None)

    # --------------------------------------------------------------- helpers for other modules
    def to_dict(self) -> dict[str, np.ndarray]:
        """Every attribute's values, by name (read from the file as needed)."""
        return {name: self[name] for name in self._names}

    def _forget(self, values: bool = True) -> None:
        """Drop cached values (after the file changed underneath, e.g. columns were appended) and list
        the names again; ``values=False``: only list them (row attributes after columns were
        appended: an append adds row attributes, but never changes those there)."""
        if values:
            self._cache.clear()
        group = self._group
        if group is not None:
            self._names[:] = [k for k, v in group.items() if isinstance(v, h5py.Dataset)]


@dataclass
class _KeptGlobals:
    """A global attribute manager's record of what it read: when (the file's opening and its count of
    global writes), the values read so far, and the names (None: not listed yet)."""

    source: tuple[int, int] | None
    values: dict[str, Any] = field(default_factory=dict)
    names: list[str] | None = None


class GlobalAttributeManager(DotAccess, CheckedUpdate, MutableMapping):
    """File-wide attributes (``title``, ``description``...); ``LOOM_SPEC_VERSION`` is read-only."""

    def __init__(self, f: h5py.File, *, in_group: bool, legacy: bool) -> None:
        object.__setattr__(self, "_file", f)
        object.__setattr__(self, "_in_group", in_group)
        object.__setattr__(self, "_legacy", legacy)
        object.__setattr__(self, "_kept", _KeptGlobals(None))

    @property
    def _where(self) -> str:
        return f"{self._file.filename}: global attribute"

    def _read_since(self) -> _KeptGlobals:
        """What was read since a global attribute was last written or deleted through any connection
        of this process (a view read them all each time, 0.5 ms of a small view's 1.2), kept to be
        added to. Files before spec 3.0.0 keep nothing (a new, empty record each time)."""
        if not self._in_group:
            return _KeptGlobals(None)
        source = kept_since(self._file, "globals")
        forks.check_current(self._file)  # (a forked child's counts stopped at the fork)
        if self._kept.source != source:
            object.__setattr__(self, "_kept", _KeptGlobals(source))
        return self._kept

    def __getitem__(self, name: str) -> Any:
        values = self._read_since().values
        if name not in values:
            if name not in self:
                raise LoomKeyError(f"{self._where} '{name}' does not exist")
            values[name] = fmt.read_global(self._file, name, self._in_group, self._legacy)
        value = values[name]
        return value.copy() if isinstance(value, np.ndarray) else value  # (the caller's to change)

    @one_of_the_writes
    def __setitem__(self, name: str, value: Any) -> None:
        self._checked(name, value)()

    def _checked(self, name: str, value: Any) -> Callable[[], None]:
        fmt.check_name(name, self._where)
        if name == fmt.SPEC_VERSION_KEY:
            if isinstance(value, bytes):  # (np.bytes_ too)
                value = value.decode("utf-8", "replace")
            if name in self and isinstance(value, str) and value == str(self[name]):
                return lambda: None  # (set to what it is: nothing changes, as in loompy 3)
            raise LoomValueError(f"{self._where} '{name}' is managed by loompy and cannot be changed")
        if name in (fmt.LAST_MODIFIED, fmt.APPEND_JOURNAL) and not self._in_group:  # (a file before spec 3.0.0)
            use = "time stamp of the file" if name == fmt.LAST_MODIFIED else "record of an unfinished append"
            raise LoomValueError(f"{self._where} '{name}': in a file that keeps its global attributes on its "
                                 f"root (before spec 3.0.0), that name is loompy's {use}")
        check_writable(self._file, f"{self._where} '{name}'")
        arr = fmt.normalize_global(value, name, self._file.filename)
        check_room(self._file, approximate_nbytes(np.asarray(arr)), f"{self._where} '{name}'")

        def write() -> None:
            with changing(self._file, "globals"):
                fmt.write_global(self._file, name, arr, self._in_group)
        return write

    @one_of_the_writes
    def __delitem__(self, name: str) -> None:
        if name == fmt.SPEC_VERSION_KEY or (name == fmt.LAST_MODIFIED and not self._in_group):
            raise LoomValueError(f"{self._where} '{name}' is managed by loompy and cannot be deleted")
        if name not in self:
            raise LoomKeyError(f"{self._where} '{name}' does not exist")
        check_deletable(self._file, f"{self._where} '{name}'")
        with changing(self._file, "globals"):
            fmt.delete_global(self._file, name, self._in_group)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and fmt.has_global(self._file, name, self._in_group)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def to_dict(self) -> dict[str, Any]:
        """Every global attribute, by name (one look at whether /attrs was written since they were read)."""
        kept = self._read_since()
        if kept.names is None or any(name not in kept.values for name in kept.names):
            return {name: self[name] for name in self.keys()}
        return {name: value.copy() if isinstance(value, np.ndarray) else value
                for name, value in kept.values.items() if name in kept.names}

    def keys(self) -> list[str]:
        kept = self._read_since()
        if kept.names is None:
            kept.names = fmt.global_names(self._file, self._in_group)
        return list(kept.names)

    def _ipython_key_completions_(self) -> list[str]:
        return self.keys()

    def __repr__(self) -> str:
        return f"<global attributes: {', '.join(self.keys()) or 'none'}>"
