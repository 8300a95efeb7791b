"""Appending columns in place (``add_columns``, ``add_loom``) without ever losing what the file held.

An append validates all input first (every value, fill and dtype is settled before the first
write), then writes under the file's journal (:mod:`.journal`): interrupted, it is rolled back
when the file is next opened; failing while it writes, it rolls itself back.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from . import encoding, engine, joining, journal
from . import format as fmt
from .connection import LoomConnection, connect
from .create import as_attr_dict, as_layer_dict, validate_contents, write_layers
from .errors import LoomFormatError, LoomKeyError, LoomValueError
from .files import stored_size_bound
from .graphs import joined_graph
from .handles import SPARE_BYTES, changed, changing, check_free_space, check_writable, the_only_write
from .indexing import batch_count


@the_only_write
def add_columns(ds: LoomConnection, layers: Any, col_attrs: Any, *, row_attrs: Any = None, fill_values: Any = None,
                journalled: bool = True, convert_attrs: bool = False, drop: bool | None = None) -> None:
    """Append columns: every existing layer must be given. A column attribute only the file or only
    the new columns have is filled by ``fill_values`` (a dict, or ``"auto"`` for 0 / ""); with
    ``fill_values=None``, as in loompy 3, the file's is removed and the new columns' ignored (with a
    warning). On an empty file from ``new()`` the first call defines the rows (and ``row_attrs``); on
    others, ``row_attrs`` add row attributes the file lacks (those it has are kept, as loompy 3 keeps
    them). ``journalled=False``: the caller keeps the journal (:func:`add_loom`'s batches are one
    append); ``drop``: whether attributes are dropped (default: when ``fill_values`` is None).
    """
    f = ds._file
    where = ds.filename
    check_writable(f, f"{where}: columns")
    joining.check_fill_values(fill_values, where)
    ds._dims.sync(on_disk=True)
    layer_dict = as_layer_dict(layers, where)
    layer_dict = {k: (v[:, :] if hasattr(v, "_dataset") else v) for k, v in layer_dict.items()}
    for name, matrix in layer_dict.items():
        if len(matrix.shape) != 2:
            raise LoomValueError(f"{where}: layer '{name}' must be two-dimensional, got shape {tuple(matrix.shape)}")
    n_new = layer_dict[""].shape[1]
    n_rows = layer_dict[""].shape[0]
    empty = "" not in ds.layers
    if empty:
        _first_columns(ds, layer_dict, col_attrs, row_attrs, journalled)
        return
    n, m = ds.shape
    if n_rows != n:
        raise LoomValueError(f"{where}: new columns have {n_rows} rows, the file has {n}")
    existing = set(ds.layers.keys())
    if set(layer_dict) != existing:
        missing, extra = sorted(existing - set(layer_dict)), sorted(set(layer_dict) - existing)
        raise LoomValueError(f"{where}: add_columns needs exactly the file's layers; "
                             f"missing {missing}, unknown {extra}")
    matrices = {}  # (cast by the engine as it writes)
    for name, matrix in layer_dict.items():
        if tuple(matrix.shape) != (n, n_new):
            raise LoomValueError(f"{where}: layer '{name}' has shape {tuple(matrix.shape)}, expected {(n, n_new)}")
        limit = ds.layers[name]._dataset.maxshape[1]
        if limit is not None and limit < m + n_new:
            raise LoomValueError(f"{where}: layer '{name}' was stored with at most {limit} columns, so it cannot "
                                 "grow; loompy.combine writes a copy with these columns added")
        fmt.check_fits(matrix, ds.layers[name].dtype, f"{where}: layer '{name}'")  # the engine casts as it writes
        matrices[name] = matrix
    drop = fill_values is None if drop is None else drop
    combined, dropped, ignored = _column_attrs(ds, col_attrs, n_new, fill_values, convert_attrs, drop)
    given_row_attrs = as_attr_dict(row_attrs, where)
    for name in given_row_attrs:
        fmt.check_name(name, f"{where}: row attribute")
    # (the file's own values given back, as loops that build a file pass them, are kept without a look:
    # reading and comparing 30,000 gene names took 24 ms a call)
    given_row_attrs = {k: v for k, v in given_row_attrs.items() if not _the_files_own(ds, k, v)}
    new_row_attrs = {k: encoding.normalize_values(v, f"{where}: row attribute '{k}'", n)
                     for k, v in given_row_attrs.items()}
    differing = [k for k, v in new_row_attrs.items() if k in ds.ra and not joining.same_values(ds.ra[k], v)]
    new_row_attrs = {k: v for k, v in new_row_attrs.items() if k not in ds.ra}
    needed = sum(stored_size_bound(matrix) for matrix in matrices.values())
    check_free_space(f.filename, needed + SPARE_BYTES + sum(v.nbytes for v, _ in combined.values()
                                                           if v.dtype != object), where)
    # everything is valid: write, journalled
    try:
        if journalled:
            journal.begin(f, m)
        with engine.writing_all([ds.layers[name]._dataset for name in matrices]):  # (reads: all or none)
            for name, matrix in matrices.items():
                dataset = ds.layers[name]._dataset
                engine.resize(dataset, m + n_new, axis=1)
                engine.write_matrix(dataset, matrix, col_offset=m)
                fmt.touch(dataset)
        group = f.require_group(fmt.COL_ATTRS)
        for name, (values, whole) in combined.items():
            _append_attr(group, name, values, whole, m, where, ds.ca._legacy)
        for name in dropped:
            journal.set_aside(group, name)
        if new_row_attrs:
            journal.note_created(f, journal.ADDED_ROWS, list(new_row_attrs))
            rows = f.require_group(fmt.ROW_ATTRS)
            for name, values in new_row_attrs.items():
                fmt.write_values(rows, name, values, resizable=False, where=f"{where}: row attribute '{name}'",
                                 legacy=ds.ra._legacy)
        f.flush()
        if journalled:
            journal.commit(f)
    except BaseException:  # an I/O error, Ctrl-C: back to the old width (else the next r+ open does it)
        if journalled:
            _roll_back(ds)
        raise
    ds._dims.shape = (n, m + n_new)  # the columns are in: the connection says so before anything else
    ds.col_attrs._forget()
    ds.row_attrs._forget(values=False)  # (the ones it added are listed; those there are unchanged)
    if journalled:  # (add_loom says it once)
        _warn_left_out(where, dropped, ignored)
    if differing:
        warnings.warn(f"{where}: row attributes {differing} given with the new columns differ from the file's, "
                      "which are kept (row_attrs only add row attributes the file lacks)", stacklevel=3)


def _file_attrs_as_columns(ds: LoomConnection, other: LoomConnection, attrs: dict[str, np.ndarray], fill_values: Any
                           ) -> tuple[Any, list[str]]:
    """``add_loom(convert_attrs=True)``: file attributes become column attributes, as in loompy 3.

    A file attribute that differs between the files, or is a column attribute on one side only,
    gives the other file's columns (added to ``attrs``) or this file's old columns (a fill value)
    one value each. Returns the fill values to use and the file attributes of this file so replaced.
    """
    fills = dict(fill_values) if isinstance(fill_values, Mapping) else {}
    if joining.is_auto(fill_values):
        fills = {k: joining.auto_fill(ds.ca[k]) for k in ds.ca.keys()}
        fills.update({k: joining.auto_fill(v) for k, v in attrs.items()})
    n, replaced = other.shape[1], []
    for name, (mine, theirs) in joining.differing_globals([ds, other]).items():
        if name in ds.ca and name in attrs:
            continue  # a column attribute on both sides already
        where = f"{ds.filename}: column attribute '{name}'"
        if name in ds.ca:  # this file's columns have their own values; the other's take its file attribute
            if theirs is not None:
                attrs[name] = joining.per_column([theirs], [n], where)
            continue
        if name not in attrs:  # one value for this file's columns, one for the other's
            both = joining.per_column([mine, theirs], [1, n], where)
            attrs[name], fills[name] = both[1:], both[0]
        elif mine is not None:  # the other file's own column values; this file's value fills its old columns
            fills[name] = joining.per_column([mine], [1], where)[0]
        else:
            continue
        replaced.append(name)
    for name in [k for k in ds.ca.keys() if k not in attrs and k in other.attrs]:  # equal on both sides
        attrs[name] = joining.per_column([other.attrs[name]], [n], f"{other.filename}: attribute '{name}'")
    for name in [k for k in attrs if k not in ds.ca and k in ds.attrs and k not in replaced]:
        fills[name] = joining.per_column([ds.attrs[name]], [1], f"{ds.filename}: attribute '{name}'")[0]
        replaced.append(name)
    return (fills if replaced else fill_values), replaced


def _roll_back(ds: LoomConnection) -> None:
    """Undo a journalled append that failed while writing (or, when it was interrupted just after
    its commit, keep it done): the connection then says what the file holds."""
    journal.recover(ds._file)
    if fmt.MATRIX not in ds._file:  # an empty file again: the connection starts over
        ds._open_managers()
        return
    ds._dims.shape = tuple(ds._file[fmt.MATRIX].shape)
    ds.col_attrs._forget()


def _column_attrs(ds: LoomConnection, col_attrs: Any, n_new: int, fill_values: Any, convert_attrs: bool = False,
                  drop: bool = False) -> tuple[dict[str, tuple[np.ndarray, bool]], list[str], list[str]]:
    """Each column attribute's values to write for ``n_new`` appended columns, checked against what
    is stored, and whether they are every column's. Values that go after the stored ones unchanged
    (in the stored dtype, into a dataset that can grow) are the new columns' alone, and the stored
    values are never read (an append in batches would read them all again for each batch); else
    they are all: the stored values, then the new or filled ones (with ``convert_attrs``, text on
    either side makes both text), and the attribute is rewritten.

    An attribute only one side has and no fill value covers is refused, or with ``drop`` (what
    ``fill_values=None`` means, as documented for loompy 3) left out: the file's is removed, the
    new columns' ignored. Also returns those two lists of names."""
    where, m = ds.filename, ds.shape[1]
    stored = {name: ds.ca._group[name] for name in ds.ca.keys()}  # (no such group: none)
    for name, dataset in stored.items():
        if dataset.shape[:1] != (m,):
            raise LoomFormatError(f"{where}: column attribute '{name}' has {dataset.shape[0] if dataset.shape else 0} "
                                  f"values for {m} columns; the file is damaged")
    samples = {name: _stored_values(ds, dataset, 1) for name, dataset in stored.items()}  # (dtype and shape)
    given = as_attr_dict(col_attrs, where)
    for name in given:  # (a bad name first: "K\0" would read as K, and be reported as missing)
        fmt.check_name(name, f"{where}: column attribute")
    new_attrs = {k: encoding.normalize_values(v, f"{where}: column attribute '{k}'", n_new) for k, v in given.items()}
    dropped = [k for k in samples if k not in new_attrs and drop and not joining.has_fill(k, fill_values)]
    ignored = [k for k in new_attrs if k not in samples and drop and not joining.has_fill(k, fill_values)]
    for name in ignored:
        del new_attrs[name]
    for name, sample in samples.items():
        if name not in new_attrs and name not in dropped:
            new_attrs[name] = joining.fill_for(name, sample, fill_values, n_new, where)
    out = {}
    for name, values in new_attrs.items():
        what = f"{where}: column attribute '{name}'"
        if name in stored:
            sample = samples[name]  # its dtype and shape decide how the new values join
            joined = joining.join_values([sample, values], what, convert_attrs,
                                         clash=functools.partial(_other_kind, name, sample, values))
            if joined.dtype == sample.dtype and _appendable(stored[name], joined):
                out[name] = (joined[len(sample):], False)
                continue
            old = _stored_values(ds, stored[name])  # (from the file: not an array the caller may have changed)
        else:  # (a new attribute: the file's columns have none)
            old = joining.fill_for(name, values, fill_values, m, where, lacking="the file's existing columns")
        out[name] = (joining.join_values([old, values], what, convert_attrs), True)
    return out, dropped, ignored


