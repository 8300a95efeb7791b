"""Users' attribute values and what HDF5 stores for them, both ways.

* strings are written as variable-length UTF-8 and always read back as ``str``;
  bytes that are not valid UTF-8 are decoded with ``surrogateescape`` (lossless: writing
  the string back restores the original bytes);
* fixed-length ASCII strings in files older than spec 3.0.0 carry XML character
  references (``&#233;``), which are decoded, and text written into such files is stored so;
* booleans are stored as ``uint8`` (HDF5 has no boolean type), as the reference writer does.

Where these values live in a file is :mod:`.format`'s business.
"""

from __future__ import annotations

import html
import numbers
import re
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import LoomValueError

STRING_DTYPE = h5py.string_dtype("utf-8")
_XML_REF = re.compile(r"&#(?:x([0-9a-fA-F]+)|([0-9]+));")


# ----------------------------------------------------------------------------- strings
def decode_one(item: bytes | str, xml_refs: bool = False, errors: str = "surrogateescape") -> str:
    """Bytes to str, by default losslessly (invalid UTF-8 becomes lone surrogates, see module docstring)."""
    text = item.decode("utf-8", errors) if isinstance(item, bytes) else str(item)
    if xml_refs and "&#" in text:
        text = _XML_REF.sub(_xml_ref_to_char, text)
    return text


def escape_legacy(text: str) -> bytes:
    """Text as a file before spec 3.0.0 stores it: ASCII, other characters as XML character
    references. Where a reader would decode something in it (a literal ``&#36;``; loompy 3 also
    decodes ``&amp;``, ``&#36`` and the like), every ``&`` is stored as ``&#38;``, so that what
    is read back, by us or by loompy 3, is what was written; other text keeps its ``&`` as is."""
    if "&" in text and (_XML_REF.search(text) or html.unescape(text) != text):
        text = text.replace("&", "&#38;")
    return text.encode("ascii", "xmlcharrefreplace")


def _xml_ref_to_char(match: re.Match) -> str:
    hex_digits, dec_digits = match.groups()
    code = int(hex_digits, 16) if hex_digits else int(dec_digits)
    try:
        return chr(code)
    except (ValueError, OverflowError):
        return match.group(0)


