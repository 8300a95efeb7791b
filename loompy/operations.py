"""Out-of-core computation over a connection: scan, batch_scan, map, aggregate, change tracking.

Everything streams the matrix in batches along one axis through the chunk engine, so memory holds
a few batches (plus the attributes), however large the file.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from . import encoding, engine, files
from . import format as fmt
from .errors import LoomFileError, LoomKeyError, LoomTypeError, LoomValueError, naming
from .handles import changes, closed_meanwhile
from .indexing import AxisSelection, axis_number, batch_count, expand, positions, select_axis
from .view import WHAT_ALL, LoomView, layer_names, make_view, whole_parts

if TYPE_CHECKING:  # (the connection imports this module)
    from .connection import LoomConnection


def iter_batches(selected: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, positions) for each file window ``[start, start + batch_size)`` holding selected
    positions, in file order; within a window the positions keep their order in ``selected``
    and their repeats, as loompy 3's scans take them (``batch_size`` checked by the caller: see
    :func:`~loompy.indexing.batch_count`)."""
    window = selected // batch_size
    order = np.argsort(window, kind="stable")  # (the identity, and quick, for sorted positions)
    window = window[order]
    firsts = np.flatnonzero(np.diff(window, prepend=-1)).tolist()
    for a, b in zip(firsts, [*firsts[1:], len(order)]):
        yield int(window[a]) * batch_size, selected[order[a:b]]


def read_strip(dataset: Any, axis: int, batch: np.ndarray, other: np.ndarray, recycler: engine.Recycler
               ) -> np.ndarray:
    """Values of one batch: rows ``batch`` x cols ``other`` (axis 0) or rows ``other`` x cols ``batch``
    (axis 1), each in its order and with its repeats, read into memory from ``recycler`` (fresh
    memory costs page faults)."""
    rows, cols = (batch, other) if axis == 0 else (other, batch)
    rows, cols = AxisSelection(rows, dataset.shape[0]), AxisSelection(cols, dataset.shape[1])
    block = engine.read_block(dataset, rows.unique, cols.unique,
                              recycler.get((rows.unique.size, cols.unique.size), dataset.dtype))
    return expand(block, rows, cols)


def _one_ahead(items: list, build: Callable[[Any], Any], check: Callable[[], None], opening: tuple
               ) -> Iterator[Any]:
    """``build(item)`` for each item in turn, the next one built on a helper thread while the caller
    works on this one (reading overlaps the caller's computing, and the engine's workers do not
    pause between batches). ``check()`` runs before each item is handed over, so a connection closed
    meanwhile says so rather than what the read ahead met.

    An item built (or failed) while one of loompy's writes to the file ``opening`` names
    (``file.id.fileno``) began or ended, the caller's own or another thread's, is built again before
    it is handed over: it may hold values from before the write (or have met a layer deleted and
    made again). The count of writes is read before an item is built (``began``), as it is handed
    over (``handed``) and when the next is asked for: a caller that wrote while it worked on an item
    gets the next one built when asked for, not ahead (a loop writing every batch would have each
    read twice). A caller that stops early waits for at most the one item being built.
    """
    def build_saying_why(item: Any) -> Any:
        with closed_meanwhile(check):
            return build(item)

    def writes() -> int:
        return changes(opening, "writes")

    with ThreadPoolExecutor(max_workers=1) as helper:
        began, future = writes(), helper.submit(build_saying_why, items[0]) if len(items) > 1 else None
        wrote, parent = False, os.getpid()
        for k, item in enumerate(items):
            built = None
            if os.getpid() != parent:  # (in a process forked meanwhile: the helper thread stayed behind)
                future = None
            if future is not None:
                try:
                    built = future.result()
                except Exception:
                    if writes() == began:  # (not a write's doing: the caller's to hear)
                        check()
                        raise
                finally:
                    future = None  # (it holds the item too: let go before one is built again)
                if writes() != began:  # (written meanwhile: built again, after the write)
                    built = None
            check()
            if built is None:
                built = build_saying_why(item)
            if k + 1 < len(items) and not wrote and os.getpid() == parent:
                began, future = writes(), helper.submit(build_saying_why, items[k + 1])
            handed = writes()
            yield built
            wrote = writes() != handed


