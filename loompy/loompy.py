"""The module loompy 3 kept its connection and file-making functions in, so that imports of that path
(``from loompy.loompy import LoomConnection``, as the SCope viewer's server writes) work as they did.
The names are the package's own."""

from . import (
    LoomConnection,
    combine,
    combine_faster,
    connect,
    create,
    create_append,
    create_from_cellranger,
    create_from_matrix_market,
    create_from_tsv,
    new,
    timestamp,
)

__all__ = ["LoomConnection", "combine", "combine_faster", "connect", "create", "create_append",
           "create_from_cellranger", "create_from_matrix_market", "create_from_tsv", "new", "timestamp"]
