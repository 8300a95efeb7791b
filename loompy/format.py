"""What the Loom spec says is where in the file: the paths of the matrix, layers, attributes and
graphs, which spec version keeps global attributes where, and how datasets are laid out and
stamped. :mod:`.encoding` converts between users' values and what these paths hold.

Names loompy adds for its own crash safety (an append's journal, a swap's staging group) live
with the code that uses them: :mod:`.journal`, :mod:`.swaps`; the journal's root attribute is named
here too, as global attributes must step around it.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import h5py
import numpy as np

from . import swaps
from .encoding import STRING_DTYPE, decode_one, normalize_values, present, read_values, storable
from .errors import LoomError, LoomFileError, LoomTypeError, LoomValueError
from .handles import ClosedFile, why_closed

# ----------------------------------------------------------------------------- paths
MATRIX = "matrix"
LAYERS = "layers"
GLOBAL_ATTRS = "attrs"
ROW_ATTRS = "row_attrs"
COL_ATTRS = "col_attrs"
ROW_GRAPHS = "row_graphs"
COL_GRAPHS = "col_graphs"
GROUPS = (GLOBAL_ATTRS, LAYERS, ROW_ATTRS, COL_ATTRS, ROW_GRAPHS, COL_GRAPHS)
ATTR_GROUPS = (ROW_ATTRS, COL_ATTRS)  # indexed by axis
GRAPH_GROUPS = (ROW_GRAPHS, COL_GRAPHS)  # indexed by axis
LEGACY_GRAPH_GROUPS = ("row_edges", "col_edges")  # loompy 1 and some R writers

SPEC_VERSION_KEY = "LOOM_SPEC_VERSION"
CREATION_DATE_KEY = "CreationDate"
LAST_MODIFIED = "last_modified"
APPEND_JOURNAL = "loompy_append_from_columns"  # root attribute while an append is unfinished (see .journal)
CURRENT_SPEC = "3.0.0"

# ----------------------------------------------------------------------------- creation defaults
DEFAULT_CHUNKS = (64, 64)
DEFAULT_COMPRESSION_LEVEL = 2
DEFAULT_CHUNK_CACHE_MB = 512
MATRIX_DTYPES = frozenset(
    np.dtype(t) for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                          "float16", "float32", "float64")
)


def timestamp() -> str:
    """UTC time in the format Loom uses for ``CreationDate`` and ``last_modified``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def touch(*objects: h5py.HLObject) -> None:
    """Stamp ``last_modified`` on each object (dataset or group) and on the file root."""
    now = timestamp()
    for obj in objects:
        obj.attrs[LAST_MODIFIED] = now
    if objects:
        objects[0].file.attrs[LAST_MODIFIED] = now


def own_stamp(obj: h5py.HLObject) -> str | None:
    """``obj``'s own ``last_modified`` stamp (text, or bytes from other writers, as text); None if it has none."""
    value = obj.attrs.get(LAST_MODIFIED)
    if value is None:
        return None
    return decode_one(value) if isinstance(value, bytes) else str(value)


def read_stamp(obj: h5py.HLObject) -> str:
    """When ``obj`` (a dataset or group) was last written: its own stamp, else the file's (files
    from other writers stamp less), else the epoch."""
    return own_stamp(obj) or own_stamp(obj.file) or "19700101T000000.000000Z"


# ----------------------------------------------------------------------------- spec versions
@dataclass(frozen=True)
class SpecVersion:
    """The spec a file follows, as far as it matters to a reader or writer."""

    text: str | None  # as stored ("3.0.0", "2.0.1"), or None when the file has none

    @property
    def major(self) -> int:
        if not self.text:
            return 0
        try:
            return int(self.text.split(".")[0])
        except ValueError:
            return 0

    @property
    def is_legacy(self) -> bool:
        """True for files before 3.0.0 (global attributes on the root, XML-escaped ASCII strings)."""
        return self.major < 3

    def __str__(self) -> str:
        return self.text or "old"


def _scalar_text(value: Any) -> str:
    """A scalar or shape-(1,) str/bytes value as ``str``."""
    arr = np.asarray(value)
    if arr.shape not in ((), (1,)):
        raise LoomValueError(f"expected a single string, got shape {arr.shape}")
    item = arr.reshape(()).item() if arr.dtype != object else arr.reshape(-1)[0]
    return decode_one(item) if isinstance(item, bytes) else str(item)


