"""loompy: read and write Loom files (chunked, compressed HDF5 containers for annotated matrices).

>>> import loompy
>>> with loompy.connect("cortex.loom") as ds:
...     ds[ds.ra.Gene == "Actb", :]
"""

from .access import render_html as to_html
from .attributes import AttributeManager, GlobalAttributeManager
from .combine import combine, combine_faster, create_append, repack
from .connection import LoomConnection, connect
from .create import create, new
from .errors import (
    LoomAttributeError,
    LoomError,
    LoomFileError,
    LoomFileNotFoundError,
    LoomFormatError,
    LoomIndexError,
    LoomKeyError,
    LoomLockError,
    LoomTypeError,
    LoomValueError,
)
from .format import CURRENT_SPEC as LOOM_SPEC_VERSION
from .format import compare_loom_spec_version, get_loom_spec_version, timestamp
from .graphs import GraphManager
from .importers import create_from_cellranger
from .layers import LayerManager, LoomLayer
from .normalize import materialize_attr_values, normalize_attr_values
from .text_importers import create_from_matrix_market, create_from_tsv
from .validator import LoomValidator
from .view import LoomView, ViewManager
from .view import MemoryLayer as MemoryLoomLayer

__version__ = "4.0.0.dev0"
loom_spec_version = LOOM_SPEC_VERSION  # (loompy 3's name for it)

__all__ = [
    "AttributeManager",
    "GlobalAttributeManager",
    "GraphManager",
    "LOOM_SPEC_VERSION",
    "LayerManager",
    "LoomAttributeError",
    "LoomConnection",
    "LoomError",
    "LoomFileError",
    "LoomFileNotFoundError",
    "LoomFormatError",
    "LoomIndexError",
    "LoomKeyError",
    "LoomLayer",
    "LoomLockError",
    "LoomTypeError",
    "LoomValidator",
    "LoomValueError",
    "LoomView",
    "MemoryLoomLayer",
    "ViewManager",
    "__version__",
    "combine",
    "combine_faster",
    "compare_loom_spec_version",
    "connect",
    "create",
    "create_append",
    "create_from_cellranger",
    "create_from_matrix_market",
    "create_from_tsv",
    "get_loom_spec_version",
    "loom_spec_version",
    "materialize_attr_values",
    "new",
    "normalize_attr_values",
    "repack",
    "timestamp",
    "to_html",
]
