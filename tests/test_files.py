"""Whole-file rewrites (create, combine, permute, repack) and the file they replace: links, other
writers, ownership, odd names, late failures."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import pytest

import loompy

from .conftest import held_in_another_thread


def make(path, m=None):
    m = np.arange(12, dtype=np.float32).reshape(3, 4) if m is None else m
    loompy.create(path, m, {"g": np.arange(m.shape[0])}, {"c": np.arange(m.shape[1])}).close()
    return path


def columns(path):
    with loompy.connect(path, "r") as ds:
        return ds.ca.c.tolist()


def test_a_symlink_is_followed_and_kept(tmp_path):
    """permute, repack and create through a symlink update the file it names; the link stays a link."""
    (tmp_path / "data").mkdir()
    real = make(tmp_path / "data" / "real.loom")
    link = tmp_path / "link.loom"
    link.symlink_to(real)
    with loompy.connect(link) as ds:
        ds.permute(np.array([3, 2, 1, 0]), axis=1)
    assert link.is_symlink() and columns(real) == [3, 2, 1, 0]
    loompy.repack(link)
    assert link.is_symlink() and columns(real) == [3, 2, 1, 0]
    make(link, np.zeros((3, 2), np.float32))
    assert link.is_symlink() and columns(real) == [0, 1]
    dangling = tmp_path / "dangling.loom"
    dangling.symlink_to(tmp_path / "data" / "new.loom")
    make(dangling)
    assert dangling.is_symlink() and columns(tmp_path / "data" / "new.loom") == [0, 1, 2, 3]


def test_a_file_with_other_hard_links_is_not_split(tmp_path):
    path = make(tmp_path / "a.loom")
    os.link(path, tmp_path / "b.loom")
    before = path.read_bytes()
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomFileError, match="a.loom: the file has 2 hard links"):
            ds.permute(np.array([3, 2, 1, 0]), axis=1)
        assert ds.ca.c.tolist() == [0, 1, 2, 3]  # the connection still works
    assert path.read_bytes() == before and (tmp_path / "b.loom").read_bytes() == before


def test_a_file_open_for_writing_elsewhere_is_not_replaced(tmp_path):
    """Writes through the other connection would go to the replaced file and be lost: refused."""
    path = make(tmp_path / "a.loom")
    first, second = loompy.connect(path), loompy.connect(path)
    with pytest.raises(loompy.LoomFileError, match="open for writing by another connection"):
        first.permute(np.array([3, 2, 1, 0]), axis=1)
    with pytest.raises(loompy.LoomFileError, match="open for writing by another connection"):
        make(path, np.zeros((3, 2), np.float32))
    second.ca["kept"] = np.ones(4)
    second.close()
    first.permute(np.array([3, 2, 1, 0]), axis=1)  # alone now: allowed
    assert first.ca.kept.tolist() == [1, 1, 1, 1] and first.ca.c.tolist() == [3, 2, 1, 0]
    first.close()
    with loompy.connect(path, "r") as reader:  # readers keep the old file and do not stand in the way
        make(path, np.zeros((3, 2), np.float32))
        assert reader.shape == (3, 4)
    assert columns(path) == [0, 1]


def test_a_file_another_program_writes_is_not_replaced(tmp_path):
    path = make(tmp_path / "a.loom")
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, loompy
        ds = loompy.connect({str(path)!r}, "r+")
        print("open", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=os.environ)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(loompy.LoomFileError, match="another program has the file open for writing"):
            make(path, np.zeros((3, 2), np.float32))
        with pytest.raises(loompy.LoomFileError):
            loompy.combine([path, path], path)
    finally:
        holder.communicate("", timeout=60)
    assert columns(path) == [0, 1, 2, 3]


def test_a_late_failure_leaves_the_file_and_the_connection_as_they_were(tmp_path, monkeypatch):
    path = make(tmp_path / "a.loom")
    before = path.read_bytes()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomFileError, match="a.loom: the new file could not replace it"):
            ds.permute(np.array([3, 2, 1, 0]), axis=1)
        assert not ds.closed and ds.ca.c.tolist() == [0, 1, 2, 3]
        ds.ca["after"] = np.ones(4)  # still writable
        assert ds.ca.after.tolist() == [1, 1, 1, 1]
    monkeypatch.undo()
    assert not list(tmp_path.glob(".*loom-tmp"))
    with loompy.connect(path, "r") as ds:
        assert ds.ca.c.tolist() == [0, 1, 2, 3] and "after" in ds.ca
    assert path.read_bytes() != before  # (the attribute written after the failure)


def test_names_a_rewrite_must_cope_with(tmp_path):
    existing = make(tmp_path / "results.loom")
    before = existing.read_bytes()
    for name in ("results.loom/", "newdir/"):
        with pytest.raises(loompy.LoomFileError, match="names a folder"):
            make(f"{tmp_path}/{name}")  # (pathlib would drop the slash)
    assert existing.read_bytes() == before and not (tmp_path / "newdir").exists()
    make(os.fsencode(tmp_path / "bytes.loom"))
    assert columns(tmp_path / "bytes.loom") == [0, 1, 2, 3]
    long_name = tmp_path / ("l" * 240 + ".loom")  # a legal name; the temporary one must fit too
    make(long_name)
    with loompy.connect(long_name) as ds:
        ds.permute(np.array([1, 0, 3, 2]), axis=1)
    assert columns(long_name) == [1, 0, 3, 2]
    assert not list(tmp_path.glob(".*loom-tmp"))


def test_repack_opens_only_loom_files(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    before = plain.read_bytes()
    with pytest.raises(loompy.LoomFormatError, match="plain.h5: not a valid Loom file"):
        loompy.repack(plain)
    assert plain.read_bytes() == before
    with pytest.raises(loompy.LoomFileNotFoundError):
        loompy.repack(tmp_path / "missing.loom")


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="changing owners needs root")
def test_a_rewrite_keeps_the_owner_group_and_mode(tmp_path):
    path = make(tmp_path / "a.loom")
    os.chown(path, 65534, 65534)
    os.chmod(path, 0o640)
    with loompy.connect(path) as ds:
        ds.permute(np.array([3, 2, 1, 0]), axis=1)
    info = os.stat(path)
    assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o640)


def test_export_never_writes_text_over_a_loom_file(tmp_path):
    path, other = make(tmp_path / "a.loom"), make(tmp_path / "b.loom")
    before = {p: p.read_bytes() for p in (path, other)}
    with loompy.connect(path, "r") as ds:
        for target in (path, other):
            with pytest.raises(loompy.LoomFileError, match="is an HDF5 file; export writes text"):
                ds.export(target)
        (tmp_path / "old.tsv").write_text("stale")
        ds.export(tmp_path / "old.tsv")  # text over text is an ordinary overwrite
    assert all(p.read_bytes() == content for p, content in before.items())
    assert (tmp_path / "old.tsv").read_text().splitlines()[0].split("\t")[-2:] == ["3", ""]  # (a tab after each cell)


def test_in_place_writes_are_refused_when_the_disk_has_no_room(tmp_path, monkeypatch):
    """A disk filling up mid-write can damage an HDF5 file beyond repair: appends and layer
    replacements that clearly do not fit are refused before anything is written."""
    path = make(tmp_path / "a.loom", np.random.default_rng(0).random((50, 40)))
    other = make(tmp_path / "b.loom", np.random.default_rng(1).random((50, 40)))
    before = path.read_bytes()
    real = os.statvfs

    class Nearly_full:
        f_frsize, f_bavail = 4096, 100  # 0.4 MB free

    monkeypatch.setattr(os, "statvfs", lambda p: Nearly_full())
    with loompy.connect(path) as ds:
        for write in (lambda: ds.add_columns(np.ones((50, 40)), {"c": np.arange(40)}),
                      lambda: ds.add_loom(other),
                      lambda: ds.set_layer("x", np.ones((50, 40)))):
            with pytest.raises(loompy.LoomFileError, match="a.loom.*MB may be needed.*nothing was written"):
                write()
        assert ds.shape == (50, 40)
    assert path.read_bytes() == before
    monkeypatch.setattr(os, "statvfs", real)
    with loompy.connect(path) as ds:  # with room, the same writes go ahead
        ds.add_columns(np.ones((50, 40)), {"c": np.arange(40)})
        assert ds.shape == (50, 80)


def test_a_file_longer_than_hdf5_recorded_keeps_its_data_when_opened_for_writing(tmp_path):
    """Metadata a writer stored past the end its superblock records (it died, or its disk filled
    up) is kept: opening the file 'r+' counts those bytes in instead of letting HDF5 trim them."""
    import struct

    m = np.random.default_rng(2).random((300, 300)).astype(np.float32)
    path = make(tmp_path / "a.loom", m)
    with h5py.File(path, "r") as f:
        d = f["matrix"]
        last = max(d.id.get_chunk_info(i).byte_offset for i in range(d.id.get_num_chunks()))
    data = bytearray(path.read_bytes())
    assert data[8] == 0  # superblock version 0: the end-of-file address is bytes 40-47
    data[40:48] = struct.pack("<Q", last + 1)
    path.write_bytes(bytes(data))
    with pytest.raises(loompy.LoomFileError, match=r"a.loom: a write was interrupted; open it once with mode 'r\+'"):
        loompy.connect(path, "r")
    with loompy.connect(path, "r+") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)


def test_the_free_space_checked_is_that_of_the_disk_the_file_is_on(tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    real = make(tmp_path / "full" / "a.loom")
    link = tmp_path / "link.loom"
    link.symlink_to(real)
    statvfs = os.statvfs

    class Full:
        f_frsize, f_bavail = 4096, 10

    monkeypatch.setattr(os, "statvfs", lambda p: Full() if os.fspath(p).endswith("full") else statvfs(p))
    with loompy.connect(link) as ds, pytest.raises(loompy.LoomFileError, match="MB may be needed"):
        ds.add_columns(np.ones((3, 2), np.float32), {"c": [4, 5]})


def test_readers_and_plain_h5py_writers_in_this_process(tmp_path):
    """A read-only connection does not stop a permute (HDF5 shares its writable file: loompy knows
    the connection's own mode); a file h5py itself has open for writing is not replaced."""
    path = make(tmp_path / "a.loom")
    writer = loompy.connect(path)
    reader = loompy.connect(path, "r")  # (after: HDF5 cannot reopen for writing a file open read-only)
    writer.permute(np.array([3, 2, 1, 0]), axis=1)
    writer.close()
    reader.close()
    assert columns(path) == [3, 2, 1, 0]
    with h5py.File(path, "r+"):
        with pytest.raises(loompy.LoomFileError, match="open for writing"):
            make(path, np.zeros((3, 2), np.float32))
    assert columns(path) == [3, 2, 1, 0]


def test_objects_taken_before_a_permute_see_the_permuted_file(tmp_path):
    path = make(tmp_path / "a.loom")
    with loompy.connect(path) as ds:
        layer, layers, ca = ds.layers[""], ds.layers, ds.ca
        ds.permute(np.array([3, 2, 1, 0]), axis=1)
        assert layer[0, :].tolist() == [3, 2, 1, 0] and layers[""][0, 0] == 3 and ca["c"].tolist() == [3, 2, 1, 0]
        layer[0, 0] = -1
        assert ds[0, 0] == -1
    assert "connection is closed" in repr(layer)  # a layer of a closed connection still shows itself


def test_a_rewrite_that_fails_leaves_no_temporary_file_and_a_loompy_error(tmp_path, monkeypatch):
    path = make(tmp_path / "a.loom")
    before = path.read_bytes()
    files = __import__("importlib").import_module("loompy.files")
    real = h5py.File

    def made_then_failed(name, mode="r", *args, **kwargs):
        if mode == "x":  # HDF5 creates the file, then cannot write its header (a full disk)
            open(name, "wb").close()
            raise OSError(28, "No space left on device")
        return real(name, mode, *args, **kwargs)

    monkeypatch.setattr(files.h5py, "File", made_then_failed)
    with pytest.raises(loompy.LoomFileError, match="a.loom: cannot write a new file beside it"):
        make(path, np.zeros((3, 2), np.float32))
    monkeypatch.undo()
    create = __import__("importlib").import_module("loompy.create")
    write = create.engine.write_matrix

    def full(*args, **kwargs):
        raise RuntimeError("Can't write data (file write failed: No space left on device)")

    monkeypatch.setattr(create.engine, "write_matrix", full)
    with pytest.raises(loompy.LoomFileError, match="the new file could not be written.*the file is unchanged"):
        make(path, np.zeros((3, 2), np.float32))
    monkeypatch.setattr(create.engine, "write_matrix", write)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*loom-tmp"))


def test_home_and_undecodable_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with loompy.create("~/home.loom", np.ones((2, 2)), {}, {}) as ds:
        assert ds.shape == (2, 2)
    with loompy.connect("~/home.loom", "r") as ds:
        assert ds.shape == (2, 2)
    odd = os.fsencode(tmp_path) + b"/bad\xff.loom"  # a Linux file name that is not UTF-8
    loompy.create(odd, np.ones((2, 2)), {}, {}).close()
    with loompy.connect(odd) as ds:
        ds.permute(np.array([1, 0]), axis=1)
        assert ds.shape == (2, 2)
    assert not list(tmp_path.glob(".*loom-tmp"))


def test_a_sticky_folder_refuses_replacing_another_users_file_up_front(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    folder.mkdir()
    path = make(folder / "a.loom")
    folder.chmod(0o1777)
    mine = os.stat(path).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: mine + 4242, raising=False)
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomFileError, match="sticky"):
            ds.permute(np.array([3, 2, 1, 0]), axis=1)
        assert ds.ca.c.tolist() == [0, 1, 2, 3]


