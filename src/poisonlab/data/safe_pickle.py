"""A restricted unpickler for pickled data files (the CIFAR-10 python batches).

Unpickling runs whatever callables a pickle names, so a data file from the internet must not go
through `pickle.load`. `RestrictedUnpickler` resolves only the globals that pickled dicts, lists
and NumPy arrays need and refuses everything else with a DataError before it is imported.

The official CIFAR-10 batches are Python 2 protocol-2 pickles of dicts with byte-string keys,
lists of ints or byte strings, and uint8 arrays; the arrays reference
`numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`. The same data pickled by
Python 3 at protocol 2 also references `_codecs.encode` (how bytes are written below protocol 3).

Allowed globals are also bounded, so that a few hundred bytes cannot ask for gigabytes: a real
pickle rebuilds an array with `_reconstruct(ndarray, (0,), b"b")` and then fills it from raw
bytes inside the file, so
- calling `numpy.ndarray` itself is refused (it would make a view with any shape and strides,
  e.g. zero strides, over a tiny buffer), and `_reconstruct` accepts only the ndarray class;
- every size an allowed callable is asked to allocate (`_reconstruct`'s shape, `bytes(n)`,
  `bytearray(n)`) and every dtype's item size is at most the file's own length, object dtypes
  are refused;
- after loading, the arrays' bytes together are at most the file's length (their data must have
  been in the file).
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


def _ndarray(*_args, **_kwargs):
    """Stands for numpy.ndarray in a pickle: passed to `_reconstruct`, never called."""
    raise DataError("constructing numpy.ndarray directly is not allowed in a data file "
                    "(arrays are rebuilt from their own bytes)")


def _allowed(limit: int) -> dict[tuple[str, str], Any]:
    """The allow-listed globals, each bounded by `limit` (the pickle's length in bytes)."""
    import _codecs

    reconstruct = _numpy_reconstruct()

    def too_big(what: str, n: int) -> DataError:
        return DataError(f"{what} asks for {n} bytes, more than the {limit}-byte file holds")

    def dtype(*args, **kwargs) -> np.dtype:
        dt = np.dtype(*args, **kwargs)
        if dt.hasobject:
            raise DataError("object arrays are not allowed in a data file")
        if dt.itemsize > limit:
            raise too_big(f"dtype {dt}", dt.itemsize)
        return dt

    def rebuild(subtype, shape, dt):
        if subtype is not _ndarray:
            raise DataError("numpy _reconstruct of anything but numpy.ndarray is not allowed")
        dt = np.dtype(dt) if not isinstance(dt, np.dtype) else dt
        count = int(np.prod(shape, dtype=object)) if len(shape) else 1
        if count * dt.itemsize > limit:
            raise too_big(f"an array of shape {tuple(shape)}", count * dt.itemsize)
        return reconstruct(np.ndarray, shape, dt)

    def latin1(text, encoding="latin1", *_errors):
        """How protocol 2 writes bytes: `_codecs.encode(str, "latin1")`, same length. Other
        codecs (hex doubles its input) could be chained to grow a few bytes into gigabytes."""
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise DataError(f"_codecs.encode with {encoding!r} is not allowed in a data file")
        return _codecs.encode(text, "latin1")

    def sized(kind):
        def make(*args):
            if args and isinstance(args[0], int) and not isinstance(args[0], bool) \
                    and args[0] > limit:
                raise too_big(f"{kind.__name__}({args[0]})", args[0])
            return kind(*args)
        return make

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _ndarray,
        ("numpy", "dtype"): dtype,
        ("numpy.core.multiarray", "_reconstruct"): rebuild,
        ("numpy._core.multiarray", "_reconstruct"): rebuild,
        ("_codecs", "encode"): latin1,
    }
    for module in ("builtins", "__builtin__"):  # Python 3 and Python 2 spellings
        for kind in (dict, list, tuple, str, int, float, bool):
            allowed[(module, kind.__name__)] = kind
        for kind in (bytes, bytearray):
            allowed[(module, kind.__name__)] = sized(kind)
    return allowed


MAX_DEPTH = 64


def _array_bytes(obj: Any, source: str, budget: int) -> int:
    """Bytes held by the NumPy arrays inside `obj` (dicts, lists, tuples), views counted whole.

    The walk visits the object as the tree every consumer will see, so it is bounded: a pickle
    can reference one container many times (its memo), and a few hundred bytes of `L = [L, L]`
    nested 45 times are a tree of 2^45 nodes. More than `budget` nodes (the file's size: each
    distinct object costs at least a byte) or nesting deeper than MAX_DEPTH is refused."""
    held, visited, stack = 0, 0, [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        visited += 1
        if visited > budget:
            raise DataError(f"{source}: its shared references expand to more than {budget} "
                            "objects, more than its size can hold")
        if isinstance(node, np.ndarray):
            held += int(node.nbytes)
            continue
        children = (node.values() if isinstance(node, dict)
                    else node if isinstance(node, list | tuple) else ())
        if children and depth >= MAX_DEPTH:
            raise DataError(f"{source}: containers nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)
    return held


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose `find_class` hands out only the allow-listed data constructors.

    Byte strings from Python 2 pickles stay `bytes` (encoding="bytes"), as the CIFAR batches
    expect (`batch[b"data"]`).
    """

    def __init__(self, file, source: str = "<data>", limit: int = 2**31) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source
        self.allowed = _allowed(limit)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.source}: "
                "not allowed in a data file"
            ) from None


def safe_loads(data: bytes, source: str = "<data>") -> Any:
    """Unpickle `data` with the restricted unpickler; `source` names it in errors."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), source, limit=len(data)).load()
    except DataError as exc:
        if source in str(exc):
            raise
        raise DataError(f"{source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any failure of a malformed pickle is bad data
        raise DataError(f"cannot unpickle {source}: {type(exc).__name__}: {exc}") from exc
    held = _array_bytes(obj, source, budget=max(len(data), 1024))
    if held > len(data):
        raise DataError(f"{source}: its arrays hold {held} bytes, more than the "
                        f"{len(data)}-byte file")
    return obj


def safe_load_file(path: str | Path) -> Any:
    """Read and unpickle a file with the restricted unpickler."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return safe_loads(data, str(path))