def get_group(f: h5py.File, name: str) -> h5py.Group | None:
    """The group at ``name``, or None when the file has none there (or something else)."""
    if not f:
        raise LoomFileError(f"{f.filename if isinstance(f, ClosedFile) else 'the file'}: {why_closed(f)}")
    group = f.get(name)
    return group if isinstance(group, h5py.Group) else None


def layer_path(name: str) -> str:
    """Where layer ``name`` lives: the main matrix (``""``) at ``/matrix``, the others in ``/layers``."""
    return MATRIX if name == "" else f"{LAYERS}/{name}"


def layer_place(f: h5py.File, name: str) -> tuple[h5py.Group, str]:
    """The group to create layer ``name`` in (``/layers`` made if missing) and its key there."""
    return (f, MATRIX) if name == "" else (f.require_group(LAYERS), name)


def matrix_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Every layer's dataset, by layer name (``""`` first, when the file has a main matrix)."""
    out = {"": f[MATRIX]} if isinstance(f.get(MATRIX), h5py.Dataset) else {}
    layers = get_group(f, LAYERS)
    if layers is not None:
        out.update((k, v) for k, v in layers.items() if isinstance(v, h5py.Dataset))
    return out


def read_spec_version(f: h5py.File) -> SpecVersion:
    """Find LOOM_SPEC_VERSION: first ``/attrs/LOOM_SPEC_VERSION``, then the root HDF5 attribute."""
    group = get_group(f, GLOBAL_ATTRS)
    if group is not None and SPEC_VERSION_KEY in group:
        return SpecVersion(_scalar_text(group[SPEC_VERSION_KEY][()]))
    if SPEC_VERSION_KEY in f.attrs:
        return SpecVersion(_scalar_text(f.attrs[SPEC_VERSION_KEY]))
    return SpecVersion(None)


def get_loom_spec_version(f: h5py.File) -> str:
    """The spec version an open HDF5 file says it follows, "0.0.0" when it says none (loompy 3's helper)."""
    return read_spec_version(f).text or "0.0.0"


def compare_loom_spec_version(f: h5py.File, version: str) -> int:
    """-1, 0 or 1 as the file's spec version is below, equal to or above ``version`` (loompy 3's
    helper), compared number by number ("3.0.10" is above "3.0.9"); LoomValueError (a ValueError,
    as loompy 3 raised) when either is not a version number."""
    def numbers(text: Any, what: str) -> list[int]:
        parts = text.strip().split(".") if isinstance(text, str) else None  # (int() took spaces too)
        if not parts or not all(part.isascii() and part.isdigit() for part in parts):
            raise LoomValueError(f"{what} {text!r} is not a version number such as '3.0.0'")
        return [int(part) for part in parts]

    mine = numbers(get_loom_spec_version(f), f"{f.filename}: LOOM_SPEC_VERSION")
    theirs = numbers(version, "compare_loom_spec_version: version")
    width = max(len(mine), len(theirs))
    mine, theirs = mine + [0] * (width - len(mine)), theirs + [0] * (width - len(theirs))
    return (mine > theirs) - (mine < theirs)


def globals_live_in_group(f: h5py.File) -> bool:
    """Where this file keeps global attributes: ``/attrs`` datasets (3.0.0) or root HDF5 attributes."""
    group = get_group(f, GLOBAL_ATTRS)
    if group is None:
        return False
    return SPEC_VERSION_KEY in group or SPEC_VERSION_KEY not in f.attrs


def graph_group_name(f: h5py.File, axis: int) -> str:
    """Where graphs along ``axis`` live: the spec's group, or the loompy 1 name if only that exists."""
    name, legacy = GRAPH_GROUPS[axis], LEGACY_GRAPH_GROUPS[axis]
    if name not in f and get_group(f, legacy) is not None:
        return legacy
    return name


