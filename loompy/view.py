"""In-memory views: ``ds.view[rows, cols]`` copies a selection (layers, attributes, graphs) into a ``LoomView``.

A view reads like a connection (``view[:, :]``, ``view.ca``, ``view.layers[...]``, ``view.view[...]``)
but never touches the file again; changes to it are not saved.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from . import format as fmt
from .access import LoomAccess
from .attributes import AttributeManager, DotAccess
from .engine import Recycler
from .errors import LoomKeyError, LoomValueError, naming
from .graphs import GraphManager, renumber_graph
from .handles import Dims
from .indexing import AxisSelection, axis_number, expand, permutation, select, values_for_unique
from .layers import LoomLayer, SparseForms


class MemoryLayer(SparseForms):
    """A layer held in memory, indexed like :class:`loompy.LoomLayer`."""

    def __init__(self, name: str, values: np.ndarray) -> None:
        self.name = name
        self.values = values

    shape = property(lambda self: self.values.shape)
    dtype = property(lambda self: self.values.dtype)

    @property
    def _where(self) -> str:
        return f"view: layer '{self.name}'"

    def __getitem__(self, key: Any) -> np.ndarray:
        with naming(self._where):
            rows, cols = select(key, self.shape)
        return expand(self.values[np.ix_(rows.unique, cols.unique)], rows, cols)

    def __setitem__(self, key: Any, values: Any) -> None:
        with naming(self._where):
            rows, cols = select(key, self.shape)
        self.values[np.ix_(rows.unique, cols.unique)] = values_for_unique(values, rows, cols, self.dtype, self._where)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """The layer's values; a copy unless ``copy`` is False or None (numpy's protocol)."""
        return np.array(self.values, dtype=dtype, copy=copy)

    def _sparse_block(self, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
        return sp.coo_matrix(self.values[np.ix_(rows, cols)])

    def permute(self, ordering: npt.ArrayLike, *, axis: int) -> None:
        """Reorder the rows (``axis=0``) or columns (``axis=1``) of this layer alone, as loompy 3's
        in-memory layers do (the view's other layers and attributes keep their order)."""
        axis = axis_number(axis, f"view: layer '{self.name}'")
        order = permutation(ordering, self.shape[axis], f"view: layer '{self.name}': axis {axis}")
        self.values = self.values[order] if axis == 0 else self.values[:, order]


class MemoryLayerManager(DotAccess, MutableMapping):
    """Layers of a view, by name (``""`` is the main matrix); layers added to a view stay in memory."""

    _where = "view: layer"

    def __init__(self, layers: dict[str, np.ndarray], dims: Dims | None = None) -> None:
        object.__setattr__(self, "_layers", {name: MemoryLayer(name, values) for name, values in layers.items()})
        object.__setattr__(self, "_dims", dims)

    def __setitem__(self, name: str, values: Any) -> None:
        """Add or replace a layer of the view (in memory); a dtype or its name makes one of zeros, as
        for a connection's layers."""
        if isinstance(values, (str, np.dtype, type)) and self._dims is not None:
            values = np.zeros(self._dims.shape, dtype=fmt.check_matrix_dtype(values, f"{self._where} '{name}'"))
        matrix = np.asarray(values.toarray() if sp.issparse(values) else values)
        if self._dims is not None and matrix.shape != self._dims.shape:
            raise LoomValueError(f"{self._where} '{name}': shape {matrix.shape} differs from the view's "
                                 f"{self._dims.shape}")
        self._layers[name] = MemoryLayer(name, matrix)

    def __delitem__(self, name: str) -> None:
        if name not in self._layers:
            raise LoomKeyError(f"{self._where} '{name}' is not in this view")
        del self._layers[name]

    def __getitem__(self, name: str) -> MemoryLayer:
        if name not in self._layers:
            raise LoomKeyError(f"{self._where} '{name}' is not in this view")
        return self._layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self._layers)


class MemoryGlobals(DotAccess, dict):
    """A view's copy of the file's global attributes: ``view.attrs.title`` reads ``view.attrs["title"]``."""

    _where = "view: global attribute"

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


