"""Replacing a value inside a Loom file (an attribute, a layer or a graph) so that an interruption never loses it.

The replacement is written whole in a staging group, ``/loompy_swap``, that no listing shows; then
the old value is moved there too, the new one moved to its name, and the old one deleted. The
staging group's own HDF5 attributes note where each staged value belongs; the user's datasets
carry nothing. An interruption leaves at most staged values: the next ``r+`` open puts an old value
back if its name is free (the new one never got it) and drops everything else (:func:`settle`); a
read-only open refuses the file while a value is only to be found there (:func:`pending`). A
user's own names are never touched, whatever they look like; of a group named ``loompy_swap``
without loompy's mark, only an empty one with no HDF5 attributes is taken for loompy's own (one an
interruption cut short before marking it: an ``r+`` open removes it), and one holding anything
makes replacements fail with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import h5py
import numpy as np

from .errors import LoomFileError

try:  # the lock h5py takes around every HDF5 call (reentrant): held, no other thread uses HDF5
    from h5py._objects import phil as _h5py_lock
except ImportError:  # pragma: no cover - a later h5py; readers may then see a name missing briefly
    _h5py_lock = contextlib.nullcontext()

STAGING = "loompy_swap"  # root group of values being swapped in or out
_MARK = "loompy_staging"  # its HDF5 attribute: the group is loompy's
_OLD_ATTR = "attr:"  # a spec-2 global attribute's old value, kept on the staging group while replaced


def _path(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def _staging(f: h5py.File, create: bool = False) -> h5py.Group | None:
    group = f.get(STAGING)
    if isinstance(group, h5py.Group) and _MARK in group.attrs:
        return group
    if not create:
        return None
    if group is not None and not _cut_short(group):
        raise LoomFileError(f"{f.filename}: /{STAGING} is not loompy's, so values cannot be replaced safely")
    if group is None:
        group = f.create_group(STAGING)
    try:
        group.attrs[_MARK] = 1
    except BaseException:
        del f[STAGING]  # (not left behind empty and unmarked)
        raise
    return group


def _cut_short(group: h5py.HLObject) -> bool:
    """Whether an unmarked ``/loompy_swap`` is loompy's own, left when it was cut short before its
    mark was set: an empty group with no HDF5 attributes."""
    return isinstance(group, h5py.Group) and len(group) == 0 and not group.attrs


def is_staging(f: h5py.File, name: str) -> bool:
    """Whether root object ``name`` is loompy's staging group (copies of a file leave it out)."""
    return name == STAGING and _staging(f) is not None


def _drop_if_empty(f: h5py.File) -> None:
    staging = _staging(f)
    if staging is not None and len(staging) == 0 and set(staging.attrs) == {_MARK}:
        del f[STAGING]


def stage(group: h5py.Group, name: str) -> str:
    """A free path in the staging group to write the replacement of ``group[name]`` at, its
    destination noted."""
    staging = _staging(group.file, create=True)
    k = 0
    while f"new{k}" in staging or f"new{k}.old" in staging or f"new{k}" in staging.attrs:
        k += 1
    staging.attrs[f"new{k}"] = _path(group, name)
    return f"/{STAGING}/new{k}"


def discard(f: h5py.File, staged: str) -> None:
    """Drop a staged replacement that will not be swapped in (its writing failed)."""
    if staged in f:
        del f[staged]
    staging = _staging(f)
    key = staged.rsplit("/", 1)[-1]
    if staging is not None and key in staging.attrs:
        del staging.attrs[key]
    _drop_if_empty(f)


def swap_in(group: h5py.Group, name: str, staged: str) -> h5py.Dataset:
    """Make the complete staged dataset ``staged`` the value ``group[name]``, the old one deleted last."""
    f = group.file
    target, backup = _path(group, name), f"{staged}.old"
    try:
        with _h5py_lock:  # (no other thread can find the name missing between the two moves)
            if target in f:
                f.move(target, backup)
            f.move(staged, target)
    except BaseException:
        if target not in f and backup in f:
            f.move(backup, target)
        elif backup in f:  # the new value is in place: the swap is done
            del f[backup]
        discard(f, staged)
        raise
    try:  # the new value is in place: a failure from here on is left for the next writable open
        if backup in f:
            del f[backup]
        discard(f, staged)  # (only its note is left to drop)
    except Exception as exc:
        warnings.warn(f"{f.filename}: '{target}' is written, but its old value could not be deleted ({exc}); "
                      "the file's next opening for writing deletes it", stacklevel=2)
    return f[target]


def carry_attrs(source: h5py.HLObject | None, target: h5py.HLObject) -> None:
    """Give ``target`` the HDF5 attributes of ``source`` (what it replaces) that it lacks: a user's
    own notes outlive a rewrite. loompy's working marks (``loompy_...``) stay behind, and so do
    object references (dimension scales among them), which would point nowhere from elsewhere."""
    if source is None:
        return
    pointing = _pointing(source)
    for key in source.attrs:
        if key not in target.attrs and not key.startswith("loompy_") and key not in pointing:
            target.attrs[key] = source.attrs[key]


def _pointing(obj: h5py.HLObject) -> list[str]:
    """The HDF5 attributes of ``obj`` that point at other objects of its file: those holding object
    references, and a dimension scale's marks (its CLASS and NAME go with its references)."""
    keys = [key for key in obj.attrs if _has_reference(obj.attrs.get_id(key).dtype)]
    if obj.attrs.get("CLASS") in (b"DIMENSION_SCALE", "DIMENSION_SCALE"):
        keys += [key for key in ("CLASS", "NAME") if key in obj.attrs]
    return keys