def decode_strings(raw: np.ndarray, xml_refs: bool = False, errors: str = "surrogateescape") -> np.ndarray:
    """Any stored string array (fixed ``S``, vlen bytes or str) as an object array of ``str``."""
    flat = [decode_one(x, xml_refs, errors) for x in raw.ravel().tolist()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(raw.shape)


def given_text(values: np.ndarray, where: str) -> np.ndarray:
    """Text a user gives (str or bytes) as an object array of ``str``. Bytes must be UTF-8: the file
    declares its strings so, and other readers refuse anything else (text read from a file comes
    back as ``str`` and is written back as it was, see the module docstring)."""
    try:
        return decode_strings(values, errors="strict")
    except UnicodeDecodeError:
        for item in values.ravel().tolist():
            if isinstance(item, bytes):
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise LoomValueError(f"{where}: {item[:60]!r} is not UTF-8 text ({exc.reason} at byte "
                                         f"{exc.start}); decode it to str first, e.g. with .decode('latin-1')"
                                         ) from None
        raise


def encode_one(text: str, where: str) -> bytes:
    """Str to the UTF-8 bytes HDF5 stores; a NUL cannot be stored in an HDF5 string."""
    if "\x00" in text:
        raise LoomValueError(f"{where}: strings cannot contain NUL characters (HDF5 would truncate them)")
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:  # a lone surrogate that did not come from undecodable bytes
        raise LoomValueError(f"{where}: {text!r} cannot be written as UTF-8 ({exc.reason})") from None


def is_string_kind(dtype: np.dtype) -> bool:
    """Whether values of ``dtype`` are text (bytes, str, or objects, which hold text here)."""
    return dtype.kind in "SUO"


def _string_fields(dtype: np.dtype) -> bool:
    return dtype.names is not None and any(is_string_kind(dtype.fields[n][0]) for n in dtype.names)


# ----------------------------------------------------------------------------- reading values
def read_values(dataset: h5py.Dataset, legacy: bool) -> np.ndarray:
    """A row/column/global attribute dataset as users see it (strings as ``str``)."""
    dtype = dataset.dtype
    if dataset.shape == ():
        raw = np.asarray(dataset[()])
    else:
        raw = dataset[...]
    return present(raw, dtype, legacy)


def present(raw: np.ndarray, stored_dtype: np.dtype, legacy: bool) -> np.ndarray:
    """Convert raw stored values to the user's view (strings decoded, compound string fields decoded)."""
    if stored_dtype.kind == "S" or (stored_dtype.kind == "O" and h5py.check_string_dtype(stored_dtype)):
        return decode_strings(np.asarray(raw), xml_refs=legacy and stored_dtype.kind == "S")
    if stored_dtype.kind == "O" or raw.dtype.kind in "SO":
        return decode_strings(np.asarray(raw, dtype=object), xml_refs=False)
    if _string_fields(raw.dtype):
        fields = []
        for name in raw.dtype.names:
            sub = raw.dtype.fields[name][0]
            fields.append((name, object if is_string_kind(sub) else sub))
        out = np.empty(raw.shape, dtype=fields)
        for name in raw.dtype.names:
            col = raw[name]
            out[name] = decode_strings(col, xml_refs=legacy) if is_string_kind(col.dtype) else col
        return out
    return raw


# ----------------------------------------------------------------------------- writing values
def _has_nul(values: Any) -> bool:
    """Whether a string, or a string in (nested) lists and tuples, holds a NUL character."""
    if isinstance(values, str):
        return "\x00" in values
    if isinstance(values, (list, tuple)):
        return any(_has_nul(v) for v in values)
    return False


def _missing(value: Any) -> bool:
    """Whether ``value`` is a missing-value marker: None, or pandas' NA and NaT (known by their type's
    name, so that pandas need not be imported)."""
    return value is None or type(value).__name__ in ("NAType", "NaTType")


def refuse_masked(values: Any, where: str) -> None:
    """Refuse a numpy masked array with masked entries: a Loom file has no mask, and numpy would
    hand over whatever lies under it."""
    if isinstance(values, np.ma.MaskedArray) and np.ma.is_masked(values):
        raise LoomValueError(f"{where}: {int(np.ma.count_masked(values))} values are masked, and a Loom file "
                             "stores no mask; fill them first (values.filled(...))")


def matrix_values(values: Any, where: str) -> Any:
    """A user's matrix values: dense ones as an array of numbers (masked entries, ragged nesting and
    values that are not numbers, such as text or objects, are refused); a scipy.sparse matrix as it
    is, once its structure is found sound."""
    if sp.issparse(values):
        _check_sparse(values, where)
        if values.dtype.kind not in "biuf":
            raise LoomValueError(f"{where}: cannot store values of dtype {values.dtype} in a matrix")
        return values
    refuse_masked(values, where)
    try:
        arr = np.asarray(values)
    except ValueError as exc:  # ragged nesting
        raise LoomValueError(f"{where}: cannot make a matrix of the values ({exc})") from exc
    if arr.dtype.kind not in "biuf":
        raise LoomValueError(f"{where}: cannot store values of dtype {arr.dtype} in a matrix")
    return arr


def _check_sparse(matrix: Any, where: str) -> None:
    """Refuse a sparse matrix whose arrays do not fit its shape (a row index past its last row, column
    pointers out of order): built from damaged arrays, scipy takes it as it is, and its entries would
    be stored in the wrong place or lost. The user's matrix itself is left as it is."""
    try:
        if matrix.format in ("csr", "csc", "bsr"):  # (a copy sharing its arrays: scipy's check may retype them)
            type(matrix)((matrix.data, matrix.indices, matrix.indptr), shape=matrix.shape,
                         copy=False).check_format(full_check=True)
        elif matrix.format == "coo":
            for index, size in ((matrix.row, matrix.shape[0]), (matrix.col, matrix.shape[1])):
                if index.size and (int(index.min()) < 0 or int(index.max()) >= size):
                    raise ValueError(f"an index from {int(index.min())} to {int(index.max())} for {size} rows or "
                                     "columns")
    except ValueError as exc:
        raise LoomValueError(f"{where}: the sparse matrix of shape {tuple(matrix.shape)} is malformed ({exc})") \
            from exc


def normalize_values(values: Any, where: str, length: int | None = None) -> np.ndarray:
    """Validate and convert user values into the array that will be stored.

    Strings become an object array of ``str``; booleans become ``uint8``; numbers keep their
    dtype. ``length`` (if given) is the required size of the first dimension.
    """
    refuse_masked(values, where)
    if isinstance(values, Mapping):  # (numpy would take its keys: "expected 6 values, got 2")
        names = [repr(k) for k in list(values)[:5]] + (["..."] if len(values) > 5 else [])
        raise LoomValueError(f"{where}: expected an array of values, got a mapping ({type(values).__name__}: "
                             f"{', '.join(names)})")
    if _has_nul(values):  # (checked before numpy, whose fixed-width strings drop trailing NULs)
        raise LoomValueError(f"{where}: strings cannot contain NUL characters (HDF5 would truncate them)")
    try:
        try:
            arr = np.asarray(values)
        except UnicodeDecodeError:  # (numpy reads bytes beside str as ASCII: taken as objects, decoded below)
            arr = np.asarray(values, dtype=object)
    except Exception as exc:  # ragged lists and the like
        raise LoomValueError(f"{where}: cannot convert values to an array ({exc})") from exc
    # integers numpy made floats? (Python values, and pandas' nullable integers with missing ones)
    if not isinstance(values, np.ndarray) and _maybe_rounded(arr):
        whole = exact_integers(np.asarray(values, dtype=object).ravel().tolist(), where)
        arr = arr if whole is None else whole.reshape(arr.shape)
    if arr.dtype.kind == "O":
        items = arr.ravel().tolist()
        if all(isinstance(x, (str, bytes, np.str_, np.bytes_)) for x in items):
            arr = given_text(arr, where)
        elif all(isinstance(x, (bool, np.bool_)) for x in items) and items:
            arr = arr.astype(bool)
        elif any(map(_missing, items)) and all(_missing(x) or isinstance(x, (str, bytes, numbers.Number))
                                               for x in items):
            # missing values (a pandas column's None, NA or NaT): text, as loompy 3 stores them ("None")
            texts = [x if isinstance(x, (str, bytes)) else str(x) for x in items]
            arr = given_text(np.array(texts, dtype=object).reshape(arr.shape), where)
        else:
            try:
                converted = np.asarray(arr.tolist())
            except Exception as exc:
                raise LoomValueError(f"{where}: cannot store values of mixed types") from exc
            if converted.dtype.kind == "O" or _maybe_rounded(converted):
                whole = exact_integers(items, where)
                converted = converted if whole is None else whole.reshape(arr.shape)
            arr = converted
            if arr.dtype.kind == "O":
                kinds = sorted({type(x).__qualname__ for x in items})
                what = f"type {kinds[0]}" if len(kinds) == 1 else f"mixed types ({', '.join(kinds[:4])})"
                raise LoomValueError(f"{where}: cannot store values of {what}: a Loom file holds numbers, text or "
                                     "booleans, one kind to an attribute (str() them to store them as text)")
    if arr.dtype.kind in "US":
        arr = given_text(arr, where)
    if _string_fields(arr.dtype):
        arr = _text_fields_as_str(arr, where)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.names is not None:
        arr = _plain_fields(arr, where)
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:  # (numpy's longdouble: no portable HDF5 type)
        raise LoomValueError(f"{where}: values of dtype {arr.dtype} are not portable across machines; "
                             "cast them to float64")
    if arr.dtype.kind in "mMcV" and arr.dtype.names is None:
        raise LoomValueError(f"{where}: values of dtype {arr.dtype} cannot be stored in a Loom file")
    if arr.dtype.kind == "O":
        _check_storable_text(arr, where)
    if length is not None:
        if arr.ndim == 0:
            raise LoomValueError(f"{where}: expected an array of length {length}, got a scalar")
        if arr.shape[0] != length:
            raise LoomValueError(f"{where}: expected {length} values, got {arr.shape[0]} (shape {arr.shape})")
    return arr


def _plain_fields(arr: np.ndarray, where: str) -> np.ndarray:
    """A compound array (pySCENIC's and SCope's attributes) whose fields follow the rules of plain
    values: booleans as uint8; no complex numbers, dates, long doubles or nested records."""
    kinds = [arr.dtype.fields[n][0] for n in arr.dtype.names]  # (a field may hold several values: .base, .shape)
    for name, kind in zip(arr.dtype.names, kinds):
        if kind.base.kind in "mMcV" or (kind.base.kind == "f" and kind.base.itemsize > 8):
            raise LoomValueError(f"{where}: field '{name}' of dtype {kind} cannot be stored in a Loom file")
    if not any(kind.base.kind == "b" for kind in kinds):
        return arr
    out = np.empty(arr.shape, dtype=[(n, (np.uint8, k.shape) if k.base.kind == "b" else k)
                                     for n, k in zip(arr.dtype.names, kinds)])
    for name in arr.dtype.names:
        out[name] = arr[name]
    return out


def _maybe_rounded(arr: np.ndarray) -> bool:
    """Whether floats numpy made of Python values may have rounded integers: only those of 2**53
    or more do (a cheap test before looking at every item)."""
    if arr.dtype.kind != "f" or not arr.size:
        return False
    with np.errstate(invalid="ignore"):
        return bool(np.nanmax(np.abs(arr)) >= 2.0**53) if not np.isnan(arr).all() else False


def exact_integers(items: list, where: str) -> np.ndarray | None:
    """Items that are all integers as int64, else uint64, exactly (numpy made ``[2**63 + 5, 1]``
    float64, losing the first); None for other items, refused where integers mixed with
    fractions would not keep their value as float64, or where one needs more than 64 bits."""
    ints = [int(x) for x in items if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))]
    if not ints:
        return None
    if len(ints) < len(items):
        if all(isinstance(x, (numbers.Real, np.number)) or _missing(x) for x in items) and \
                not all(_exact_float(x) for x in ints):
            gaps = any(_missing(x) or (isinstance(x, (float, np.floating)) and x != x) for x in items)  # (NaN)
            others, advice = ("missing values", "fill those first") if gaps else \
                ("fractions", "give them as one dtype")
            raise LoomValueError(f"{where}: integers mixed with {others} would lose digits as float64 "
                                 f"(e.g. {next(x for x in ints if not _exact_float(x))}); {advice}")
        return None
    for dtype in (np.int64, np.uint64):
        if np.iinfo(dtype).min <= min(ints) and max(ints) <= np.iinfo(dtype).max:
            return np.array(ints, dtype=dtype)
    raise LoomValueError(f"{where}: integers from {min(ints)} to {max(ints)} do not fit one 64-bit integer type")