class LoomView(LoomAccess):
    """A selection of a Loom file (or of another view), held in memory."""

    def __init__(self, layers: dict[str, np.ndarray], row_attrs: dict[str, np.ndarray],
                 col_attrs: dict[str, np.ndarray], row_graphs: dict[str, sp.coo_matrix] | None = None,
                 col_graphs: dict[str, sp.coo_matrix] | None = None, *, filename: str = "",
                 file_attrs: dict[str, Any] | None = None, shape: tuple[int, int] | None = None) -> None:
        if shape is None:
            shape = next(iter(layers.values())).shape if layers else (0, 0)
        self._dims = Dims(shape)
        self.filename = filename
        self.layers = MemoryLayerManager(layers, self._dims)
        self.row_attrs = AttributeManager(None, 0, self._dims, values=row_attrs)
        self.col_attrs = AttributeManager(None, 1, self._dims, values=col_attrs)
        self.row_graphs = GraphManager(None, 0, self._dims, values=row_graphs or {})
        self.col_graphs = GraphManager(None, 1, self._dims, values=col_graphs or {})
        self.attrs = MemoryGlobals(file_attrs or {})
        self._ready = True  # (see LoomAccess.__setattr__)

    @property
    def shape(self) -> tuple[int, int]:
        return self._dims.shape

    @property
    def view(self) -> ViewManager:
        return ViewManager(self)

    def permute(self, ordering: npt.ArrayLike, *, axis: int) -> None:
        """Reorder the view's rows (``axis=0``) or columns (``axis=1``) in memory: every layer, and
        the attributes and graphs of that axis (``ordering[i]`` is the item placed at position i)."""
        axis = axis_number(axis, "view.permute")
        order = permutation(ordering, self.shape[axis], f"view.permute: axis {axis}")
        for layer in self.layers.values():
            layer.permute(order, axis=axis)
        attrs, graphs = (self.row_attrs, self.row_graphs) if axis == 0 else (self.col_attrs, self.col_graphs)
        for name, values in list(attrs.items()):
            attrs[name] = values[order]
        for name in list(graphs.keys()):
            graphs[name] = renumber_graph(graphs[name], order)

    def __repr__(self) -> str:
        n, m = self.shape
        return (f"<LoomView of '{self.filename}': {n} rows x {m} columns; layers {self.layers.keys()}; "
                f"row attributes {self.ra.keys()}; column attributes {self.ca.keys()}>")


WHAT_ALL = ("col_attrs", "row_attrs", "layers", "col_graphs", "row_graphs")


def layer_names(source: Any, layers: Any) -> list[str]:
    """The layers a scan or view asks for: all of them (None), one by name ("" among them, as in
    loompy 3), or a list of names."""
    if layers is None:
        return list(source.layers.keys())
    return [layers] if isinstance(layers, str) else list(layers)


def whole_parts(source: Any, what: Any = WHAT_ALL) -> dict[str, Any]:
    """What every view of ``source`` shares, read once for a scan's many views: the global
    attributes, and the graphs ``what`` asks for (renumbered per view)."""
    what = set(what)
    return {
        "file_attrs": source.attrs.to_dict(),
        "row_graphs": {k: source.row_graphs[k] for k in source.row_graphs.keys()} if "row_graphs" in what else {},
        "col_graphs": {k: source.col_graphs[k] for k in source.col_graphs.keys()} if "col_graphs" in what else {},
    }


def make_view(source: Any, rows: AxisSelection, cols: AxisSelection, *, layers: Any = None,
              what: Any = WHAT_ALL, recyclers: dict[str, Recycler] | None = None,
              parts: dict[str, Any] | None = None, blocks: dict[str, np.ndarray] | None = None) -> LoomView:
    """Copy the ``rows`` x ``cols`` selection of a connection or view into a new :class:`LoomView`.

    With ``recyclers`` (a scan's, one per layer), a file's layers are read into memory that earlier
    views no longer use; ``parts`` is :func:`whole_parts` of ``source``, read once by the caller;
    ``blocks``: layers' values already read (by a scan's helper processes), taken as they are.
    """
    what = set(what)
    names = layer_names(source, layers)
    r, c = rows.indices, cols.indices
    data = {}
    if "layers" in what:
        for name in names:
            layer, shape = source.layers[name], (len(rows.unique), len(cols.unique))
            if blocks is not None and name in blocks:
                block = blocks[name]
            elif not len(rows) or not len(cols):
                block = np.zeros(shape, dtype=layer.dtype)
            elif recyclers is not None and isinstance(layer, LoomLayer):
                block = layer._read(rows.unique, cols.unique, recyclers[name].get(shape, layer.dtype))
            else:
                block = layer[rows.unique, cols.unique]
            data[name] = expand(np.asarray(block).reshape(len(rows.unique), len(cols.unique)),
                                AxisSelection(r, rows.length), AxisSelection(c, cols.length))
    row_attrs = {k: v[r] for k, v in source.ra.items()} if "row_attrs" in what else {}
    col_attrs = {k: v[c] for k, v in source.ca.items()} if "col_attrs" in what else {}
    parts = whole_parts(source, what) if parts is None else parts
    row_graphs = {k: renumber_graph(g, r) for k, g in parts["row_graphs"].items()}  # ({} unless in what)
    col_graphs = {k: renumber_graph(g, c) for k, g in parts["col_graphs"].items()}
    file_attrs = {k: v.copy() if isinstance(v, np.ndarray) else v for k, v in parts["file_attrs"].items()}
    return LoomView(data, row_attrs, col_attrs, row_graphs, col_graphs, filename=source.filename,
                    file_attrs=file_attrs, shape=(len(r), len(c)))


class ViewManager:
    """``ds.view[rows, cols]``: in-memory views of a connection or another view."""

    def __init__(self, source: Any) -> None:
        self._source = source

    def __getitem__(self, key: Any) -> LoomView:
        with naming(f"{getattr(self._source, 'filename', 'view')}: view"):
            rows, cols = select(key, self._source.shape)
        rows = AxisSelection(rows.indices, rows.length)  # a view keeps both axes, even for an int
        cols = AxisSelection(cols.indices, cols.length)
        return make_view(self._source, rows, cols)