def write_values(group: h5py.Group, name: str, values: np.ndarray, *, resizable: bool, where: str,
                 legacy: bool = False) -> h5py.Dataset:
    """(Re)write a dataset holding normalized attribute values, in place when shape and dtype allow
    (``legacy``: text as a file before spec 3.0.0 stores it, see :func:`storable`)."""
    data, dtype = storable(values, where, legacy)
    existing = group.get(name)
    if isinstance(existing, h5py.Dataset) and existing.shape == data.shape and existing.dtype == dtype:
        if data.shape == ():
            existing[()] = data[()]
        elif data.size:
            existing[...] = data
        touch(existing, group)
        return existing
    def create(target: str) -> h5py.Dataset:  # (stamped too: a failure to stamp it leaves no new value)
        if data.shape == ():
            dataset = group.create_dataset(target, data=data, dtype=dtype)
        else:
            maxshape = (None,) + data.shape[1:] if resizable else None
            chunks = (max(1, min(len(data), 4096)),) + data.shape[1:] if data.ndim else None
            if 0 in data.shape[1:] or (len(data) == 0 and not resizable):
                chunks, maxshape = None, None
            dataset = group.create_dataset(
                target, data=data, dtype=dtype, maxshape=maxshape, chunks=chunks,
                compression="gzip" if chunks else None, compression_opts=DEFAULT_COMPRESSION_LEVEL if chunks else None,
            )
        dataset.attrs[LAST_MODIFIED] = timestamp()
        return dataset

    try:  # a replacement is written whole before it takes the name: refused or interrupted, the old one stays
        ds = swaps.replace(group, name, create)
    except (TypeError, ValueError, RuntimeError) as exc:  # (an OSError is the disk's or the file's, not the values')
        if isinstance(exc, LoomError):
            raise
        raise LoomValueError(f"{where}: HDF5 cannot store values of dtype {values.dtype} ({exc})") from exc
    touch(ds, group)
    return ds



def check_name(name: Any, where: str, *, empty: bool = False) -> None:
    """Refuse a name no layer, attribute or graph may have: not text, with '/' or a NUL (HDF5 ends
    a name at its NUL, so "X\\0z" would overwrite "X"), '.' or '..' (HDF5 paths), or empty (unless
    ``empty``: the main matrix is layer "")."""
    if not isinstance(name, str) or "/" in name or "\0" in name or name in (".", "..") or (not name and not empty):
        raise LoomValueError(f"{where}: name {name!r} is invalid (a {'' if empty else 'non-empty '}string "
                             "without '/' or NUL, other than '.' and '..')")


def normalize_global(value: Any, name: str, filename: str = "") -> np.ndarray:
    """A global attribute value (scalar, string, list of strings, array) ready for storage."""
    where = f"{filename}: global attribute '{name}'" if filename else f"global attribute '{name}'"
    if isinstance(value, (dict, set)) or value is None:
        raise LoomTypeError(f"{where}: cannot store a value of type {type(value).__name__}")
    return normalize_values(value, where)


def normalize_globals(file_attrs: Mapping[str, Any] | None, filename: str) -> dict[str, np.ndarray]:
    """``file_attrs`` for a new file (create, new, combine), checked and ready for storage.

    The spec version is loompy's own to write: a new file is laid out as ``CURRENT_SPEC`` says. A
    version number given here (another file's attributes copied whole, a loompy 2 file's "2.0.1"
    among them) is set aside, as loompy 3 does; anything else under that name is refused.
    """
    if file_attrs is not None and not isinstance(file_attrs, Mapping):
        raise LoomTypeError(f"{filename}: file_attrs must be a mapping (a dict) of global attributes, not "
                            f"{type(file_attrs).__name__}")
    globals_ = {}
    for name, value in (file_attrs or {}).items():
        check_name(name, f"{filename}: global attribute")
        if name == SPEC_VERSION_KEY:
            if _is_version(value):
                continue
            raise LoomValueError(f"{filename}: global attribute '{name}' is managed by loompy and cannot be set "
                                 f"(got {value!r}, not a version number)")
        globals_[name] = normalize_global(value, name, filename)
    return globals_


def _is_version(value: Any) -> bool:
    """Whether ``value`` is a single text of dot-separated numbers, such as '2.0.1'."""
    if not isinstance(value, (str, bytes, np.ndarray)):
        return False
    try:
        parts = _scalar_text(value).split(".")
    except LoomValueError:
        return False
    return all(part.isascii() and part.isdigit() for part in parts)


