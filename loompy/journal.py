"""The append journal: how an append of columns is recorded in the file, so that one interrupted
by a crash or a kill is rolled back rather than left half done.

An append (see :mod:`.growing`) records the old column count in a root HDF5 attribute (the
*journal*) and flushes before it writes anything, then writes layers and column attributes,
flushes, and removes the journal (:func:`commit`). A column attribute that cannot grow in place
(another dtype, or not resizable) is rewritten, its old dataset kept aside in the root group
``loompy_before_append`` until the append is done (:func:`set_aside`); attributes the append
creates are noted there first (:func:`note_created`). The group carries loompy's mark (``OURS``):
a group of that name without it (a user's) is never deleted by an open, and an append is refused
while it is there. If the writer dies in between,
:func:`recover` (run by ``connect``) finds the journal, puts the kept attributes back, removes the
created ones and cuts every layer and column attribute back to the old width: the file reopens
as before the append.
"""

from __future__ import annotations

import h5py
import numpy as np

from . import engine
from . import format as fmt
from .errors import LoomFileError
from .handles import changed, writable

BEFORE_APPEND = "loompy_before_append"  # root group: column attributes an append rewrote, kept until it is done
ADDED = "added"  # its HDF5 attribute: names of the column attributes the append created
ADDED_ROWS = "added_rows"  # its HDF5 attribute: names of the row attributes the append created
FIRST = "first_columns"  # its HDF5 attribute: the append gives an empty file (new()) its first columns
OURS = "kept_by_loompy"  # its HDF5 attribute: the group is loompy's (see _ours)


def pending_append(f: h5py.File) -> int | None:
    """The column count to roll back to, if an append was interrupted."""
    value = f.attrs.get(fmt.APPEND_JOURNAL)
    if value is None:
        return None
    if np.ndim(value) or not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) \
            or value < 0:
        raise LoomFileError(f"{f.filename}: the root attribute '{fmt.APPEND_JOURNAL}' ({value!r}) is not the "
                            "column count loompy's append journal keeps; nothing was changed")
    return int(value)


def recover(f: h5py.File) -> int | None:
    """Roll back an interrupted append (in ``r+``); returns the committed column count, or None if clean.

    In read-only mode nothing is written; the caller presents the committed width instead.
    """
    width = pending_append(f)
    if width is None and writable(f) and _ours(f):  # what a finished append kept aside
        del f[BEFORE_APPEND]
        f.flush()
    if width is None or not writable(f):
        return width
    try:
        kept = fmt.get_group(f, BEFORE_APPEND)
        if kept is not None and kept.attrs.get(FIRST):  # the file was empty: empty it again
            _empty_again(f)
            del f[BEFORE_APPEND]
            del f.attrs[fmt.APPEND_JOURNAL]
            f.flush()
            return 0
        for ds in fmt.matrix_datasets(f).values():
            if ds.shape[1] > width:
                engine.resize(ds, width, axis=1)
        group = fmt.get_group(f, fmt.COL_ATTRS)
        if group is not None and kept is not None:  # attributes the append rewrote: the old ones back
            for name in list(kept):
                if name in group:
                    del group[name]
                f.move(f"{BEFORE_APPEND}/{name}", f"{fmt.COL_ATTRS}/{name}")
            for name in kept.attrs.get(ADDED, []):  # and those it created: gone
                if name in group:
                    del group[name]
        rows = fmt.get_group(f, fmt.ROW_ATTRS)
        for name in kept.attrs.get(ADDED_ROWS, []) if kept is not None and rows is not None else []:
            if name in rows:
                del rows[name]
        if kept is not None:
            del f[BEFORE_APPEND]
        if group is not None:
            for ds in group.values():
                if isinstance(ds, h5py.Dataset) and ds.ndim and ds.shape[0] > width:
                    ds.resize(width, axis=0)
        del f.attrs[fmt.APPEND_JOURNAL]
        f.flush()
    except (RuntimeError, OSError, KeyError, ValueError) as exc:
        raise LoomFileError(f"{f.filename}: could not roll back an interrupted append: {exc}") from exc
    return width


