"""Graphs over rows or columns, stored as coordinate lists ``a`` (from), ``b`` (to), ``w`` (weight)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

from . import forks, swaps
from . import format as fmt
from .attributes import CheckedUpdate, DotAccess, last_written
from .encoding import refuse_masked
from .engine import codecs
from .errors import LoomFormatError, LoomKeyError, LoomValueError, naming
from .handles import (
    Dims,
    KeptNames,
    changes,
    changing,
    check_deletable,
    check_room,
    check_writable,
    kept_since,
    one_of_the_writes,
)
from .indexing import AXIS_NAMES, select_axis

PARTS = ("a", "b", "w")  # a stored graph's datasets: from, to and (optional, 1 when missing) weight


def stored_parts(g: h5py.Group) -> dict[str, h5py.Dataset]:
    """The datasets among a stored graph group's parts, by name."""
    return {k: v for k in PARTS if isinstance(v := g.get(k), h5py.Dataset)}


def is_graph(obj: Any) -> bool:
    """Whether a member of a graph group is taken for a graph: a group with an ``a`` and a ``b``
    (reading it says what is wrong when they are not datasets)."""
    return isinstance(obj, h5py.Group) and "a" in obj and "b" in obj


def renumber_graph(graph: sp.coo_matrix, selection: np.ndarray) -> sp.coo_matrix:
    """The subgraph on ``selection`` (in its order), vertices renumbered 0..len-1; other edges dropped."""
    new_index = np.full(graph.shape[0], -1, dtype=np.int64)
    new_index[selection[::-1]] = np.arange(len(selection))[::-1]  # first occurrence wins for repeats
    a, b = new_index[graph.row], new_index[graph.col]
    keep = (a >= 0) & (b >= 0)
    n = len(selection)
    return sp.coo_matrix((graph.data[keep], (a[keep], b[keep])), shape=(n, n))


def joined_graph(parts: list[tuple[sp.coo_matrix, int]], n: int) -> sp.coo_matrix:
    """One graph of ``n`` vertices from graphs on stretches of them: each ``(graph, offset)``'s
    vertices numbered from its offset (columns of several files, joined)."""
    rows = np.concatenate([g.row.astype(np.int64) + offset for g, offset in parts])
    cols = np.concatenate([g.col.astype(np.int64) + offset for g, offset in parts])
    return sp.coo_matrix((np.concatenate([g.data for g, _ in parts]), (rows, cols)), shape=(n, n))


def read_edges(g: h5py.Group, n: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """A stored graph's (from, to, weight) arrays and what is wrong with them (empty when readable).

    Vertex indices come back as int64: some writers (R) store them as whole floats. ``n``: the
    number of vertices, to check indices against (None: unchecked).
    """
    parts = stored_parts(g)
    if not {"a", "b"} <= parts.keys():
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), ["its 'a' or 'b' is not a dataset"]
    values = {k: np.asarray(v[()]) for k, v in parts.items()}
    a, b = values["a"], values["b"]
    w = values.get("w", np.ones(a.shape, dtype=np.float64))
    problems = edge_problems(a, b, w, n)
    if problems:
        return a, b, w, problems
    return a.astype(np.int64), b.astype(np.int64), w, []


def edge_problems(a: np.ndarray, b: np.ndarray, w: np.ndarray, n: int | None) -> list[str]:
    """What keeps (from, to, weight) arrays from being a graph of ``n`` vertices (None: unchecked);
    empty when nothing does. Stored graphs and ``set_edges`` are checked alike."""
    if not all(x.ndim == 1 for x in (a, b, w)) or not a.shape == b.shape == w.shape:
        return [f"a, b, w must be 1-D and of equal length (shapes {a.shape}, {b.shape}, {w.shape})"]
    if a.dtype.kind not in "iuf" or b.dtype.kind not in "iuf" or w.dtype.kind not in "biuf":
        return [f"a, b, w must be real numbers (dtypes {a.dtype}, {b.dtype}, {w.dtype})"]
    if any(x.dtype.kind == "f" and not np.array_equal(x, np.round(x)) for x in (a, b)):  # (integers are)
        return ["vertex indices are not whole numbers"]
    if n is not None and a.size and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        return [f"vertex indices outside [0, {n})"]
    return []


def _float_weights(w: np.ndarray, where: str) -> np.ndarray:
    """Weights as the spec stores them, floats: booleans and integers as float64 when that keeps
    every value (loompy 3 refuses to open a file whose graph weights are not floats)."""
    if w.dtype.kind == "f" and w.dtype.itemsize > 8:  # (numpy's longdouble: no portable HDF5 type)
        raise LoomValueError(f"{where}: weights of dtype {w.dtype} are not portable across machines; "
                             "cast them to float64")
    if w.dtype.kind == "f":
        return w
    as_float = w.astype(np.float64)
    if w.dtype.kind != "b" and not np.array_equal(as_float.astype(w.dtype), w):
        raise LoomValueError(f"{where}: integer weights of dtype {w.dtype} too large for float64 to hold "
                             "exactly (Loom graphs store weights as floats)")
    return as_float