ATTRIBUTE_BYTES = 64000  # HDF5 keeps a file's attributes in its object header: 64 KB each at most


def write_global(f: h5py.File, name: str, value: np.ndarray, in_group: bool) -> None:
    """Store a normalized global attribute where this file keeps them."""
    if in_group:
        write_values(f[GLOBAL_ATTRS], name, value, resizable=False, where=f"{f.filename}: global attribute '{name}'")
        return
    where = f"{f.filename}: global attribute '{name}'"
    data, dtype = storable(value, where, legacy=True)  # (only files before spec 3.0.0 keep them on the root)
    if dtype.kind == "S" and data.nbytes > ATTRIBUTE_BYTES:  # too long to sit in the file's header as
        data, dtype = storable(value, where)                 # fixed-length text: variable-length, on the heap
    if dtype.kind != "O" and data.nbytes > ATTRIBUTE_BYTES:
        raise LoomValueError(f"{where}: {data.nbytes} bytes is more than an HDF5 attribute of this file holds "
                             f"({ATTRIBUTE_BYTES})")
    # tried on a scratch object first (HDF5 refuses values over 64 KB in an object header): if HDF5
    # refuses, the old value stays
    try:
        swaps.replace_root_attribute(f, name, data, dtype)
    except (TypeError, ValueError, OSError, RuntimeError) as exc:
        raise LoomValueError(f"{where}: HDF5 cannot store this value as an attribute of the file ({exc})") from exc
    f.attrs[LAST_MODIFIED] = timestamp()


def delete_global(f: h5py.File, name: str, in_group: bool) -> None:
    """Delete a global attribute from where this file keeps them, stamping the change."""
    if in_group:
        del f[GLOBAL_ATTRS][name]
        touch(f[GLOBAL_ATTRS])
    else:
        del f.attrs[name]
        f.attrs[LAST_MODIFIED] = timestamp()


def read_global(f: h5py.File, name: str, in_group: bool, legacy: bool) -> Any:
    """A global attribute as users see it: scalar strings as ``str``, arrays as arrays (the
    one-element arrays R writers store for every value too, as loompy 3 gives them)."""
    if in_group:
        value = read_values(f[GLOBAL_ATTRS][name], legacy)
    else:
        raw = f.attrs[name]
        if isinstance(raw, (bytes, str)):
            return decode_one(raw, xml_refs=legacy)
        raw = np.asarray(raw)
        value = present(raw, raw.dtype, legacy)
    if value.shape == ():
        return value[()]
    return value


def address(where: h5py.File | h5py.Dataset, path: str = ".") -> tuple[int, int] | None:
    """HDF5's number of the object at ``path`` (from a file; a dataset itself: "."), which another object
    moved to that path does not share; None if nothing is there."""
    try:
        return h5py.h5g.get_objinfo(where.id, path.encode()).objno
    except (KeyError, ValueError, RuntimeError):
        return None


def global_names(f: h5py.File, in_group: bool) -> list[str]:
    """The names of the global attributes (``in_group``: the file keeps them in ``/attrs``; else on the
    root, with loompy 1 and 2's stamp ``last_modified``, listed as loompy 3 lists it)."""
    if in_group:
        return [k for k, v in f[GLOBAL_ATTRS].items() if isinstance(v, h5py.Dataset)]
    return [k for k in f.attrs.keys() if k != APPEND_JOURNAL]


def carried_globals(f: h5py.File) -> list[str]:
    """The global attributes a file made from this one carries over: all but what loompy writes into
    every file itself (the spec version, the creation date and, in files before spec 3.0.0, the root's
    ``last_modified`` stamp)."""
    in_group = globals_live_in_group(f)
    own = {SPEC_VERSION_KEY, CREATION_DATE_KEY} | (set() if in_group else {LAST_MODIFIED})
    return [name for name in global_names(f, in_group) if name not in own]


def has_global(f: h5py.File, name: str, in_group: bool) -> bool:
    """Whether global attribute ``name`` exists (without listing them all)."""
    if in_group:
        return isinstance(f[GLOBAL_ATTRS].get(name), h5py.Dataset)
    return name in f.attrs and name != APPEND_JOURNAL