def _same_order(source: Any, call: str, columns_given: bool = False) -> Callable[[], None]:
    """What a scan (``source`` its connection) or map (``source`` its layer) checks before each batch:
    the connection is open, its file is the one it began on (permute in between replaces it: later
    batches, cut for the old order, would repeat some items and miss others), and, unless the pass
    was given its columns, the matrix has the shape it had then (columns appended meanwhile would
    be missing from later batches)."""
    filename = source.filename if hasattr(source, "filename") else source._filename
    check_open = source._check_open if hasattr(source, "_check_open") else source._shared.check_open
    began_on, shape = source._file, source.shape

    def check() -> None:
        check_open()
        if source._file is not began_on:
            raise LoomFileError(f"{filename}: {call}: the file was permuted since it began, and its later "
                                "batches would mix the two orders; start again")
        if not columns_given and source.shape != shape:
            raise LoomFileError(f"{filename}: {call}: the matrix is {source.shape[0]} x {source.shape[1]} now, "
                                f"{shape[0]} x {shape[1]} when it began (its later batches would miss the "
                                "columns appended); start again")
    return check


@contextlib.contextmanager
def _helped(ds: LoomConnection, datasets: dict[str, Any], axis: int, batch_size: int, whole: bool
            ) -> Iterator[dict[str, engine.BatchReads]]:
    """For a pass over the ``whole`` matrix of a single layer (``datasets``: the layers read, by
    name), in file order on both axes: its batches filled by the engine's helper processes, by
    layer name (see :mod:`loompy.engine.scans`; none where they do not pay). They stop at the
    first write to the file (its batches are then read here, after it) and as the pass ends."""
    readers = {}
    if whole and len(datasets) == 1:
        opening = ds._file.id.fileno
        began = changes(opening, "writes")
        ((name, dataset),) = datasets.items()
        reader = engine.BatchReads.start(dataset, axis, batch_size, lambda: changes(opening, "writes") != began)
        readers = {name: reader} if reader is not None else {}
    try:
        yield readers
    finally:
        for reader in readers.values():
            reader.close()


def _chosen(items: Any) -> bool:
    """Whether a scan's ``items`` name the items (indices, a mask), so that items appended later are
    none of them; a start position or a slice runs to the end, wherever that is by then."""
    return items is not None and not isinstance(items, slice)