def _other_kind(name: str, stored: np.ndarray, new: np.ndarray) -> str:
    """An append's text for a column attribute of numbers (or numbers for one of text), and the way out."""
    return (f" holds {joining.described(stored)}, and the new columns' values are {joining.described(new)}: "
            f"give the new columns the same kind of values (or store the attribute as text first: "
            f"ds.ca['{name}'] = ds.ca['{name}'].astype(str))")


def _warn_left_out(where: str, dropped: list[str], ignored: list[str]) -> None:
    """Say what ``fill_values=None`` left out (loompy 3 logged it at debug level only)."""
    if dropped:
        warnings.warn(f"{where}: column attributes {dropped} removed: the new columns have no values for them "
                      "(fill_values=None; pass fill_values to keep them)", stacklevel=4)
    if ignored:
        warnings.warn(f"{where}: column attributes {ignored} of the new columns ignored: the file has no such "
                      "attributes (fill_values=None; pass fill_values to add them)", stacklevel=4)


def _stored_values(ds: LoomConnection, dataset: h5py.Dataset, count: int | None = None) -> np.ndarray:
    """The first ``count`` (else all) stored values of a column attribute, as read."""
    if count is None:
        return encoding.read_values(dataset, ds.ca._legacy)
    return encoding.present(dataset[:count], dataset.dtype, ds.ca._legacy)