def _empty_again(f: h5py.File) -> None:
    """Remove what the first columns of an empty file brought: matrix, layers, attributes, graphs."""
    if fmt.MATRIX in f:
        engine.forget(f[fmt.MATRIX])
        del f[fmt.MATRIX]
        changed(f, "shape")
    for name in (fmt.LAYERS, fmt.ROW_ATTRS, fmt.COL_ATTRS, fmt.ROW_GRAPHS, fmt.COL_GRAPHS):
        group = fmt.get_group(f, name)
        for key in list(group) if group is not None else []:
            if isinstance(group[key], h5py.Dataset):
                engine.forget(group[key])
            del group[key]
    changed(f, "layers")  # (what connections of this process keep of them is looked up again)
    changed(f, "graphs")


def begin(f: h5py.File, width: int, first: bool = False) -> None:
    """Start a journalled append to a file of ``width`` columns (``first``: an empty one); refused,
    with nothing written, where a user's group has the name of the one it keeps things aside in."""
    if BEFORE_APPEND in f and not _ours(f):
        raise LoomFileError(f"{f.filename}: the file has a '/{BEFORE_APPEND}' that loompy did not mark as its own, "
                            "where an append keeps what it replaces until it is done: a group of yours (rename it, "
                            "then append), or one an older loompy left after an append it had finished (nothing in "
                            f"it is needed: delete it, with h5py: del h5py.File(path, 'r+')['{BEFORE_APPEND}']); "
                            "nothing was changed")
    if first:
        _kept(f).attrs[FIRST] = True
    f.attrs[fmt.APPEND_JOURNAL] = width
    f.flush()


def set_aside(group: h5py.Group, name: str) -> None:
    """Take a column attribute out of the file as part of an append (to rewrite or drop it): kept
    aside until the append is done, so that a rollback puts it back; the first batch's move is
    the one kept (a later batch's is its own rewrite, deleted)."""
    kept = _kept(group.file)
    if name in kept:
        if name in group:
            del group[name]
    elif name in group:
        group.file.move(f"{fmt.COL_ATTRS}/{name}", f"{BEFORE_APPEND}/{name}")


def note_created(f: h5py.File, key: str, names: list[str]) -> None:
    """Note, before writing them, the attributes an append creates (``key``: ADDED for column
    attributes, ADDED_ROWS for row attributes), so that a rollback removes them."""
    kept = _kept(f)
    noted = list(kept.attrs.get(key, []))
    if any(name not in noted for name in names):
        kept.attrs[key] = [*noted, *(name for name in names if name not in noted)]
        f.flush()


def commit(f: h5py.File) -> None:
    """End a journalled append: drop the journal (the append is then done), then what it kept aside."""
    del f.attrs[fmt.APPEND_JOURNAL]
    f.flush()
    if _ours(f):  # a kill right here leaves it behind: recover() drops it
        del f[BEFORE_APPEND]


def _kept(f: h5py.File) -> h5py.Group:
    """The group an append keeps things aside in, made (and marked as loompy's) if need be."""
    group = f.require_group(BEFORE_APPEND)
    if not group.attrs.get(OURS):
        group.attrs[OURS] = True
    return group


def _ours(f: h5py.File) -> bool:
    """Whether the file holds a group an append kept things aside in, marked as loompy's. One
    without the mark is a user's, or an older loompy's: an open or an append never deletes it, and
    only the rollback of an unfinished append (whose journal says the group is the append's, as an
    older loompy's journal does) uses it."""
    group = fmt.get_group(f, BEFORE_APPEND)
    return group is not None and bool(group.attrs.get(OURS))


def refuse_if_pending_read_only(f: h5py.File, filename: str, seen_whole: bool = True) -> None:
    """Refuse a read-only open of a file whose append is unfinished (only a writer can roll it back),
    or a read of one that was not ``seen_whole`` (its matrix and its attributes of different widths:
    an append in another thread of this process began, and perhaps ended, as it was read)."""
    if not seen_whole:  # (a writable file's interrupted append was rolled back when it was opened)
        raise LoomFileError(f"{filename}: another connection of this process is appending to it; "
                            "read it once that append is done")
    if pending_append(f) is not None and not writable(f):
        raise LoomFileError(f"{filename}: an append is unfinished (interrupted, or under way in another "
                            "connection); open with mode 'r+' once to roll an interrupted one back")
