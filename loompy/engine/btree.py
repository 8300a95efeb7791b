"""Listing a chunked dataset's stored chunks by reading HDF5's chunk B-tree straight from the file.

h5py lists chunks with ``chunk_iter``, which calls back into Python once per chunk: 0.15 s for
the benchmark matrix's 98,000 chunks, paid by every first large read of a connection. The index
HDF5 keeps for datasets written with its default (oldest-compatible) format is a version 1 B-tree
whose leaves hold each chunk's size, filter mask, position and address; read node by node here
with ``os.pread`` and numpy, the same listing took 20-40 ms here.

Only that case is handled: data layout message version 3 (chunked, version 1 B-tree), no userblock,
HDF5's default file driver (the file is read through HDF5's own descriptor).
Anything else, and anything that does not look exactly as the HDF5 file format specification says
(signatures, node types, levels, positions on the chunk grid, addresses inside the file, the number
of chunks HDF5 counts), gives None and the caller lists chunks with ``chunk_iter`` instead.
"""

from __future__ import annotations

import functools
import os
import struct

import h5py
import numpy as np

_LAYOUT = 0x0008  # object header message types used here
_CONTINUATION = 0x0010
_SHARED = 0x02  # message flag: the message is stored elsewhere (a layout never is)
_MAX_HEADER_BLOCKS = 64  # continuation blocks followed before giving up on a header
_MAX_LEVELS = 32
_UNDEFINED = (1 << 64) - 1  # HDF5's address of nothing
_NODE_GUESS = 4096  # bytes read per B-tree node at first (a node of HDF5's default 64 entries: 2,616)


class _Unexpected(Exception):
    """The file does not look as this reader expects: list chunks through HDF5 instead."""


def list_chunks(dataset: h5py.Dataset) -> np.ndarray | None:
    """One row per stored chunk (chunk row, chunk column, byte offset, size, filter mask), as
    ``chunk_iter`` would give, in any order; None when the B-tree cannot be read here. The caller
    has written out what HDF5 holds of the dataset (:func:`.storage.refresh`): its B-tree nodes too."""
    where = _where(dataset)
    if where is None:
        return None
    fd, header, eof = where
    try:
        root = _btree_address(fd, header, eof)
        if root == _UNDEFINED:  # no chunk written yet
            table = np.empty((0, 5), dtype=np.int64)
        else:
            table = _leaves(fd, root, eof, dataset.chunks, dataset.shape)
        if table.shape[0] != dataset.id.get_num_chunks():
            return None
        return table
    except (_Unexpected, OSError, ValueError, IndexError, RuntimeError, struct.error):  # (HDF5's count too)
        return None


def chunk_queries_trusted(dataset: h5py.Dataset) -> bool:
    """Whether HDF5's own chunk queries (``chunk_iter``, ``get_chunk_info_by_coord``) may be believed
    for ``dataset``. Not for an extensible-array chunk index (``libver="latest"`` files whose dataset
    has one unlimited axis, as loompy 3 makes the matrix): HDF5 2.0 lists such chunks at positions
    they are not at (chunk (1, 2) of a 4 x 4 grid as (0, 576)), and says chunks that are there are
    not. Reads of single chunks (``read_direct_chunk``) are right there."""
    if sum(m is None for m in (dataset.maxshape or ())) != 1:
        return True  # (that index serves exactly one unlimited axis)
    where = _where(dataset)
    if where is None:
        return False  # (cannot tell: believe nothing)
    try:
        return _layout(*where)[0] == 3  # layout version 3: a version 1 B-tree, listed right
    except (_Unexpected, OSError, ValueError, IndexError, struct.error):
        return False


def _where(dataset: h5py.Dataset) -> tuple[int, int, int] | None:
    """(HDF5's descriptor of the file, the dataset's object header address, the file's size), or None
    when the file is not one read here (see the module's docstring)."""
    f = dataset.file
    try:
        fcpl = f.id.get_create_plist()
        if (f.driver != "sec2" or not hasattr(os, "pread") or fcpl.get_userblock() != 0
                or fcpl.get_sizes() != (8, 8) or dataset.ndim != 2):
            return None
        header = header_address(dataset)
        fd = f.id.get_vfd_handle()  # the file HDF5 has open (its name may now be another's); not ours to close
        return fd, header, os.fstat(fd).st_size
    except (OSError, ValueError, RuntimeError, AttributeError, TypeError):
        return None


def header_address(dataset: h5py.Dataset) -> int:
    """The file address of the dataset's object header. ``H5Oget_info`` also sums the sizes of the
    dataset's metadata (walking the whole B-tree: 7-16 ms for the benchmark matrix), ``H5Gget_objinfo``
    does not (0.05 ms); its number is the address split into two C longs."""
    try:
        low, high = h5py.h5g.get_objinfo(dataset.id).objno
        return low | high << (8 * struct.calcsize("l"))
    except (AttributeError, RuntimeError, ValueError, TypeError):
        return h5py.h5o.get_info(dataset.id).addr


def _read(fd: int, offset: int, size: int, eof: int) -> bytes:
    if offset < 0 or size < 0 or offset + size > eof:
        raise _Unexpected(f"{size} bytes at {offset} run past the end of the file")
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise _Unexpected("short read")
    return data


def _layout(fd: int, header: int, eof: int) -> bytes:
    """The body of the data layout message of the object header at ``header``."""
    for kind, flags, body in _messages(fd, header, eof):
        if kind == _LAYOUT:
            if flags & _SHARED or not body:
                raise _Unexpected("a shared or empty layout message")
            return body
    raise _Unexpected("no data layout message")


