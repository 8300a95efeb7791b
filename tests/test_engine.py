"""The chunk engine against numpy and plain h5py: fast path, fallbacks, unallocated chunks, direct writes."""

from __future__ import annotations

import importlib
import mmap
import os
import resource
import time
import zlib

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy
from loompy import engine

from .conftest import held_in_another_thread

RNG = np.random.default_rng(42)


def sparse_counts(shape, dtype, density=0.1):
    m = (RNG.random(shape) < density) * RNG.integers(1, 100, size=shape)
    return m.astype(dtype)


STORAGE = {
    "gzip2": {"chunks": (64, 64), "compression": "gzip", "compression_opts": 2},
    "gzip9-odd-chunks": {"chunks": (7, 33), "compression": "gzip", "compression_opts": 9},
    "uncompressed": {"chunks": (16, 64)},
    "shuffle": {"chunks": (64, 64), "compression": "gzip", "shuffle": True},
    "fletcher32": {"chunks": (64, 64), "fletcher32": True},
    "contiguous": {},
    "lzf": {"chunks": (32, 32), "compression": "lzf"},
}


@pytest.fixture(scope="module", params=sorted(STORAGE))
def stored(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("eng") / f"{request.param}.h5"
    m = sparse_counts((150, 211), np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("m", data=m, **STORAGE[request.param])
    f = h5py.File(path, "r")
    yield request.param, f["m"], m
    f.close()


def random_selection(length):
    kind = RNG.integers(0, 4)
    if kind == 0:
        return np.arange(length)
    if kind == 1:
        a = int(RNG.integers(0, length))
        return np.arange(a, min(length, a + int(RNG.integers(1, 90))))
    if kind == 2:
        return np.unique(RNG.integers(0, length, size=int(RNG.integers(1, 40))))
    return np.flatnonzero(RNG.random(length) < 0.3)


def test_read_block_equals_numpy(stored):
    name, dataset, m = stored
    expect_fast = name in ("gzip2", "gzip9-odd-chunks", "uncompressed")
    assert (engine.chunk_layout(dataset) is not None) == expect_fast
    for _ in range(30):
        rows, cols = random_selection(150), random_selection(211)
        np.testing.assert_array_equal(engine.read_block(dataset, rows, cols), m[np.ix_(rows, cols)])
    coo = engine.read_sparse(dataset, np.arange(150), np.arange(211))
    assert coo.dtype == np.float32
    np.testing.assert_array_equal(coo.toarray(), m)
    for rows, cols in [(np.arange(150), np.arange(211)), (random_selection(150), random_selection(211))]:
        seen = np.full((rows.size, cols.size), -1.0)
        numbers = []

        def keep(k, first, block, seen=seen, numbers=numbers):  # blocks are reused: copy them now
            numbers.append(k)
            seen[first:first + block.shape[0]] = block

        engine.each_row_block(dataset, rows, cols, keep)
        np.testing.assert_array_equal(seen, m[np.ix_(rows, cols)])
        assert sorted(numbers) == list(range(len(numbers)))


@pytest.mark.parametrize("dtype", ["int8", "uint16", "int32", "int64", "float16", "float64"])
def test_dtypes_round_trip_through_direct_writes(tmp_path, dtype):
    m = sparse_counts((130, 100), dtype)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype=dtype, chunks=(64, 64), compression="gzip",
                             compression_opts=2, maxshape=(130, None), fillvalue=0)
        engine.write_matrix(d, m if dtype == "float16" else sp.csr_matrix(m))  # scipy has no float16
        coo = engine.read_sparse(d, np.arange(130), np.arange(100))
        np.testing.assert_array_equal(coo.toarray(), m)
        np.testing.assert_array_equal(engine.read_block(d, np.arange(130), np.arange(100)), m)
    with h5py.File(tmp_path / "d.h5", "r") as f:  # plain h5py (HDF5's gzip filter) reads what we wrote
        np.testing.assert_array_equal(f["m"][...], m)


def test_zero_chunks_stay_unallocated_and_read_as_zero(tmp_path):
    m = np.zeros((200, 300), dtype=np.float32)
    m[5, 5] = 1.0  # only chunk (0, 0) holds data
    m[199, 299] = 2.0  # and the edge chunk (192, 256)
    with h5py.File(tmp_path / "z.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=0)
        engine.write_matrix(d, m)
        assert d.id.get_num_chunks() == 2
        assert d.id.get_chunk_info_by_coord((64, 64)).byte_offset is None
        np.testing.assert_array_equal(engine.read_block(d, np.arange(200), np.arange(300)), m)
    with h5py.File(tmp_path / "z.h5", "r") as f:
        np.testing.assert_array_equal(f["m"][...], m)


def test_unallocated_chunks_read_as_fill_value(tmp_path):
    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("m", shape=(100, 100), dtype="i4", chunks=(64, 64), compression="gzip", fillvalue=-7)
        d[0:10, 0:10] = 3
        f.flush()
        got = engine.read_block(d, np.arange(100), np.arange(100))
        expected = np.full((100, 100), -7, dtype=np.int32)
        expected[:10, :10] = 3
        np.testing.assert_array_equal(got, expected)


def test_overwriting_with_zeros_replaces_stored_chunks(tmp_path):
    m = sparse_counts((100, 100), np.float32, density=0.5)
    with h5py.File(tmp_path / "o.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=0)
        engine.write_matrix(d, m)
        engine.write_matrix(d, np.zeros_like(m))
        assert not engine.read_block(d, np.arange(100), np.arange(100)).any()
        assert not d[...].any()


def test_appends_at_unaligned_offsets(tmp_path):
    """add_columns appends at any column: partial chunks merge with what is stored."""
    parts = [sparse_counts((90, w), np.float32, density=0.3) for w in (50, 30, 100, 1, 64)]
    with h5py.File(tmp_path / "a.h5", "w") as f:
        d = f.create_dataset("m", shape=(90, 0), dtype="f4", chunks=(64, 64), compression="gzip",
                             maxshape=(90, None), fillvalue=0)
        offset = 0
        for p in parts:
            d.resize(offset + p.shape[1], axis=1)
            engine.write_matrix(d, sp.csc_matrix(p) if p.shape[1] % 2 else p, col_offset=offset)
            offset += p.shape[1]
        expected = np.hstack(parts)
        np.testing.assert_array_equal(engine.read_block(d, np.arange(90), np.arange(offset)), expected)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        np.testing.assert_array_equal(f["m"][...], expected)


def test_chunks_a_write_covers_in_part_are_merged_by_the_engine_strip_by_strip(tmp_path, monkeypatch):
    """The chunks a column write or a region write covers only in part are read, merged and stored by
    the engine (h5py rewrote them one zlib stream at a time: add_columns of 10 columns to 30,000 rows
    2.4x slower), a strip of rows at a time; the values around the write are kept."""
    from loompy.engine import write

    monkeypatch.setattr(write, "STRIP_BYTES", 64 * 64 * 4 * 2)  # (strips of 128 rows: 3 of them for 300)
    h5py_writes = []
    real_setitem = h5py.Dataset.__setitem__
    monkeypatch.setattr(h5py.Dataset, "__setitem__", lambda d, k, v: h5py_writes.append(k) or real_setitem(d, k, v))
    old = sparse_counts((300, 300), np.float32, density=0.3)
    with h5py.File(tmp_path / "e.h5", "w") as f:
        d = f.create_dataset("m", shape=old.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=0)
        engine.write_matrix(d, old)
        expected = old.copy()
        for offset, width, sparse in ((37, 100, False), (130, 20, True), (250, 50, False), (5, 3, True),
                                      (60, 10, False)):  # (the last across a chunk boundary, no whole chunk)
            new = sparse_counts((300, width), np.float32, density=0.5)
            engine.write_matrix(d, sp.csc_matrix(new) if sparse else new, col_offset=offset)
            expected[:, offset:offset + width] = new
            np.testing.assert_array_equal(engine.read_block(d, np.arange(300), np.arange(300)), expected)
        # regions: every side inside a chunk, or no whole chunk inside (rows or columns)
        regions = ((10, 290, 3, 299), (60, 70, 0, 300), (0, 300, 60, 70), (5, 9, 5, 9), (130, 300, 200, 300))
        for r0, r1, c0, c1 in regions:
            values = RNG.random((r1 - r0, c1 - c0)).astype(np.float32)
            engine.write_block(d, np.arange(r0, r1), np.arange(c0, c1), values)
            expected[r0:r1, c0:c1] = values
            np.testing.assert_array_equal(engine.read_block(d, np.arange(300), np.arange(300)), expected)
    assert h5py_writes == []
    with h5py.File(tmp_path / "e.h5", "r") as f:
        np.testing.assert_array_equal(f["m"][...], expected)


def test_write_block_then_read_sees_it(tmp_path):
    m = sparse_counts((100, 120), np.float64)
    with h5py.File(tmp_path / "w.h5", "w") as f:
        d = f.create_dataset("m", data=m, chunks=(64, 64), compression="gzip")
        rows, cols = np.array([0, 63, 64, 99]), np.array([1, 70, 119])
        values = RNG.random((4, 3))
        engine.write_block(d, rows, cols, values)
        m[np.ix_(rows, cols)] = values
        np.testing.assert_array_equal(engine.read_block(d, np.arange(100), np.arange(120)), m)


def test_copy_columns_copies_stored_chunks_when_layouts_match(tmp_path):
    m = sparse_counts((100, 150), np.float32, density=0.3)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        src = f.create_dataset("src", data=m, chunks=(64, 64), compression="gzip", compression_opts=2)
        dst = f.create_dataset("dst", shape=(100, 400), dtype="f4", chunks=(64, 64), compression="gzip",
                               compression_opts=2, fillvalue=0)
        other = f.create_dataset("other", shape=(100, 400), dtype="f4", chunks=(32, 64), compression="gzip")
        assert engine.copy_columns(src, other, 0) == (0, 0)  # chunk shapes differ
        assert engine.copy_columns(src, dst, 128) == (128, 256)  # the two whole chunk columns, as stored
        assert dst.id.read_direct_chunk((64, 128)) == src.id.read_direct_chunk((64, 0))
        np.testing.assert_array_equal(dst[:, 128:256], m[:, :128])
        assert not dst[:, :128].any() and not dst[:, 256:].any()


@pytest.mark.parametrize("offset, width, total, src_dtype, fill", [
    (10, 150, 400, np.float32, 0),      # unaligned: dst's chunks 64:128 and 128:192 cut from src's
    (32, 200, 232, np.int32, 0),        # reaching dst's end: its partial last chunk is src's alone
    (100, 20, 130, np.float32, 0),      # inside one chunk of dst: nothing whole to copy
    (64, 150, 214, np.int16, 7),        # aligned but another dtype and fill: re-encoded, not copied
    (5, 300, 305, np.float64, 0),       # float64 into float64, at the end
])
def test_copy_columns_reencodes_shifted_chunks(tmp_path, offset, width, total, src_dtype, fill):
    """Columns that do not line up with dst's chunks are cut from src's chunks, values exact, the
    unallocated ones of src read as its fill value, padding left zero, and the edges left alone."""
    m = sparse_counts((130, width), np.float64, density=0.2).astype(src_dtype)
    m[:, 64:128] = 0  # a whole chunk column of src never stored: it reads as src's fill value
    with h5py.File(tmp_path / "s.h5", "w") as f:
        src = f.create_dataset("src", shape=m.shape, maxshape=(None, None), dtype=src_dtype, chunks=(64, 64),
                               compression="gzip", fillvalue=fill)
        for c in range(0, width, 64):  # only chunks with a non-zero, their padding not zero (HDF5 allows it)
            for r in range(0, 130, 64):
                block = np.full((64, 64), 99, dtype=src_dtype)
                part = m[r:r + 64, c:c + 64]
                block[:part.shape[0], :part.shape[1]] = part
                if part.any():
                    src.id.write_direct_chunk((r, c), zlib.compress(block.tobytes()))
        expected_src = src[...]  # what src holds, as HDF5 reads it (fill value included)
        dst = f.create_dataset("dst", shape=(130, total), dtype="f8", chunks=(64, 64), compression="gzip",
                               compression_opts=2, fillvalue=0)
        a, b = engine.copy_columns(src, dst, offset)
        first = -(-offset // 64) * 64
        last = total if offset + width == total else (offset + width) // 64 * 64
        assert (a, b) == ((first, last) if first < last else (offset, offset))
        got = dst[...]
        np.testing.assert_array_equal(got[:, a:b], expected_src[:, a - offset:b - offset].astype("f8"))
        assert not got[:, :a].any() and not got[:, b:].any()  # edges are the caller's
        if b == total and total % 64:  # the padding of dst's last chunk column stays zero
            mask, raw = dst.id.read_direct_chunk((128, (total - 1) // 64 * 64))
            chunk = np.frombuffer(zlib.decompress(raw), "f8").reshape(64, 64)
            assert not chunk[:, total % 64:].any() and not chunk[130 - 128:, :].any()


def test_aligned_write_block_stores_chunks_directly(tmp_path):
    """A chunk-aligned rectangle (here reaching the bottom edge) is stored as whole chunks, zero chunks included."""
    m = sparse_counts((150, 200), np.float32, density=0.5)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        d = f.create_dataset("m", data=m, chunks=(64, 64), compression="gzip", compression_opts=2)
        rows, cols = np.arange(64, 150), np.arange(64, 192)
        values = sparse_counts((86, 128), np.float32, density=0.5)
        values[:, :64] = 0  # over stored chunks: the zeros must replace them, not leave old values
        engine.write_block(d, rows, cols, values)
        m[np.ix_(rows, cols)] = values
        np.testing.assert_array_equal(engine.read_block(d, np.arange(150), np.arange(200)), m)
        assert d.id.get_chunk_info_by_coord((64, 64)).size > 0
    with h5py.File(tmp_path / "d.h5", "r") as f:  # plain HDF5 gzip filter reads what the engine wrote
        np.testing.assert_array_equal(f["m"][...], m)


@pytest.mark.parametrize("seed", range(6))
def test_unaligned_regions_store_whole_chunks_inside_and_merge_the_strips_around(tmp_path, monkeypatch, seed):
    """A rectangle at any offset: the whole chunks inside it go through the engine (one region),
    then the chunks of the strips around it, merged with what they hold; numpy and plain HDF5 agree."""
    write_module = importlib.import_module("loompy.engine.write")
    rng = np.random.default_rng(seed)
    m = sparse_counts((200, 260), np.float32, density=0.3)
    r0, c0 = int(rng.integers(0, 120)), int(rng.integers(0, 150))
    r1, c1 = int(rng.integers(r0 + 1, 201)), int(rng.integers(c0 + 1, 261))
    values = sparse_counts((r1 - r0, c1 - c0), np.float32, density=0.5)
    regions = []
    real = write_module.store_region
    monkeypatch.setattr(write_module, "store_region", lambda d, layout, *args, **kw: (regions.append(args[:4]),
                                                                                      real(d, layout, *args, **kw)))
    with h5py.File(tmp_path / "d.h5", "w") as f:
        d = f.create_dataset("m", data=m, chunks=(64, 64), compression="gzip", compression_opts=2)
        engine.write_block(d, np.arange(r0, r1), np.arange(c0, c1), values)
        m[r0:r1, c0:c1] = values
        np.testing.assert_array_equal(engine.read_block(d, np.arange(200), np.arange(260)), m)
    with h5py.File(tmp_path / "d.h5", "r") as f:
        np.testing.assert_array_equal(f["m"][...], m)
    a0, b0 = -(-r0 // 64) * 64, -(-c0 // 64) * 64
    a1, b1 = (r1 if r1 == 200 else r1 // 64 * 64), (c1 if c1 == 260 else c1 // 64 * 64)
    core = [(a0, b0, a1 - a0, b1 - b0)] if a0 < a1 and b0 < b1 else []
    assert regions[:len(core)] == core  # (then the chunks around it, merged and stored whole too)
    assert all(top % 64 == 0 and left % 64 == 0 for top, left, _, _ in regions) and len(regions) <= len(core) + 4


def test_negative_zero_chunks_are_stored(tmp_path):
    """A chunk holding only -0.0 is not 'all zero': its sign bits must survive."""
    m = np.zeros((70, 130), dtype=np.float32)
    m[3, 5] = -0.0
    m[69, 129] = -0.0  # in the partial corner chunk
    with h5py.File(tmp_path / "z.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=0)
        engine.write_matrix(d, m)
        assert d.id.get_num_chunks() == 2
    with h5py.File(tmp_path / "z.h5", "r") as f:
        back = f["m"][...]
    np.testing.assert_array_equal(np.signbit(back), np.signbit(m))


@pytest.mark.parametrize("chunks", [(64, 64), (7, 33), (100, 1)])
def test_sparse_input_is_scattered_into_chunks_like_toarray(tmp_path, chunks):
    """Sparse input skips the dense strip: entries land in their chunks, duplicates add up as in toarray()."""
    rows = np.array([0, 0, 99, 50, 50, 13, 98])
    cols = np.array([0, 0, 120, 64, 64, 7, 3])
    vals = np.array([1, 2, 3, 4, -5, -0.0, 7], dtype=np.float64)
    m = sp.coo_matrix((vals, (rows, cols)), shape=(100, 121))
    with h5py.File(tmp_path / "s.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=chunks, compression="gzip", fillvalue=0)
        engine.write_matrix(d, m)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        back = f["m"][...]
    expected = m.toarray().astype(np.float32)
    np.testing.assert_array_equal(back, expected)
    assert back[0, 0] == 3 and back[50, 64] == -1 and np.signbit(back[13, 7])


def test_sparse_csc_input_with_duplicates_is_summed_and_left_as_given(tmp_path):
    """A CSC matrix with unsorted and repeated row indices: stored as toarray() gives, and the
    caller's arrays (which the engine shares while writing) are not sorted or summed in place."""
    indptr = np.array([0, 3, 3, 6] + [6] * 130)
    indices = np.array([70, 2, 70, 5, 1, 5], dtype=np.int32)
    data = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=np.float32)
    m = sp.csc_matrix((data, indices, indptr), shape=(80, 133))
    assert not m.has_canonical_format
    given = [a.copy() for a in (m.data, m.indices, m.indptr)]
    with h5py.File(tmp_path / "d.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=0)
        engine.write_matrix(d, m)
        back = d[...]
    np.testing.assert_array_equal(back, m.toarray())
    assert back[70, 0] == 4 and back[5, 2] == 10
    for before, after in zip(given, (m.data, m.indices, m.indptr)):
        np.testing.assert_array_equal(before, after)


def test_read_block_into_a_strided_view_of_another_dtype(stored):
    """combine reads each input straight into its columns of the output strip."""
    name, dataset, m = stored
    out = np.full((150, 300), -1.0)
    rows, cols = np.arange(150), np.array([0, 1, 2, 100, 210])
    engine.read_block(dataset, rows, cols, out=out[:, 50:55])
    np.testing.assert_array_equal(out[:, 50:55], m[:, cols])
    assert (out[:, :50] == -1).all() and (out[:, 55:] == -1).all()
    engine.read_block(dataset, rows, np.arange(211), out=out[:, 10:221])
    np.testing.assert_array_equal(out[:, 10:221], m)


def _many_chunk_file(path, userblock=0, maxshape=None):
    """A 300 x 700 matrix in 16 x 16 chunks: some never written (fill 7), some stored uncompressed."""
    m = sparse_counts((300, 700), np.float32, density=0.2)
    m[:, 208:288] = 7  # the fill value: these chunks are left unallocated below
    with h5py.File(path, "w", userblock_size=userblock) as f:
        d = f.create_dataset("m", shape=m.shape, dtype=np.float32, chunks=(16, 16), compression="gzip",
                             compression_opts=2, fillvalue=7, maxshape=maxshape)
        for r in range(0, 300, 16):
            for c in range(0, 700, 16):
                if 208 <= c < 288:
                    continue
                tile = np.zeros((16, 16), np.float32)
                part = m[r:r + 16, c:c + 16]
                tile[:part.shape[0], :part.shape[1]] = part
                if (r // 16 + c // 16) % 5 == 0:  # deflate skipped: filter mask bit 0
                    d.id.write_direct_chunk((r, c), tile.tobytes(), filter_mask=1)
                else:
                    d[r:r + 16, c:c + 16] = part
    return m


@pytest.mark.parametrize("userblock", [0, 1024])
@pytest.mark.parametrize("how", ["index", "no index", "r+"])
def test_reads_through_each_path_equal_numpy(tmp_path, monkeypatch, how, userblock):
    """Chunks read by workers with pread (index), by this thread with HDF5 (no index), and in a writable file."""
    from loompy.engine import storage

    path = tmp_path / "many.h5"
    m = _many_chunk_file(path, userblock)
    if how == "index":
        monkeypatch.setattr(storage, "INDEX_SHARE", 10**9)  # build at the first parallel read
    if how == "no index":
        monkeypatch.setattr(storage, "build_index", lambda dataset: None)
    built = []
    real_build = storage.build_index
    monkeypatch.setattr(storage, "build_index", lambda d: built.append(real_build(d)) or built[-1])
    with h5py.File(path, "r+" if how == "r+" else "r") as f:
        d = f["m"]
        selections = [(np.arange(300), np.arange(700)), (np.array([5]), np.arange(700)),
                      (np.arange(300), np.array([699])), (np.arange(17, 290), np.arange(3, 650))]
        selections += [(random_selection(300), random_selection(700)) for _ in range(25)]
        # narrow runs of columns: whole chunk rows are stacked into one unit (see the test below)
        selections += [(np.arange(300), np.arange(20, 90)), (np.r_[0:100, 140:300], np.arange(200, 300)),
                       (np.arange(16, 300), np.arange(64, 128)), (np.r_[0:32, 64:300], np.arange(600, 700))]
        for rows, cols in selections:
            np.testing.assert_array_equal(engine.read_block(d, rows, cols), m[np.ix_(rows, cols)])
        out = np.full((300, 710), -1.0)
        engine.read_block(d, np.arange(300), np.arange(700), out=out[:, 5:705])
        np.testing.assert_array_equal(out[:, 5:705], m)
        assert (out[:, :5] == -1).all() and (out[:, 705:] == -1).all()
        coo = engine.read_sparse(d, np.arange(300), np.arange(700))
        np.testing.assert_array_equal(coo.toarray(), m)
        assert coo.nnz == np.count_nonzero(m) and (np.diff(coo.row) >= 0).all()  # row-major, no repeats
    if how != "no index":
        assert len(built) == 1 and built[0] is not None  # built once, then kept


def test_units_stay_below_the_largest_size(tmp_path, monkeypatch):
    """Wide reads split each chunk row into units of at most LARGEST_UNIT chunks; narrow ones stack
    whole chunk rows up to it."""
    from loompy.engine import read as engine_read

    monkeypatch.setattr(engine_read, "LARGEST_UNIT", 10)
    monkeypatch.setattr(engine_read, "UNIT_CHUNKS", 4)
    path = tmp_path / "many.h5"
    m = _many_chunk_file(path)
    with h5py.File(path, "r") as f:
        d = f["m"]
        layout = engine.storage.chunk_layout(d)
        for rows, cols in [(np.arange(300), np.arange(700)), (np.arange(5, 290), np.arange(33, 690)),
                           (np.arange(300), np.arange(16, 48))]:
            for whole_rows in (False, True):
                read = engine_read._ChunkRead(d, layout, rows, cols, whole_rows=whole_rows)
                assert max(u.stacked * (u.stop - u.first) for u in read.units) <= 10
            np.testing.assert_array_equal(engine.read_block(d, rows, cols), m[np.ix_(rows, cols)])
            # sparse() completes a chunk row from several units on one worker before taking its entries
            coo = engine.read_sparse(d, rows, cols)
            np.testing.assert_array_equal(coo.toarray(), m[np.ix_(rows, cols)])
            assert (np.diff(coo.row) >= 0).all() and (np.diff(coo.row * 10**6 + coo.col) > 0).all()
        assert [u.stacked for u in read.units] == [5, 5, 5, 3, 1]  # 2 chunk columns: 5 whole chunk rows a unit


def test_narrow_reads_stack_whole_chunk_rows(tmp_path):
    """A read a few chunks wide groups whole chunk rows into one unit; partial ones stay alone."""
    from loompy.engine import read as engine_read

    path = tmp_path / "many.h5"
    m = _many_chunk_file(path)
    with h5py.File(path, "r") as f:
        d = f["m"]
        rows, cols = np.r_[3:100, 112:300], np.arange(20, 90)  # chunk rows 0 and 6 only partly wanted
        read = engine_read._ChunkRead(d, engine.storage.chunk_layout(d), rows, cols)
        stacked = [(u.chunk_row, u.stacked) for u in read.units]
        assert stacked == [(0, 1), (1, 5), (6, 1), (7, 11), (18, 1)]  # the last chunk row is 12 rows of 16
        one_column = engine_read._ChunkRead(d, engine.storage.chunk_layout(d), rows, np.array([37]))
        assert [(u.chunk_row, u.stacked) for u in one_column.units] == stacked  # stacked as wider reads
        np.testing.assert_array_equal(engine.read_block(d, rows, np.array([37])), m[rows][:, [37]])
        out = np.zeros((rows.size, cols.size + 3), np.float64)
        engine.read_block(d, rows, cols, out=out[:, 2:-1])
        np.testing.assert_array_equal(out[:, 2:-1], m[np.ix_(rows, cols)])
        assert (out[:, :2] == 0).all() and (out[:, -1] == 0).all()


def test_writes_drop_the_chunk_index_of_a_writable_file(tmp_path, monkeypatch):
    """Overwriting moves chunks in the file; reads after a write must not use the old offsets."""
    from loompy.engine import storage

    path = tmp_path / "w.h5"
    m = _many_chunk_file(path, maxshape=(300, None))
    built = []
    real_build = storage.build_index
    monkeypatch.setattr(storage, "build_index", lambda d: built.append(real_build(d)) or built[-1])
    rng = np.random.default_rng(5)
    with h5py.File(path, "r+") as f:
        d = f["m"]
        everything = (np.arange(300), np.arange(700))
        np.testing.assert_array_equal(engine.read_block(d, *everything), m)
        np.testing.assert_array_equal(engine.read_block(d, *everything), m)
        assert len(built) == 1
        for step in range(3):
            # denser values compress worse: the rewritten chunks no longer fit where they were
            rows, cols = np.arange(16 * step, 16 * step + 160), np.arange(32, 640)
            values = rng.integers(0, 10**6, size=(rows.size, cols.size)).astype(np.float32)
            engine.write_block(d, rows, cols, values)
            m[np.ix_(rows, cols)] = values
            np.testing.assert_array_equal(engine.read_block(d, *everything), m)
            np.testing.assert_array_equal(engine.read_sparse(d, *everything).toarray(), m)
        d.resize((300, 760))
        engine.forget(d)
        engine.write_block(d, np.arange(300), np.arange(700, 760), np.ones((300, 60), np.float32))
        grown = np.concatenate([m, np.ones((300, 60), np.float32)], axis=1)
        np.testing.assert_array_equal(engine.read_block(d, np.arange(300), np.arange(760)), grown)
    assert len(built) >= 4  # rebuilt after every write


def test_a_file_replaced_on_disk_is_still_read_through_the_open_handle(tmp_path, monkeypatch):
    """The chunk index reads by path; once the path names another file, reads go through HDF5 again."""
    from loompy.engine import storage

    monkeypatch.setattr(storage, "INDEX_SHARE", 10**9)  # index at the first parallel read
    path, other = tmp_path / "a.h5", tmp_path / "b.h5"
    m = _many_chunk_file(path)
    replacement = _many_chunk_file(other)
    assert not np.array_equal(m, replacement)
    everything = (np.arange(300), np.arange(700))
    with h5py.File(path, "r") as f:
        d = f["m"]
        np.testing.assert_array_equal(engine.read_block(d, *everything), m)
        assert storage.chunk_index(d, 0) is not None
        os.replace(other, path)
        np.testing.assert_array_equal(engine.read_block(d, *everything), m)
        np.testing.assert_array_equal(engine.read_sparse(d, *everything).toarray(), m)


def test_closing_a_connection_drops_its_chunk_indexes(tmp_path):
    import loompy
    from loompy.engine import storage

    m = sparse_counts((300, 700), np.float32, density=0.2)
    path = tmp_path / "c.loom"
    loompy.create(str(path), m, {"Gene": np.arange(300)}, {"Cell": np.arange(700)}, chunks=(16, 16)).close()
    ds = loompy.connect(str(path), "r")
    number = ds._file.id.fileno
    np.testing.assert_array_equal(ds[:, :], m)
    assert any(key[0] == number and index is not None for key, index in storage._cache.items())
    ds.close()
    assert not any(key[0] == number for key in storage._cache)


def test_sparse_parts_are_collected_in_order_whatever_order_they_finish_in():
    from loompy.engine.read import _Collector

    rng = np.random.default_rng(3)
    parts = [tuple(rng.integers(0, 1000, size=n).astype(t) for t in (np.int32, np.int32, np.float32))
             for n in rng.integers(0, 40000, size=12)]  # 12 parts, more in all than the first allocation
    collector = _Collector(np.int32, np.dtype(np.float32))
    for k in rng.permutation(len(parts)):
        collector.add(int(k), parts[k])
    for got, k in zip(collector.result(), range(3)):
        np.testing.assert_array_equal(got, np.concatenate([p[k] for p in parts]))


def test_a_failing_write_task_stops_the_write_and_raises(tmp_path, monkeypatch):
    """The error of a task run on a worker reaches the caller, and the write stops there."""
    from loompy.engine import write

    monkeypatch.setattr(write, "TASK_BYTES", 64 * 64 * 4)  # one chunk column per task
    calls = []

    def produce(a, b):
        calls.append(a)
        if a == 64 * 3:
            raise ValueError("input broken at column 192")
        return np.ones((64, b - a), np.float32)

    with h5py.File(tmp_path / "f.h5", "w") as f:
        d = f.create_dataset("m", shape=(64, 64 * 40), dtype="f4", chunks=(64, 64), compression="gzip")
        with pytest.raises(ValueError, match="column 192"):
            engine.write_columns(d, 0, 64 * 40, produce)
    assert len(calls) <= 4 + write.QUEUED_TASKS + write.THREADS < 40  # no more tasks after the failure


def test_run_in_order_consumes_in_order_with_bounded_lookahead():
    """Tasks finishing out of order are consumed in order, on this thread, never more than
    ``ahead`` results (plus the one this thread runs) waiting; tasks run as workers."""
    import random
    import threading
    import time

    from loompy.engine import workers

    rng = random.Random(5)
    delays = [rng.random() * 0.004 for _ in range(60)]
    consumed, lead, threads, flags = [], [], set(), []
    caller = threading.get_ident()

    def task(k):
        lead.append(k - len(consumed))  # how far ahead of what was consumed this task starts
        threads.add(threading.get_ident())
        flags.append(workers.on_worker())
        time.sleep(delays[k] if k < 30 else 0)  # the last ones quick: the helper could race ahead
        return k * k

    def consume(value):
        assert threading.get_ident() == caller
        consumed.append(value)
        time.sleep(0.002 if value >= 30 * 30 else 0)

    workers.run_in_order([lambda k=k: task(k) for k in range(60)], consume, ahead=3)
    assert consumed == [k * k for k in range(60)]
    assert max(lead) <= 4 and len(threads) == workers.THREADS and all(flags)
    assert not workers.on_worker()


@pytest.mark.parametrize("where", ["task", "consume"])
def test_run_in_order_stops_at_the_first_failure(where):
    import threading
    import time

    from loompy.engine import workers

    before = threading.active_count()
    ran = []

    def task(k):
        ran.append(k)
        time.sleep(0.001)
        if where == "task" and k == 5:
            raise KeyError("task 5")
        return k

    def consume(value):
        if where == "consume" and value == 5:
            raise KeyError("consuming 5")

    with pytest.raises(KeyError, match="5"):
        workers.run_in_order([lambda k=k: task(k) for k in range(100)], consume, ahead=2)
    assert max(ran) < 12 and threading.active_count() == before  # helpers stopped and joined
    assert not workers.on_worker()


def test_groups_split_any_sorted_selection_by_chunk():
    """Runs take an arithmetic shortcut; every selection must still split exactly by chunk."""
    rng = np.random.default_rng(11)
    for _ in range(300):
        size = int(rng.integers(1, 70))
        if rng.random() < 0.5:
            start = int(rng.integers(0, 300))
            indices = np.arange(start, start + int(rng.integers(1, 400)))
        else:
            indices = np.unique(rng.integers(0, 700, size=int(rng.integers(1, 200))))
        covered = []
        for chunk, positions, local in engine.storage.groups(indices, size):
            part = indices[positions]
            assert (part // size == chunk).all()
            np.testing.assert_array_equal(np.arange(size)[local], part - chunk * size)
            covered += range(positions.start, positions.stop)
        assert covered == list(range(indices.size))


def _damaged_copies(tmp_path):
    """A Loom file, and copies of it: one with a chunk's bytes overwritten, one whose superblock says
    it ends before its last chunk (as after a disk filled up mid-write), one cut short."""
    import struct

    import loompy

    m = (RNG.random((300, 300)) < 0.3).astype(np.float32)
    good = tmp_path / "good.loom"
    loompy.create(good, m, {}, {}).close()
    with h5py.File(good, "r") as f:
        d = f["matrix"]
        infos = [d.id.get_chunk_info(i) for i in range(d.id.get_num_chunks())]
    last = max(infos, key=lambda info: info.byte_offset)
    hit = next(info for info in infos if info.chunk_offset == last.chunk_offset)  # the same chunk, damaged
    data = good.read_bytes()
    assert data[8] == 0  # superblock version 0: the end-of-file address is bytes 40-47
    garbled = bytearray(data)
    garbled[hit.byte_offset + 10:hit.byte_offset + 50] = b"\xff" * 40
    short_eoa = bytearray(data)
    short_eoa[40:48] = struct.pack("<Q", last.byte_offset + 1)
    copies = {"garbled": bytes(garbled), "short_eoa": bytes(short_eoa), "cut": data[:last.byte_offset + 5]}
    for name, content in copies.items():
        (tmp_path / f"{name}.loom").write_bytes(content)
    return last.chunk_offset, {name: tmp_path / f"{name}.loom" for name in copies}


def test_a_damaged_chunk_is_an_error_never_zeros(tmp_path):
    """Chunks that exist but cannot be read (garbled bytes, beyond the end HDF5 recorded) raise
    LoomFileError naming the file, on every read path; they never read as the fill value."""
    import loompy

    (r, c), paths = _damaged_copies(tmp_path)
    for name in ("garbled", "short_eoa"):
        with loompy.connect(paths[name], "r") as ds:
            for read in (lambda: ds[:, :], lambda: ds[:, c], lambda: ds[[0, r], :], lambda: ds.sparse(),
                         lambda: ds.map([np.sum], axis=1), lambda: [v for _, _, v in ds.scan(axis=0)]):
                with pytest.raises(loompy.LoomFileError, match=f"{name}.loom.*(damaged|cannot be read)"):
                    read()
        with pytest.raises(loompy.LoomFileError, match=f"{name}.loom.*(damaged|cannot be read)"):
            loompy.combine([paths[name], paths[name]], tmp_path / f"{name}-twice.loom")
    with pytest.raises(loompy.LoomFileError, match="cut.loom: the file is shorter than HDF5 recorded"):
        loompy.connect(paths["cut"], "r")


@pytest.mark.parametrize("children", [False, True])
def test_zeros_written_under_a_negative_zero_fill_keep_their_sign(tmp_path, monkeypatch, children):
    """-0.0 equals 0, but an all-(+0.0) chunk left unwritten would read back as a -0.0 fill: such
    chunks are stored (direct writes, and permute's re-encoding in child processes)."""
    import importlib

    import loompy

    monkeypatch.setattr(importlib.import_module("loompy.engine.processes"), "MIN_CHUNKS", 0 if children else 10 ** 12)
    m = np.zeros((130, 200), np.float32)
    m[5, 7] = 1
    with h5py.File(tmp_path / "z.h5", "w") as f:
        d = f.create_dataset("m", shape=m.shape, dtype="f4", chunks=(64, 64), compression="gzip", fillvalue=-0.0)
        engine.write_matrix(d, m)
        assert not np.signbit(d[...]).any()
    path = tmp_path / "z.loom"
    loompy.create(path, m, {}, {}).close()
    with h5py.File(path, "r+") as f:  # the same matrix, stored under a -0.0 fill value
        del f["matrix"]
        f.create_dataset("matrix", data=m, chunks=(64, 64), compression="gzip", maxshape=(130, None), fillvalue=-0.0)
    with loompy.connect(path) as ds:
        ds.permute(np.arange(200)[::-1], axis=1)
    with h5py.File(path, "r") as f:
        got = f["matrix"][...]
    np.testing.assert_array_equal(got, m[:, ::-1])
    assert not np.signbit(got).any()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/transparent_hugepage") or not os.path.exists("/proc/self/smaps")
                    or importlib.import_module("loompy.engine.memory")._advise() is None,
                    reason="no transparent huge pages here (or no way to see or change a mapping's flags)")
def test_large_fresh_arrays_are_kept_out_of_huge_pages():
    """Huge pages cost a compaction each where memory is fragmented: large arrays the engine makes
    are marked (madvise MADV_NOHUGEPAGE, 'nh' in /proc/self/smaps); small ones are left alone."""
    from loompy.engine import memory

    def flags(array):
        address, found = array.ctypes.data + array.nbytes // 2, None
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split()[0]
                if "-" in head and all(c in "0123456789abcdef-" for c in head):
                    low, high = (int(x, 16) for x in head.split("-"))
                    found = low <= address < high
                elif found and line.startswith("VmFlags:"):
                    return line.split()[1:]
        return None

    large = memory.fresh((9000, 8000), np.float32)  # 288 MB (never touched whole: pages come as written)
    before = memory.fresh(1000, np.float64)
    large[::1000] = 1
    assert large.shape == (9000, 8000) and large.dtype == np.float32 and (large[::1000] == 1).all()
    if flags(large) is None:
        pytest.skip("/proc/self/smaps shows no VmFlags here")
    assert "nh" in flags(large)
    assert "nh" not in flags(before)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(importlib.import_module("loompy.engine.memory")._advise() is None,
                    reason="no madvise here")
def test_populating_faults_pages_in_ahead_and_keeps_what_they_hold():
    from loompy.engine import memory

    def new_small_pages():  # 64 MB: always a mapping of its own (glibc maps anything over 32 MB apart)
        array = np.empty(16 << 20, np.float32)
        first = -(-array.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE
        memory._advise()(first, array.nbytes - mmap.PAGESIZE, mmap.MADV_NOHUGEPAGE)
        return array

    pages = (64 << 20) // mmap.PAGESIZE
    plain = new_small_pages()
    before = _minor_faults()
    plain[:] = 1
    assert _minor_faults() - before > pages // 2  # (the count this test relies on: a fault per page)
    ahead = new_small_pages()
    if not memory.populate(ahead):
        pytest.skip("this kernel cannot fault pages in ahead (MADV_POPULATE_WRITE: Linux 5.14)")
    before = _minor_faults()
    ahead[:] = 1
    assert _minor_faults() - before < pages // 20
    values = np.arange(3_000_000, dtype=np.float64)
    assert memory.populate(values[12_345:2_000_001])  # (pages already there, an odd start and end)
    assert not memory.populate(values[::2])  # (not contiguous: left alone)
    np.testing.assert_array_equal(values, np.arange(3_000_000, dtype=np.float64))


@pytest.mark.parametrize("how", ["index", "no index"])
def test_a_large_new_result_is_faulted_in_a_band_at_a_time_as_it_is_read(tmp_path, monkeypatch, how):
    from loompy.engine import memory, read, storage

    path = tmp_path / "many.h5"
    m = _many_chunk_file(path)
    if how == "index":
        monkeypatch.setattr(storage, "INDEX_SHARE", 10**9)
    else:
        monkeypatch.setattr(storage, "build_index", lambda dataset: None)
    monkeypatch.setattr(read, "POPULATE_FROM", 0)
    bands = []
    monkeypatch.setattr(memory, "populate", lambda array: bands.append((array.ctypes.data, array.nbytes)) or True)
    with h5py.File(path, "r") as f:
        for rows, cols in [(np.arange(300), np.arange(700)), (np.arange(5, 290, 2), np.arange(30, 650)),
                           (np.arange(300), np.arange(17, 150))]:
            bands.clear()
            got = engine.read_block(f["m"], rows, cols)
            np.testing.assert_array_equal(got, m[np.ix_(rows, cols)])
            # every band of rows once, and together the whole result
            assert len(set(bands)) == len(bands) and sum(n for _, n in bands) == got.nbytes
            assert sorted(a for a, _ in bands)[0] == got.ctypes.data
        bands.clear()
        out = np.zeros((300, 700), np.float32)  # (a result the caller gave: not new, left as it is)
        engine.read_block(f["m"], np.arange(300), np.arange(700), out=out)
        np.testing.assert_array_equal(out, m)
        assert bands == []


def test_reads_beside_writes_from_another_thread_are_sound(tmp_path):
    """A read through the chunk index while another thread wrote to the same layer took chunks
    from where the writes had moved them: "the file is damaged" (8 reads of 8), or worse. Reads
    and writes of one dataset now take turns (storage.reading, storage.writing)."""
    import threading

    rng = np.random.default_rng(3)
    base = (rng.random((1280, 1280)) < 0.1).astype(np.float32)
    path = tmp_path / "rw.loom"
    loompy.create(path, base, {"g": np.arange(1280)}, {"c": np.arange(1280)}).close()
    written, stop, problems = {}, threading.Event(), []
    with loompy.connect(path) as ds:
        def writer():
            k = 0
            while not stop.is_set():  # random values compress worse than the sparse base: chunks move
                k += 1
                block = np.random.default_rng(k).random((64, 64)).astype(np.float32)
                block[0, 0] = 1000 + k  # (which write left a chunk)
                written[1000 + k] = block
                r, c = (k * 7) % 20 * 64, (k * 11) % 20 * 64
                ds[r:r + 64, c:c + 64] = block

        def peeker():  # another part of the program opens the file and closes it (HDF5 shares it)
            while not stop.is_set():
                loompy.connect(path, "r").close()

        threads = [threading.Thread(target=writer), threading.Thread(target=peeker)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(6):
                try:
                    whole, sums = ds[:, :], ds.map([np.sum], axis=1)[0]
                except loompy.LoomError as error:
                    problems.append(str(error))
                    continue
                for r in range(0, 1280, 64):
                    for c in range(0, 1280, 64):  # each chunk as the base or one write left it
                        block = whole[r:r + 64, c:c + 64]
                        if not (np.array_equal(block, base[r:r + 64, c:c + 64])
                                or np.array_equal(block, written.get(float(block[0, 0]), ()))):
                            problems.append((r, c))
                assert sums.shape == (1280,) and np.isfinite(sums).all()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
    assert not problems and len(written) > 10, (problems[:3], len(written))


def test_a_reader_s_helper_threads_get_in_while_a_writer_waits(tmp_path):
    """A thread holding a read whose helpers read the same layer, while another thread waits to
    write: the helpers queued behind the waiting writer, the writer behind the holder, the holder
    behind its helpers. Reads no longer wait for writers that only wait."""
    import faulthandler
    import threading

    from loompy.engine import storage

    path = tmp_path / "h.loom"
    loompy.create(path, np.ones((300, 300), np.float32), {"g": np.arange(300)}, {"c": np.arange(300)}).close()
    with loompy.connect(path) as ds:
        dataset = ds.layers[""]._dataset
        wrote = threading.Event()

        def writer():
            ds[0:64, 0:64] = np.zeros((64, 64), np.float32)
            wrote.set()

        faulthandler.dump_traceback_later(60, exit=True)  # (a hang fails the run with every stack)
        try:
            with storage.reading(dataset):
                threading.Thread(target=writer, daemon=True).start()
                time.sleep(0.2)  # the writer waits for this read now
                assert not wrote.is_set()
                helper = threading.Thread(target=lambda: engine.read_block(dataset, np.arange(10), np.arange(10)))
                helper.start()
                helper.join(20)
                assert not helper.is_alive()
            assert wrote.wait(20)
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert ds[0, 0] == 0 and ds[0, 64] == 1


def test_combine_reads_its_inputs_while_no_other_thread_writes_them(tmp_path):
    """combine's reads of an input run on the engine's workers, which take no turn of their own:
    another thread rewriting that input (through its own connection) moved its chunks under
    them ("the file is damaged", 6 of 10 combines). The input's held index now holds its turn."""
    import threading

    n, m = 1024, 2048
    versions = [np.round(sp.random(n, m, density=d, random_state=s, dtype=np.float32).toarray() * 100)
                for s, d in ((1, 0.02), (2, 0.3))]
    a, b = tmp_path / "a.loom", tmp_path / "b.loom"
    for path in (a, b):
        loompy.create(path, versions[0], {"g": np.arange(n)}, {"c": np.arange(m)}).close()
    stop, ready, problems, writes = threading.Event(), threading.Event(), [], []

    def writer():
        with loompy.connect(a) as ds:  # (open for writing before combine opens it to read: HDF5's order)
            ready.set()
            k = 0
            while not stop.is_set():
                k ^= 1
                ds[:, :] = versions[k]
                writes.append(k)

    thread = threading.Thread(target=writer)
    thread.start()
    assert ready.wait(30)
    try:
        for _ in range(5):
            try:
                loompy.combine_faster([a, b], tmp_path / "out.loom", selections=[np.arange(m) % 2 == 0, None])
            except loompy.LoomError as error:
                problems.append(str(error))
                continue
            with loompy.connect(tmp_path / "out.loom", "r") as out:
                half = out[:, :m // 2]
            if not any(np.array_equal(half, v[:, ::2]) for v in versions):  # (one write or the other, whole)
                problems.append("values from neither version")
    finally:
        stop.set()
        thread.join()
    assert not problems and len(writes) > 2, (problems[:2], len(writes))


def test_a_kept_chunk_index_is_rebuilt_after_h5py_moved_chunks_of_an_open_file(tmp_path):
    """The index kept between reads only went with loompy's own writes: a chunk rewritten through
    h5py on the same open file (moved, being larger) read as its old values (4096 cells wrong)."""
    path = tmp_path / "a.loom"
    values = np.zeros((512, 512), np.float32)
    values[::3, ::5] = 1
    loompy.create(path, values, {"g": np.arange(512)}, {"c": np.arange(512)}).close()
    rng = np.random.default_rng(0)
    with loompy.connect(path) as ds:
        ds[:, :]
        ds[:, :]  # (the index is built and kept)
        matrix = ds._file["matrix"]
        matrix[0:64, 0:64] = rng.random((64, 64)).astype(np.float32)  # compresses worse: moved
        matrix[64:128, 0:64] = 2
        matrix.flush()
        expected = matrix[...]
        np.testing.assert_array_equal(ds[:, :], expected)
        np.testing.assert_array_equal(ds.map([np.sum], axis=0)[0], [np.sum(row) for row in expected])


@pytest.mark.parametrize("compression", [None, 2])
def test_writes_h5py_still_holds_in_its_cache_are_seen_through_a_kept_index(tmp_path, compression):
    """Values written through an h5py handle of the matrix, still in HDF5's chunk cache: map read
    the file's old values through the kept index (200 of 200 rows wrong), and sparse() took the
    index before the cache was written out (old values, silently, or "damaged")."""
    rng = np.random.default_rng(0)
    path = tmp_path / "a.loom"
    values = rng.integers(0, 3, (512, 512)).astype(np.float32)
    loompy.create(path, values, {"g": np.arange(512)}, {"c": np.arange(512)}, chunks=(8, 8),
                  compression_opts=compression).close()
    with loompy.connect(path) as ds:
        ds[:, :]
        ds.map([np.sum], axis=0)  # (the index is built and kept)
        matrix = ds._file["matrix"]  # an h5py handle the user keeps, written through and not flushed
        matrix[0:200, 0:300] = 5
        matrix[0:8, 0:8] = np.arange(64, dtype=np.float32).reshape(8, 8) * 1.37  # (compresses worse: moves)
        values[0:200, 0:300] = 5
        values[0:8, 0:8] = np.arange(64, dtype=np.float32).reshape(8, 8) * 1.37
        np.testing.assert_array_equal(ds.map([np.sum], axis=0)[0], [np.sum(row) for row in values])
        matrix[300:310, 0:100] = 7
        values[300:310, 0:100] = 7
        np.testing.assert_array_equal(ds.sparse().toarray(), values)
        matrix[400, :] = 9
        values[400, :] = 9
        np.testing.assert_array_equal(ds[:, :], values)


def test_a_kept_chunk_index_is_rebuilt_when_h5py_moved_chunks_into_space_freed_before(tmp_path):
    """The file need not grow: chunks rewritten through h5py may go where a deleted layer was (the
    next full read said 'damaged', or gave old values), so the file's free space counts too."""
    rng = np.random.default_rng(0)
    path = tmp_path / "a.loom"
    loompy.create(path, rng.integers(0, 5, (512, 512)).astype(np.float32), {"g": np.arange(512)},
                  {"c": np.arange(512)}).close()
    with loompy.connect(path) as ds:
        ds.layers["tmp"] = rng.random((512, 512)).astype(np.float32)
        del ds.layers["tmp"]  # (its space is free for this session)
        ds[:, :]
        ds[:, :]  # (the index is built and kept)
        size = ds._file.id.get_filesize()
        matrix = ds._file["matrix"]
        matrix[:, 0:256] = rng.random((512, 256)).astype(np.float32)
        assert ds._file.id.get_filesize() == size  # (the case: nothing grew)
        np.testing.assert_array_equal(ds[:, :], matrix[...])


def test_big_endian_matrices_read_sparse_and_are_taken_as_layers(tmp_path):
    """scipy has no big-endian types: sparse() and as_coo/csr/csc of a '>f4' matrix raised; a '>f4'
    layer was refused as a dtype not allowed."""
    path = tmp_path / "be.loom"
    values = np.arange(12, dtype=">f4").reshape(3, 4)
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=values, chunks=(2, 2), compression="gzip")
        for group in ("layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs", "attrs"):
            f.create_group(group)
        f["attrs/LOOM_SPEC_VERSION"] = "3.0.0"
    with loompy.connect(path) as ds:
        for matrix in (ds.sparse(), ds.layers[""].as_coo(), ds.layers[""].as_csr(), ds.layers[""].as_csc()):
            assert matrix.dtype == np.float32
            np.testing.assert_array_equal(matrix.toarray(), values)
        ds.layers["x"] = np.ones((3, 4), ">i8") * -2
        assert ds.layers["x"].dtype == np.int64 and (ds.layers["x"][:, :] == -2).all()


@pytest.mark.parametrize("how", ["aligned chunks", "unaligned region", "scattered rows"])
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_partial_write_that_fails_leaves_none_of_it(tmp_path, monkeypatch, how, failure):
    """ds[rows, cols] = values fails (a full disk, Ctrl-C) after some of its chunks were stored:
    what those chunks held is put back, chunks it allocated read as the fill value again, and the
    layer reads as before, in this connection and after reopening."""
    write_module = importlib.import_module("loompy.engine.write")
    rng = np.random.default_rng(3)
    m = rng.integers(0, 9, size=(200, 300)).astype(np.float32)
    m[:, 128:] = 0  # chunks never written (all zero): a failed write must not leave them allocated
    path = tmp_path / "p.loom"
    loompy.create(path, m, {"g": np.arange(200)}, {"c": np.arange(300)}).close()
    rows, cols = {"aligned chunks": (slice(0, 200), slice(0, 300)),
                  "unaligned region": (slice(3, 190), slice(5, 290)),
                  "scattered rows": ([1, 70, 150, 199], slice(10, 280))}[how]
    calls = []

    def failing_after_the_first(real):  # the second write goes in, then fails (once: the rest works)
        def wrapped(*args, **kwargs):
            calls.append(1)
            result = real(*args, **kwargs)
            if len(calls) == (1 if how == "unaligned region" else 2):
                raise failure
            return result
        return wrapped

    real_init = write_module.ChunkStore.__init__

    def store_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.write = failing_after_the_first(self.write)

    monkeypatch.setattr(write_module.ChunkStore, "__init__", store_init)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_after_the_first(h5py.Dataset.__setitem__))
    with loompy.connect(path) as ds:
        with pytest.raises(type(failure)):
            ds[rows, cols] = m[rows, cols] + 100
        assert calls  # (some of the write was stored before it failed)
        monkeypatch.undo()
        np.testing.assert_array_equal(ds[:, :], m)
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m)
        if how == "aligned chunks":  # the all-zero chunks hold no values again (as zeros, or not stored)
            assert ds._file["matrix"].id.get_storage_size() < m.nbytes
    with loompy.connect(path) as ds:  # and the write, done again, goes through whole
        ds[rows, cols] = m[rows, cols] + 100
        expected = m.copy()
        expected[np.ix_(np.arange(200)[rows], np.arange(300)[cols])] += 100
        np.testing.assert_array_equal(ds[:, :], expected)


def test_ctrl_c_is_held_back_while_old_values_go_back_then_delivered(tmp_path):
    """deferred_interrupts: Python's handler gets the Ctrl-C after the block; with the system's
    default handler the process is stopped by it after the block; off the main thread, or with a
    handler Python did not set, nothing is changed."""
    import signal
    import subprocess
    import sys
    import threading

    from loompy.engine.write import deferred_interrupts

    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("block finished")
    assert done == ["block finished"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    script = ("import os, signal, time\nfrom loompy.engine.write import deferred_interrupts\n"
              "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
              "with deferred_interrupts():\n    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(0.05)\n"
              "    print('block finished', flush=True)\nprint('went on')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(loompy.__file__))})
    assert run.returncode == -signal.SIGINT and run.stdout == "block finished\n"
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_handler_inside(deferred_interrupts)))
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]


def _handler_inside(context):
    import signal

    with context():
        return signal.getsignal(signal.SIGINT)


def test_a_failed_write_into_a_matrix_stored_without_chunks_keeps_only_what_it_replaces(tmp_path, monkeypatch):
    m = np.arange(300 * 200, dtype=np.float32).reshape(300, 200)
    path = tmp_path / "c.loom"
    loompy.create(path, m, {"g": np.arange(300)}, {"c": np.arange(200)}).close()
    with h5py.File(path, "r+") as f:  # (as some other writer stores it: one contiguous block)
        del f["matrix"]
        f.create_dataset("matrix", data=m)
    real, calls, reads = h5py.Dataset.__setitem__, [], []
    real_get = h5py.Dataset.__getitem__

    def failing_second(self, key, value):
        calls.append(1)
        real(self, key, value)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    def counted(self, key):
        out = real_get(self, key)
        reads.append(np.asarray(out).size)
        return out

    with loompy.connect(path, validate=False) as ds:
        monkeypatch.setattr(h5py.Dataset, "__setitem__", failing_second)
        monkeypatch.setattr(h5py.Dataset, "__getitem__", counted)
        with pytest.raises(OSError):
            ds[[0, 299], :] = -1  # two row runs: the second write fails after it went in
        monkeypatch.undo()
        np.testing.assert_array_equal(ds[:, :], m)
        assert max(reads) <= 2 * 200  # (what the write replaces, not every row between)


def test_a_kept_index_is_not_used_for_another_dataset_h5py_renamed_into_its_place(tmp_path):
    """Indexes are kept by dataset name: two layers whose names h5py swapped (the file's size and
    free space unchanged) read as each other, all 409,600 values of each."""
    rng = np.random.default_rng(10)
    path = tmp_path / "r.loom"
    x, y = rng.random((640, 640)).astype(np.float32), rng.random((640, 640)).astype(np.float32)
    with loompy.create(path, x, {"g": np.arange(640)}, {"c": np.arange(640)}) as ds:
        ds.layers["y"] = y
    with loompy.connect(path) as ds:
        np.testing.assert_array_equal(ds.layers[""][:, :], x)  # (their indexes are built and kept)
        np.testing.assert_array_equal(ds.layers["y"][:, :], y)
        f = ds._file
        f.move("matrix", "swap")
        f.move("layers/y", "matrix")
        f.move("swap", "layers/y")
        np.testing.assert_array_equal(ds.layers[""][:, :], y)
        np.testing.assert_array_equal(ds.layers["y"][:, :], x)


def test_a_csr_matrix_is_written_in_strips_of_rows_not_converted_whole(tmp_path, monkeypatch):
    """A CSR matrix was converted to CSC whole before its first strip was written (a copy the size of
    its non-zeros); now strips of its rows are, each as written. Values as numpy's."""
    converted = []
    original = sp.csr_matrix.tocsc

    def recording(self, copy=False):
        converted.append(self.shape[0])
        return original(self, copy=copy)

    monkeypatch.setattr(sp.csr_matrix, "tocsc", recording)
    monkeypatch.setattr(importlib.import_module("loompy.engine.write"), "TASK_BYTES", 128 * 300 * 4)
    csr = sp.random(1000, 300, density=0.1, format="csr", random_state=4, dtype=np.float32)
    with loompy.create(tmp_path / "r.loom", csr, {"g": np.arange(1000)}, {"c": np.arange(300)}) as ds:
        ds.layers["again"] = csr
        np.testing.assert_array_equal(ds[:, :], csr.toarray())
        np.testing.assert_array_equal(ds.layers["again"][:, :], csr.toarray())
    assert converted and max(converted) <= 128


@pytest.mark.parametrize("fill", [0, 2.5])
def test_scattered_writes_rewrite_whole_chunks_through_the_engine(tmp_path, monkeypatch, fill):
    """A write to scattered rows and columns read each band of chunks and wrote it back through
    h5py (one zlib stream at a time: 7x slower than a block); now runs of whole chunks are stored
    by the engine, in strips (made small here). Values as numpy's; chunks never written and still
    all fill read as the fill value."""
    write = importlib.import_module("loompy.engine.write")
    monkeypatch.setattr(write, "STRIP_BYTES", 3 * 10 * 10 * 8)  # strips of at most three chunk rows
    rng = np.random.default_rng(7)
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("m", shape=(95, 87), dtype=np.float64, chunks=(10, 10), compression="gzip",
                             fillvalue=fill, maxshape=(None, None))
        d[:40, :] = rng.random((40, 87))
    expected = np.full((95, 87), fill, dtype=np.float64)
    with h5py.File(path, "r") as f:
        expected[:40] = f["m"][:40]
    through_h5py = []
    original = h5py.Dataset.__setitem__
    monkeypatch.setattr(h5py.Dataset, "__setitem__", lambda d, key, v: through_h5py.append(key) or original(d, key, v))
    with h5py.File(path, "r+") as f:
        d = f["m"]
        for _ in range(12):
            rows = np.unique(rng.choice(95, rng.integers(1, 40)))
            cols = np.unique(rng.choice(87, rng.integers(1, 40)))
            values = rng.random((rows.size, cols.size))
            engine.write_block(d, rows, cols, values)
            expected[np.ix_(rows, cols)] = values
            np.testing.assert_array_equal(d[...], expected)
    assert through_h5py == []


def test_reads_of_a_file_closed_meanwhile_say_so(tmp_path):
    """close() does not wait for reads in other threads: a read it cut short met h5py's raw
    ValueError or RuntimeError (a scan in 1 of 4 closes in a review's loop). The engine's reads of a
    dataset whose file has gone say the connection was closed."""
    m = np.arange(200 * 150, dtype=np.float32).reshape(200, 150)
    ds = loompy.create(tmp_path / "c.loom", m, {"g": np.arange(200)}, {"c": np.arange(150)})
    dataset = ds.layers[""]._dataset
    ds.close()
    rows, cols = np.arange(200), np.arange(150)
    for read in (lambda: engine.read_block(dataset, rows, cols), lambda: engine.read_sparse(dataset, rows, cols),
                 lambda: engine.expect_reads(dataset, 1.0),
                 lambda: engine.each_row_block(dataset, rows, cols, lambda *a: None)):
        with pytest.raises(loompy.LoomFileError, match="connection was closed"):
            read()


def test_repeated_small_reads_ask_hdf5_once_for_what_never_changes(tmp_path, monkeypatch):
    """Each read of a few rows asked h5py again for the layer (a lookup by path: 33 us) and for its
    chunks, dtype, filters and fill value (35 us) and its file's mode (10 us): half of a 16-row
    read's 240 us. A layer replaced by another of other chunks and dtype is still seen at once."""
    import h5py

    from loompy.engine import storage

    path = tmp_path / "r.loom"
    m = np.arange(100 * 90, dtype=np.float32).reshape(100, 90)
    loompy.create(path, m, {"g": np.arange(100)}, {"c": np.arange(90)}).close()
    layouts, lookups = [], []
    layout_of, get = storage._layout_of, h5py.Group.get
    monkeypatch.setattr(storage, "_layout_of", lambda d: layouts.append(d.name) or layout_of(d))
    monkeypatch.setattr(h5py.Group, "get", lambda self, *a, **k: lookups.append(a[0]) or get(self, *a, **k))
    with loompy.connect(path) as ds:
        ds.layers["x"] = m * 2
        for k in range(0, 100, 5):
            np.testing.assert_array_equal(ds.layers["x"][k:k + 5, :], m[k:k + 5] * 2)
            np.testing.assert_array_equal(ds[k:k + 5, ::3], m[k:k + 5, ::3])
        assert layouts.count("/layers/x") <= 2 and layouts.count("/matrix") == 1  # (the write, then reads)
        assert lookups.count("/layers/x") <= 2 and lookups.count("/matrix") <= 2
        ds.set_layer("x", (m * 3).astype(np.int16), chunks=(32, 16))
        np.testing.assert_array_equal(ds.layers["x"][40:45, :], (m[40:45] * 3).astype(np.int16))
        assert ds.layers["x"].dtype == np.int16 and ds.layers["x"]._dataset.chunks == (32, 16)


def _contiguous_loom(path, seed):
    """A 2,000 x 30 Loom file whose matrix is stored without chunks (as other writers may store it)."""
    m = np.random.default_rng(seed).random((2000, 30)).astype(np.float32)
    loompy.create(path, np.zeros((1, 1), np.float32), {}, {}).close()
    with h5py.File(path, "r+") as f:
        del f["matrix"]
        f.create_dataset("matrix", data=m)
        for axis, n in (("row_attrs", 2000), ("col_attrs", 30)):
            for name in list(f[axis]):
                del f[axis][name]
            f[axis].create_dataset("id", data=np.arange(n, dtype=np.float64))
    return path, m


def test_scattered_rows_of_contiguous_storage_are_read_alone(tmp_path, monkeypatch):
    """Storage without chunks was read in strips of 64 rows around the rows asked for: 500
    scattered rows of 5,000 read ten times their rows (3x slower than loompy 3). Runs of rows
    close together are read now; values as numpy's."""
    path, m = _contiguous_loom(tmp_path / "c.loom", seed=3)
    rng = np.random.default_rng(3)
    rows_read = []
    getitem = h5py.Dataset.__getitem__

    def counting(self, key, *a, **k):
        values = getitem(self, key, *a, **k)
        if self.name == "/matrix":
            rows_read.append(values.shape[0])
        return values

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    with loompy.connect(path, "r") as ds:
        assert ds.layers[""]._dataset.chunks is None
        for rows in (np.sort(rng.choice(2000, 100, replace=False)), np.r_[3:9, 10, 12, 500:600, 1999]):
            rows_read.clear()
            np.testing.assert_array_equal(ds[rows, :], m[rows])
            np.testing.assert_array_equal(ds[rows, 5:20:3], m[rows, 5:20:3])
            assert sum(rows_read) <= 2 * 5 * rows.size


def test_close_rows_of_contiguous_storage_are_read_in_bounded_parts(tmp_path, monkeypatch):
    """Rows at most four apart made one run read whole: every 4th row of 40,000 read all 40,000
    rows at once (430 MB for an 80 MB result). Runs are read in parts of at most RUN_BYTES."""
    from loompy.engine import read

    monkeypatch.setattr(read, "RUN_BYTES", 30 * 4 * 50)  # (50 rows of 30 float32)
    path, m = _contiguous_loom(tmp_path / "c.loom", seed=4)
    largest = []
    getitem = h5py.Dataset.__getitem__

    def recording(self, key):
        values = getitem(self, key)
        if self.name == "/matrix":
            largest.append(values.nbytes)
        return values

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    with loompy.connect(path, "r") as ds:
        rows = np.arange(0, 2000, 4)
        largest.clear()
        np.testing.assert_array_equal(ds[rows[:40], :], m[rows[:40]])  # (one run, fewer than MANY_RUNS)
        assert max(largest) <= 30 * 4 * 50
        largest.clear()
        np.testing.assert_array_equal(ds[np.r_[0:900:3, 901], 4:29], m[np.r_[0:900:3, 901], 4:29])
        assert len(largest) > 1 and max(largest) <= 30 * 4 * 50


def test_what_is_kept_per_file_goes_when_its_last_connection_closes(tmp_path):
    """Each dataset's turns (a lock) were kept for good once read, as was each file's count of
    layer changes: 2.5 KB for every connect, read and close (a server opening files all day grew
    without end). They go when no connection of the process shares the opening any more."""
    from loompy import handles
    from loompy.engine import storage

    path = tmp_path / "k.loom"
    loompy.create(path, np.ones((70, 70), np.float32), {"g": np.arange(70)}, {"c": np.arange(70)}).close()
    before = (len(storage._turns), len(handles._counts))
    for _ in range(50):
        with loompy.connect(path) as ds:
            ds.layers["x"] = ds[:, :] * 2
            ds.add_columns({"": np.ones((70, 1), np.float32), "x": np.ones((70, 1), np.float32)}, {"c": [0]})
            assert ds.layers["x"][0:3, 0].tolist() == [2, 2, 2]
    assert (len(storage._turns), len(handles._counts)) == before
    a, b = loompy.connect(path), loompy.connect(path)  # (shared: the second keeps them)
    a[0:2, :]
    b.layers["x"] = np.zeros(b.shape, np.float32)
    a.close()
    held = b.layers["x"]
    b.layers["x"] = np.ones(b.shape, np.float32)
    assert held[0, 0] == 1 and len(storage._turns) > before[0]
    b.close()
    assert len(storage._turns) == before[0]


def test_what_is_kept_per_file_goes_after_rewrites_too(tmp_path):
    """create, combine and permute left the turns of the files they wrote (the new file before its
    rename; permute's old file too) for good: one or two per call, about 2.6 KB each."""
    from loompy.engine import storage

    path, other = tmp_path / "k.loom", tmp_path / "c.loom"
    m = np.ones((70, 70), np.float32)
    loompy.create(path, m, {"g": np.arange(70)}, {"c": np.arange(70)}).close()
    before = len(storage._turns)
    for k in range(20):
        loompy.create(path, m, {"g": np.arange(70)}, {"c": np.arange(70)}).close()
        loompy.combine([path, path], other)
        with loompy.connect(path) as ds:
            ds.permute(np.random.default_rng(k).permutation(70), axis=k % 2)
            ds[0:2, :]
    assert len(storage._turns) == before


def test_a_turn_held_as_its_files_last_connection_closes_is_kept(tmp_path):
    """The turns of a closing file were dropped before it closed, held or not: a connection made
    during the close's flush shared the opening, got a new lock under the same name, and wrote
    while a read on the closing connection still held the old one."""
    from loompy.engine import storage

    path = tmp_path / "t.loom"
    loompy.create(path, np.ones((70, 70), np.float32), {"g": np.arange(70)}, {"c": np.arange(70)}).close()
    ds = loompy.connect(path)
    dataset = ds.layers[""]._dataset
    key = storage._key(dataset)
    with held_in_another_thread(storage.reading(dataset)):
        held = storage._turns[key]
        ds.close()
        assert storage._turns.get(key) is held  # (held: kept)


def test_what_is_kept_per_file_goes_after_connections_let_go_of_unclosed(tmp_path):
    """The seed says there is usually no need to close: a connection let go of unclosed kept its
    file's turns and counts for good (2.5 KB each). They go once its file is closed, at the next connect."""
    import gc

    from loompy import handles
    from loompy.engine import storage

    path = tmp_path / "k.loom"
    loompy.create(path, np.ones((70, 70), np.float32), {"g": np.arange(70)}, {"c": np.arange(70)}).close()
    loompy.connect(path).close()
    before = (len(storage._turns), len(handles._counts))
    for k in range(30):
        ds = loompy.connect(path, "r+" if k % 2 else "r")
        ds[0:3, :]
        if k % 2:
            ds.layers["x"] = np.full((70, 70), k, np.float32)
        del ds
        gc.collect()
    loompy.connect(path).close()
    assert (len(storage._turns), len(handles._counts)) == before
    assert not storage._let_go


def test_a_connection_collected_in_a_cycle_inside_h5py_does_not_deadlock(tmp_path):
    """What a connection let go of unclosed leaves is noted when the cycle collector frees it, which
    may be in a thread inside h5py (holding h5py's lock) while another thread holds the engine's lock
    and waits for h5py: noting it took the engine's lock, and both threads waited for good."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import gc, threading
        import h5py, numpy as np, loompy
        from h5py._objects import phil
        from loompy.engine import storage
        path = {str(tmp_path / "d.loom")!r}
        loompy.create(path, np.ones((3, 3), np.float32), {{}}, {{}}).close()
        gc.disable()
        ds = loompy.connect(path)
        cycle = [ds, None]
        cycle[1] = cycle
        del ds, cycle
        locked, go = threading.Event(), threading.Event()
        def engine_then_h5py():
            with storage._lock:
                locked.set()
                go.wait()
                h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
        other = threading.Thread(target=engine_then_h5py, daemon=True)
        other.start()
        locked.wait()
        with phil:
            go.set()
            gc.collect()
        other.join(30)  # (a daemon thread stopped by the exit while it holds h5py's lock hangs the exit)
        print("done")
    """)
    try:
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the two threads waited for each other")
    assert run.stdout.strip() == "done", run.stderr[-500:]


def test_a_single_row_is_read_on_this_thread_a_run_of_chunks_at_a_time(tmp_path, monkeypatch):
    """A row of 80 chunks, once the chunk index is kept, is one read of the file (it was one per
    chunk, 8 us each here), inflated on the calling thread (the workers' hand-overs of the GIL cost
    more than they shared: 5.6 ms a row of 20,000 columns against 4.4); numpy's values, chunks never
    written included."""
    read_module, codecs = importlib.import_module("loompy.engine.read"), importlib.import_module("loompy.engine.codecs")
    rng = np.random.default_rng(4)
    m = rng.poisson(0.3, (130, 64 * 80)).astype(np.float32)
    m[:, 64 * 10:64 * 12] = 0  # (two chunk columns never written: a run ends there)
    path = tmp_path / "wide.loom"
    loompy.create(path, m, {"g": np.arange(130)}, {"c": np.arange(64 * 80)}).close()
    reads, pread = [], os.pread
    monkeypatch.setattr(codecs.os, "pread", lambda fd, n, at: reads.append(n) or pread(fd, n, at))
    shared = []
    monkeypatch.setattr(read_module, "run_all", lambda tasks: shared.append(len(tasks)) or [t() for t in tasks])
    with loompy.connect(path, "r") as ds, engine.held_index(ds.layers[""]._dataset):
        for row in (0, 77, 129):
            reads.clear()
            np.testing.assert_array_equal(ds[row, :], m[row])
            assert len(reads) <= 6, reads  # (a few runs, as create stored the chunks; it was 78 reads)
        np.testing.assert_array_equal(ds[[5, 6], :], m[[5, 6]])
        assert shared == []  # (no task went to the workers)
        np.testing.assert_array_equal(ds[[5, 70], :], m[[5, 70]])  # (two chunk rows: the workers share them)
        assert shared != []
