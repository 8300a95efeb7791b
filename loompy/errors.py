"""One exception hierarchy for loompy.

Every class derives from :class:`LoomError` and also from the builtin exception the
reference loompy raises in the same situation, so ``except KeyError`` and
``except loompy.LoomError`` both work.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class LoomError(Exception):
    """Base class of every error raised by loompy."""


class LoomKeyError(LoomError, KeyError, AttributeError):
    """A named attribute, layer or graph does not exist (loompy 3 raised AttributeError for
    ``ds.ca["X"]`` as for ``ds.ca.X``: ``except KeyError`` and ``except AttributeError`` both work)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class LoomAttributeError(LoomKeyError):
    """Dot access to a name that is neither a method nor an attribute (a :class:`LoomKeyError` too,
    so ``except KeyError`` catches ``ds.ca.X`` as it catches ``ds.ca["X"]``)."""


class LoomValueError(LoomError, ValueError):
    """A value has the wrong shape, type or content for where it is written."""


class LoomMixedAttributesError(LoomValueError, AttributeError):
    """Alternative attribute names (``ds.ca[("A", "B")]``) found with different dtypes, which cannot
    be taken side by side (an AttributeError too, as loompy 3 raised)."""


class LoomIndexError(LoomError, IndexError):
    """A selection reaches outside the matrix."""


class LoomTypeError(LoomError, TypeError):
    """An argument has a type loompy cannot use."""


class LoomFileError(LoomError, OSError):
    """The file cannot be opened, is not a Loom file, or is open in the wrong mode."""


class LoomReadOnlyError(LoomFileError, ValueError):
    """A write to a file open read-only (a ValueError too, as loompy 3 raised for attribute writes)."""


class LoomFileNotFoundError(LoomFileError, FileNotFoundError):
    """The path does not exist."""


class LoomLockError(LoomFileError):
    """HDF5 could not take the file lock (another process writes, or the file system refuses locks)."""


class LoomFormatError(LoomValueError):
    """The file's structure breaks the Loom specification in a way readers cannot work around."""


@contextmanager
def naming(where: str) -> Iterator[None]:
    """Raise a loompy error from inside the block again, of the same class, with ``where`` (the
    file and the argument at fault) before its message."""
    try:
        yield
    except LoomError as error:
        raise type(error)(f"{where}: {error}") from error


class naming_the_file:  # noqa: N801 (used as a function: ``with naming_the_file(name):``)
    """Raise a loompy error from inside the block that does not name ``filename`` again, of the
    same class, with the file's name before its message (an error of the engine, which knows
    datasets, not files). (A class, not a generator: it is on the path of every small read.)"""

    __slots__ = ("filename",)

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        if isinstance(error, LoomError) and self.filename not in str(error):
            raise type(error)(f"{self.filename}: {error}") from error