def _appendable(dataset: Any, values: np.ndarray) -> bool:
    """Whether ``values`` can go after what the attribute ``dataset`` holds, in place."""
    return (isinstance(dataset, h5py.Dataset) and bool(dataset.maxshape) and dataset.maxshape[0] is None
            and (values.dtype == object) == (dataset.dtype.kind == "O")
            and (values.dtype == object or np.can_cast(values.dtype, dataset.dtype, "safe")))


def _append_attr(group: h5py.Group, name: str, values: np.ndarray, whole: bool, m: int, where: str,
                 legacy: bool) -> None:
    """Write a column attribute's ``values`` for the new columns from ``m`` (in place), or with
    ``whole`` all of its values (the old one kept aside until the append is done; ``legacy``: text
    as a file before spec 3.0.0 stores it)."""
    if not whole:
        dataset = group[name]
        dataset.resize(m + len(values), axis=0)
        dataset[m:] = encoding.storable(values, f"{where}: column attribute '{name}'")[0]
        fmt.touch(dataset, group)
        return
    if name in group:
        journal.set_aside(group, name)
    else:
        journal.note_created(group.file, journal.ADDED, [name])
    fmt.write_values(group, name, values, resizable=True, where=f"{where}: column attribute '{name}'",
                     legacy=legacy)


