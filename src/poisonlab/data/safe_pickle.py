"""A restricted unpickler for pickled data files (the CIFAR-10 python batches).

Unpickling runs whatever callables a pickle names, so a data file from the internet must not go
through `pickle.load`. `RestrictedUnpickler` resolves only the globals that pickled dicts, lists
and NumPy arrays need and refuses everything else with a DataError before it is imported.

The official CIFAR-10 batches are Python 2 protocol-2 pickles of dicts with byte-string keys,
lists of ints or byte strings, and uint8 arrays; the arrays reference
`numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`. The same data pickled by
Python 3 at protocol 2 also references `_codecs.encode` (how bytes are written below protocol 3).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from poisonlab.errors import DataError


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _allowed() -> dict[tuple[str, str], Any]:
    import _codecs

    reconstruct = _numpy_reconstruct()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("_codecs", "encode"): _codecs.encode,
    }
    for module in ("builtins", "__builtin__"):  # Python 3 and Python 2 spellings
        for kind in (dict, list, tuple, bytes, bytearray, str, int, float, bool):
            allowed[(module, kind.__name__)] = kind
    return allowed


_ALLOWED = _allowed()


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` hands out only the allow-listed data constructors.

    Byte strings from Python 2 pickles stay `bytes` (encoding="bytes"), as the CIFAR batches
    expect (`batch[b"data"]`).
    """

    def __init__(self, file, source: str = "<data>") -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.source}: "
                "not allowed in a data file"
            ) from None


def safe_loads(data: bytes, source: str = "<data>") -> Any:
    """Unpickle `data` with the restricted unpickler; `source` names it in errors."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a malformed pickle is bad data
        raise DataError(f"cannot unpickle {source}: {type(exc).__name__}: {exc}") from exc


def safe_load_file(path: str | Path) -> Any:
    """Read and unpickle a file with the restricted unpickler."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return safe_loads(data, str(path))
