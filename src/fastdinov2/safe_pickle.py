"""Load pickles that hold only data (e.g. the revisited Oxford/Paris ``gnd_*.pkl`` ground truth).

A pickle is a program: ``pickle.load`` imports and calls whatever globals the file names, so a crafted
file runs arbitrary code. :func:`safe_load` resolves only an allow-list of globals (plain containers,
numbers, strings, bytes, ``collections.OrderedDict`` and numpy array/scalar reconstruction); any other
global is refused with :class:`UnsafePickleError` before it is imported or called.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

# (module, name) pairs a data pickle may reference.
_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray", "int", "float",
             "complex", "bool", "slice", "range")
_NUMPY_RECONSTRUCT = [
    (f"numpy.{core}.{mod}", name)
    for core in ("core", "_core")
    for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
]
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [("builtins", n) for n in _BUILTINS]
    + [("__builtin__", n) for n in _BUILTINS]  # Python 2 pickles
    + [("collections", "OrderedDict"), ("_codecs", "encode")]  # _codecs.encode: bytes under protocol <= 2
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + _NUMPY_RECONSTRUCT
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside :data:`ALLOWED_GLOBALS`; the message names it."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}': only plain containers, numbers, "
                "strings and numpy arrays are allowed in this pickle"
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing persistent id {pid!r}")


def safe_load(path_or_file: str | Path | IO[bytes] | bytes, encoding: str = "ASCII") -> Any:
    """Unpickle data-only content from a path, an open binary file or bytes.

    ``encoding`` is passed to the unpickler (use ``"latin1"`` for Python 2 pickles holding numpy arrays).
    Raises :class:`UnsafePickleError` for any disallowed global, and ``pickle.UnpicklingError`` naming the
    source for a corrupt or truncated file.
    """
    fh: IO[bytes]
    if isinstance(path_or_file, bytes):
        source, fh, close = "<bytes>", io.BytesIO(path_or_file), True
    elif isinstance(path_or_file, str | Path):
        source, fh, close = str(path_or_file), open(path_or_file, "rb"), True  # noqa: SIM115
    else:
        source, fh, close = str(getattr(path_or_file, "name", "<file>")), path_or_file, False
    try:
        return _RestrictedUnpickler(fh, source, encoding).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise pickle.UnpicklingError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    finally:
        if close:
            fh.close()
