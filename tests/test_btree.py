"""Listing chunks from HDF5's B-tree in the file (loompy.engine.btree) against HDF5's own chunk_iter."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from loompy import engine
from loompy.engine import btree, storage


def hdf5_listing(dataset: h5py.Dataset) -> np.ndarray:
    """The independent expectation: HDF5's chunk_iter, rows sorted."""
    found = []
    dataset.id.chunk_iter(lambda c: found.append((*c.chunk_offset, c.byte_offset, c.size, c.filter_mask)))
    table = np.array(found, dtype=np.int64).reshape(-1, 5)
    table[:, :2] //= np.array(dataset.chunks)
    return sorted_rows(table)


def root_address(path) -> int:
    """Where the B-tree of dataset ``m`` of the file at ``path`` starts."""
    with h5py.File(path, "r") as f:
        fd = os.open(path, os.O_RDONLY)
        try:
            return btree._btree_address(fd, btree.header_address(f["m"]), os.fstat(fd).st_size)
        finally:
            os.close(fd)


def sorted_rows(table: np.ndarray) -> np.ndarray:
    return table[np.lexsort((table[:, 1], table[:, 0]))]


def make(path, libver="earliest", track_order=False, attrs=0, shape=(300, 200), chunks=(64, 64),
         fill="dense", userblock=0, seed=0):
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w", libver=libver, track_order=track_order, userblock_size=userblock) as f:
        d = f.create_dataset("m", shape=shape, chunks=chunks, dtype="f4", compression="gzip",
                             maxshape=(None, None), track_times=True)
        for k in range(attrs):  # enough to need header continuation blocks
            d.attrs[f"attribute {k}"] = np.arange(k)
        if fill == "dense":
            d[...] = rng.random(shape)
        elif fill == "sparse":
            d[0, 0], d[-1, -1] = 1, 2
    return path


@pytest.mark.parametrize("libver, track_order, attrs, shape, chunks, fill", list(itertools.product(
    ["earliest", "v108"], [False, True], [0, 40], [(300, 200), (5, 3)], [(64, 64), (7, 5)],
    ["dense", "sparse", "none"])))
def test_the_b_tree_lists_what_hdf5_lists(tmp_path, libver, track_order, attrs, shape, chunks, fill):
    path = make(tmp_path / "f.h5", libver, track_order, attrs, shape, chunks, fill)
    with h5py.File(path, "r") as f:
        table = btree.list_chunks(f["m"])
        assert table is not None  # version 1 and 2 object headers, layout version 3: read here
        np.testing.assert_array_equal(sorted_rows(table), hdf5_listing(f["m"]))
    with h5py.File(path, "r+") as f:  # chunks HDF5 still holds in its caches, from a grown dataset
        d = f["m"]
        d.resize((shape[0] + 70, shape[1]))
        d[-1, :] = 3
        d[0, :2] = 5
        storage.refresh(d)  # (what callers do first: HDF5 writes out its caches, B-tree nodes too)
        table = btree.list_chunks(d)
        np.testing.assert_array_equal(sorted_rows(table), hdf5_listing(d))


@pytest.mark.parametrize("libver, userblock", [("v110", 0), ("latest", 0), ("earliest", 512)])
def test_other_indexes_are_left_to_hdf5_and_read_the_same(tmp_path, libver, userblock):
    path = make(tmp_path / "f.h5", libver, userblock=userblock, shape=(300, 260), chunks=(8, 8))
    with h5py.File(path, "r") as f:
        assert btree.list_chunks(f["m"]) is None
        np.testing.assert_array_equal(sorted_rows(storage._listing(f["m"])), hdf5_listing(f["m"]))
        expected = f["m"][...]
    with h5py.File(path, "r") as f:  # through the index HDF5 listed
        assert storage.build_index(f["m"]) is not None
        np.testing.assert_array_equal(engine.read_block(f["m"], np.arange(300), np.arange(260)), expected)


def test_a_tree_of_several_levels(tmp_path):
    path = make(tmp_path / "f.h5", shape=(90, 100), chunks=(1, 1))  # 9,000 chunks: more than 64 x 64
    with h5py.File(path, "r") as f:
        d = f["m"]
        table = btree.list_chunks(d)
        np.testing.assert_array_equal(sorted_rows(table), hdf5_listing(d))
        assert table.shape[0] == 9000
    with open(path, "rb") as raw:
        raw.seek(root_address(path))
        assert raw.read(6)[5] >= 2  # the root's level


def test_the_header_address_is_the_one_hdf5_reports(tmp_path):
    path = make(tmp_path / "f.h5", fill="none")
    with h5py.File(path, "r") as f:
        assert btree.header_address(f["m"]) == h5py.h5o.get_info(f["m"].id).addr


def test_a_damaged_node_leaves_the_listing_to_hdf5(tmp_path):
    path = make(tmp_path / "f.h5", shape=(640, 640), chunks=(8, 8))
    with h5py.File(path, "r") as f:
        expected = hdf5_listing(f["m"])
    root = root_address(path)
    with open(path, "r+b") as raw:
        raw.seek(root)
        raw.write(b"EERT")
    with h5py.File(path, "r") as f:
        assert btree.list_chunks(f["m"]) is None
        assert expected.shape[0] == 6400


def test_a_listing_short_of_hdf5_s_count_is_not_used(tmp_path, monkeypatch):
    path = make(tmp_path / "f.h5")
    leaves = btree._leaves
    monkeypatch.setattr(btree, "_leaves", lambda *a: leaves(*a)[1:])
    with h5py.File(path, "r") as f:
        assert btree.list_chunks(f["m"]) is None
        np.testing.assert_array_equal(sorted_rows(storage._listing(f["m"])), hdf5_listing(f["m"]))