def _the_files_own(ds: LoomConnection, name: str, values: Any) -> bool:
    """Whether ``values`` are row attribute ``name`` as this connection reads it: an array of its
    shape holding the same values (text as ``str``, numbers of any dtype). Such values need no look:
    an append keeps the row attributes a file has as they are, whatever it is given."""
    if name not in ds.ra or not isinstance(values, np.ndarray):
        return False
    mine = ds.ra[name]
    return values is mine or (values.shape == mine.shape and values.dtype.kind in "biufUO" and
                              bool(np.array_equal(values, mine)))


def _first_columns(ds: LoomConnection, layer_dict: dict, col_attrs: Any, row_attrs: Any, journalled: bool) -> None:
    """An empty file's first columns define its rows: write it like ``create`` would, journalled
    (undone, the file is empty again; ``journalled=False``: the caller keeps the journal)."""
    contents = validate_contents(ds.filename, layer_dict, row_attrs, col_attrs, None, None)
    layer_dict, dtypes, rows, cols, _ = contents
    f = ds._file
    try:
        if journalled:
            journal.begin(f, 0, first=True)
        with changing(f, "layers"):  # (new names for the file's other connections to list)
            write_layers(f, layer_dict, dtypes)
        ds._dims.shape = tuple(layer_dict[""].shape)
        changed(f, "shape")  # (other connections to the file in this process take the new shape)
        for name, values in rows.items():
            ds.ra[name] = values
        for name, values in cols.items():
            ds.ca[name] = values
        f.flush()
        if journalled:
            journal.commit(f)
    except BaseException:
        if journalled:
            _roll_back(ds)
        raise


def align_rows(ds: LoomConnection, other: LoomConnection, key: str | None) -> np.ndarray | None:
    """Row order of ``other`` matching ``ds`` by the row attribute ``key`` (None: same order already)."""
    where = f"{ds.filename} + {other.filename}"
    if other.shape[0] != ds.shape[0]:
        raise LoomValueError(f"{where}: the files have {ds.shape[0]} and {other.shape[0]} rows")
    if key is None:
        return None
    for conn in (ds, other):
        if key not in conn.ra:
            raise LoomKeyError(f"{conn.filename}: row attribute '{key}' (the key) does not exist")
    mine, theirs = ds.ra[key], other.ra[key]
    if len(np.unique(mine)) != len(mine):
        raise LoomValueError(f"{ds.filename}: key '{key}' has repeated values; rows cannot be aligned")
    lookup = {v: i for i, v in enumerate(theirs.tolist())}
    if len(lookup) != len(theirs):
        raise LoomValueError(f"{other.filename}: key '{key}' has repeated values; rows cannot be aligned")
    missing = [v for v in mine.tolist() if v not in lookup]
    if missing:
        raise LoomValueError(f"{where}: key '{key}' values differ between the files (e.g. {missing[:3]})")
    order = np.array([lookup[v] for v in mine.tolist()], dtype=np.int64)
    return None if np.array_equal(order, np.arange(len(order))) else order


