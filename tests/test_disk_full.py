"""A disk without room: every write is refused before it touches the file.

HDF5 running out of space mid-write can leave a file damaged beyond repair (its metadata cache
written in part), and it may only notice when the file is closed. So each in-place write first
asks the disk for room for about twice its data and 2 MB of metadata. The first test fakes the
free space; the second fills a real (tmpfs) disk, where it can be mounted. Whole-file rewrites
(permute, combine, repack, create) ask for room for the new file: HDF5 running out of space while
writing one has been seen to bring the process down rather than fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp

import loompy

WRITES = {
    "partial write": lambda ds: ds.__setitem__((slice(10, 250), slice(33, 390)), np.ones((240, 357), np.float32)),
    "row attribute": lambda ds: ds.ra.__setitem__("Num", np.array([f"n{i}" for i in range(ds.shape[0])])),
    "column attribute": lambda ds: ds.ca.__setitem__("Label", np.arange(ds.shape[1]) * 2.5),
    "global attribute": lambda ds: ds.attrs.__setitem__("title", "t" * 60000),
    "graph": lambda ds: ds.col_graphs.__setitem__("g2", sp.random(ds.shape[1], ds.shape[1], density=0.01,
                                                                  random_state=1, format="coo")),
    "layer": lambda ds: ds.layers.__setitem__("new", np.ones(ds.shape, np.float32)),
    "delete": lambda ds: ds.ra.__delitem__("Gene"),
    "permute": lambda ds: ds.permute(np.arange(ds.shape[1])[::-1], axis=1),
    "combine": lambda ds: loompy.combine([ds.filename, ds.filename], ds.filename + ".both.loom"),
    "repack": lambda ds: loompy.repack(ds.filename),
    "create over it": lambda ds: loompy.create(ds.filename, np.ones((3, 4), np.float32), {"g": np.arange(3)},
                                               {"c": np.arange(4)}),
}


def _mode(write):
    """Files are replaced whole only when no connection has them open for writing."""
    return "r" if write in ("combine", "repack", "create over it") else "r+"


def _make(path):
    rng = np.random.default_rng(18)
    m = rng.poisson(1.0, size=(300, 400)).astype(np.float32)
    loompy.create(path, {"": m, "spliced": m.astype(np.int32)}, {"Gene": [f"g{i}" for i in range(300)]},
                  {"CellID": [f"c{i}" for i in range(400)]}, file_attrs={"title": "old"}).close()
    return path


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("write", sorted(WRITES))
def test_every_in_place_write_asks_for_room_first(tmp_path, monkeypatch, write):
    path = _make(tmp_path / "a.loom")
    before = _digest(path)
    free = 1 << 20  # 1 MB: less than any write's metadata allowance
    monkeypatch.setattr(os, "statvfs", lambda _: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    with loompy.connect(path, _mode(write)) as ds:
        with pytest.raises(loompy.LoomFileError, match=r"a\.loom.*MB are free.*nothing was written"):
            WRITES[write](ds)
    monkeypatch.undo()
    assert _digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.loom"]


def _tmpfs(where):
    where.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True)
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.parametrize("left", [0, 4096, 65536, 900_000])
def test_a_nearly_full_real_disk_refuses_writes_and_keeps_the_file(tmp_path, left):
    disk = tmp_path / "disk"
    if not _tmpfs(disk):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        path = _make(disk / "a.loom")
        before = _digest(path)
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(filler, "wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, max(0, free - left))
        for write in sorted(WRITES):
            with loompy.connect(path, _mode(write)) as ds:
                with pytest.raises(loompy.LoomFileError, match="MB are free"):
                    WRITES[write](ds)
        filler.unlink()
        assert _digest(path) == before and sorted(p.name for p in disk.iterdir()) == ["a.loom"]
        with loompy.connect(path, "r") as ds:
            assert ds.attrs.title == "old" and "Gene" in ds.ra
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
        shutil.rmtree(disk, ignore_errors=True)


def test_small_writes_need_only_the_metadata_allowance(tmp_path, monkeypatch):
    """Changing one value, or adding a small attribute, asks for little more than 2 MB (it asked
    for 4 MB: a 1 MB estimate doubled, plus 2 MB); a whole new layer asks for its size as well."""
    path = _make(tmp_path / "a.loom")
    free = (2 << 20) + 200_000
    monkeypatch.setattr(os, "statvfs", lambda _: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096))
    with loompy.connect(path) as ds:
        ds[0, 0] = 7
        ds.ca["Small"] = np.arange(ds.shape[1])
        del ds.ca["Small"]
        with pytest.raises(loompy.LoomFileError, match="MB are free"):
            ds.layers["big"] = np.random.default_rng(0).random(ds.shape)
    with loompy.connect(path, "r") as ds:
        assert ds[0, 0] == 7 and "big" not in ds.layers
