"""Column attribute values of several sources, joined without changing any of them.

Shared by the appends (:mod:`.growing`) and the whole-file joins (:mod:`.combine`): one dtype for
values from several files (promoted only when every value survives), the fill values for columns
one side has no values for (``fill_values``), and file attributes that become per-column values
(``convert_attrs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import encoding
from . import format as fmt
from .errors import LoomValueError


def auto_fill(values: np.ndarray) -> Any:
    """The ``fill_values="auto"`` value for an attribute like ``values``: "" for text, 0 for numbers."""
    return "" if values.dtype == object or values.dtype.kind in "SU" else 0


def check_fill_values(fill_values: Any, where: str) -> None:
    """Refuse a ``fill_values`` that is neither None, ``"auto"`` nor a mapping of names to values
    (any other would be ignored where every attribute is given)."""
    if not (fill_values is None or isinstance(fill_values, Mapping) or is_auto(fill_values)):
        raise LoomValueError(f"{where}: fill_values must be None, 'auto' or a dict of column attribute names "
                             f"to values, got {fill_values!r}")


def fill_for(name: str, existing: np.ndarray, fill_values: Any, n: int, where: str,
              lacking: str = "the new columns") -> np.ndarray:
    """``n`` values of column attribute ``name`` (like ``existing``) for columns that have none
    (``lacking`` says which, for the message), from ``fill_values``."""
    if not has_fill(name, fill_values):
        raise LoomValueError(f"{where}: column attribute '{name}' has no values for {lacking} "
                             "(supply it, or pass fill_values={name: value} or fill_values='auto')")
    fill = auto_fill(existing) if is_auto(fill_values) else fill_values[name]
    shape = (n,) + existing.shape[1:]
    what = f"{where}: column attribute '{name}'"
    if existing.dtype.names is not None:  # compound: "auto" is zeros (and "" in text fields)
        if is_auto(fill_values):
            out = np.zeros(shape, existing.dtype)
            for field in existing.dtype.names:
                if existing.dtype.fields[field][0].kind == "O":
                    out[field] = ""
            return out
        try:
            return np.full(shape, np.array(fill, dtype=existing.dtype), dtype=existing.dtype)
        except (TypeError, ValueError) as exc:
            raise LoomValueError(f"{what} holds {existing.dtype} values; its fill value {fill!r} is not one "
                                 "of them") from exc
    if existing.dtype == object:
        if not isinstance(fill, str):
            raise LoomValueError(f"{where}: column attribute '{name}' holds text; its fill value must be a "
                                 f"string, got {fill!r}")
        return encoding.normalize_values(np.full(shape, fill, dtype=object), f"{where}: column attribute '{name}'")
    value = np.asarray(fill)
    refused = LoomValueError(f"{what} holds {existing.dtype} values; its fill value {fill!r} is not one of them")
    if value.dtype.kind not in "biuf" or value.ndim != 0:
        raise refused
    try:
        value = fmt.cast_values(value.reshape(1), existing.dtype, what)[0]
    except LoomValueError:
        raise refused from None
    return np.full(shape, value, dtype=existing.dtype)


def is_auto(fill_values: Any) -> bool:
    """Whether ``fill_values`` is loompy 3's ``"auto"`` (a value per attribute chosen by its type)."""
    return isinstance(fill_values, str) and fill_values == "auto"


def has_fill(name: str, fill_values: Any) -> bool:
    """Whether ``fill_values`` gives values for column attribute ``name``."""
    return is_auto(fill_values) or (isinstance(fill_values, Mapping) and name in fill_values)


