"""Matrix I/O for every layer: the one place that reads and writes matrix elements.

Callers pass *sorted, unique* row and column index arrays (see :mod:`loompy.indexing`). For the
datasets Loom files normally hold (chunked; no filter or a single deflate filter; numeric dtype) the
engine works on raw chunks: :mod:`.storage` knows where they are, :mod:`.codecs` inflates and
deflates them, :mod:`.read` assembles selections from them and :mod:`.write` stores values as them,
with worker threads doing the inflating and deflating (:mod:`.workers`) in reused memory (:mod:`.memory`).
Whole-matrix jobs go to helper processes (:mod:`.processes`, running :mod:`.child`): re-encoding
chunk rows (:mod:`.bands`: combine, permute), reducing rows or columns (:mod:`.lines`: map),
picking a few lines of many bands (:mod:`.picks`) and filling a scan's batches (:mod:`.scans`).
Anything else (shuffle, other codecs, checksums, contiguous storage) goes through h5py's own path,
so every valid file still reads and writes correctly. Measurements behind the choices: ``benchmarks/README.md``.
"""

from .copying import copy_columns, copying_columns, reorder_columns
from .lines import reduce_block, reduce_columns
from .memory import Recycler, Scratch, fresh
from .read import STRIP_BYTES, each_row_block, read_block, read_sparse, reduce_lines
from .scans import BatchReads
from .storage import (
    chunk_layout,
    expect_reads,
    forget,
    forget_file,
    forget_later,
    forget_let_go,
    forget_opening,
    held_index,
    writing_all,
)
from .write import (
    resize,
    write_block,
    write_columns,
    write_matrix,
    write_rows,
)

__all__ = [
    "STRIP_BYTES", "BatchReads", "Recycler", "Scratch", "chunk_layout", "copy_columns",
    "copying_columns", "each_row_block", "expect_reads", "forget", "forget_file", "forget_later",
    "forget_let_go", "forget_opening", "fresh",
    "held_index",
    "read_block", "read_sparse", "reduce_block", "reduce_columns", "reduce_lines",
    "reorder_columns", "resize", "write_block", "write_columns", "write_matrix", "write_rows",
    "writing_all",
]
