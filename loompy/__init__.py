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
    LoomMixedAttributesError,
    LoomReadOnlyError,
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
from .utils import deprecated  # (the module loompy.utils comes with it, as in loompy 3)
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
    "LoomMixedAttributesError",
    "LoomReadOnlyError",
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
    "deprecated",
    "get_loom_spec_version",
    "loom_spec_version",
    "materialize_attr_values",
    "new",
    "normalize_attr_values",
    "repack",
    "timestamp",
    "to_html",
]


def _loompy3_module_paths() -> None:
    """loompy 3's module paths (``from loompy.loom_view import LoomView``, ``loompy.layer_manager``),
    each a module holding the names loompy 3 kept there, as this package's own."""
    import importlib.machinery
    import sys
    import types

    kept_there = {
        "attribute_manager": ["AttributeManager"], "global_attribute_manager": ["GlobalAttributeManager"],
        "graph_manager": ["GraphManager"], "layer_manager": ["LayerManager"],
        "loom_layer": ["LoomLayer", "MemoryLoomLayer"], "loom_view": ["LoomView"], "view_manager": ["ViewManager"],
        "loom_validator": ["LoomValidator"],
    }
    package = sys.modules[__name__]
    for module_name, names in kept_there.items():
        module = types.ModuleType(f"{__name__}.{module_name}", f"loompy 3's module path for {', '.join(names)}.")
        module.__dict__.update({name: getattr(package, name) for name in names}, __all__=names,
                               __spec__=importlib.machinery.ModuleSpec(module.__name__, None))
        sys.modules[module.__name__] = module
        setattr(package, module_name, module)


_loompy3_module_paths()
from . import loompy as loompy  # noqa: E402  (loompy 3's module, there after ``import loompy`` as it was)
