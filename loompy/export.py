"""``ds.export``: a layer as tab-separated text, with its row and column attributes, as loompy 3 writes it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from . import engine
from .errors import LoomError, LoomFileError, LoomValueError
from .handles import closed_meanwhile
from .operations import iter_batches

if TYPE_CHECKING:  # (the connection imports this module)
    from .connection import LoomConnection

EXPORT_BATCH_VALUES = 1 << 20  # values export turns into text at once (8 MB of pointers, the text of the non-zero ones)


def export_layer(ds: LoomConnection, out_file: str | os.PathLike, layer: str | None = None,
                 format: str = "tab") -> None:
    """Write a layer as tab-separated text: column attributes on top, row attributes on the left."""
    if format != "tab":
        raise LoomValueError(f"{ds.filename}: export format '{format}' is not supported (only 'tab')")
    dataset = ds.layers["" if layer is None else layer]._dataset
    _refuse_to_overwrite_hdf5(out_file)
    try:
        with closed_meanwhile(ds._check_open):
            _write_tab(ds, out_file, dataset)
    except OSError as exc:  # a folder, a missing folder, no permission, a full disk
        if isinstance(exc, LoomError):  # (reading the file: the engine's errors say what is wrong)
            raise
        raise LoomFileError(f"{os.fspath(out_file)}: cannot write the export there ({exc.strerror or exc})") from exc


def _write_tab(ds: LoomConnection, out_file: str | os.PathLike, dataset: Any) -> None:
    """loompy 3's layout, byte for byte: every cell followed by a tab, so that every line has the
    same number of fields (row attribute names, then the column attribute names' cell, then one
    per column)."""
    row_names = list(ds.ra.keys())
    lead = len(row_names)
    cols = np.arange(ds.shape[1], dtype=np.int64)
    with open(out_file, "w", encoding="utf-8", errors="surrogateescape") as out:  # (text read so)
        for name in ds.ca.keys():
            out.write("\t" * lead + name + "\t" + "".join(v + "\t" for v in _as_text(ds.ca[name])) + "\n")
        out.write("".join(name + "\t" for name in row_names) + "\t" + "\t" * ds.shape[1] + "\n")
        row_values = [ds.ra[name] for name in row_names]
        with engine.held_index(dataset):  # nothing is written to the layer during the pass
            rows = max(1, EXPORT_BATCH_VALUES // max(1, ds.shape[1]))  # (text objects, not values: ~60 bytes each)
            for start, batch in iter_batches(np.arange(ds.shape[0], dtype=np.int64), rows):
                block = engine.read_block(dataset, batch, cols)
                texts, end = _block_as_text(block), "\t\n" if ds.shape[1] else "\n"  # (a tab after every cell)
                for i in range(block.shape[0]):
                    labels = "".join(str(v[start + i]) + "\t" for v in row_values)
                    out.write(labels + "\t" + "\t".join(texts[i].tolist()) + end)


def _block_as_text(block: np.ndarray) -> np.ndarray:
    """Each value of ``block`` as :func:`_as_text` writes it, in an array of str objects: zeros (all
    bits zero: not -0.0) share one text, and only the others are turned into text. Counts are
    mostly zeros: text for each of 8 million values took 1.8 s, for the non-zero ones 0.6 s."""
    zero = ~block.view(f"u{block.dtype.itemsize}").astype(bool) if block.dtype.kind in "fiu" else None
    if zero is None or not zero.any():
        return np.array(_as_text(block.reshape(-1)), dtype=object).reshape(block.shape)
    texts = np.empty(block.shape, dtype=object)
    texts.fill(_as_text(np.zeros(1, block.dtype))[0])  # (one str: np.full made one for each value, 276 MB a batch)
    texts[~zero] = _as_text(block[~zero])
    return texts


def _refuse_to_overwrite_hdf5(path: str | os.PathLike) -> None:
    """Text never replaces an HDF5 file (a Loom file, perhaps the one being exported): a slip of the
    output name must not destroy data."""
    if os.path.isfile(path) and h5py.is_hdf5(os.fspath(path)):  # (h5py also finds it after a user block)
        raise LoomFileError(f"{os.fspath(path)}: is an HDF5 file; export writes text, give it another name")


def _as_text(values: np.ndarray) -> list[str]:
    """Each value as numpy prints it: the shortest text that reads back as the same value in its own
    dtype (float32 0.1 is "0.1", not the "0.10000000149011612" of the float64 it widens to)."""
    if values.dtype.names is not None or values.ndim > 1:  # compound or several values per column, as
        return [str(v) for v in values]                     # numpy prints them ("[0. 1.]"), as loompy 3 does
    return values.astype(str).tolist()
