"""Check Loom files against the spec: liberal about what real writers produce, strict about what breaks readers.

``check_structure`` is the cheap test ``connect`` runs (shapes and names only, no data read);
:class:`LoomValidator` is the full report with ``errors``, ``warnings`` and ``summary``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import h5py
import numpy as np

from . import format as fmt
from .encoding import read_values
from .errors import LoomError, LoomValueError
from .graphs import read_edges, stored_parts
from .indexing import AXIS_NAMES


def _attr_problems(f: h5py.File, axis: int, length: int | None) -> list[str]:
    group_name = fmt.ATTR_GROUPS[axis]
    problems: list[str] = []
    group = f.get(group_name)
    if group is None:
        return problems
    if not isinstance(group, h5py.Group):
        return [f"/{group_name} is not a group"]
    for name, obj in group.items():
        if not isinstance(obj, h5py.Dataset):
            continue  # nested groups are tolerated (kept intact, not exposed)
        if obj.shape == ():
            problems.append(f"/{group_name}/{name} is a scalar; attributes need one value per {AXIS_NAMES[axis]}")
        elif length is not None and obj.shape[0] != length:
            problems.append(f"/{group_name}/{name} has {obj.shape[0]} values, expected {length}")
    return problems


def _empty(f: h5py.File) -> bool:
    """A Loom file with no matrix yet (as ``new()`` makes it): its groups, but no layer or attribute."""
    groups = [fmt.get_group(f, name) for name in (fmt.LAYERS, *fmt.ATTR_GROUPS)]
    return all(g is not None and not any(isinstance(v, h5py.Dataset) for v in g.values()) for g in groups)


def looks_like_loom(f: h5py.File) -> bool:
    """Whether the file is a Loom file at all, as connect decides it: a matrix, or the empty groups
    ``new()`` makes (what else is wrong with it :func:`check_structure` tells)."""
    return fmt.MATRIX in f or _empty(f)


def check_structure(f: h5py.File) -> list[str]:
    """Problems that would make the file unreadable as Loom (names and shapes only; cheap)."""
    problems: list[str] = []
    matrix = f.get(fmt.MATRIX)
    shape: tuple[int, ...] | None = None
    if not looks_like_loom(f):
        return ["no /matrix, and not an empty Loom file either (as new() makes one)"]
    if matrix is not None:
        if not isinstance(matrix, h5py.Dataset) or matrix.ndim != 2:
            return ["/matrix is not a two-dimensional dataset"]
        shape = matrix.shape
    layers = f.get(fmt.LAYERS)
    if isinstance(layers, h5py.Group):
        for name, obj in layers.items():
            if isinstance(obj, h5py.Dataset) and obj.shape != shape:
                problems.append(f"layer '{name}' has shape {obj.shape}, but /matrix has shape {shape}")
    for axis in (0, 1):
        problems += _attr_problems(f, axis, shape[axis] if shape else None)
    for axis in (0, 1):
        group = f.get(fmt.graph_group_name(f, axis))
        if not isinstance(group, h5py.Group):
            continue
        for name, g in group.items():
            if not isinstance(g, h5py.Group):
                continue
            parts = {k: d.shape for k, d in stored_parts(g).items()}
            if not {"a", "b"} <= set(parts):
                problems.append(f"graph '{group.name}/{name}' lacks its 'a' or 'b' dataset")
            elif len(set(parts.values())) != 1:
                problems.append(f"graph '{group.name}/{name}' has a, b, w of unequal lengths {parts}")
    return problems


class LoomValidator:
    """Validate a Loom file; after :meth:`validate`, read ``errors``, ``warnings`` and ``summary``."""

    def __init__(self, version: str | None = None) -> None:
        self.version = version  # the spec to validate against; None: the file's own
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.summary: list[str] = []

    def validate(self, path: str | os.PathLike, strictness: str = "speconly") -> bool:
        """True when the file has no errors. ``strictness``: ``"speconly"`` or ``"conventions"``."""
        if strictness not in ("speconly", "conventions"):
            raise LoomValueError(f"strictness must be 'speconly' or 'conventions', got {strictness!r}")
        self.errors, self.warnings, self.summary = [], [], []
        path = os.fspath(path)
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            try:  # locked by a writer elsewhere: the file can still be read for a report
                f = h5py.File(path, "r", locking=False)
                self.warnings.append(f"{path}: another process holds the file's lock; read without it")
            except OSError:
                self.errors.append(f"{path}: cannot be opened as an HDF5 file ({exc})")
                return False
        with f:
            self._check(f)
            if strictness == "conventions":
                self._check_conventions(f)
        return not self.errors

    def validate_spec(self, file: h5py.File) -> bool:
        """The spec checks of :meth:`validate` on a file open with h5py (loompy 3's method); the
        errors, warnings and summary are added to those held."""
        self._check(file)
        return not self.errors

    def validate_conventions(self, ds: Any) -> bool:
        """The conventions' checks of ``validate(..., "conventions")`` on a connection (loompy 3's
        method); the errors and warnings are added to those held."""
        ds._check_open()
        self._check_conventions(ds._file)
        return not self.errors

    # --------------------------------------------------------------- spec checks
    def _check(self, f: h5py.File) -> None:
        try:
            found = fmt.read_spec_version(f)
        except ValueError as exc:
            self.errors.append(f"LOOM_SPEC_VERSION is unreadable: {exc}")
            found = fmt.SpecVersion(None)
        spec = fmt.SpecVersion(self.version) if self.version else found
        self.summary.append(f"spec version: {found}")
        if found.text is None:
            self.warnings.append("no LOOM_SPEC_VERSION: treated as a file older than spec 2.0")
        elif not re.fullmatch(r"\d+\.\d+\.\d+", found.text):
            self.errors.append(f"LOOM_SPEC_VERSION {found.text!r} is not a version (major.minor.patch)")
        elif found.major > fmt.SpecVersion(fmt.CURRENT_SPEC).major:
            self.warnings.append(f"LOOM_SPEC_VERSION {found.text} is newer than this library's {fmt.CURRENT_SPEC}")
        if self.version and found.text and found.text != self.version:
            self.warnings.append(f"file declares spec {found.text}, validating against {self.version}")
        for name in fmt.GROUPS:
            if name == fmt.GLOBAL_ATTRS and spec.is_legacy:
                continue
            if not isinstance(f.get(name), h5py.Group):
                alt = name in fmt.GRAPH_GROUPS and fmt.graph_group_name(f, fmt.GRAPH_GROUPS.index(name)) != name
                message = f"group /{name} is missing" + (" (the loompy 1 name is used instead)" if alt else "")
                (self.warnings if spec.is_legacy else self.errors).append(message)
        if fmt.MATRIX not in f and _empty(f):  # otherwise check_structure reports it
            self.warnings.append("no /matrix yet: an empty file, as new() makes it")
        self.errors += check_structure(f)
        matrix = f.get(fmt.MATRIX)
        if not isinstance(matrix, h5py.Dataset) or matrix.ndim != 2:
            matrix = None  # check_structure has said why
        if matrix is not None:
            self.summary.append(f"matrix: shape {matrix.shape}, dtype {matrix.dtype}, chunks {matrix.chunks}")
            self._check_matrix("/" + fmt.MATRIX, matrix)
        layers = f.get(fmt.LAYERS)
        if isinstance(layers, h5py.Group):
            for name, obj in layers.items():
                if isinstance(obj, h5py.Dataset) and obj.ndim == 2:
                    self._check_matrix("/" + fmt.layer_path(name), obj)
                    self.summary.append(f"layer '{name}': dtype {obj.dtype}")
        for axis, group_name in enumerate(fmt.ATTR_GROUPS):
            group = f.get(group_name)
            if not isinstance(group, h5py.Group):
                continue
            for name, obj in group.items():
                if isinstance(obj, h5py.Dataset):
                    self._check_attribute(f"/{group_name}/{name}", obj, spec)
                    self.summary.append(f"{AXIS_NAMES[axis]} attribute '{name}': {obj.dtype}, shape {obj.shape}")
                else:
                    self.warnings.append(f"/{group_name}/{name} is a group, not an attribute dataset (kept, not read)")
        for axis in (0, 1):
            self._check_graphs(f, axis, matrix.shape[axis] if matrix is not None else None)

    def _check_matrix(self, path: str, ds: h5py.Dataset) -> None:
        if ds.dtype.newbyteorder("=") not in fmt.MATRIX_DTYPES:  # (either byte order: HDF5 converts on reading)
            self.errors.append(f"{path} has dtype {ds.dtype}, which the spec does not allow for matrices")
        if ds.chunks is None:
            self.warnings.append(f"{path} is not chunked (columns cannot be appended)")
        elif ds.maxshape[1] is not None:
            self.warnings.append(f"{path} is not resizable along columns (columns cannot be appended)")

    def _check_attribute(self, path: str, ds: h5py.Dataset, spec: fmt.SpecVersion) -> None:
        kind = ds.dtype.kind
        if kind == "V" and ds.dtype.names:
            self.warnings.append(f"{path} has a compound dtype (not in the spec; read as a structured array)")
        elif kind == "S" and not spec.is_legacy:
            self.warnings.append(f"{path} stores fixed-length strings; spec 3.0.0 asks for variable-length UTF-8")
        elif kind == "O" and not h5py.check_string_dtype(ds.dtype):
            self.errors.append(f"{path} has an object dtype that is not a string")
        elif kind == "b":
            self.errors.append(f"{path} has dtype bool, which the spec does not allow (booleans are stored as "
                               "uint8; loompy reads it all the same)")
        elif kind not in "iufSOV":
            self.errors.append(f"{path} has dtype {ds.dtype}, which the spec does not allow for attributes")

    def _check_graphs(self, f: h5py.File, axis: int, n: int | None) -> None:
        group = f.get(fmt.graph_group_name(f, axis))
        if not isinstance(group, h5py.Group):
            return
        for name, g in group.items():
            if not isinstance(g, h5py.Group):
                self.warnings.append(f"{group.name}/{name} is a dataset, not a graph's group (kept, not read)")
                continue
            parts = stored_parts(g)
            if not {"a", "b"} <= parts.keys() or len({d.shape for d in parts.values()}) != 1:
                continue  # check_structure reports these
            if "w" not in parts:
                self.warnings.append(f"graph {g.name} has no 'w' dataset (the spec stores weights): read with "
                                     "every weight 1")
            a, b, _, problems = read_edges(g, n)
            self.errors += [f"graph {g.name}: {problem}" for problem in problems]
            if not problems and (g["a"].dtype.kind == "f" or g["b"].dtype.kind == "f"):
                self.warnings.append(f"graph {g.name}: vertex indices are stored as floats")
            weights = parts.get("w")
            if not problems and weights is not None and weights.dtype.kind != "f":
                self.errors.append(f"graph {g.name}: weights are stored as {weights.dtype}; the spec stores "
                                   "floats (loompy 3 refuses to open the file)")
            self.summary.append(f"graph {g.name}: {a.size} edges")

    # --------------------------------------------------------------- conventions
    def _check_conventions(self, f: h5py.File) -> None:
        """The Linnarsson lab's conventions for attribute names and types, which loompy 3's
        ``strictness="conventions"`` checks: CellID, ClusterID, Gene and Accession are required;
        the rest are checked when present (and noted when missing)."""
        legacy = fmt.read_spec_version(f).is_legacy
        rows = _attr_values(f, fmt.ROW_ATTRS, ("Accession", "Gene", "Valid", "Selected"), legacy)
        cols = _attr_values(f, fmt.COL_ATTRS, ("ClusterID", "ClusterName", "CellID", "Valid", "Outliers"), legacy)
        in_group = fmt.globals_live_in_group(f)
        for name in ("Description", "Journal", "Authors", "Title", "Year", fmt.CREATION_DATE_KEY):
            if not fmt.has_global(f, name, in_group):
                self.warnings.append(f"optional global attribute '{name}' is missing")
        self._convention(cols, "column", "ClusterID", required=True, kind="integers")
        ids = cols.get("ClusterID")
        if ids is not None and ids.dtype.kind in "iu" and ids.size and \
                not np.array_equal(np.unique(ids), np.arange(int(ids.max()) + 1)):
            self.errors.append("column attribute 'ClusterID' must be the integers 0, 1, 2, ... with none missing")
        if self._convention(cols, "column", "ClusterName", kind="strings") and ids is not None:
            pairs = set(zip(ids.tolist(), cols["ClusterName"].tolist()))
            if len(pairs) != len(set(ids.tolist())) or len(pairs) != len(set(cols["ClusterName"].tolist())):
                self.errors.append("column attribute 'ClusterName' must correspond 1:1 with 'ClusterID'")
        self._convention(cols, "column", "CellID", required=True, kind="strings", unique=True)
        self._convention(cols, "column", "Valid", kind="flags")
        self._convention(cols, "column", "Outliers", kind="flags")
        self._convention(rows, "row", "Accession", required=True, kind="strings", unique=True)
        self._convention(rows, "row", "Gene", required=True, kind="strings")
        self._convention(rows, "row", "Valid", kind="flags")
        self._convention(rows, "row", "Selected", kind="flags")
        matrix = f.get(fmt.MATRIX)
        if isinstance(matrix, h5py.Dataset) and matrix.chunks and matrix.chunks != fmt.matrix_chunks(matrix.shape):
            self.warnings.append(f"/matrix has chunks {matrix.chunks}; the convention for its shape is "
                                 f"{fmt.matrix_chunks(matrix.shape)}")

    def _convention(self, values: dict[str, np.ndarray], axis: str, name: str, *, kind: str,
                    required: bool = False, unique: bool = False) -> bool:
        """Check one conventional attribute (``kind``: strings, integers, or flags, integers 0 or 1);
        True when it is present."""
        what = f"{axis} attribute '{name}'"
        if name not in values:
            (self.errors if required else self.warnings).append(f"{'' if required else 'optional '}{what} is missing")
            return False
        v = values[name]
        if v.ndim != 1:
            self.errors.append(f"{what} must be one-dimensional, not of shape {v.shape}")
        elif kind == "strings" and v.dtype != object:
            self.errors.append(f"{what} must be strings, not {v.dtype}")
        elif kind in ("integers", "flags") and v.dtype.kind not in "iu":
            self.errors.append(f"{what} must be integers, not {v.dtype}")
        elif kind == "flags" and not np.all(np.isin(v, [0, 1])):
            self.errors.append(f"{what} must be the integers 0 or 1 only")
        elif unique and len(set(v.tolist())) != v.size:
            self.errors.append(f"{what} cannot contain duplicate values")
        return True


def _attr_values(f: h5py.File, group_name: str, names: tuple[str, ...], legacy: bool) -> dict[str, np.ndarray]:
    """The values of those of ``names`` the group has as readable datasets, as loompy reads them
    (text as str); the spec checks report the rest."""
    group = fmt.get_group(f, group_name)
    values = {}
    for name in names:
        obj = group.get(name) if group is not None else None
        try:
            if isinstance(obj, h5py.Dataset):
                values[name] = read_values(obj, legacy)
        except (OSError, ValueError, TypeError, LoomError):
            continue
    return values