def test_export_errors_are_loompy_errors_and_hdf5_after_a_user_block_is_kept(tmp_path):
    path = make(tmp_path / "a.loom")
    blocked = tmp_path / "ub.h5"
    with h5py.File(blocked, "w", userblock_size=512) as f:  # the HDF5 signature sits at byte 512
        f["x"] = np.arange(3)
    before = blocked.read_bytes()
    with loompy.connect(path, "r") as ds:
        with pytest.raises(loompy.LoomFileError, match="ub.h5: is an HDF5 file"):
            ds.export(blocked)
        for target in (tmp_path, tmp_path / "missing" / "out.tsv"):
            with pytest.raises(loompy.LoomFileError, match="cannot write the export there"):
                ds.export(target)
    assert blocked.read_bytes() == before


def test_the_staging_group_is_loompys_only_and_never_copied(tmp_path):
    """A leftover staging group (a replacement killed half-way) is not carried into repack's output;
    a user's own group of that name, which lacks loompy's mark, is left alone by r+ opens."""
    path = make(tmp_path / "a.loom")
    swaps = __import__("importlib").import_module("loompy.swaps")
    with h5py.File(path, "r+") as f:
        f.create_dataset(swaps.stage(f["col_attrs"], "c"), data=np.arange(4) * 9)  # staged, never swapped in
    loompy.repack(path)
    with h5py.File(path, "r") as f:
        assert swaps.STAGING not in f
    with h5py.File(path, "r+") as f:
        f.create_group(swaps.STAGING).create_dataset("my_notes", data=[1, 2])
    with loompy.connect(path) as ds:
        assert ds.ca.c.tolist() == [0, 1, 2, 3]
    with h5py.File(path, "r") as f:
        assert f[swaps.STAGING]["my_notes"][1] == 2


