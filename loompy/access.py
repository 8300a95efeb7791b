"""What a connection and a view share: reading them the same way.

``ds[rows, cols]`` selects from the main matrix and ``ds["name"]`` is a layer; ``ds.ra``, ``ds.ca``
and ``ds.layer`` are the short names of the managers; ``ds.Name`` is an attribute (a column one
first); ``ds.sparse()`` and the notebook table work alike. Both classes hold ``row_attrs``,
``col_attrs`` and ``layers`` managers; everything here delegates to them.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import LoomAttributeError, LoomError, LoomTypeError


class LoomAccess:
    """The reading surface of :class:`~loompy.LoomConnection` and :class:`~loompy.LoomView`."""

    row_attrs: Any
    col_attrs: Any
    layers: Any

    @property
    def _label(self) -> str:
        """How errors name what they are about (the file, or a view of it)."""
        return str(getattr(self, "filename", ""))

    @property
    def ra(self) -> Any:
        return self.row_attrs

    @property
    def ca(self) -> Any:
        return self.col_attrs

    @property
    def layer(self) -> Any:
        return self.layers

    def __getitem__(self, key: Any) -> Any:
        """``ds["layer"]`` is a layer; anything else selects from the main matrix."""
        if isinstance(key, str):
            return self.layers[key]
        return self.layers[""][key]

    def sparse(self, rows: Any = None, cols: Any = None, layer: str | None = None) -> sp.coo_matrix:
        """A layer (default: main matrix), or its ``rows`` x ``cols`` part, as a COO matrix."""
        return self.layers["" if layer is None else layer].sparse(rows, cols)

    def __getattr__(self, name: str) -> Any:
        """``ds.Name``: a column attribute, else a row attribute (methods always win)."""
        if name.startswith("_") or name in ("row_attrs", "col_attrs", "layers"):
            raise AttributeError(name)
        if name in self.col_attrs:
            return self.col_attrs[name]
        if name in self.row_attrs:
            return self.row_attrs[name]
        raise LoomAttributeError(f"{self._label}: no method, column attribute or row attribute named '{name}'")

    def __setattr__(self, name: str, value: Any) -> None:
        """``ds.Name = values``, where ``ds.Name`` reads an attribute, is refused: it would only hide
        the attribute behind a Python one, writing nothing (``ds.ca.Name = values`` writes it)."""
        if self.__dict__.get("_ready") and not name.startswith("_") and name not in self.__dict__ \
                and not hasattr(type(self), name):  # (not while it is being set up: its managers' names)
            try:
                axis = "ca" if name in self.col_attrs else "ra" if name in self.row_attrs else None
            except LoomError:  # (closed: nothing to hide)
                axis = None
            if axis is not None:
                raise LoomAttributeError(f"{self._label}: ds.{name} is the {'column' if axis == 'ca' else 'row'} "
                                         f"attribute '{name}'; write it with ds.{axis}.{name} = ... (nothing "
                                         "was written)")
        object.__setattr__(self, name, value)

    def _repr_html_(self) -> str:
        """Upper-left 10x10 corner with the attributes, for notebooks (every value HTML-escaped)."""
        if getattr(self, "closed", False):
            return html.escape(repr(self))
        return render_html(self)


def render_html(ds: Any, size: int = 10) -> str:
    """HTML table: shape, column attributes as header rows, row attributes as leading columns."""
    if not all(hasattr(ds, name) for name in ("shape", "ra", "ca", "layers")):
        raise LoomTypeError(f"to_html takes a Loom connection or view, not {type(ds).__name__}")
    esc = html.escape
    n, m = ds.shape
    rn, cn = min(n, size), min(m, size)
    ra, ca = list(ds.ra.keys()), list(ds.ca.keys())
    corner = ds[:rn, :cn] if rn and cn and "" in ds.layers else np.zeros((rn, cn))
    more_cols = "<td>...</td>" if m > size else ""
    cells = ["<p>" + esc(str(ds.shape)) + "</p><table><tbody>"]

    def values(arr: np.ndarray, k: int) -> list[str]:
        return [esc(str(v)) for v in np.asarray(arr)[:k].tolist()]

    for name in ca:
        cells.append("<tr>" + "<td>&nbsp;</td>" * max(0, len(ra) - 1) + f"<td><strong>{esc(name)}</strong></td>"
                     + "".join(f"<td>{v}</td>" for v in values(ds.ca[name], cn)) + more_cols + "</tr>")
    cells.append("<tr>" + "".join(f"<td><strong>{esc(name)}</strong></td>" for name in ra)
                 + ("<td>&nbsp;</td>" if not ra else "") + "<td>&nbsp;</td>" * cn + more_cols + "</tr>")
    row_values = [values(ds.ra[name], rn) for name in ra]
    for i in range(rn):
        lead = "".join(f"<td>{col[i]}</td>" for col in row_values) or "<td>&nbsp;</td>"
        cells.append("<tr>" + lead + "".join(f"<td>{esc(str(v))}</td>" for v in corner[i].tolist())
                     + more_cols + "</tr>")
    if n > size:
        cells.append("<tr>" + "<td>...</td>" * (max(1, len(ra)) + cn + (1 if m > size else 0)) + "</tr>")
    cells.append("</tbody></table>")
    return "".join(cells)