def join_values(parts: list[np.ndarray], where: str, convert_attrs: bool = False,
                clash: Callable[[], str] | None = None) -> np.ndarray:
    """Column attribute values of several sources, one after the other, with no value changed:
    each part is taken in the first one's dtype when it fits it, else the parts are promoted only
    if every value survives. With ``convert_attrs``, text in any part makes all of them text;
    without, text beside numbers is refused, ``clash()`` (when given) saying after ``where`` which
    sources hold which, in the caller's words."""
    filled = [p for p in parts if len(p)]  # (a part without values, from a file without columns, fits any)
    if filled and len(filled) < len(parts):
        parts = [p if len(p) else np.empty((0, *filled[0].shape[1:]), filled[0].dtype) for p in parts]
    kinds = {p.dtype == object for p in parts}
    if len(kinds) > 1 and convert_attrs and all(p.dtype.names is None for p in parts):
        parts = [encoding.normalize_values(p.astype(str), where) for p in parts]
    first = parts[0]
    for p in parts[1:]:
        if (p.dtype == object) != (first.dtype == object) and clash is not None and not convert_attrs:
            raise LoomValueError(f"{where}{clash()}")
        if (p.dtype == object) != (first.dtype == object) or p.shape[1:] != first.shape[1:]:
            raise LoomValueError(f"{where}: values of one source ({described(p)}) cannot join those of the first "
                                 f"({described(first)})")
    if first.dtype.kind in "biuf":  # in the first part's dtype when they fit it exactly: nothing changes
        fitted = []
        for p in parts:
            try:
                cast = fmt.cast_values(p, first.dtype, where) if p.dtype.kind in "biuf" else p
            except LoomValueError:
                cast = p
            fitted.append(cast if same_values(cast, p) else p)  # (no float rounding in attributes)
        parts = fitted
    try:
        joined = np.concatenate(parts)
    except (TypeError, ValueError) as exc:  # compound values with other fields, say
        raise LoomValueError(f"{where}: values of {', '.join(str(p.dtype) for p in parts)} cannot be joined "
                             f"({exc})") from exc
    at = 0
    for p in parts:  # a promotion (int64 with uint64 gives float64) must keep every value
        if p.dtype != joined.dtype and not same_values(joined[at:at + len(p)], p):
            raise LoomValueError(f"{where}: joining {p.dtype} values with the others as {joined.dtype} would "
                                 "change them")
        at += len(p)
    return joined


def described(values: np.ndarray) -> str:
    """What a column attribute's values are, for messages: their kind and how many per column."""
    kind = "text" if values.dtype == object else f"{values.dtype} values"
    each = "one per column" if values.ndim == 1 else f"{' x '.join(map(str, values.shape[1:]))} per column"
    return f"{kind}, {each}"


def same_values(part: np.ndarray, given: np.ndarray) -> bool:
    """Whether ``part`` (promoted) holds exactly the values of ``given``, field by field for compounds."""
    try:
        back = part.astype(given.dtype)
    except (TypeError, ValueError):
        return False
    if given.dtype.names is not None:
        return all(same_values(part[f], given[f]) for f in given.dtype.names)
    if given.dtype == object:
        return back.tolist() == given.tolist()
    return bool(np.array_equal(back, given, equal_nan=given.dtype.kind in "fc"))


def differing_globals(conns: list[Any]) -> dict[str, list[Any]]:
    """Global attributes whose (single) value differs between the files, or that some files lack:
    name -> value per file (None where missing). ``convert_attrs`` makes them column attributes."""
    names = sorted({k for c in conns for k in fmt.carried_globals(c._file)})
    out = {}
    for name in names:
        values = [c.attrs[name] if name in c.attrs else None for c in conns]
        if any(v is not None and np.ndim(v) > 0 for v in values):
            continue  # arrays stay global attributes (the first file's)
        if any(not _same_global(v, values[0]) for v in values[1:]):
            out[name] = values
    return out


def _same_global(a: Any, b: Any) -> bool:
    """Equal file attribute values: numbers by value (1 and 1.0), text by text, None only with None."""
    numbers = (int, float, np.number)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return bool(a == b)
    return type(a) is type(b) and a == b


def per_column(values: list[Any], widths: list[int], where: str) -> np.ndarray:
    """One file-level value per file (None: the file has none), repeated for each of its columns:
    numbers when every value there is a number (a 0 of their common type where a file had none, as
    loompy 3 fills), else text ("" where a file had none)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))
                       for v in present):
        dtype = np.result_type(*[np.asarray(v) for v in present])  # (a bare 0 would widen uint64 to float)
        return np.concatenate([np.full(w, 0 if v is None else v, dtype=dtype) for v, w in zip(values, widths)])
    texts = ["" if v is None else str(v) for v in values]
    joined = np.concatenate([np.full(w, t, dtype=object) for t, w in zip(texts, widths)])
    return encoding.normalize_values(joined, where)
