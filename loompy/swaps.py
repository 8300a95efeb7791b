"""Replacing a value inside a Loom file (an attribute or a layer) so that an interruption never loses it.

The replacement is written whole in a staging group, ``/loompy_swap``, that no listing shows; then
the old value is moved there too and the new one moved to its name, and the old one deleted.
Each staged dataset notes where it belongs (its group and name) and whether it is the new or the
old value. An interruption leaves at most staged values: the next ``r+`` open puts an old value
back if its name is free (the new one never got it) and drops everything else (:func:`settle`); a
read-only open refuses the file while a value is only to be found there (:func:`pending`).
A user's own names are never touched, whatever they look like.
"""

from __future__ import annotations

import h5py

STAGING = "loompy_swap"  # root group of values being swapped in or out
_GROUP, _NAME, _KIND = "loompy_group", "loompy_name", "loompy_kind"  # a staged value's notes


def _path(group: h5py.Group, name: str) -> str:
    return f"{group.name.rstrip('/')}/{name}"


def _free(f: h5py.File, kind: str) -> str:
    staging = f.require_group(STAGING)
    k = 0
    while f"{kind}{k}" in staging:
        k += 1
    return f"/{STAGING}/{kind}{k}"


def _note(dataset: h5py.Dataset, group: h5py.Group, name: str, kind: str) -> None:
    dataset.attrs[_GROUP], dataset.attrs[_NAME], dataset.attrs[_KIND] = group.name, name, kind


def _unnote(dataset: h5py.Dataset) -> None:
    for key in (_GROUP, _NAME, _KIND):
        if key in dataset.attrs:
            del dataset.attrs[key]


def stage(group: h5py.Group) -> str:
    """A free path in the staging group, to create a replacement at (then :func:`note_new` it)."""
    return _free(group.file, "new")


def note_new(dataset: h5py.Dataset, group: h5py.Group, name: str) -> None:
    """Note a staged replacement's destination (until then an interruption just drops it)."""
    _note(dataset, group, name, "new")


def discard(f: h5py.File, staged: str) -> None:
    """Drop a staged replacement that will not be swapped in (its writing failed)."""
    if staged in f:
        del f[staged]
    _drop_staging_if_empty(f)


def swap_in(group: h5py.Group, name: str, staged: str) -> h5py.Dataset:
    """Make the complete staged dataset ``staged`` the value ``group[name]``, the old one deleted last."""
    f = group.file
    target = _path(group, name)
    old = group.get(name)
    if old is None:
        f.move(staged, target)
    else:
        backup = _free(f, "old")
        _note(old, group, name, "old")
        f.move(target, backup)
        try:
            f.move(staged, target)
        except BaseException:
            f.move(backup, target)
            _unnote(f[target])
            discard(f, staged)
            raise
        del f[backup]
    _unnote(f[target])
    _drop_staging_if_empty(f)
    return f[target]


def _drop_staging_if_empty(f: h5py.File) -> None:
    staging = f.get(STAGING)
    if isinstance(staging, h5py.Group) and len(staging) == 0 and not staging.attrs:
        del f[STAGING]


def pending(f: h5py.File) -> list[str]:
    """Values an interrupted replacement left only in the staging group (an ``r+`` open restores them)."""
    staging = f.get(STAGING)
    found = []
    for obj in staging.values() if isinstance(staging, h5py.Group) else []:
        group, name, kind = (obj.attrs.get(k) for k in (_GROUP, _NAME, _KIND))
        if kind == "old" and group is not None and name is not None and f"{str(group).rstrip('/')}/{name}" not in f:
            found.append(f"{str(group).rstrip('/')}/{name}")
    return found


def settle(f: h5py.File) -> None:
    """After an interruption (an ``r+`` open): old values whose name is free go back, the rest goes."""
    staging = f.get(STAGING)
    if not isinstance(staging, h5py.Group):
        return
    for key, obj in list(staging.items()):
        group, name, kind = (obj.attrs.get(k) for k in (_GROUP, _NAME, _KIND))
        target = f"{str(group).rstrip('/')}/{name}" if group is not None and name is not None else None
        if kind == "old" and target is not None and target not in f and isinstance(obj, h5py.Dataset):
            f.move(obj.name, target)
            _unnote(f[target])
        else:
            del staging[key]
    del f[STAGING]


def probe_attribute(f: h5py.File, value: object, dtype: object) -> None:
    """Check that HDF5 takes ``value`` as an attribute of this file, without touching any real one
    (written on the staging group, then dropped with it)."""
    staging = f.require_group(STAGING)
    try:
        staging.attrs.create("probe", value, dtype=dtype)
    finally:
        if "probe" in staging.attrs:
            del staging.attrs["probe"]
        _drop_staging_if_empty(f)