def _exact_float(x: int) -> bool:
    try:
        return int(float(x)) == x
    except OverflowError:
        return False


def _text_fields_as_str(arr: np.ndarray, where: str) -> np.ndarray:
    """A compound array with its text fields (fixed or variable length) as object fields of ``str``."""
    names = arr.dtype.names
    kinds = [arr.dtype.fields[n][0] for n in names]
    out = np.empty(arr.shape, dtype=[(n, object if is_string_kind(k) else k) for n, k in zip(names, kinds)])
    for name, kind in zip(names, kinds):
        if not is_string_kind(kind):
            out[name] = arr[name]
            continue
        items = arr[name].ravel().tolist()
        if not all(isinstance(x, (str, bytes)) for x in items):
            raise LoomValueError(f"{where}: field '{name}' mixes text with other values")
        out[name] = given_text(arr[name], f"{where} (field '{name}')")
        _check_storable_text(out[name], where)
    return out


def _check_storable_text(texts: np.ndarray, where: str) -> None:
    """Refuse, before anything is written, text HDF5 cannot store: checked all at once (a joined
    string encodes exactly when each part does), then one by one to name the culprit."""
    joined = "".join(texts.ravel().tolist())
    fine = "\x00" not in joined
    try:
        joined.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        fine = False
    if not fine:
        for text in texts.ravel():
            encode_one(text, where)