def _has_reference(dtype: np.dtype) -> bool:
    """Whether values of ``dtype`` hold HDF5 object or region references (also inside compounds,
    arrays and variable-length sequences)."""
    if h5py.check_dtype(ref=dtype) is not None:
        return True
    base = h5py.check_dtype(vlen=dtype)
    if isinstance(base, np.dtype):
        return _has_reference(base)
    if dtype.subdtype is not None:
        return _has_reference(dtype.subdtype[0])
    return any(_has_reference(dtype.fields[name][0]) for name in dtype.names or ())


def copy_member(source: h5py.Group, name: str, target: h5py.Group) -> None:
    """Copy ``source[name]`` into ``target`` as it is: an object whole, a soft or external link as
    the same link (it may point nowhere, or to a file not at hand); in the same file, an object
    is linked rather than copied (another name of it may be elsewhere in the file); copied to
    another file, without its object references (see :func:`drop_references`)."""
    link = source.get(name, getlink=True)
    if isinstance(link, h5py.SoftLink):
        target[name] = h5py.SoftLink(link.path)
    elif isinstance(link, h5py.ExternalLink):
        target[name] = h5py.ExternalLink(link.filename, link.path)
    elif source.file == target.file:  # (in the same file: the same object, linked once more)
        target[name] = source[name]
    else:
        source.copy(source[name], target, name=name)
        drop_references(target[name])


def drop_references(obj: h5py.HLObject) -> None:
    """Remove the HDF5 attributes holding object references (dimension scales' among them) from
    ``obj`` and all under it, copied from another file: they would point at garbage here."""
    def clean(item: h5py.HLObject) -> None:
        for key in _pointing(item):
            del item.attrs[key]

    clean(obj)
    if isinstance(obj, h5py.Group):
        obj.visititems(lambda _, item: clean(item))


_swapping = threading.RLock()  # one replacement at a time: threads share the staging group's names


def _after_fork_in_child() -> None:
    global _swapping
    _swapping = threading.RLock()  # (another thread of the parent may have held it: not to be released here)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

T = TypeVar("T")


def _one_at_a_time(function: Callable[..., T]) -> Callable[..., T]:
    """``function`` under ``_swapping``: one replacement at a time in this process."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with _swapping:
            return function(*args, **kwargs)
    return wrapper


@_one_at_a_time
def replace(group: h5py.Group, name: str, write: Callable[[str], h5py.HLObject]) -> h5py.HLObject:
    """The value ``group[name]`` (a dataset or group) as ``write(path)`` creates it at the path
    given: under the name when it is free, else whole in the staging group and then swapped in,
    with the old value's HDF5 attributes (:func:`carry_attrs`). A write that fails or is
    interrupted leaves the old value, and nothing of the new one. One replacement at a time in this process."""
    if name not in group:
        try:
            return write(name)
        except BaseException:
            if name in group:
                del group[name]
            raise
    staged = stage(group, name)
    try:
        carry_attrs(group[name], write(staged))
    except BaseException:
        discard(group.file, staged)
        raise
    return swap_in(group, name, staged)


def pending(f: h5py.File) -> list[str]:
    """Values an interrupted replacement left only in the staging group (an ``r+`` open restores them)."""
    staging = _staging(f)
    if staging is None:
        return []
    found = [str(target) for key, target in staging.attrs.items()
             if key.startswith("new") and f"{key}.old" in staging and str(target) not in f]
    found += [f"global attribute '{key[len(_OLD_ATTR):]}'" for key in staging.attrs
              if key.startswith(_OLD_ATTR) and key[len(_OLD_ATTR):] not in f.attrs]
    return found


def settle(f: h5py.File) -> None:
    """After an interruption (an ``r+`` open): old values whose name is free go back, the rest goes."""
    staging = _staging(f)
    if staging is None:
        if STAGING in f and _cut_short(f[STAGING]):
            del f[STAGING]
        return
    for key, value in list(staging.attrs.items()):
        if key.startswith("new") and f"{key}.old" in staging and str(value) not in f:
            f.move(f"/{STAGING}/{key}.old", str(value))
        elif key.startswith(_OLD_ATTR) and key[len(_OLD_ATTR):] not in f.attrs:
            f.attrs.create(key[len(_OLD_ATTR):], value, dtype=staging.attrs.get_id(key).dtype)
    del f[STAGING]


@_one_at_a_time
def replace_root_attribute(f: h5py.File, name: str, data: Any, dtype: Any) -> None:
    """Store a spec-2 global attribute (on the file's root), the old value kept on the staging group
    meanwhile: HDF5 replaces an attribute by deleting it, then creating the new one. Raises what
    HDF5 raises if it refuses the value (tried on the staging group first: the old value stays).
    One replacement at a time in this process."""
    if name not in f.attrs:  # nothing to lose: a refused value leaves no attribute behind
        f.attrs.create(name, data, dtype=dtype)
        return
    staging = _staging(f, create=True)
    backup = _OLD_ATTR + name
    try:
        staging.attrs.create("probe", data, dtype=dtype)  # refused (too large...)? nothing is touched
        del staging.attrs["probe"]
        staging.attrs.create(backup, f.attrs[name], dtype=f.attrs.get_id(name).dtype)
        f.attrs.create(name, data, dtype=dtype)
    except BaseException:
        if name not in f.attrs and backup in staging.attrs:  # deleted, then not created: put it back
            f.attrs.create(name, staging.attrs[backup], dtype=staging.attrs.get_id(backup).dtype)
        raise
    finally:
        if "probe" in staging.attrs:
            del staging.attrs["probe"]
        if backup in staging.attrs and name in f.attrs:  # (else it is all that is left of the value)
            del staging.attrs[backup]
        _drop_if_empty(f)