def scan(ds: LoomConnection, *, items: Any = None, axis: int | None = None, layers: Iterable[str] | None = None,
         key: str | None = None, batch_size: int = 512, what: Sequence[str] = WHAT_ALL
         ) -> Iterator[tuple[int, np.ndarray, LoomView]]:
    """Yield ``(ix, selection, view)`` per batch along ``axis``; ``ix`` is the batch's first file position.

    ``items`` restricts the items scanned: a mask, indices (each batch holds those in its window of
    ``batch_size`` positions, in their order and with their repeats, as in loompy 3), or one position
    to start from; ``key`` orders the *other* axis by that attribute; ``layers`` (a name or a list
    of names) and ``what`` restrict what each view carries.
    The next batch is read while the caller works on this one (see :func:`_one_ahead`).
    """
    ds._check_open()
    axis = ds._axis(axis)
    batch_size = batch_count(batch_size, f"{ds.filename}: scan(batch_size=...)")
    unknown = set(what) - set(WHAT_ALL)
    if unknown:
        raise LoomValueError(f"{ds.filename}: scan(what=...) got unknown parts {sorted(unknown)}")
    names = layer_names(ds, layers)
    for name in names:
        if name not in ds.layers:
            ds._check_open()  # (a connection closed meanwhile lists no layers: say that instead)
            raise LoomKeyError(f"{ds.filename}: layer '{name}' does not exist")
    length, other_length = ds.shape[axis], ds.shape[1 - axis]
    if isinstance(items, numbers.Integral) and not isinstance(items, (bool, np.bool_)):
        items = slice(int(items), None)  # (loompy 3: scan from there on)
    with naming(f"{ds.filename}: scan(items=...)"):
        selected = positions(items, length, axis)
    if key is None:
        other = np.arange(other_length, dtype=np.int64)
    else:
        other_attrs = ds.ca if axis == 0 else ds.ra
        if key not in other_attrs:
            raise LoomKeyError(f"{ds.filename}: scan(key=...): attribute '{key}' does not exist on the other axis")
        other = np.argsort(other_attrs[key], kind="stable").astype(np.int64)
    other_sel = AxisSelection(other, other_length)
    for name in names:
        engine.expect_reads(ds.layers[name]._dataset, min(1, selected.size / max(1, length)))
    recyclers = {name: engine.Recycler() for name in names}  # batches let go of lend their memory to later ones
    # global attributes and graphs: read again only after a write to them
    parts: dict[str, Any] = {"changes": None}
    opening = ds._file.id.fileno

    def build(item: tuple[int, np.ndarray]) -> tuple[int, np.ndarray, LoomView]:
        start, batch = item
        batch_sel = AxisSelection(batch, length)
        rows, cols = (batch_sel, other_sel) if axis == 0 else (other_sel, batch_sel)
        now = (changes(opening, "globals"), changes(opening, "graphs"))
        if parts["changes"] != now:
            parts.update(whole_parts(ds, what), changes=now)
        blocks = {name: block for name, reader in helpers.items() if (block := reader.batch(start // batch_size))
                  is not None}
        return start, batch, make_view(ds, rows, cols, layers=names, what=what, recyclers=recyclers, parts=parts,
                                       blocks=blocks)

    check = _same_order(ds, "scan", columns_given=axis == 1 and _chosen(items))
    whole = items is None and key is None and "layers" in what
    with _helped(ds, {name: ds.layers[name]._dataset for name in names}, axis, batch_size, whole) as helpers:
        yield from _one_ahead(list(iter_batches(selected, batch_size)), build, check, opening)


def batch_scan_layers(ds: LoomConnection, cells: Any = None, genes: Any = None, axis: int = 0, batch_size: int = 1000,
                      layers: Iterable[str] | None = None) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
    """Yield ``(ix, selection, {layer: values})`` per batch of rows (axis 0) or columns (axis 1);
    read one batch ahead, as :func:`scan`."""
    ds._check_open()
    axis = ds._axis(axis)
    batch_size = batch_count(batch_size, f"{ds.filename}: batch_scan(batch_size=...)")
    names = layer_names(ds, layers)
    if ds.shape == (0, 0) and set(names) <= {""}:  # an empty file (new()): no batches, as scan gives
        return
    found = {name: ds.layers[name] for name in names}  # (each batch asks for its dataset: one may be replaced)
    datasets = {name: layer._dataset for name, layer in found.items()}
    with naming(f"{ds.filename}: batch_scan(genes=...)"):
        rows = positions(genes, ds.shape[0], 0)
    with naming(f"{ds.filename}: batch_scan(cells=...)"):
        cols = positions(cells, ds.shape[1], 1)
    along, other = (rows, cols) if axis == 0 else (cols, rows)
    for dataset in datasets.values():
        engine.expect_reads(dataset, min(1, along.size / max(1, ds.shape[axis])))
    recyclers = {name: engine.Recycler() for name in datasets}  # as in scan

    def build(item: tuple[int, np.ndarray]) -> tuple[int, np.ndarray, dict[str, np.ndarray]]:
        start, batch = item
        values = {name: reader.batch(start // batch_size) for name, reader in helpers.items()}
        return start, batch, {name: read_strip(layer._dataset, axis, batch, other, recyclers[name])
                              if values.get(name) is None else values[name] for name, layer in found.items()}

    batches = list(iter_batches(along, batch_size))
    check = _same_order(ds, "batch_scan", columns_given=_chosen(cells))
    with _helped(ds, datasets, axis, batch_size, genes is None and cells is None) as helpers:
        yield from _one_ahead(batches, build, check, ds._file.id.fileno)


def batch_scan(ds: LoomConnection, cells: Any = None, genes: Any = None, axis: int = 0, batch_size: int = 1000,
               layer: str | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(ix, selection, values)`` per batch: :func:`batch_scan_layers` of one layer (loompy 3's name)."""
    name = "" if layer is None else layer
    for start, batch, values in batch_scan_layers(ds, cells, genes, axis, batch_size, layers=[name]):
        yield start, batch, values[name]


# numpy reductions that accept ``axis=``: applied to a whole batch at once (same result as per row)
_VECTORISABLE = {np.mean, np.std, np.var, np.sum, np.max, np.min, np.amax, np.amin, np.median, np.prod,
                 np.count_nonzero, np.nanmean, np.nanstd, np.nanvar, np.nansum, np.nanmax, np.nanmin, np.nanmedian,
                 np.ptp, np.all, np.any}


def _apply(f: Callable, block: np.ndarray, axis: int) -> np.ndarray:
    """``f`` on every row (axis 0) or column (axis 1) of ``block``: numpy's reductions on each line
    as a contiguous array (the values they give for that line alone), others on each line as is."""
    if f in _VECTORISABLE:
        return (engine.reduce_block if axis == 0 else engine.reduce_columns)([f], block)[0]
    values = [f(line) for line in (block if axis == 0 else block.T)]
    # (np.array would turn numbers into text beside text, and fail on arrays: each its own object)
    if any(isinstance(v, (str, bytes)) or np.ndim(v) != 0 for v in values):
        kept = np.empty(len(values), dtype=object)
        kept[:] = values
        return kept
    return np.array(values)


def map_(layer: Any, f_list: Callable | Sequence[Callable], axis: int = 0, chunksize: int = 1000,
         selection: Any = None) -> list[np.ndarray] | np.ndarray:
    """Apply each function to every row (axis 0) or column (axis 1) of ``layer`` (a
    :class:`~loompy.layers.LoomLayer`: the main matrix or a named layer), in one pass over the file.

    ``selection`` (a mask, or indices in their order and with their repeats) picks the values of
    the *other* axis each function sees: each line is taken as ``line[selection]``, as in loompy 3.
    Returns a list of arrays for a list of functions, one array for a single function.
    ``chunksize`` is how many rows or columns a batch holds, rounded down to whole chunks. When
    every function is a numpy reduction (np.mean, np.std, np.sum, ...), the engine reduces each
    chunk row or column as soon as it is inflated (see :func:`~loompy.engine.reduce_lines`). numpy's
    reductions see each line as a contiguous array, so their values are the ones they give for
    that line alone, as in loompy 3.
    """
    dataset = layer._dataset  # (LoomFileError when the connection is closed)
    axis = axis_number(axis, f"{layer._where}: map()")
    chunksize = batch_count(chunksize, f"{layer._where}: map(chunksize=...)")
    single = callable(f_list)
    functions = [f_list] if single else list(f_list)
    if not functions or not all(callable(f) for f in functions):
        raise LoomTypeError(f"{layer._where}: map() needs a function or a list of functions")
    length, n_other = dataset.shape[axis], dataset.shape[1 - axis]
    # the other axis's positions as given (order and repeats kept: each line is taken as row[selection])
    with naming(f"{layer._where}: map(selection=...)"):
        other = AxisSelection(np.arange(n_other, dtype=np.int64), n_other) if selection is None \
            else select_axis(np.asarray(selection), n_other, 1 - axis)
    if other.indices.size and all(f in _VECTORISABLE for f in functions):
        reduced = _reduce_lines(dataset, axis, functions, other.indices)
        if reduced is not None:
            return reduced[0] if single else reduced
    engine.expect_reads(dataset)
    if dataset.chunks and chunksize >= dataset.chunks[axis]:  # whole chunks: none is inflated twice
        chunksize = chunksize // dataset.chunks[axis] * dataset.chunks[axis]
    batches = list(iter_batches(np.arange(length, dtype=np.int64), chunksize))
    recycler = engine.Recycler()  # a batch no function kept a part of lends its memory to a later one

    def build(item: tuple[int, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
        start, batch = item
        block = read_strip(layer._dataset, axis, batch, other.unique, recycler)  # (replaced meanwhile: the new one)
        return start, batch, block if other.inverse is None else np.take(block, other.inverse, axis=1 - axis)

    results: list[np.ndarray | None] = [None] * len(functions)
    # the next batch is read on a helper thread while the functions run on this one
    check = _same_order(layer, "map", columns_given=axis == 0 and selection is not None)
    for start, batch, block in _one_ahead(batches, build, check, dataset.file.id.fileno):
        for i, f in enumerate(functions):
            values = _apply(f, block, axis)
            dtype = _result_dtype(values.dtype)
            results[i] = np.empty(length, dtype=dtype) if results[i] is None else _holding(results[i], dtype)
            results[i][start:start + len(batch)] = values
        del block  # let go before the next batch is read ahead: two buffers take turns
    results = [r if r is not None else np.zeros(0) for r in results]
    return results[0] if single else results


def _holding(results: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``results`` (a pass's values so far), widened when a later batch's values of ``dtype`` need it
    (a function giving 0 for the first lines and 0.5 for later ones)."""
    wanted = np.result_type(results.dtype, dtype)
    return results if wanted == results.dtype else results.astype(wanted)


def _result_dtype(dtype: np.dtype) -> np.dtype:
    """What map stores a function's values in: numbers as float64 at least (as loompy 3 does, so a
    function giving 0 for one row and 0.5 for the next loses nothing), anything else as objects."""
    return np.result_type(np.float64, dtype) if dtype.kind in "biufc" else np.dtype(object)


def _reduce_lines(dataset: Any, axis: int, functions: list[Callable], others: np.ndarray
                  ) -> list[np.ndarray] | None:
    """numpy reductions of every row or column, by the engine as each chunk row or column is
    inflated (see :func:`~loompy.engine.reduce_lines`), instead of here a batch at a time; None
    where the engine cannot read the chunks directly."""
    probe = np.zeros((1, others.size), dataset.dtype)
    dtypes = [_result_dtype(np.asarray(f(probe, axis=1)).dtype) for f in functions]
    return engine.reduce_lines(dataset, axis, functions, others, dtypes)


# --------------------------------------------------------------------------- aggregate
def _mode(values: np.ndarray, axis: int) -> np.ndarray:
    import scipy.stats  # heavy: imported only when a mode is asked for

    return scipy.stats.mode(values, axis=axis, keepdims=False).mode


AGGREGATORS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    # sums and means of floats in float64 (as loompy 3's), so that float32 counts lose nothing
    "sum": lambda v, a: np.sum(v, axis=a, dtype=np.float64 if v.dtype.kind == "f" else None),
    "mean": lambda v, a: np.mean(v, axis=a, dtype=np.float64),
    "median": lambda v, a: np.median(v.astype(np.float64, copy=False), axis=a),
    "min": lambda v, a: np.min(v, axis=a),
    "max": lambda v, a: np.max(v, axis=a),
    "count": lambda v, a: np.full(v.shape[1 - a] if v.ndim > 1 else (), v.shape[a]),
    "first": lambda v, a: np.take(v, 0, axis=a),
    "nansum": lambda v, a: np.nansum(v, axis=a, dtype=np.float64 if v.dtype.kind == "f" else None),
    "mode": _mode,
    # the other names loompy 3 took (numpy-groupies' functions), in float64 where numbers are averaged
    "prod": lambda v, a: np.prod(v, axis=a, dtype=np.float64 if v.dtype.kind == "f" else None),
    "var": lambda v, a: np.var(v, axis=a, dtype=np.float64),
    "std": lambda v, a: np.std(v, axis=a, dtype=np.float64),
    "all": lambda v, a: np.all(v, axis=a),
    "any": lambda v, a: np.any(v, axis=a),
    "last": lambda v, a: np.take(v, -1, axis=a),
    "nanmean": lambda v, a: np.nanmean(v, axis=a, dtype=np.float64),
    "nanvar": lambda v, a: np.nanvar(v, axis=a, dtype=np.float64),
    "nanstd": lambda v, a: np.nanstd(v, axis=a, dtype=np.float64),
    "nanmin": lambda v, a: np.nanmin(v, axis=a),
    "nanmax": lambda v, a: np.nanmax(v, axis=a),
    "nanprod": lambda v, a: np.nanprod(v, axis=a, dtype=np.float64 if v.dtype.kind == "f" else None),
    "nanmedian": lambda v, a: np.nanmedian(v.astype(np.float64, copy=False), axis=a),
}


def _aggregator(how: Any, where: str) -> Callable[[np.ndarray, int], np.ndarray]:
    """The function for aggregation ``how``: one of :data:`AGGREGATORS` by name, or a function of
    a group's values (a numpy reduction such as ``np.sum`` is given the whole group at once)."""
    if callable(how):
        name = getattr(how, "__name__", None)
        if getattr(np, name or "", None) is how and name in AGGREGATORS:
            return AGGREGATORS[name]
        # (one value per line, then one array of them all: numpy's apply_along_axis gives every
        # line the dtype of the first line's value, so 2.5 became 2 after a first 0)
        return lambda v, a: np.array([how(line) for line in (v if a == 1 else v.T)])
    if how not in AGGREGATORS:
        raise LoomValueError(f"{where}: unknown aggregation {how!r} (use one of {sorted(AGGREGATORS)}, "
                             "or a function of a group's values)")
    return AGGREGATORS[how]


def _aggregate_values(values: np.ndarray, how: str | Callable, where: str) -> Any:
    """One value from a 1-D group of attribute values."""
    if how == "join":
        return ",".join(str(v) for v in values)
    if callable(how):
        return how(values)
    _aggregator(how, where)  # (refuses unknown names)
    if values.dtype == object and how not in ("first", "last", "count", "mode"):
        raise LoomValueError(f"{where}: cannot compute '{how}' of strings")
    if values.dtype == object and how == "mode":
        uniq, counts = np.unique(values, return_counts=True)
        return uniq[np.argmax(counts)]
    if how == "mean" and values.dtype.kind == "f":  # in the attribute's own dtype, as loompy 3 stores it
        return AGGREGATORS[how](values, 0).astype(values.dtype)  # (summed in float64, then rounded once)
    return AGGREGATORS[how](values, 0)


AGGREGATE_BATCH_BYTES = 64 << 20  # rows read at once by aggregate: this many bytes as float64


def aggregate(ds: LoomConnection, out_file: str | os.PathLike | None = None, select: Any = None,
              group_by: str | np.ndarray = "Clusters", aggr_by: str | Callable = "mean",
              aggr_ca_by: dict[str, str | Callable] | None = None, layer: str = "",
              aggr_ca_if_equal: bool = False) -> np.ndarray:
    """Aggregate columns by group (``group_by``: a column attribute name or one label per column).

    Returns the (rows x groups) matrix, groups in sorted label order, as loompy 3 does (the
    connection's ``return_matrix`` keyword, from older loompy, changes nothing); with ``out_file``,
    also writes a Loom file with one column per group, labelled by a column attribute named as
    ``group_by`` (``"Group"`` for labels given as an array), besides those of ``aggr_ca_by``
    (``"tally"`` there counts each value of the attribute per group, as attributes ``name_value``).
    Sums, means and medians of the matrix's floats are float64, as in loompy 3; the mean of a
    float column attribute keeps its dtype (float32 stays float32), as there. ``out_file`` and the
    column attributes are checked before the matrix is read; the file being aggregated is refused.
    """
    where = f"{ds.filename}: aggregate"
    func = _aggregator(aggr_by, where)
    if isinstance(group_by, str):
        if group_by not in ds.ca:
            raise LoomKeyError(f"{where}: column attribute '{group_by}' does not exist")
        labels_all = ds.ca[group_by]
    else:  # (as a column attribute would store them: mixed labels, None, as text)
        labels_all = encoding.normalize_values(group_by, f"{where}: group_by")
    if labels_all.shape != (ds.shape[1],):
        raise LoomValueError(f"{where}: group_by must give one label per column ({ds.shape[1]}), "
                             f"got shape {labels_all.shape}")
    with naming(f"{where}: select"):
        cols = positions(select, ds.shape[1], 1, unique=True)
    labels = labels_all[cols]
    groups, inverse = np.unique(labels, return_inverse=True)
    members = [cols[inverse == g] for g in range(len(groups))]
    for name, how in (aggr_ca_by or {}).items():  # validate before any work
        if name not in ds.ca:
            raise LoomKeyError(f"{where}: column attribute '{name}' does not exist")
        if how not in ("join", "tally"):
            _aggregator(how, f"{where}: column attribute '{name}'")
    dataset = ds.layers[layer]._dataset
    col_attrs = None  # (with out_file: checked, and the output's column attributes made, before the pass)
    if out_file is not None:
        _check_aggregate_target(ds, out_file)
        col_attrs = _aggregated_columns(ds, where, group_by, groups, members, aggr_ca_by, aggr_ca_if_equal)
    result: np.ndarray | None = None
    everything = np.arange(ds.shape[0], dtype=np.int64)
    step = max(1, AGGREGATE_BATCH_BYTES // max(1, 8 * len(cols)))
    local = [np.searchsorted(cols, m) for m in members]
    # each batch is its own read: the function (perhaps the user's, perhaps writing) runs outside any read,
    # which a thread it waits for could itself be waiting on
    engine.expect_reads(dataset)
    for start, batch in iter_batches(everything, step):
        block = engine.read_block(dataset, batch, cols)
        parts = [np.asarray(func(block[:, idx], 1)) for idx in local]
        stacked = np.stack(parts, axis=1) if parts else np.zeros((len(batch), 0))
        result = np.empty((ds.shape[0], len(groups)), stacked.dtype) if result is None else \
            _holding(result, stacked.dtype)
        result[start:start + len(batch)] = stacked
    if result is None:
        result = np.zeros((ds.shape[0], len(groups)))
    if col_attrs is not None:
        from .create import create

        create(out_file, result, dict(ds.ra.items()), col_attrs, file_attrs=None).close()
    return result


def _check_aggregate_target(ds: LoomConnection, out_file: str | os.PathLike) -> None:
    """Where aggregate will write, checked before the pass over the matrix: never the file it reads
    (loompy 3 refuses that too), and a place a Loom file can replace (see files.check_replaceable)."""
    files.check_replaceable(files.check_not_input(out_file, [ds._path], "the file being aggregated"))


def _aggregated_columns(ds: LoomConnection, where: str, group_by: str | np.ndarray, groups: np.ndarray,
                        members: list[np.ndarray], aggr_ca_by: dict[str, str | Callable] | None,
                        aggr_ca_if_equal: bool) -> dict[str, Any]:
    """The output's column attributes: the group labels, those of ``aggr_ca_by``, and (with
    ``aggr_ca_if_equal``) any other that is the same for all of each group's columns."""
    group_name = group_by if isinstance(group_by, str) else "Group"
    col_attrs: dict[str, Any] = {group_name: groups}
    for name, how in (aggr_ca_by or {}).items():
        values = ds.ca[name]
        if isinstance(how, str) and how == "tally":  # one count per value: attributes name_value
            for value in np.unique(values):
                label = str(value).replace("/", "-").replace(".", "_") if isinstance(value, str) else str(value)
                col_attrs[f"{name}_{label}"] = np.array([int(np.count_nonzero(values[m] == value)) for m in members])
            continue
        col_attrs[name] = np.array([_aggregate_values(values[m], how, f"{where}: '{name}'") for m in members])
    if aggr_ca_if_equal:
        for name in ds.ca.keys():
            if name in col_attrs or ds.ca[name].ndim != 1:
                continue
            values = ds.ca[name]
            firsts = [values[m][0] for m in members]
            if all(np.all(values[m] == f) for m, f in zip(members, firsts)):
                col_attrs[name] = np.array(firsts)
    return col_attrs


# --------------------------------------------------------------------------- change tracking
def last_modified(ds: LoomConnection, name: str | None = None, axis: int = 0) -> str:
    """When the file (or, with ``name``, that row/column attribute) was last written (``YYYYmmddTHHMMSS.ffffffZ``)."""
    ds._check_open()
    if name is None:
        return fmt.read_stamp(ds._file)
    return ds._attr_manager(axis).last_modified(name)


def get_changes_since(ds: LoomConnection, timestamp: str) -> dict[str, list[str]]:
    """Names of everything written after ``timestamp`` (as ``last_modified`` gives), per part of the file."""
    ds._check_open()
    if not isinstance(timestamp, str):
        raise LoomTypeError(f"{ds.filename}: get_changes_since needs a timestamp string (as last_modified() "
                            f"returns), got {type(timestamp).__name__}")
    f = ds._file
    found: dict[str, list[str]] = {}
    parts = (("row_graphs", fmt.graph_group_name(f, 0)), ("col_graphs", fmt.graph_group_name(f, 1)),
             ("row_attrs", fmt.ROW_ATTRS), ("col_attrs", fmt.COL_ATTRS), ("layers", fmt.LAYERS),
             ("attrs", fmt.GLOBAL_ATTRS))
    def written_since(obj: Any) -> bool:
        stamp = fmt.own_stamp(obj)
        return stamp is not None and stamp > timestamp

    for label, group_name in parts:
        group = f.get(group_name)
        found[label] = [key for key, obj in group.items() if written_since(obj)] if group is not None else []
    matrix = f.get(fmt.MATRIX)
    if matrix is not None and written_since(matrix):
        found["layers"].insert(0, "")
    return found