def test_replacements_get_past_what_an_interruption_left_in_the_staging_group(tmp_path):
    path = make(tmp_path / "a.loom")
    swaps = __import__("importlib").import_module("loompy.swaps")
    with h5py.File(path, "r+") as f:
        f.create_group(swaps.STAGING)  # cut short before loompy marked it: empty
    with loompy.connect(path) as ds:
        ds.ca["c"] = np.array(["w", "x", "y", "z"])  # another dtype: staged
        assert ds.ca.c.tolist() == ["w", "x", "y", "z"]
        staging = ds._file.require_group(swaps.STAGING)
        staging.attrs["loompy_staging"] = 1
        staging.create_dataset("new0.old", data=[1])  # an old value whose swap completed, note gone
        ds.ca["c"] = np.arange(4) * 3
        assert ds.ca.c.tolist() == [0, 3, 6, 9]
    with h5py.File(path, "r+") as f:
        f.create_group(swaps.STAGING + "_x")
        del f[swaps.STAGING]
        f.create_group(swaps.STAGING).create_dataset("mine", data=[1])  # a user's own, not loompy's
    with loompy.connect(path) as ds:
        with pytest.raises(loompy.LoomError, match="loompy_swap is not loompy's"):
            ds.ca["c"] = np.array(["a", "b", "c", "d"])
        assert ds.ca.c.tolist() == [0, 3, 6, 9]