def storable(arr: np.ndarray, where: str, legacy: bool = False) -> tuple[np.ndarray, np.dtype]:
    """The array h5py writes for normalized values, and its HDF5 dtype: text as UTF-8 variable-length
    strings, also inside compound values; in a file before spec 3.0.0 (``legacy``), as that spec
    (and loompy 3 writing to such a file) has it: fixed-length ASCII, other characters as XML
    character references, so that its readers still take the file."""
    if arr.dtype.kind == "O":
        if legacy:
            for text in arr.ravel().tolist():
                encode_one(text, where)  # (the same refusals: NUL)
            escaped = [escape_legacy(s) for s in arr.ravel().tolist()]
            data = np.array(escaped, dtype=f"S{max(map(len, escaped), default=1) or 1}").reshape(arr.shape)
            return data, data.dtype
        data = np.empty(arr.shape, dtype=object)
        data.ravel()[:] = [encode_one(s, where) for s in arr.ravel()]
        return data, STRING_DTYPE
    if arr.dtype.names is not None and any(arr.dtype.fields[n][0].kind == "O" for n in arr.dtype.names):
        fields = {n: storable(arr[n], where, legacy) if arr.dtype.fields[n][0].kind == "O" else None
                  for n in arr.dtype.names}
        dtype = np.dtype([(n, arr.dtype.fields[n][0] if f is None else f[1]) for n, f in fields.items()])
        data = np.empty(arr.shape, dtype=dtype)
        for name, field in fields.items():
            data[name] = arr[name] if field is None else field[0]
        return data, dtype
    return arr, arr.dtype