VECTOR_CHUNK = 1 << 16  # elements in a chunk of a graph's a, b and w


def _store_vector(group: h5py.Group, name: str, values: np.ndarray) -> h5py.Dataset:
    """``values`` (1-D) as dataset ``name``: chunked, gzip-compressed, able to grow, as HDF5's gzip
    filter stores it, but deflated here (ISA-L or libdeflate, as the engine's chunks): 7 ms for a
    graph of 200,000 edges, where HDF5's zlib took 57 (and an uncompressed one, 35% larger, 1)."""
    values = np.ascontiguousarray(values)
    size = min(VECTOR_CHUNK, values.size)
    dataset = group.create_dataset(name, shape=values.shape, dtype=values.dtype, chunks=(size,), maxshape=(None,),
                                   compression="gzip", compression_opts=fmt.DEFAULT_COMPRESSION_LEVEL)
    deflate = codecs.compressor(fmt.DEFAULT_COMPRESSION_LEVEL)
    for start in range(0, values.size, size):
        part = values[start:start + size]
        if part.size < size:  # (a chunk is stored whole: the part past the end is never read)
            part = np.concatenate([part, np.zeros(size - part.size, values.dtype)])
        dataset.id.write_direct_chunk((start,), deflate(memoryview(part).cast("B")))
    return dataset


def store_graph(parent: h5py.Group, name: str, graph: sp.coo_matrix, like: h5py.Group | None = None) -> h5py.Group:
    """Write ``graph`` as the group ``parent[name]`` (``a``, ``b``, ``w``: chunked, compressed, able
    to grow), stamped as changed. ``like``: the stored graph it replaces or was made from, whose
    HDF5 attributes (the group's and each part's) and other members it keeps, and whose integer
    index dtype when that holds the new indices exactly. Vertex indices are int32 where they fit, as
    loompy 3 stores them (scipy's own index type), else int64."""
    group = parent.create_group(name)
    index = np.int32 if graph.shape[0] <= np.iinfo(np.int32).max else np.int64
    parts = {"a": graph.row.astype(index), "b": graph.col.astype(index), "w": graph.data}
    datasets = []
    for key, values in parts.items():
        old = like.get(key) if like is not None else None
        old = old if isinstance(old, h5py.Dataset) else None
        if old is not None and key != "w" and old.dtype.kind in "iu":  # (vertices are integers: not R's floats)
            kept = values.astype(old.dtype)
            values = kept if np.array_equal(kept, values) else values
        dataset = _store_vector(group, key, values) if values.size else group.create_dataset(key, data=values)
        swaps.carry_attrs(old, dataset)
        datasets.append(dataset)
    for key in like.keys() if like is not None else ():  # what else it holds, as it is
        if key not in parts:
            swaps.copy_member(like, key, group)
    swaps.carry_attrs(like, group)
    fmt.touch(*datasets, group)
    return group