@pytest.mark.parametrize("content", ["a dataset", "a Loom attrs group only"])
def test_an_hdf5_file_that_is_not_loom_is_refused_untouched_even_with_trailing_bytes(tmp_path, content):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        if content == "a dataset":
            f["x"] = np.arange(5)
        else:  # what connect would refuse as not Loom: no matrix, not the groups of an empty file
            f.create_group("attrs")["LOOM_SPEC_VERSION"] = "3.0.0"
    with open(plain, "ab") as fh:
        fh.write(b"\0" * 100)  # longer than HDF5 recorded: opening it for writing would trim it
    before = plain.read_bytes()
    with pytest.raises(loompy.LoomFormatError, match="plain.h5: not a Loom file"):
        loompy.connect(plain)
    assert plain.read_bytes() == before


def test_a_new_file_is_flushed_while_written_and_a_failed_flush_is_not_lost(tmp_path, monkeypatch):
    """Whole-file writes send their bytes to the disk as they go (the sync before the rename then has
    little left); a flush that fails makes the rewrite fail, though the kernel reports it only once."""
    files = __import__("importlib").import_module("loompy.files")
    create = __import__("importlib").import_module("loompy.create")
    monkeypatch.setattr(files._EarlyFlush, "EVERY", 0.01)
    monkeypatch.setattr(files._EarlyFlush, "GROWTH", 0)
    synced, real_fsync, write = [], os.fsync, create.engine.write_matrix

    def slow_write(*args, **kwargs):
        time.sleep(0.2)
        return write(*args, **kwargs)

    monkeypatch.setattr(create.engine, "write_matrix", slow_write)
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(threading.current_thread().name) or real_fsync(fd))
    path = make(tmp_path / "a.loom")
    assert synced.count("loompy-flush") >= 3 and synced[-1] == threading.current_thread().name  # and once at the end
    before = path.read_bytes()

    def fails_once(fd):
        if threading.current_thread().name == "loompy-flush" and not synced:
            synced.append("failed")
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    synced.clear()
    monkeypatch.setattr(files.os, "fsync", fails_once)
    with pytest.raises(loompy.LoomFileError, match="a.loom: the new file could not replace it.*Input/output error"):
        make(path, np.zeros((3, 2), np.float32))
    assert synced == ["failed"] and path.read_bytes() == before and not list(tmp_path.glob(".*loom-tmp"))
    assert not [t for t in threading.enumerate() if t.name == "loompy-flush"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open descriptors")
def test_a_failed_rewrite_does_not_wait_for_a_flush_under_way_and_leaves_nothing_open(tmp_path, monkeypatch):
    files = __import__("importlib").import_module("loompy.files")
    monkeypatch.setattr(files._EarlyFlush, "EVERY", 0.01)
    monkeypatch.setattr(files._EarlyFlush, "GROWTH", 0)
    flushing, real_fsync = threading.Event(), os.fsync

    def slow_fsync(fd):
        if threading.current_thread().name == "loompy-flush":
            flushing.set()
            time.sleep(1.0)  # a slow disk
        return real_fsync(fd)

    def temporary_files_open():
        return [n for n in os.listdir("/proc/self/fd") if "loom-tmp" in os.path.realpath(f"/proc/self/fd/{n}")]

    monkeypatch.setattr(files.os, "fsync", slow_fsync)
    path = make(tmp_path / "a.loom")
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(path) as f:
            f["x"] = np.zeros(10)
            assert flushing.wait(5)
            began = time.monotonic()
            raise KeyboardInterrupt
    assert time.monotonic() - began < 0.5  # not after the flush
    for _ in range(100):  # the thread closes the file once its flush returns
        if not [t for t in threading.enumerate() if t.name == "loompy-flush"]:
            break
        time.sleep(0.05)
    assert not temporary_files_open() and not [t for t in threading.enumerate() if t.name == "loompy-flush"]
    assert path.read_bytes() == before and not list(tmp_path.glob(".*loom-tmp"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to see open descriptors")
def test_an_interrupt_as_the_flusher_starts_leaves_nothing_open(tmp_path, monkeypatch):
    files = __import__("importlib").import_module("loompy.files")
    path = make(tmp_path / "a.loom")
    before, real_open = path.read_bytes(), os.open

    def interrupted(name, flags, *args, **kwargs):
        if str(name).endswith(".loom-tmp") and flags == os.O_RDWR:
            raise KeyboardInterrupt
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(files.os, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make(path, np.zeros((3, 2), np.float32))
    monkeypatch.undo()
    held = [n for n in os.listdir("/proc/self/fd") if "loom-tmp" in os.path.realpath(f"/proc/self/fd/{n}")]
    assert not held and path.read_bytes() == before and not list(tmp_path.glob(".*loom-tmp"))


def test_small_files_are_synced_once_at_the_end(tmp_path, monkeypatch):
    """The helper syncs only after 32 MB of growth: a small write is synced once, before its rename."""
    files = __import__("importlib").import_module("loompy.files")
    monkeypatch.setattr(files._EarlyFlush, "EVERY", 0.01)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(threading.current_thread().name) or real_fsync(fd))
    create = __import__("importlib").import_module("loompy.create")
    write = create.engine.write_matrix
    monkeypatch.setattr(create.engine, "write_matrix", lambda *a, **k: time.sleep(0.1) or write(*a, **k))
    make(tmp_path / "a.loom")
    assert synced == [threading.current_thread().name]


def _open_in_child(path, queue):
    try:
        with loompy.connect(path, "r") as ds:
            queue.put(("opened", ds.shape))
    except loompy.LoomError as error:
        queue.put((type(error).__name__, str(error)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_from_a_writer_is_refused_the_file(tmp_path):
    """HDF5 in a forked child hands over the parent's inherited open file: a worker that opened it
    'r' while the parent held it 'r+' put back stale metadata (the matrix back at its old width).
    Refused, with the remedy named; a reading parent, or one that closed the file, is fine."""
    import multiprocessing

    path = tmp_path / "w.loom"
    loompy.create(path, np.ones((20, 30), np.float32), {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    fork = multiprocessing.get_context("fork")

    def child_says() -> tuple:
        queue = fork.Queue()
        process = fork.Process(target=_open_in_child, args=(str(path), queue))
        process.start()
        process.join(60)
        return queue.get(timeout=10)

    with loompy.connect(path) as ds:
        ds.add_columns(np.zeros((20, 2), np.float32), {"c": [30, 31]})
        kind, message = child_says()
        assert kind == "LoomFileError" and "forked" in message and "close the file" in message and "w.loom" in message
        assert ds.shape == (20, 32)
    assert child_says() == ("opened", (20, 32))  # (the writer has closed it)
    with loompy.connect(path, "r"):
        assert child_says() == ("opened", (20, 32))
    with loompy.connect(path, "r") as ds:
        assert ds.shape == (20, 32) and ds.ca.c[-1] == 31


def _use_inherited_connection(ds, queue, go_on, how_to_end):
    """A forked child's use of the parent's connection: writes, reads, then (once the parent has
    written more) reads again and ends as asked."""
    said = []
    for write in (lambda: ds.__setitem__((slice(0, 5), slice(0, 5)), np.zeros((5, 5))),
                  lambda: setattr(ds.ca, "Y", np.arange(30)), lambda: ds.layers.__setitem__("z", np.ones((20, 30))),
                  lambda: ds.attrs.__setitem__("title", "child"), lambda: ds.flush(),
                  lambda: ds.col_graphs.__setitem__("g", np.eye(30)), lambda: ds.permute(np.arange(30), axis=1)):
        try:
            write()
            said.append("written")
        except Exception as error:  # (the parent checks each is the refusal)
            said.append(str(error))
    said.append(ds[1, :3].tolist())
    queue.put(said)
    go_on.wait(60)
    later = []
    for read in (lambda: ds[:, :], lambda: ds.sparse(), lambda: ds.map([np.sum]),  # the parent wrote since
                 lambda: ds.ca.c, lambda: ds.col_graphs.knn):  # (not read before the fork)
        try:
            read()
            later.append("read")
        except Exception as error:  # (reported by the parent)
            later.append(f"{type(error).__name__}: {error}")
    queue.put(later)
    if how_to_end == "close, connect again":
        ds.close()
        try:
            loompy.connect(ds._path)
            queue.put("connected again")
        except loompy.LoomFileError as error:
            queue.put(str(error))
    elif how_to_end == "dropped":
        del ds
        __import__("gc").collect()
        queue.put("dropped")
    else:
        queue.put("exits")
    sys.exit(0)  # (a normal exit: HDF5 closes what is still open)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("how_to_end", ["exit", "close, connect again", "dropped"])
@pytest.mark.parametrize("permuted_first", [False, True])
def test_a_forked_child_cannot_write_through_the_parent_s_connection(tmp_path, how_to_end, permuted_first):
    """A child forked from a process with a connection open for writing wrote through its copy of
    HDF5's state of the file; its reads, exit or close wrote that state out over the parent's later
    changes (the parent then read "the file is damaged"). Now its writes are refused, naming the
    file; HDF5's descriptor there is read-only; the parent's file stays as the parent wrote it."""
    import multiprocessing

    path = tmp_path / "w.loom"
    m = np.arange(600, dtype=np.float32).reshape(20, 30)
    loompy.create(path, m, {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    fork = multiprocessing.get_context("fork")
    with loompy.connect(path) as ds:
        if permuted_first:  # (a whole-file rewrite reopens the file)
            ds.permute(np.arange(30)[::-1], axis=1)
            ds.permute(np.arange(30)[::-1], axis=1)
        ds.ca.X = np.arange(30) * 3  # not yet written out at the fork
        ds.col_graphs.knn = np.eye(30)
        ds[2, 2] = -2
        queue, go_on = fork.Queue(), fork.Event()
        process = fork.Process(target=_use_inherited_connection, args=(ds, queue, go_on, how_to_end))
        process.start()
        said = queue.get(timeout=60)
        assert said[-1] == [30.0, 31.0, 32.0]
        for message in said[:-1]:
            assert "w.loom was open for writing in the process this one was forked from" in message, said
        ds.ca.Z = np.arange(30) * 2  # the parent goes on writing: new chunks and attributes move things
        ds.col_graphs.knn = np.eye(30) * 2
        ds[0, :] = np.random.default_rng(0).random(30)
        ds.layers["p"] = m * 2
        ds.flush()
        go_on.set()
        for message in queue.get(timeout=60):  # (HDF5 there would read the file as it was at the fork)
            assert message.startswith("LoomFileError: ") and \
                "w.loom: the process this one was forked from has written to the file since the fork" in message
        ending = queue.get(timeout=60)
        process.join(60)
        assert process.exitcode == 0
        if how_to_end == "close, connect again":
            assert "forked from one that had the file open for writing" in ending
        expected = m.copy()
        expected[2, 2] = -2
        expected[0, :] = np.random.default_rng(0).random(30).astype(np.float32)
        ds[19, 29] = 7  # and after the child is gone
        expected[19, 29] = 7
    with loompy.connect(path, "r") as ds:
        assert sorted(ds.ca.keys()) == ["X", "Z", "c"] and "title" not in ds.attrs
        assert sorted(ds.layers.keys()) == ["", "p"] and list(ds.col_graphs) == ["knn"]
        np.testing.assert_array_equal(ds[:, :], expected)
        np.testing.assert_array_equal(ds.layers["p"][:, :], m * 2)


def test_a_staging_group_cut_short_is_never_left_behind(tmp_path, monkeypatch):
    """A full disk as the staging group gets its mark: the group goes (it stayed, empty, for good),
    the old value stays, and the error says what happened (it said the values' dtype could not be
    stored). An empty unmarked one an older interruption left is dropped by the next r+ open."""
    path = make(tmp_path / "a.loom")
    real = h5py.AttributeManager.__setitem__

    def full_at_the_mark(self, key, value):
        if key == "loompy_staging":
            raise OSError(28, "No space left on device")
        return real(self, key, value)

    with loompy.connect(path) as ds:
        before = ds.ca.c.tolist()
        monkeypatch.setattr(h5py.AttributeManager, "__setitem__", full_at_the_mark)
        with pytest.raises(OSError, match="No space left") as info:
            ds.ca["c"] = np.array(["w", "x", "y", "z"])  # another dtype: staged
        assert not isinstance(info.value, ValueError)
        monkeypatch.undo()
        assert "loompy_swap" not in ds._file and ds.ca.c.tolist() == before
    with h5py.File(path, "r+") as f:
        f.create_group("loompy_swap")  # as an older interruption left it
    with loompy.connect(path) as ds:
        assert "loompy_swap" not in ds._file and ds.ca.c.tolist() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_new_file_being_written_is_inherited_read_only_by_a_forked_child(tmp_path):
    """create, combine and permute write a new file that no connection holds yet: a child forked
    meanwhile (from another thread) got it writable, and its HDF5 could write its state out."""
    from loompy import files, forks

    path = tmp_path / "new.h5"
    with files.replacing(path) as f:
        f.create_dataset("a", data=np.arange(1000.0))
        pid = os.fork()
        if pid == 0:  # (the child must leave without running anything of pytest's)
            try:
                f.id.get_vfd_handle()
                read_only = os.write(f.id.get_vfd_handle(), b"x") < 0
            except OSError:
                read_only = True
            os._exit(0 if forks.inherited(f) and read_only else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        f.create_dataset("b", data=np.ones(10))
    with h5py.File(path, "r") as g:
        assert sorted(g) == ["a", "b"] and g["a"][-1] == 999


def _said_by_a_forked_child(target, *args):
    """Run ``target(*args, queue)`` in a child forked from this process: (what it put on the queue, its exit code)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    process = fork.Process(target=target, args=(*args, queue))
    process.start()
    said = queue.get(timeout=60)
    process.join(60)
    return said, process.exitcode


def _connect_after_dropping(held, queue):
    path = held[0]._path
    held.clear()  # (the child's only reference to its copy of the parent's connection)
    __import__("gc").collect()
    try:
        loompy.connect(path).close()
        queue.put("connected")
    except loompy.LoomFileError as error:
        queue.put(str(error))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_that_dropped_the_inherited_connection_still_cannot_open_the_file(tmp_path):
    """The refusal to open an inherited file looked through the child's connections: once the child
    had let go of its copy of the parent's, nothing refused HDF5's inherited file to a new one."""

    path = tmp_path / "w.loom"
    loompy.create(path, np.ones((20, 30), np.float32), {"g": np.arange(20)}, {"c": np.arange(30)}).close()
    held = [loompy.connect(path)]
    try:
        said, _ = _said_by_a_forked_child(_connect_after_dropping, held)
    finally:
        held[0].close()
    assert "w.loom: this process was forked from one that had the file open for writing" in said


def _read_in_child(path, queue):
    """In a forked child: read through the inherited connection and a new read-only one."""
    ds = _read_in_child.inherited
    said = []
    for name in ("", "other"):
        try:
            said.append(float(ds.layers[name][:, :].sum()))
        except loompy.LoomFileError as error:
            said.append(str(error))
    queue.put(said)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_while_other_threads_read_and_write_does_not_wait_for_them(tmp_path):
    """The engine's lock and each dataset's turns (one writer or many readers) were copied into a
    forked child held by threads that do not exist there: the child waited for them for good (28 of
    40 children, forked as another thread wrote). Now the child starts them afresh; a dataset that
    another thread was writing at the fork is half written in the child, and its reads are refused."""
    from loompy.engine import storage

    path = tmp_path / "w.loom"
    m = np.ones((300, 300), np.float32)
    with loompy.create(path, m, {"g": np.arange(300)}, {"c": np.arange(300)}) as ds:
        ds.layers["other"] = m * 2
    with loompy.connect(path) as ds:
        @contextlib.contextmanager
        def writing_with_the_engines_lock():  # as a thread in the middle of writing the main matrix
            with storage.writing(ds.layers[""]._dataset), storage._lock:
                yield

        with held_in_another_thread(writing_with_the_engines_lock()):
            _read_in_child.inherited = ds
            said, exitcode = _said_by_a_forked_child(_read_in_child, path)
        assert exitcode == 0
        assert "/matrix was being written (or the file permuted) by another thread of the process this one was " \
            "forked from" in said[0]
        assert said[1] == 2 * 300 * 300


def test_a_file_nobody_may_write_is_not_replaced_even_by_root(tmp_path):
    """The check asked the system whether this user may write the file: root may write anything,
    so as root create and repack replaced a file made read-only on purpose (chmod 444)."""
    path = make(tmp_path / "ro.loom")
    os.chmod(path, 0o444)
    before = path.read_bytes()
    with pytest.raises(loompy.LoomFileError, match="ro.loom: the file is read-only"):
        loompy.create(path, np.zeros((2, 2), np.float32), {"g": [1, 2]}, {"c": [1, 2]})
    with pytest.raises(loompy.LoomFileError, match="read-only"):
        loompy.repack(path)
    assert path.read_bytes() == before


# ------------------------------------------------------------------ other systems' rules, on Linux


def test_a_file_is_made_where_fsync_needs_a_writable_descriptor(tmp_path, monkeypatch):
    """Windows' fsync (FlushFileBuffers) needs write access: the new file's flush descriptor was
    opened read-only, so every create, combine, permute and repack failed there ("Bad file
    descriptor"). Here fsync refuses read-only descriptors as Windows does."""
    import errno
    import fcntl

    real_fsync = os.fsync

    def windows_fsync(fd):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", windows_fsync)
    path = tmp_path / "w.loom"
    loompy.create(path, np.eye(3, dtype=np.float32), {"g": np.arange(3)}, {"c": np.arange(3)}).close()
    loompy.repack(path)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.eye(3))


def test_a_layer_hdf5_never_stored_reads_as_zeros_without_pread(tmp_path, monkeypatch):
    """Without ``os.pread`` (Windows) chunks are read through HDF5, which says "storage is not
    initialized" for a dataset it never stored a chunk of (an all-zero layer): that was taken for
    a damaged file, and every read of the layer refused."""
    path = tmp_path / "z.loom"
    with loompy.create(path, np.ones((70, 80), np.float32), {"g": np.arange(70)}, {"c": np.arange(80)}) as ds:
        ds.layers["zeros"] = np.zeros((70, 80), np.float32)
    monkeypatch.delattr(os, "pread")
    with loompy.connect(path) as ds:
        assert ds.layers["zeros"]._dataset.id.get_storage_size() == 0
        np.testing.assert_array_equal(ds.layers["zeros"][:, :], np.zeros((70, 80)))
        np.testing.assert_array_equal(ds.layers["zeros"][5:9, [1, 70]], np.zeros((4, 2)))
        ds.permute(np.arange(80)[::-1], axis=1)
        np.testing.assert_array_equal(ds.layers["zeros"][:, :], np.zeros((70, 80)))


def test_rewrites_where_an_open_file_cannot_be_replaced(tmp_path, monkeypatch):
    """Windows cannot replace a file that is open: repack kept its own connection open through the
    rename, so it always failed there; a rewrite of a file another connection of this process had
    open for reading failed only after all its work. Here the rename refuses open files as Windows does."""
    from loompy import files

    real_replace = os.replace

    def windows_replace(src, dst):
        open_here = {os.path.realpath(h5py.h5f.FileID(i).name) for i in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)}
        if os.path.realpath(dst) in open_here:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", windows_replace)
    monkeypatch.setattr(files, "OPEN_FILES_STAY", True)
    path = tmp_path / "o.loom"
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    loompy.create(path, m, {"g": np.arange(3)}, {"c": np.arange(4)}).close()
    loompy.repack(path)
    with loompy.connect(path, "r") as reader:
        before = os.stat(path).st_mtime_ns
        with pytest.raises(loompy.LoomFileError, match="o.loom: the file is open in another connection, and "
                                                       "Windows cannot replace a file that is open"):
            loompy.create(path, m * 2, {"g": np.arange(3)}, {"c": np.arange(4)})
        assert os.stat(path).st_mtime_ns == before and not [p for p in os.listdir(tmp_path) if "loom-tmp" in p]
        np.testing.assert_array_equal(reader[:, :], m)


def test_the_temporary_name_of_a_long_non_ascii_name_is_whole_characters(tmp_path):
    """The name beside the target was cut at a byte count, which could split a character: Windows
    raised UnicodeDecodeError, macOS refused the name (not UTF-8)."""
    from loompy.files import NAME_MAX, _temporary_name

    for base in ("遺伝子" * 30 + ".loom", "é" * 200 + ".loom", "a" * 240 + ".loom"):
        name = os.path.basename(_temporary_name(str(tmp_path), base))
        assert len(name.encode("utf-8")) <= NAME_MAX and name.endswith(".loom-tmp")
    path = tmp_path / ("遺伝子" * 25 + ".loom")
    loompy.create(path, np.ones((2, 2), np.float32), {"g": np.arange(2)}, {"c": np.arange(2)}).close()
    assert loompy.connect(path, "r").close() is None


def test_a_forked_childs_descriptor_is_made_read_only_where_dev_fd_is_the_same_open_file(tmp_path, monkeypatch):
    """On macOS and the BSDs, opening /dev/fd/N gives the same open file again, still writable:
    a forked child's HDF5 descriptor stayed writable (its exit could write a stale superblock over
    the parent's file). Here /proc is hidden and /dev/fd/N behaves as there."""
    import fcntl

    from loompy import forks

    path = tmp_path / "f.bin"
    path.write_bytes(b"loom")
    fd = os.open(path, os.O_RDWR)
    real_open, real_isdir = os.open, os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: False if str(p).startswith("/proc") else real_isdir(p))
    monkeypatch.setattr(os, "open", lambda p, flags, *a: os.dup(int(str(p)[8:])) if str(p).startswith("/dev/fd/")
                        else real_open(p, flags, *a))
    try:
        info = os.fstat(fd)
        forks._read_only(fd, str(path), info.st_dev, info.st_ino)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"loom"


def test_a_replacement_that_fails_only_to_delete_the_old_value_reports_it_done(tmp_path, monkeypatch):
    """Once the new layer has taken the name, an error deleting the old one (an I/O error) raised
    as if the write had failed; it is a warning now, and the next writable open deletes it."""
    path = make(tmp_path / "a.loom")
    swaps = __import__("importlib").import_module("loompy.swaps")
    new = np.full((3, 4), 5, np.int16)
    with loompy.connect(path) as ds:
        ds.layers["x"] = np.ones((3, 4), np.int32)
        deleting = h5py.Group.__delitem__

        def failing(group, name):
            if str(name).endswith(".old"):
                raise OSError("injected: HDF5 could not delete it")
            deleting(group, name)
        monkeypatch.setattr(h5py.Group, "__delitem__", failing)
        with pytest.warns(UserWarning, match=r"a\.loom: '/layers/x' is written, but its old value could not be "
                                             r"deleted \(injected"):
            ds.layers["x"] = new
        monkeypatch.setattr(h5py.Group, "__delitem__", deleting)
        assert ds.layers["x"][:, :].tolist() == new.tolist()
    with h5py.File(path, "r") as f:
        assert any(k.endswith(".old") for k in f[swaps.STAGING])  # (left for the next writable open)
    with loompy.connect(path) as ds:
        assert ds.layers["x"][:, :].tolist() == new.tolist()
    with h5py.File(path, "r") as f:
        assert swaps.STAGING not in f or not any(k.endswith(".old") for k in f[swaps.STAGING])
