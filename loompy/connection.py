"""``LoomConnection``: an open Loom file. It holds the managers and delegates to them: attributes,
layers and graphs to theirs, opening to :mod:`.files`, appends and rewrites to :mod:`.growing`
and :mod:`.combine`, scans and computations to :mod:`.operations`."""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import h5py
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from . import engine, files, forks, operations, swaps
from . import format as fmt
from .access import LoomAccess
from .attributes import AttributeManager, GlobalAttributeManager
from .errors import (
    LoomError,
    LoomFileError,
    LoomFormatError,
    LoomTypeError,
    LoomValueError,
)
from .export import export_layer
from .graphs import GraphManager, edge_problems
from .handles import (
    READ_ONLY,
    ClosedFile,
    Dims,
    changes,
    check_writable,
    closed_meanwhile,
    rewriting,
    why_closed,
    writable,
)
from .indexing import axis_number
from .journal import recover, refuse_if_pending_read_only
from .layers import LayerManager
from .validator import check_structure
from .view import WHAT_ALL, LoomView, ViewManager


def _shape_syncer(connection: weakref.ref) -> Callable[[], None]:
    """What a connection's Dims calls to sync its shape (by weak reference: no cycle keeps an
    unclosed connection, and its file, alive)."""

    def sync(on_disk: bool) -> None:
        alive = connection()
        if alive is not None:
            alive._sync_shape(on_disk)

    return sync


class _ShapeSeen(NamedTuple):
    """When a connection last took the matrix's shape: its file object, that file's opening (HDF5's
    file number) and how many times loompy had reshaped the matrix of that opening then."""

    file: h5py.File
    opening: tuple
    shape_changes: int

    @classmethod
    def now(cls, file: h5py.File) -> _ShapeSeen:
        return cls(file, file.id.fileno, changes(file.id.fileno, "shape"))


OPEN_TRIES = 5  # opens of a path other threads' permutes keep replacing before connect gives up