def test_the_listing_reads_the_file_hdf5_has_open_not_what_its_name_now_names(tmp_path):
    """The B-tree was read from the file's name: a file moved away and another made under its
    name (or a relative name after a change of directory) gave the other file's chunks."""
    path = make(tmp_path / "f.h5", shape=(64, 64), chunks=(8, 8), fill="sparse")
    with h5py.File(path, "r") as f:
        expected = hdf5_listing(f["m"])
        os.rename(path, tmp_path / "moved.h5")
        make(path, shape=(64, 64), chunks=(8, 8), fill="none")
        with h5py.File(path, "r+") as other:
            other["m"][-1, -1] = 9  # one chunk, at another place than the open file's first
        table = btree.list_chunks(f["m"])
        np.testing.assert_array_equal(sorted_rows(table), expected)


def test_a_version_2_header_continued_in_another_block(tmp_path):
    """Messages of a version 2 header's continuation blocks were read one byte off (the layout
    there was not found: the slow listing), seen with track_order, checksums and a few attributes."""
    path = tmp_path / "f.h5"
    with h5py.File(path, "w", libver="earliest") as f:
        d = f.create_dataset("m", shape=(5, 8), chunks=(64, 8), maxshape=(None, None), dtype="i1",
                             fletcher32=True, fillvalue=1, track_order=True)
        for k in range(3):
            d.attrs[f"attr{k}"] = np.arange(k)
        d[0, 0] = 1
    with h5py.File(path, "r") as f:
        table = btree.list_chunks(f["m"])
        assert table is not None
        np.testing.assert_array_equal(sorted_rows(table), hdf5_listing(f["m"]))


def test_a_b_tree_hdf5_itself_cannot_count_is_left_to_hdf5():
    """A file from a fault-injection campaign (seed 11, bytes of a B-tree changed): HDF5's own count
    of its chunks raised RuntimeError, which escaped the listing."""
    with h5py.File(Path(__file__).parent / "data" / "damaged_btree.h5", "r") as f:
        with pytest.raises(RuntimeError):
            f["m"].id.get_num_chunks()
        assert btree.list_chunks(f["m"]) is None


def test_a_chunk_position_past_every_signed_number_is_not_taken(tmp_path):
    """Positions were checked as signed numbers: a damaged key of 2**64 - 8 became -8, passed, and
    named chunk column -1 (another chunk's place in the index)."""
    path = make(tmp_path / "f.h5", shape=(64, 64), chunks=(8, 8))  # 64 chunks: the root is the only leaf
    with h5py.File(path, "r") as f:
        assert btree.list_chunks(f["m"]) is not None
    root = root_address(path)
    with open(path, "r+b") as raw:
        raw.seek(root)
        assert raw.read(6)[5] == 0  # (a leaf)
        raw.seek(root + 24 + 8 + 8)  # the first key's position along the columns
        raw.write((2**64 - 8).to_bytes(8, "little"))
    with h5py.File(path, "r") as f:
        assert btree.list_chunks(f["m"]) is None


def _earray_loom(path, written):
    """A Loom file written with libver='latest' whose matrix has one unlimited axis (HDF5's extensible-array
    chunk index), 16 x 16 chunks on a 16 x 16 grid (enough for the engine to list them), only the chunks
    ``written`` (chunk row, chunk column) stored."""
    rng = np.random.default_rng(4)
    m = np.zeros((256, 256), dtype=np.float32)
    for r, c in written:
        m[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = rng.random((16, 16)) * (rng.random((16, 16)) < 0.3)
    with h5py.File(path, "w", libver="latest") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        d = f.create_dataset("matrix", shape=m.shape, dtype=m.dtype, chunks=(16, 16), compression="gzip",
                             maxshape=(256, None))
        for r, c in written:
            d[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = m[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16]
        f.create_dataset("row_attrs/Gene", data=np.array([f"g{i}" for i in range(256)], dtype="S"))
        f.create_dataset("col_attrs/CellID", data=np.array([f"c{i}" for i in range(256)], dtype="S"))
        for g in ("layers", "row_graphs", "col_graphs"):
            f.create_group(g)
    return m


@pytest.mark.parametrize("written", [[(1, 0), (2, 0)], [(r, c) for r in range(16) for c in range(16)]])
def test_chunks_of_an_extensible_array_index_are_not_listed_by_hdf5(tmp_path, written):
    """HDF5 2.0 lists such chunks at the wrong positions (chunk (1, 0) as (0, 1)): with only chunks
    (1, 0) and (2, 0) written, a listing believed read them as the chunks to the right of (0, 0)."""
    import loompy

    path = tmp_path / "earray.loom"
    m = _earray_loom(path, written)
    with loompy.connect(path, "r") as ds:
        assert not btree.chunk_queries_trusted(ds._file["matrix"])
        np.testing.assert_array_equal(ds[:, :], m)
        np.testing.assert_array_equal(ds.sparse().toarray(), m)
        np.testing.assert_array_equal(ds[[70, 3, 200], :], m[[70, 3, 200]])
        np.testing.assert_allclose(ds.map([np.sum], axis=1)[0], m.sum(axis=0), rtol=1e-5)
        for _ix, selection, view in ds.scan(axis=0, batch_size=100):
            np.testing.assert_array_equal(view[:, :], m[selection])
    with loompy.connect(path) as ds:
        ds[60:140, 10:90] = np.full((80, 80), 7, dtype=np.float32)
        m[60:140, 10:90] = 7
        np.testing.assert_array_equal(ds[:, :], m)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["matrix"][()], m)
