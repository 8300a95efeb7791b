"""Arrays reused from one strip or chunk row to the next.

Fresh memory costs more than copying on the machines this library targets: every large new array
is page-faulted in again (1.6 GB of fresh memory took 0.5 to 3.4 s of system time on the
benchmark machine). So the engine, and the producers that feed it, keep their working arrays.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

import numpy as np


class Scratch(threading.local):
    """Named arrays, one set per thread, each grown when a request is larger than what it holds.

    An array handed out stays valid until the same thread asks for the same name again.
    """

    def __init__(self) -> None:
        self.arrays: dict[Hashable, np.ndarray] = {}

    def get(self, name: Hashable, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype``, in memory reused under ``name``."""
        count = int(np.prod(shape))
        array = self.arrays.get(name)
        if array is None or array.size < count or array.dtype != dtype:
            array = self.arrays[name] = np.empty(count, dtype)
        return array[:count].reshape(shape)