@the_only_write
def add_loom(ds: LoomConnection, other_file: Any, key: str | None = None, fill_values: Any = None,
             batch_size: int = 1000, convert_attrs: bool = False, include_graphs: bool = False) -> None:
    """Append every column of another Loom file, rows aligned by ``key`` when given.

    Layers of the other file that this file lacks are ignored. The batches are one journalled
    append: attributes, and values a layer could not hold unchanged, are checked for the whole
    file before anything is written, and a batch that fails takes the file back to where it was.
    ``include_graphs`` carries over the other file's column graphs (edges shifted to the new columns),
    merged into this file's graph of the same name when it has one; they, and ``convert_attrs``'s
    deletion of this file's global attributes that became column attributes, are written after the
    append is committed.
    """
    check_writable(ds._file, f"{ds.filename}: columns")
    batch_size = batch_count(batch_size, f"{ds.filename}: add_loom(batch_size=...)")
    joining.check_fill_values(fill_values, ds.filename)
    with connect(other_file, "r") as other:
        empty = "" not in ds.layers  # a file from new(): it takes the other's rows and layers
        order = None if empty else align_rows(ds, other, key)
        missing = [name for name in ds.layers.keys() if name not in other.layers]
        if missing and not empty:
            raise LoomValueError(f"{other.filename}: lacks layers {missing} that {ds.filename} has")
        names = other.layers.keys() if empty else ds.layers.keys()
        attrs = other.ca.to_dict()
        graphs = {g: other.col_graphs[g] for g in other.col_graphs.keys()} if include_graphs else {}
        # (another thread of this process may be appending to that file: what was read must be one state)
        journal.refuse_if_pending_read_only(other._file, other.filename, seen_whole=all(
            len(v) == other.shape[1] for v in attrs.values()) and all(
            other.layers[name].shape == other.shape for name in names))
        m0 = ds.shape[1]
        converted: list[str] = []  # file attributes of this file that become column attributes
        drop = fill_values is None  # (what None means, also once convert_attrs has given fill values)
        if convert_attrs and not empty:
            fill_values, converted = _file_attrs_as_columns(ds, other, attrs, fill_values)
        rows = np.arange(other.shape[0]) if order is None else order
        batches = [slice(a, min(other.shape[1], a + batch_size)) for a in range(0, other.shape[1], batch_size)]
        left_out: list[list[str]] = [[], []]
        if not empty:  # (an empty file takes the first batch as it comes)
            _, *left_out = _column_attrs(ds, attrs, other.shape[1], fill_values, convert_attrs, drop)
            left_out = left_out if batches else [[], []]  # (no columns: no batch, nothing dropped)
            for name in names:  # values a cast could change are read once to check them all
                mine, theirs = ds.layers[name].dtype, other.layers[name].dtype
                if not np.can_cast(theirs, mine, "safe"):
                    for cols in batches:
                        fmt.check_fits(other.layers[name][rows, cols], mine, f"{ds.filename}: layer '{name}'")
        stored = sum(other.layers[name]._dataset.id.get_storage_size() for name in names)
        check_free_space(ds._file.filename, 2 * stored + SPARE_BYTES, f"{ds.filename}: columns of {other.filename}")
        # an empty file takes the other's rows: their attributes with the first batch, graphs after
        takes_rows = empty and other.shape[1] > 0  # (no columns: nothing is added, the file stays empty)
        row_attrs = other.ra.to_dict() if takes_rows else None
        row_graphs = {g: other.row_graphs[g] for g in other.row_graphs.keys()} if takes_rows else {}
        try:
            journal.begin(ds._file, m0, first=empty)
            for number, cols in enumerate(batches):
                block = {name: other.layers[name][rows, cols] for name in names}
                add_columns(ds, block, {k: v[cols] for k, v in attrs.items()}, fill_values=fill_values, drop=drop,
                            journalled=False, convert_attrs=convert_attrs, row_attrs=row_attrs if number == 0 else None)
                del block  # (before the next batch is read: two batches held at once took twice the memory)
            journal.commit(ds._file)
        except BaseException:  # back to the columns the file had (an empty file: empty again)
            _roll_back(ds)
            raise
        _warn_left_out(ds.filename, *left_out)
        ds._file.flush()
        for name in converted:  # now a column attribute: the file-level value no longer holds for every column
            if name in ds.attrs:
                del ds.attrs[name]
        for name, g in row_graphs.items():
            ds.row_graphs[name] = g
    for name, g in graphs.items():
        mine = ds.col_graphs[name] if name in ds.col_graphs else sp.coo_matrix((m0, m0))
        ds.col_graphs[name] = joined_graph([(mine, 0), (g, m0)], ds.shape[1])
