"""``python -m loompy``: the command-line tool (see :mod:`loompy.cli`)."""

import sys

from .cli import main

sys.exit(main())