class LoomConnection(LoomAccess):
    """A connection to a ``.loom`` file: the matrix stays on disk, attributes load on first use."""

    def __init__(self, filename: str | os.PathLike, mode: str = "r+", *, validate: bool = True,
                 spec_version: str = fmt.CURRENT_SPEC, locking: bool | None = None) -> None:
        if not isinstance(filename, (str, bytes, os.PathLike)):
            raise LoomTypeError(f"connect needs a path to a Loom file, got {type(filename).__name__}")
        self.filename = os.fsdecode(os.fspath(filename))
        self._path = os.path.abspath(os.path.expanduser(self.filename))  # whole-file rewrites go there,
        self._locking = locking                                            # whatever the cwd later
        for _ in range(OPEN_TRIES):
            if mode == "r+":
                files.wait_while_replaced(self._path)
            self._file = files.open_h5(self._path, mode, locking=locking)
            if mode == "r":  # HDF5 may hand over a writable file (open for writing elsewhere in this process)
                setattr(self._file, READ_ONLY, True)
            if self._open_checked(validate):
                break
        else:
            raise LoomFileError(f"{self.filename}: replaced by other threads of this process {OPEN_TRIES} times "
                                "while connecting (permute?); connect again once they are done")
        files.register(self)
        forks.watch(self, self._file, self._path)
        engine.forget_let_go()  # (what earlier connections let go of unclosed kept for their files)
        self._forget_if_let_go()
        self._ready = True  # (ds.Name = values is refused from now on: see LoomAccess.__setattr__)

    def _open_checked(self, validate: bool) -> bool:
        """Repair what an interrupted write left in the file just opened (an append, a replacement),
        check it and open its managers; False, the file closed, when another thread's permute
        replaced the file at the path meanwhile (the new one is to be opened).

        Opened for writing, all of it happens once the writes under way to the file in other threads
        of this process are done, and holds off new ones: an append or replacement under way there
        is theirs, not an interrupted one, and its file is checked whole."""
        file = self._file
        try:
            with rewriting(file) if writable(file) else contextlib.nullcontext():
                replaced = writable(file) and files.replaced_since_opened(file, self._path)
                if not replaced:
                    self._repair_and_check(validate)
                    self._open_managers()
        except BaseException as exc:
            file.close()
            if isinstance(exc, (OSError, RuntimeError)) and not isinstance(exc, LoomError):
                raise files.unreadable(self.filename, exc) from exc
            raise
        if replaced:
            file.close()
        return not replaced

    def _repair_and_check(self, validate: bool) -> None:
        """Roll back an interrupted append and settle an interrupted replacement (read-only: refuse a
        file that has either), then check the file's structure (with ``validate``)."""
        f = self._file
        recover(f)
        if writable(f):
            swaps.settle(f)
        elif pending := swaps.pending(f):
            raise LoomFileError(f"{self.filename}: the replacement of {', '.join(pending)} was interrupted; "
                                "open the file once with mode 'r+' to repair it")
        refuse_if_pending_read_only(f, self.filename)
        if validate:
            problems = check_structure(f)
            if problems:  # (an append in another thread of this process may have begun as it looked)
                refuse_if_pending_read_only(f, self.filename)
                problems = check_structure(f)
            if problems:
                raise LoomFormatError(f"{self.filename}: not a valid Loom file: " + "; ".join(problems))

    def _reopen(self) -> None:
        """Open the file at this connection's path again for writing (after a whole-file rewrite
        replaced it), into the same managers: objects taken from them before (``ds.ca``, a layer)
        see the new file."""
        self._file = files.open_h5(self._path, "r+", locking=self._locking)
        forks.watch(self, self._file, self._path)
        self._forget_unclosed.detach()  # (the old opening: permute forgot it)
        self._forget_if_let_go()
        self._shape_seen = _ShapeSeen.now(self._file)
        matrix = self._file.get(fmt.MATRIX)
        self._dims.shape = tuple(matrix.shape) if isinstance(matrix, h5py.Dataset) else (0, 0)
        self._point_managers_at(self._file)
        self.row_attrs._forget()
        self.col_attrs._forget()

    def _forget_if_let_go(self) -> None:
        """Have the engine forget this connection's opening of the file, should the connection be let
        go of without close() (see engine.forget_later); close() forgets it itself."""
        self._forget_unclosed = weakref.finalize(self, engine.forget_later, self._file.id.fileno)
        self._forget_unclosed.atexit = False  # (at exit nothing needs forgetting)

    def _point_managers_at(self, file: h5py.File | ClosedFile) -> None:
        for manager in (self.layers, self.row_attrs, self.col_attrs, self.row_graphs, self.col_graphs, self.attrs):
            object.__setattr__(manager, "_file", file)

    def _open_managers(self) -> None:
        f = self._file
        self.version = fmt.read_spec_version(f)
        legacy = self.version.is_legacy
        self._shape_seen = _ShapeSeen.now(f)  # (see _sync_shape)
        matrix = f.get(fmt.MATRIX)
        self._dims = Dims(matrix.shape if isinstance(matrix, h5py.Dataset) else (0, 0),
                          on_sync=_shape_syncer(weakref.ref(self)))
        self.layers = LayerManager(f, self._dims)
        self.row_attrs = AttributeManager(f, 0, self._dims, legacy=legacy)
        self.col_attrs = AttributeManager(f, 1, self._dims, legacy=legacy)
        self.row_graphs = GraphManager(f, 0, self._dims, group_name=fmt.graph_group_name(f, 0))
        self.col_graphs = GraphManager(f, 1, self._dims, group_name=fmt.graph_group_name(f, 1))
        self.attrs = GlobalAttributeManager(f, in_group=fmt.globals_live_in_group(f), legacy=legacy)

    # --------------------------------------------------------------- basic properties
    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the main matrix; (0, 0) for an empty file made by ``new()``."""
        self._dims.sync()
        return self._dims.shape

    def _sync_shape(self, on_disk: bool = False) -> None:
        """Take the matrix shape on disk, and the column attributes with it, when another
        connection to the file in this process appended columns (``on_disk``: look whether it did)."""
        file, seen = self._file, self._shape_seen
        if not on_disk and seen.file is file and changes(seen.opening, "shape") == seen.shape_changes:
            return
        with closed_meanwhile(self._check_open):
            if not file:
                return
            self._shape_seen = _ShapeSeen.now(file)
            matrix = file.get(fmt.MATRIX)
            shape = tuple(matrix.shape) if isinstance(matrix, h5py.Dataset) else None
        if shape is not None and shape != self._dims.shape:
            rows_changed = shape[0] != self._dims.shape[0]  # (an empty file's first columns)
            self._dims.shape = shape
            self.row_attrs._forget(values=rows_changed)
            self.col_attrs._forget()

    @property
    def mode(self) -> str:
        """``'r+'`` or ``'r'`` as the file is open, ``'closed'`` once closed."""
        return ("r+" if writable(self._file) else "r") if self._file else "closed"

    @property
    def closed(self) -> bool:
        """Whether the connection is closed (closing never reopens it)."""
        return not bool(self._file)

    def close(self, suppress_warning: bool = False) -> None:
        """Close the file; the connection cannot be used afterwards. loompy's writes under way in
        other threads finish first (later ones are refused); reads are not waited for. If writing
        out what HDF5 still holds fails (a full disk), the file is closed all the same and a
        LoomFileError raised; if HDF5 cannot even close it, the connection stays open, and
        ``close()`` may be tried again.
        (``suppress_warning`` is loompy 3's, accepted and unused: closing warns of nothing.)"""
        if not self._file:
            return
        if not writable(self._file):  # (nothing of its own to wait for: HDF5 shares the file with writers)
            self._close_now()
            return
        try:
            gate = rewriting(self._file)  # (loompy's writes under way in other threads end first; later ones wait)
        except LoomFileError:
            return  # (another thread closed it just now)
        with gate:
            self._close_now()

    def _close_now(self) -> None:
        if not self._file:
            return  # (another thread closed it meanwhile)
        file, failure = self._file, None
        number = file.id.fileno
        engine.forget_file(file)
        if forks.inherited(file):  # (HDF5 closing it here would write its state out: see forks)
            self._let_go()
            return
        try:
            file.flush()
        except Exception as error:
            failure = error
        forks.unwatch(self)  # (before its descriptor goes: another file may get the number)
        try:
            file.close()
        except Exception as error:
            failure = failure or error
        if not file:
            engine.forget_opening(number)
            self._forget_unclosed.detach()
            self._let_go()
        else:
            forks.watch(self, file, self._path)
        if failure is not None:
            still = "" if not file else "; the file is still open: close() may be tried again"
            raise LoomFileError(f"{self.filename}: writing out the file's last changes failed ({failure}){still}"
                                ) from failure

    def _let_go(self) -> None:
        """The file is closed (or, inherited from the process this one was forked from, left open
        for good): later uses, also through the managers, say the connection is closed."""
        self._file = ClosedFile(self.filename)
        self._point_managers_at(self._file)

    def flush(self) -> None:
        """Write out what HDF5 still holds in memory, so other readers of the file see it."""
        self._check_open()
        if forks.inherited(self._file):
            check_writable(self._file, "the file's last changes")  # (refused: see forks)
        self._file.flush()

    def __enter__(self) -> LoomConnection:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        """Close; when the block raised, a failure to close is noted on that error, not put in its place."""
        if error is None:
            self.close()
            return
        try:
            self.close()
        except LoomError as failure:
            if hasattr(error, "add_note"):  # (Python 3.11+)
                error.add_note(str(failure))

    # --------------------------------------------------------------- matrix access
    def __setitem__(self, key: Any, values: Any) -> None:
        if isinstance(key, str):
            self.layers[key] = values
        else:
            self.layers[""][key] = values

    # --------------------------------------------------------------- attribute and layer helpers
    def set_attr(self, name: str, values: npt.ArrayLike, axis: int = 0, dtype: npt.DTypeLike = None) -> None:
        """Create or overwrite a row (``axis=0``) or column (``axis=1``) attribute."""
        self._attr_manager(axis).set(name, values, dtype=dtype)

    def delete_attr(self, name: str, axis: int = 0) -> None:
        """Delete a row (``axis=0``) or column (``axis=1``) attribute (loompy 3's name for ``del ds.ra[name]``)."""
        del self._attr_manager(axis)[name]

    def _attr_manager(self, axis: int) -> AttributeManager:
        return self.row_attrs if self._axis(axis) == 0 else self.col_attrs

    def _graph_manager(self, axis: int) -> GraphManager:
        return self.row_graphs if self._axis(axis) == 0 else self.col_graphs

    def _check_open(self) -> None:
        if not self._file:
            raise LoomFileError(f"{self.filename}: {why_closed(self._file)}")

    def _axis(self, axis: Any) -> int:
        return axis_number(axis, self.filename)

    def set_layer(self, name: str, matrix: Any, chunks: tuple[int, int] = fmt.DEFAULT_CHUNKS,
                  chunk_cache: int = fmt.DEFAULT_CHUNK_CACHE_MB, dtype: Any = None,
                  compression_opts: int | None = fmt.DEFAULT_COMPRESSION_LEVEL) -> None:
        """Create or overwrite a layer; see :meth:`LayerManager.set_layer`."""
        self.layers.set_layer(name, matrix, chunks=chunks, chunk_cache=chunk_cache, dtype=dtype,
                              compression_opts=compression_opts)

    def list_edges(self, axis: int) -> list[str]:
        """Names of the row (``axis=0``) or column (``axis=1``) graphs."""
        return self._graph_manager(axis).keys()

    def get_edges(self, name: str, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A graph as (from, to, weight) arrays."""
        g = self._graph_manager(axis)[name]
        return g.row, g.col, g.data

    def set_edges(self, name: str, a: np.ndarray, b: np.ndarray, w: np.ndarray, axis: int) -> None:
        """Store a graph from (from, to, weight) arrays of equal length."""
        graphs = self._graph_manager(axis)
        where = f"{self.filename}: graph '{name}'"
        a, b, w, n = np.asarray(a), np.asarray(b), np.asarray(w), self.shape[axis]
        for problem in edge_problems(a, b, w, n):
            raise LoomValueError(f"{where}: {problem}")
        graphs[name] = sp.coo_matrix((w, (a.astype(np.int64), b.astype(np.int64))), shape=(n, n))

    # --------------------------------------------------------------- scanning and computing (operations.py, view.py)
    @property
    def view(self) -> ViewManager:
        """``ds.view[rows, cols]``: an in-memory :class:`LoomView` of a selection."""
        return ViewManager(self)

    def scan(self, *, items: Any = None, axis: int | None = None, layers: Any = None, key: str | None = None,
             batch_size: int = 512, what: Any = WHAT_ALL) -> Iterator[tuple[int, np.ndarray, LoomView]]:
        """Yield ``(ix, selection, view)`` in batches along ``axis``; see :func:`loompy.operations.scan`."""
        return operations.scan(self, items=items, axis=axis, layers=layers, key=key, batch_size=batch_size,
                               what=what)

    def batch_scan(self, cells: Any = None, genes: Any = None, axis: int = 0, batch_size: int = 1000,
                   layer: str | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield ``(ix, selection, values)`` in batches of rows (axis 0) or columns (axis 1)."""
        return operations.batch_scan(self, cells, genes, axis, batch_size, layer)

    def batch_scan_layers(self, cells: Any = None, genes: Any = None, axis: int = 0, batch_size: int = 1000,
                          layers: Any = None) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """Like :meth:`batch_scan`, yielding a dict of layers."""
        return operations.batch_scan_layers(self, cells, genes, axis, batch_size, layers)

    def map(self, f_list: Callable | Sequence[Callable], axis: int = 0, chunksize: int = 1000,
            selection: npt.ArrayLike | None = None) -> list[np.ndarray] | np.ndarray:
        """Apply function(s) to every row (axis 0) or column (axis 1) in one pass; see :func:`operations.map_`."""
        return self.layers[""].map(f_list, axis, chunksize, selection)

    def aggregate(self, out_file: str | os.PathLike | None = None, select: Any = None, group_by: Any = "Clusters",
                  aggr_by: str | Callable = "mean", aggr_ca_by: dict[str, str | Callable] | None = None,
                  layer: str = "", aggr_ca_if_equal: bool = False, *, return_matrix: bool = True) -> np.ndarray:
        """Aggregate columns by group, returning the matrix of groups (also when writing ``out_file``),
        with loompy 3's arguments in its order; ``return_matrix`` (older loompy's) changes nothing.
        See :func:`loompy.operations.aggregate`."""
        return operations.aggregate(self, out_file, select, group_by, aggr_by, aggr_ca_by, layer, aggr_ca_if_equal)

    def export(self, out_file: str | os.PathLike, layer: str | None = None, format: str = "tab") -> None:
        """Write a layer with its attributes as tab-separated text."""
        export_layer(self, out_file, layer, format)

    def last_modified(self, name: str | None = None, axis: int = 0) -> str:
        """Timestamp of the last write to the file (or to one row/column attribute)."""
        return operations.last_modified(self, name, axis)

    def get_changes_since(self, timestamp: str) -> dict[str, list[str]]:
        """What was written after ``timestamp``: names per part (layers, row_attrs, col_attrs, row_graphs,
        col_graphs, attrs)."""
        return operations.get_changes_since(self, timestamp)


    # --------------------------------------------------------------- growing and reordering (growing.py, combine.py)
    def add_columns(self, layers: Any = None, col_attrs: Any = None, *, row_attrs: Any = None,
                    fill_values: Any = None, submatrix: Any = None) -> None:
        """Append columns (every layer; column attributes as :meth:`add_loom` takes them, with
        ``fill_values``); see :func:`loompy.growing.add_columns`. ``submatrix=`` is the seed's name
        for ``layers``."""
        from .growing import add_columns

        if (layers is None) == (submatrix is None):
            raise LoomTypeError(f"{self.filename}: add_columns needs the new columns: layers (or submatrix=), once")
        layers = submatrix if layers is None else layers
        if col_attrs is None:
            raise LoomTypeError(f"{self.filename}: add_columns needs col_attrs (a dict, possibly empty)")

        add_columns(self, layers, col_attrs, row_attrs=row_attrs, fill_values=fill_values)

    def add_loom(self, other_file: str | os.PathLike, key: str | None = None, fill_values: Any = None,
                 batch_size: int = 1000, convert_attrs: bool = False, include_graphs: bool = False) -> None:
        """Append the columns of another Loom file, rows aligned by ``key`` when given.

        ``fill_values`` supplies column attributes one file lacks (a dict, or ``"auto"``: 0 or "");
        with None, as in loompy 3, this file's attributes the other lacks are removed and the
        other's that this file lacks ignored (with a warning). ``convert_attrs`` turns global
        attributes that differ between the files into column attributes (and deletes them as
        global attributes here); ``include_graphs`` appends the other file's column graphs, merged
        into this file's graph of the same name. The columns and attributes are one journalled
        append; the graphs and converted global attributes are written after it is committed.
        """
        from .growing import add_loom

        add_loom(self, other_file, key, fill_values, batch_size, convert_attrs, include_graphs)

    def permute(self, ordering: npt.ArrayLike, axis: int) -> None:
        """Reorder rows (axis 0) or columns (axis 1) everywhere; the file is rewritten atomically.
        loompy's writes under way in other threads finish first; writes and reads of layers asked
        for meanwhile wait, then are refused (they were meant for the old order)."""
        from .combine import permute

        permute(self, ordering, axis)


    # --------------------------------------------------------------- display
    def __repr__(self) -> str:
        if self.closed:
            return f"<LoomConnection to '{self.filename}' (closed)>"
        n, m = self.shape
        return (f"<LoomConnection to '{self.filename}' (mode {self.mode}, spec {self.version}): "
                f"{n} rows x {m} columns; layers {self.layers.keys()}; "
                f"row attributes {self.row_attrs.keys()}; column attributes {self.col_attrs.keys()}>")


def connect(filename: str | os.PathLike, mode: str = "r+", *, validate: bool = True,
            spec_version: str = fmt.CURRENT_SPEC, locking: bool | None = None) -> LoomConnection:
    """Open a Loom file. ``mode`` is ``'r+'`` (read/write, default) or ``'r'`` (read-only).

    ``validate`` checks the structure (cheap: no data is read) against the spec version the file
    says it follows (``ds.version``); ``spec_version`` is loompy 3's argument, accepted and unused
    there as here. ``locking=False`` opens without
    HDF5 file locks, for file systems that refuse them (NFS); use it only with ``mode='r'`` and
    when no other process writes the file.
    """
    return LoomConnection(filename, mode, validate=validate, spec_version=spec_version, locking=locking)