class GraphManager(DotAccess, CheckedUpdate, MutableMapping):
    """Graphs along one axis as ``scipy.sparse.coo_matrix`` (N x N for rows, M x M for columns)."""

    def __init__(self, file: h5py.File | None, axis: int, dims: Dims, *, group_name: str | None = None,
                 values: dict[str, sp.coo_matrix] | None = None) -> None:
        object.__setattr__(self, "_file", file)
        object.__setattr__(self, "axis", axis)
        object.__setattr__(self, "_dims", dims)
        object.__setattr__(self, "_group_name", group_name or fmt.GRAPH_GROUPS[axis])
        object.__setattr__(self, "_memory", dict(values or {}))
        object.__setattr__(self, "_names", KeptNames("graphs"))
        # name -> (when it was read: the file's opening, its graph writes so far, vertices; the graph): a
        # graph is read from the file again only after a write to a graph of it, through any
        # connection of this process (5.6 ms a read)
        object.__setattr__(self, "_found", {})

    @property
    def _where(self) -> str:
        file = self._file.filename if self._file is not None else "<memory>"
        return f"{file}: {AXIS_NAMES[self.axis]} graph"

    @property
    def _group(self) -> h5py.Group | None:
        return None if self._file is None else fmt.get_group(self._file, self._group_name)

    def keys(self) -> list[str]:
        """Graph names: listed again only after a graph write or delete through a connection of this
        process (a listing takes 0.1 ms)."""
        if self._file is None:
            return list(self._memory)

        def listing() -> list[str]:
            group = self._group
            return [] if group is None else [k for k, v in group.items() if is_graph(v)]

        return self._names.get(self._file, listing)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.keys()

    def __getitem__(self, name: Any) -> Any:
        """A graph by name; with a tuple of names, the first that exists (loompy 3's alternative
        names); with a selection of vertices (slice, indices, mask, int), every graph's subgraph on
        them, renumbered in the selection's order, as an in-memory manager."""
        if isinstance(name, tuple) and name and all(isinstance(k, str) for k in name):
            for k in name:
                if k in self:
                    return self[k]
            raise LoomKeyError(f"{self._where}: none of {list(name)} exists")
        if not isinstance(name, str):
            with naming(f"{self._where}s"):
                selection = select_axis(name, self._dims.shape[self.axis], self.axis).indices
            return GraphManager(None, self.axis, Dims.along(self.axis, len(selection)),
                                values={k: renumber_graph(self[k], selection) for k in self.keys()})
        if self._file is None:
            if name not in self._memory:
                raise LoomKeyError(f"{self._where} '{name}' does not exist")
            return self._memory[name]
        n = self._dims.shape[self.axis]
        source = (*kept_since(self._file, "graphs"), n)
        forks.check_current(self._file)  # (a forked child's counts stopped at the fork)
        found = self._found.get(name)
        if found is not None and found[0] == source:
            return found[1].copy()  # (the caller's to change)
        group = self._group
        stored = group.get(name) if group is not None else None
        if not is_graph(stored):
            raise LoomKeyError(f"{self._where} '{name}' does not exist")
        a, b, w, problems = read_edges(stored, n)
        if problems:
            raise LoomFormatError(f"{self._where} '{name}': " + "; ".join(problems))
        graph = sp.coo_matrix((w, (a, b)), shape=(n, n))
        self._found[name] = (source, graph)
        return graph.copy()  # (the caller's to change)

    @one_of_the_writes
    def __setitem__(self, name: str, graph: Any) -> None:
        self._checked(name, graph)()

    def _checked(self, name: str, graph: Any) -> Callable[[], None]:
        fmt.check_name(name, self._where)
        where = f"{self._where} '{name}'"
        check_writable(self._file, where)
        self._dims.sync(on_disk=True)
        n = self._dims.shape[self.axis]
        if not sp.issparse(graph):
            refuse_masked(graph, where)
            arr = np.asarray(graph)
            if arr.ndim != 2:
                raise LoomValueError(f"{where}: expected a sparse or square 2-D matrix, got shape {arr.shape}")
            if arr.dtype.kind not in "biuf":
                raise LoomValueError(f"{where}: weights must be real numbers, got {arr.dtype}")
        try:
            graph = sp.coo_matrix(graph)
        except (ValueError, TypeError) as exc:  # (scipy checks the indices of a COO matrix it is given,
            raise LoomValueError(f"{where}: not a valid graph ({exc})") from exc  # and refuses float16)
        if graph.shape != (n, n):
            raise LoomValueError(f"{where}: expected shape {(n, n)}, got {graph.shape}")
        a, b, w = graph.row.astype(np.int64), graph.col.astype(np.int64), graph.data
        for problem in edge_problems(a, b, w, n):
            raise LoomValueError(f"{where}: {problem}")
        w = _float_weights(w, where)
        if self._file is not None:
            check_room(self._file, a.nbytes + b.nbytes + w.nbytes, where)
        return lambda: self._store(name, sp.coo_matrix((w, (a, b)), shape=(n, n)))

    def _store(self, name: str, graph: sp.coo_matrix) -> None:
        if self._file is None:
            self._memory[name] = graph
            return
        parent = self._file.require_group(self._group_name)
        existing = parent.get(name)
        like = existing if isinstance(existing, h5py.Group) else None
        # (written whole before it takes the name: refused or interrupted, the old graph stays)
        start = changes(self._file, "graphs")
        with changing(self._file, "graphs"):
            swaps.replace(parent, name, lambda target: store_graph(parent, target, graph, like))
        fmt.touch(parent)
        if changes(self._file, "graphs") == start + 2:  # (no other graph write meanwhile: keep it)
            self._found[name] = ((self._file.id.id, start + 2, graph.shape[0]), graph.copy())

    @one_of_the_writes
    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise LoomKeyError(f"{self._where} '{name}' does not exist")
        check_deletable(self._file, f"{self._where} '{name}'")
        if self._file is None:
            del self._memory[name]
            return
        group = self._group
        with changing(self._file, "graphs"):  # (counted also as it ends: Ctrl-C just after the delete too)
            del group[name]
        fmt.touch(group)

    def last_modified(self, name: str | None = None) -> str:
        """When graph ``name`` (None: any of them) was last written (see :func:`~.attributes.last_written`)."""
        return last_written(self, name)

    def _ipython_key_completions_(self) -> list[str]:
        return self.keys()

    def __repr__(self) -> str:
        return f"<{AXIS_NAMES[self.axis]} graphs: {', '.join(self.keys()) or 'none'}>"