def _btree_address(fd: int, header: int, eof: int) -> int:
    """The address of the dataset's chunk B-tree, from the data layout message of its object header."""
    body = _layout(fd, header, eof)
    if len(body) < 11 or body[0] != 3 or body[1] != 2 or body[2] != 3:
        raise _Unexpected("not a version 3 chunked layout of two dimensions")
    return struct.unpack_from("<Q", body, 3)[0]


def _messages(fd: int, header: int, eof: int):
    """(type, flags, body) of every message of the object header at ``header`` (versions 1 and 2)."""
    start = _read(fd, header, 16, eof)
    if start[:4] == b"OHDR":
        flags, first = _v2_first_block(fd, header, eof, start)
        blocks, signed = [first], True  # (continuation blocks: a signature before, a checksum after)
        walk = functools.partial(_v2_messages, ordered=bool(flags & 0x04))
    elif start[0] == 1:
        size = struct.unpack_from("<I", start, 8)[0]
        blocks, signed, walk = [_read(fd, header + 16, size, eof)], False, _v1_messages
    else:
        raise _Unexpected("unknown object header version")
    seen = 0
    while blocks:
        seen += 1
        if seen > _MAX_HEADER_BLOCKS:
            raise _Unexpected("too many header continuation blocks")
        for kind, flags, body in walk(blocks.pop(0)):
            if kind == _CONTINUATION:
                where, length = struct.unpack_from("<QQ", body)
                data = _read(fd, where, length, eof)
                if signed:
                    if data[:4] != b"OCHK":
                        raise _Unexpected("bad continuation block signature")
                    data = data[4:-4]  # (signature and checksum)
                blocks.append(data)
            else:
                yield kind, flags, body


def _v1_messages(block: bytes):
    at = 0
    while at + 8 <= len(block):
        kind, size, flags = struct.unpack_from("<HHB", block, at)
        yield kind, flags, block[at + 8:at + 8 + size]
        at += 8 + size


def _v2_first_block(fd: int, header: int, eof: int, start: bytes) -> tuple[int, bytes]:
    """A version 2 object header's flags and its first block of messages."""
    if start[4] != 2:
        raise _Unexpected("unknown object header version")
    flags = start[5]
    at = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
    width = 1 << (flags & 0x03)
    head = _read(fd, header, at + width, eof)
    size = int.from_bytes(head[at:at + width], "little")
    return flags, _read(fd, header + at + width, size, eof)


def _v2_messages(block: bytes, ordered: bool):
    """Messages of a version 2 block; ``ordered`` (header flag bit 2): each carries a creation order."""
    step = 6 if ordered else 4
    at = 0
    while at + step <= len(block):
        kind, size, flags = struct.unpack_from("<BHB", block, at)
        yield kind, flags, block[at + step:at + step + size]
        at += step + size


def _leaves(fd: int, root: int, eof: int, chunks: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Every leaf entry of the B-tree at ``root``, as rows of (chunk row, chunk column, offset, size, mask)."""
    entry = np.dtype([("size", "<u4"), ("mask", "<u4"), ("position", "<u8", (3,)), ("child", "<u8")])
    nodes, level = [root], None
    for _ in range(_MAX_LEVELS):
        entries = []
        for node in sorted(nodes):
            data = _read(fd, node, min(_NODE_GUESS, eof - node), eof)
            if data[:4] != b"TREE" or data[4] != 1:
                raise _Unexpected("not a chunk B-tree node")
            node_level, used = data[5], struct.unpack_from("<H", data, 6)[0]
            if level is not None and node_level != level:
                raise _Unexpected("B-tree levels disagree")
            level, end = node_level, 24 + used * entry.itemsize
            if end > len(data):
                data = _read(fd, node, end, eof)
            entries.append(data[24:end])
        table = np.frombuffer(b"".join(entries), dtype=entry)
        if level == 0:
            break
        nodes, level = table["child"].tolist(), level - 1
    else:
        raise _Unexpected("B-tree too deep")
    position, address, size = table["position"], table["child"], table["size"]  # (unsigned, as stored)
    cells = chunk_cells(position[:, 0], position[:, 1], chunks, shape)
    if (cells is None or np.any(position[:, 2])
            or np.any(address == 0) or np.any(address >= eof) or np.any(size == 0) or np.any(size > eof)
            or np.any(address + size.astype(np.uint64) > eof)):  # (each below eof: no wrapping)
        raise _Unexpected("a leaf entry is off the chunk grid, listed twice or outside the file")
    rows, cols = cells
    return np.stack([rows, cols, address.astype(np.int64), size.astype(np.int64), table["mask"].astype(np.int64)],
                    axis=1)


def chunk_cells(first: np.ndarray, second: np.ndarray, chunks: tuple[int, int], shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """The chunk rows and columns of chunks listed at element positions (``first``, ``second``), or
    None when one is off the chunk grid (negative, not a multiple of the chunk shape, outside the
    dataset) or two are listed at one place: then nothing of the listing is to be believed."""
    (h, w), (n, m) = chunks, shape
    if (np.any(first < 0) or np.any(second < 0) or np.any(first >= n) or np.any(second >= m)
            or np.any(first % h) or np.any(second % w)):
        return None
    rows, cols = (first // h).astype(np.int64), (second // w).astype(np.int64)
    if rows.size and np.bincount(rows * -(-m // w) + cols).max() > 1:
        return None
    return rows, cols