def init_file(f: h5py.File, globals_: Mapping[str, np.ndarray] | None = None) -> None:
    """Lay out an empty spec 3.0.0 file: the six groups, LOOM_SPEC_VERSION and CreationDate, and
    the global attributes ``globals_`` (normalized: see :func:`normalize_globals`)."""
    for name in GROUPS:
        f.require_group(name)
    now = timestamp()
    attrs = f[GLOBAL_ATTRS]
    for key, value in ((SPEC_VERSION_KEY, CURRENT_SPEC), (CREATION_DATE_KEY, now)):
        attrs.create_dataset(key, data=value.encode(), dtype=STRING_DTYPE).attrs[LAST_MODIFIED] = now
    for name in GROUPS:
        f[name].attrs[LAST_MODIFIED] = now
    f.attrs[LAST_MODIFIED] = now
    for name, value in (globals_ or {}).items():
        write_global(f, name, value, in_group=True)


# ----------------------------------------------------------------------------- matrices
def matrix_chunks(shape: tuple[int, int], chunks: tuple[int, int] = DEFAULT_CHUNKS) -> tuple[int, int]:
    """Chunk shape clipped to the matrix shape (never zero)."""
    return (max(1, min(int(chunks[0]), shape[0])), max(1, min(int(chunks[1]), shape[1])))


def check_matrix_dtype(dtype: Any, where: str) -> np.dtype:
    """The dtype a matrix asked to be ``dtype`` is stored in (booleans as uint8), or why it cannot be."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise LoomTypeError(f"{where}: {dtype!r} is not a dtype") from exc
    if dt.kind == "b":  # the spec has no boolean matrices
        return np.dtype(np.uint8)
    dt = dt.newbyteorder("=")  # (big-endian input is stored in this machine's order: the same values)
    if dt not in MATRIX_DTYPES:
        allowed = ", ".join(sorted(str(d) for d in MATRIX_DTYPES))
        raise LoomValueError(f"{where}: dtype {dt} is not allowed for a matrix (allowed: {allowed})")
    return dt


def cast_values(values: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``values`` in a matrix's stored ``dtype``, refusing any cast that would change them beyond
    float rounding: integers must be in the integer dtype's range, floats stored as integers must
    be whole and in range, and nothing finite may become infinite."""
    dtype = np.dtype(dtype)
    if values.dtype.kind not in "biuf":
        raise LoomValueError(f"{where}: cannot store values of dtype {values.dtype} in a matrix")
    if np.can_cast(values.dtype, dtype, "safe"):
        return values.astype(dtype, copy=False)
    with np.errstate(all="ignore"):
        converted = values.astype(dtype)
        if values.size == 0:
            same = True
        elif dtype.kind == "f":  # rounding is fine; overflowing to infinity is not
            same = np.array_equal(np.isfinite(converted), np.isfinite(values)) if values.dtype.kind == "f" \
                else bool(np.isfinite(converted).all())
        elif dtype.kind == "b":  # booleans hold 0 and 1 only
            same = bool(np.isin(values, (0, 1)).all())
        else:
            info = np.iinfo(dtype)
            whole = values.dtype.kind != "f" or bool(np.isfinite(values).all() and (values == np.round(values)).all())
            # the range by Python integers (exact), then the round trip (float bounds round)
            same = whole and int(values.min()) >= info.min and int(values.max()) <= info.max and \
                np.array_equal(converted.astype(values.dtype), values)
    if not same:
        raise LoomValueError(f"{where}: values of dtype {values.dtype} do not fit dtype {dtype} without change")
    return converted


