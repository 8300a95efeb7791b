"""Layers: the main matrix (named ``""``) and any number of extra matrices of the same shape."""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import h5py
import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from . import encoding, engine, swaps
from . import format as fmt
from .attributes import CheckedUpdate, DotAccess
from .errors import LoomError, LoomFileError, LoomKeyError, LoomTypeError, LoomValueError, naming, naming_the_file
from .files import stored_size_bound
from .handles import (
    SPARE_BYTES,
    Dims,
    KeptNames,
    changed,
    changing,
    check_deletable,
    check_free_space,
    check_room,
    check_writable,
    closed_meanwhile,
    kept_since,
    one_of_the_writes,
    why_closed,
)
from .indexing import AxisSelection, dropped, expand, reversed_steps, select, select_axis, values_for_unique


def _axis(selection: Any, length: int, axis: int) -> AxisSelection:
    return select_axis(slice(None) if selection is None else selection, length, axis)


class SparseForms(ABC):
    """A layer as a sparse matrix, for layers on disk and in views alike: ``sparse()`` over the
    subclass's ``_sparse_block``, and the ``as_coo``/``as_csr``/``as_csc`` names of the seed README."""

    shape: tuple[int, int]

    @abstractmethod
    def _sparse_block(self, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
        """The block at sorted, unique ``rows`` x ``cols`` as a COO matrix, in the stored dtype."""

    def sparse(self, rows: npt.ArrayLike | slice | None = None, cols: npt.ArrayLike | slice | None = None,
               dtype: npt.DTypeLike = None) -> sp.coo_matrix:
        """The layer (or the ``rows`` x ``cols`` part of it, in the order and with the repeats
        given) as a COO matrix, in the stored dtype unless ``dtype`` is given."""
        shape = self.shape
        with naming(f"{self._where}: sparse()"):
            r, c = _axis(rows, shape[0], 0), _axis(cols, shape[1], 1)
        coo = self._sparse_block(r.unique, c.unique)
        if dtype is not None and np.dtype(dtype) != coo.dtype:  # (scipy's astype copies the indices too: 4.5x
            coo = sp.coo_matrix((coo.data.astype(dtype), (coo.row, coo.col)), shape=coo.shape)  # the result)
        if r.inverse is None and c.inverse is None:
            return coo
        csr = coo.tocsr()
        if r.inverse is not None:
            csr = csr[r.inverse]
        if c.inverse is not None:
            csr = csr[:, c.inverse]
        return csr.tocoo()

    def as_coo(self) -> sp.coo_matrix:
        """loompy 3's name for :meth:`sparse` of the whole layer."""
        return self.sparse()

    def as_csr(self) -> sp.csr_matrix:
        """The whole layer as CSR (loompy 3's name)."""
        return self.sparse().tocsr()

    def as_csc(self) -> sp.csc_matrix:
        """The whole layer as CSC (loompy 3's name)."""
        return self.sparse().tocsc()


def _touched_bytes(dataset: h5py.Dataset, rows: np.ndarray, cols: np.ndarray) -> int:
    """The raw size of the chunks a write to ``rows`` x ``cols`` rewrites (at most what they store again)."""
    if dataset.chunks is None:
        return rows.size * cols.size * dataset.dtype.itemsize
    h, w = dataset.chunks
    return len(np.unique(rows // h)) * len(np.unique(cols // w)) * h * w * dataset.dtype.itemsize


class _SharedFile:
    """The file a connection's layers are in, shared by its layer manager and the layers it gives out:
    a file reopened (by permute) reaches them all. The layers refer to this, not to the manager, which
    keeps them (a cycle kept a file open, and locked, after its connection was let go of unclosed)."""

    __slots__ = ("file", "filename")

    def __init__(self, file: h5py.File) -> None:
        self.file, self.filename = file, file.filename

    def check_open(self) -> None:
        """LoomFileError unless the file is open (closed, or being replaced by permute, it says which)."""
        if not self.file:
            raise LoomFileError(f"{self.filename}: {why_closed(self.file)}")


class LoomLayer(SparseForms):
    """One matrix of a Loom file, read and written lazily through the chunk engine."""

    def __init__(self, name: str, dataset: h5py.Dataset, shared: _SharedFile, state: tuple[int, int]) -> None:
        """``dataset``: what the manager found at the layer's path in file state ``state`` (taken
        before it looked: a replacement in another thread meanwhile makes the next use look again)."""
        self.name = name
        self._path = fmt.layer_path(name)  # (not dataset.name: a swap may be moving it right now)
        self._shared = shared  # the connection's file, even reopened
        self._known: tuple[Any, h5py.Dataset] = (state, dataset)  # (file state, dataset) last looked up

    @staticmethod
    def _state(file: h5py.File) -> tuple[int, int]:
        """What the lookup depends on: this opening of the file and its layer changes."""
        return kept_since(file, "layers")

    @property
    def _filename(self) -> str:
        return self._shared.filename

    @property
    def _file(self) -> h5py.File:
        return self._shared.file

    @property
    def _dataset(self) -> h5py.Dataset:
        """The layer's dataset now: looked up again whenever its manager's file or layers changed (a
        replaced layer is a new dataset, a permuted file a new file)."""
        self._shared.check_open()
        file = self._file
        with closed_meanwhile(self._shared.check_open):  # (closed by another thread as this looks)
            key = self._state(file)
            if key == self._known[0]:
                return self._known[1]
            dataset = file.get(self._path)
        if not isinstance(dataset, h5py.Dataset):
            raise LoomKeyError(f"{self._filename}: layer '{self.name}' no longer exists")
        self._known = (key, dataset)
        return dataset

    @property
    def shape(self) -> tuple[int, int]:
        with closed_meanwhile(self._shared.check_open):
            return tuple(self._dataset.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        with closed_meanwhile(self._shared.check_open):
            return self._dataset.dtype

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = self._select(key)
        steps = reversed_steps(rows, cols)
        if steps is not None:  # (placed backwards as it is read, not copied after)
            block = engine.fresh((rows.unique.size, cols.unique.size), self.dtype)
            self._read(rows.unique, cols.unique, block[steps])
            return dropped(block, rows, cols)
        return expand(self._read(rows.unique, cols.unique), rows, cols)

    @property
    def _where(self) -> str:
        return f"{self._filename}: layer '{self.name}'"

    def _select(self, key: Any) -> tuple[AxisSelection, AxisSelection]:
        """The selection ``key`` on this layer; errors name the file and layer."""
        shape = self.shape  # (outside: its errors name the file already)
        with naming(self._where):
            return select(key, shape)

    def _read(self, rows: np.ndarray, cols: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The block at sorted, unique ``rows`` x ``cols``, into ``out`` when given."""
        with naming_the_file(self._filename):
            return engine.read_block(self._dataset, rows, cols, out)

    @one_of_the_writes
    def __setitem__(self, key: Any, values: Any) -> None:
        check_writable(self._file, f"layer '{self.name}'")
        rows, cols = self._select(key)
        dataset = self._dataset
        data = values_for_unique(values, rows, cols, dataset.dtype, self._where)
        check_room(self._file, _touched_bytes(dataset, rows.unique, cols.unique), self._where)
        engine.write_block(dataset, rows.unique, cols.unique, data)
        fmt.touch(dataset)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:  # (numpy's protocol: a ValueError when a copy cannot be avoided)
            raise LoomValueError(f"{self._filename}: layer '{self.name}': reading a Loom layer always makes a copy")
        data = self[:, :]
        return data if dtype is None else data.astype(dtype)

    def last_modified(self) -> str:
        """When this layer was last written, as ``ds.last_modified()`` gives it."""
        return fmt.read_stamp(self._dataset)

    def map(self, f_list: Callable | Sequence[Callable], axis: int = 0, chunksize: int = 1000,
            selection: npt.ArrayLike | None = None) -> list[np.ndarray] | np.ndarray:
        """Apply function(s) to every row (axis 0) or column (axis 1) of this layer in one pass, as
        the connection's ``map`` does for the main matrix; see :func:`loompy.operations.map_`."""
        from . import operations  # (operations imports the view module, which imports this one)

        return operations.map_(self, f_list, axis, chunksize, selection)

    def _sparse_block(self, rows: np.ndarray, cols: np.ndarray) -> sp.coo_matrix:
        with naming_the_file(self._filename):
            return engine.read_sparse(self._dataset, rows, cols)

    def __repr__(self) -> str:
        try:
            return f"<LoomLayer '{self.name}' shape {self.shape} dtype {self.dtype}>"
        except LoomError as error:  # deleted, or its connection closed: say so rather than fail
            return f"<LoomLayer '{self.name}' ({error})>"


def _input_dtype(matrix: Any) -> np.dtype:
    return matrix.dtype if hasattr(matrix, "dtype") else np.asarray(matrix).dtype


class LayerManager(DotAccess, CheckedUpdate, MutableMapping):
    """Layers by name; ``""`` is the main matrix at ``/matrix``."""

    def __init__(self, file: h5py.File, dims: Dims) -> None:
        object.__setattr__(self, "_shared", _SharedFile(file))
        object.__setattr__(self, "_dims", dims)
        object.__setattr__(self, "_found", {})  # name -> (the layer given out last, its dataset's address)
        object.__setattr__(self, "_names", KeptNames("layers"))

    @property
    def _file(self) -> h5py.File:
        return self._shared.file

    @_file.setter
    def _file(self, file: h5py.File) -> None:  # (the connection's file, reopened or closed)
        self._shared.file = file

    @property
    def _filename(self) -> str:
        return self._shared.filename

    @property
    def _where(self) -> str:
        return f"{self._file.filename}: layer"

    # --------------------------------------------------------------- reading
    def _dataset(self, name: str) -> h5py.Dataset | None:
        obj = self._file.get(fmt.layer_path(name))
        return obj if isinstance(obj, h5py.Dataset) else None

    def keys(self) -> list[str]:
        """Layer names, ``""`` (the main matrix) first: listed again only after a layer was created,
        replaced or deleted through a connection of this process (a listing takes 0.3 ms)."""
        self._shared.check_open()
        with closed_meanwhile(self._shared.check_open):
            file = self._file
            return self._names.get(file, lambda: list(fmt.matrix_datasets(file)))

    def __getitem__(self, name: str) -> LoomLayer:
        if not isinstance(name, str):
            raise LoomTypeError(f"{self._filename}: layer names are strings, got {type(name).__name__}")
        self._shared.check_open()
        with closed_meanwhile(self._shared.check_open):  # (closed by another thread as this looks)
            state = LoomLayer._state(self._file)
            found = self._found.get(name)
            # nothing changed the layers (an h5py rename would leave another dataset at the address): 3 us, a lookup 33
            if found is not None and found[0]._known[0] == state and \
                    found[1] == fmt.address(self._file, found[0]._path):
                return found[0]
            dataset = self._dataset(name)
        if dataset is None:
            self._shared.check_open()  # (closed by another thread as this looked: no layer is there to find)
            raise LoomKeyError(f"{self._file.filename}: layer '{name}' does not exist")
        layer = LoomLayer(name, dataset, self._shared, state)
        self._found[name] = (layer, fmt.address(dataset))
        return layer

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def last_modified(self, name: str | None = None) -> str:
        """When layer ``name`` (None: any of them) was last written, as ``ds.last_modified()`` gives it."""
        if name is not None:
            return self[name].last_modified()
        return max((self[k].last_modified() for k in self.keys()), default=fmt.read_stamp(self._file))

    def _ipython_key_completions_(self) -> list[str]:
        return self.keys()

    def __repr__(self) -> str:
        return f"<layers: {', '.join(repr(k) for k in self.keys())}>"

    # --------------------------------------------------------------- writing
    def __setitem__(self, name: str, matrix: Any) -> None:
        self.set_layer(name, matrix)

    @one_of_the_writes
    def set_layer(self, name: str, matrix: Any, chunks: tuple[int, int] = fmt.DEFAULT_CHUNKS,
                  chunk_cache: int = fmt.DEFAULT_CHUNK_CACHE_MB, dtype: Any = None,
                  compression_opts: int | None = fmt.DEFAULT_COMPRESSION_LEVEL) -> None:
        """Create or overwrite layer ``name`` from a dense or sparse matrix (or zeros of ``dtype`` when
        None, or when ``matrix`` is itself a dtype or its name, as loompy 3 takes it).

        The stored dtype is ``dtype`` if given, else the input's (booleans as uint8). A replacement
        is written beside the old layer and swapped in once complete: failed, interrupted or killed,
        the old layer stays. The old layer's space HDF5 reuses only while the file stays open;
        ``repack`` reclaims it.
        """
        self._checked(name, matrix, chunks, chunk_cache, dtype, compression_opts)()

    def _checked_all(self, pairs: list[tuple[str, Any]]) -> list[functools.partial]:
        # the main matrix first: in a file that has none yet, its shape is the one the others must have
        writes, main_shape = [], None
        for name, matrix in sorted(pairs, key=lambda pair: pair[0] != ""):
            writes.append(self._checked(name, matrix, main_shape=main_shape))
            if writes[-1].keywords["defines_shape"]:
                main_shape = writes[-1].keywords["shape"]
        return writes

    def _checked(self, name: str, matrix: Any, chunks: tuple[int, int] = fmt.DEFAULT_CHUNKS,
                 chunk_cache: int = fmt.DEFAULT_CHUNK_CACHE_MB, dtype: Any = None,
                 compression_opts: int | None = fmt.DEFAULT_COMPRESSION_LEVEL,
                 main_shape: tuple[int, int] | None = None) -> functools.partial:
        """The checks of a ``set_layer``; returns its write (``main_shape``: the shape a main matrix
        checked just before will give a file that has none yet)."""
        fmt.check_name(name, f"{self._file.filename}: layer", empty=True)
        where = f"{self._file.filename}: layer '{name}'"
        check_writable(self._file, where)
        if isinstance(matrix, (str, np.dtype, type)):  # an empty layer of that dtype
            if dtype is not None:
                raise LoomValueError(f"{where}: the dtype is given twice ({matrix!r} and dtype={dtype!r})")
            matrix, dtype = None, matrix
        self._dims.sync(on_disk=True)
        chunks, compression_opts, chunk_cache = fmt.check_storage(chunks, compression_opts, chunk_cache, where)
        if isinstance(matrix, LoomLayer):
            matrix = matrix[:, :]
        if matrix is not None:
            matrix = encoding.matrix_values(matrix, where)
        target_dtype = fmt.check_matrix_dtype(dtype if dtype is not None else _input_dtype(matrix), where)
        expected = main_shape or self._dims.shape
        shape = expected if matrix is None else tuple(matrix.shape)
        if len(shape) != 2:
            raise LoomValueError(f"{where}: a layer must be two-dimensional, got shape {shape}")
        defines_shape = self._dims.shape == (0, 0) and name == "" and "" not in self
        if not defines_shape and shape != expected:
            raise LoomValueError(f"{where}: shape {shape} does not match the matrix shape {expected}")
        if matrix is not None:
            fmt.check_fits(matrix, target_dtype, where)
        check_free_space(self._file.filename, stored_size_bound(matrix) + SPARE_BYTES, where)
        return functools.partial(self._store, name, matrix, shape=shape, target_dtype=target_dtype, chunks=chunks,
                                 compression_opts=compression_opts, chunk_cache=chunk_cache,
                                 defines_shape=defines_shape)

    def _store(self, name: str, matrix: Any, *, shape: tuple[int, int], target_dtype: np.dtype,
               chunks: tuple[int, int], compression_opts: int | None, chunk_cache: int, defines_shape: bool) -> None:
        existing = self._dataset(name)
        group, final = fmt.layer_place(self._file, name)

        def write(target: str) -> h5py.Dataset:
            dataset = fmt.create_matrix(group, target, shape, target_dtype, chunks=chunks,
                                        compression_opts=compression_opts, chunk_cache=chunk_cache)
            if matrix is not None:
                engine.write_matrix(dataset, matrix)
            return dataset

        if existing is not None:
            engine.forget(existing)  # its chunk index must not outlive it (the name is reused)
        # another dtype or shape: written whole before it takes the name (see swaps); a new name too is
        # a change of the layers (their names are listed again)
        with changing(self._file, "layers"):
            dataset = swaps.replace(group, final, write)
        fmt.touch(dataset, dataset.parent)
        if defines_shape:
            self._dims.shape = shape
            changed(self._file, "shape")

    @one_of_the_writes
    def __delitem__(self, name: str) -> None:
        if name == "":
            raise LoomValueError(f"{self._file.filename}: the main matrix (layer '') cannot be deleted")
        if name not in self:
            raise LoomKeyError(f"{self._file.filename}: layer '{name}' does not exist")
        check_deletable(self._file, f"{self._file.filename}: layer '{name}'")
        group = self._file[fmt.LAYERS]
        engine.forget(group[name])  # a layer made later under this name must not find its chunk index
        self._found.pop(name, None)  # (nor keep the deleted dataset open)
        with changing(self._file, "layers"):  # (counted also as it ends: Ctrl-C just after the delete too)
            del group[name]
        fmt.touch(group)