def check_fits(matrix: Any, dtype: np.dtype, where: str) -> None:
    """Refuse, before anything is written, a dense or sparse matrix (or a layer of another file)
    whose values ``dtype`` cannot hold (see :func:`cast_values`); sparse entries are summed as
    they will be stored, dense values checked a strip of rows at a time."""
    if hasattr(matrix, "tocsc"):  # scipy.sparse: repeated entries add up before they are stored
        if np.can_cast(matrix.dtype, dtype, "safe"):
            return
        summed = matrix.tocsr(copy=True)
        summed.sum_duplicates()
        cast_values(summed.data, dtype, where)
        return
    if np.can_cast(matrix.dtype, dtype, "safe"):
        return
    if np.ndim(matrix) < 2:
        cast_values(np.atleast_1d(np.asarray(matrix)), dtype, where)
        return
    line = max(1, int(np.prod(matrix.shape[1:])) * np.dtype(matrix.dtype).itemsize)
    step = max(1, (16 << 20) // line)
    for start in range(0, matrix.shape[0], step):
        cast_values(np.asarray(matrix[start:start + step]), dtype, where)


def check_storage(chunks: Any, compression_opts: Any, chunk_cache: Any, where: str
                  ) -> tuple[tuple[int, int], int | None, float]:
    """How a new matrix is to be stored, checked before anything is written: chunks (two positive
    integers), gzip level (0-9, or None for no compression), chunk cache in MB (not negative)."""
    try:
        rows, cols = chunks
        checked = (operator.index(rows), operator.index(cols))
    except (TypeError, ValueError):
        checked = None
    if checked is None or min(checked) < 1:
        raise LoomValueError(f"{where}: chunks must be two positive integers, got {chunks!r}")
    level = None
    if compression_opts is not None:
        try:
            level = operator.index(compression_opts)
        except TypeError:
            level = -1
        if not 0 <= level <= 9:
            raise LoomValueError(f"{where}: compression_opts must be a gzip level from 0 to 9 (or None), "
                                 f"got {compression_opts!r}")
    if isinstance(chunk_cache, bool) or not isinstance(chunk_cache, numbers.Real) or not chunk_cache >= 0:
        raise LoomValueError(f"{where}: chunk_cache must be a size in MB (0 or more), got {chunk_cache!r}")
    return checked, level, chunk_cache


def create_matrix(
    group: h5py.Group,
    name: str,
    shape: tuple[int, int],
    dtype: Any,
    *,
    chunks: tuple[int, int] = DEFAULT_CHUNKS,
    compression_opts: int | None = DEFAULT_COMPRESSION_LEVEL,
    chunk_cache: int = DEFAULT_CHUNK_CACHE_MB,
) -> h5py.Dataset:
    """Create an empty (all-zero) matrix dataset with the reference writer's conventions."""
    shape = (int(shape[0]), int(shape[1]))
    compression = None if compression_opts is None else "gzip"
    ds = group.create_dataset(
        # (HDF5 has no chunk that fits a fixed dimension of 0: a matrix with no rows may grow them)
        name, shape=shape, dtype=dtype, chunks=matrix_chunks(shape, chunks), maxshape=(shape[0] or None, None),
        compression=compression, compression_opts=compression_opts, fillvalue=0,
        rdcc_nbytes=int(chunk_cache) * 1024 * 1024,
    )
    touch(ds)
    return ds


def create_matrix_like(group: h5py.Group, name: str, source: h5py.Dataset) -> h5py.Dataset:
    """Create an empty matrix dataset stored as ``source`` is (shape, dtype, chunks, growth,
    compression, fill value), carrying its HDF5 attributes."""
    ds = group.create_dataset(name, shape=source.shape, dtype=source.dtype, chunks=source.chunks,
                              maxshape=source.maxshape, compression=source.compression,
                              compression_opts=source.compression_opts, fillvalue=source.fillvalue)
    swaps.carry_attrs(source, ds)
    return ds


def stored_as_new_matrix(dataset: h5py.Dataset, shape: tuple[int, int]) -> bool:
    """True when ``dataset`` is stored as :func:`create_matrix` (defaults) stores a ``shape`` matrix:
    same chunks, one gzip filter at the default level, fill value 0 (given to chunks never written:
    HDF5's default fill time); and its columns can grow."""
    dcpl = dataset.id.get_create_plist()
    return (dataset.chunks == matrix_chunks(shape) and dcpl.get_nfilters() == 1
            and dataset.compression == "gzip" and dataset.compression_opts == DEFAULT_COMPRESSION_LEVEL
            and dataset.fillvalue == 0 and dcpl.get_fill_time() == h5py.h5d.FILL_TIME_IFSET
            and dataset.maxshape[1] is None)
