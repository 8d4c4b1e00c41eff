"""On-disk cache of preprocessed data sets: safetensors files plus a JSON sidecar.

A cache entry is keyed by a string (typically the data set name, a format version and the
checksums of its source files). It holds named tensors (`<key>.safetensors`) and JSON metadata
such as class names (`<key>.json`). Both files are written atomically (temporary file, then
`os.replace`), the sidecar last, so a reader sees either a whole entry or none. An unreadable
entry counts as a miss and is rebuilt by the caller.

A cache folder is not trusted either: each loader declares what it would build (`Expected`:
every tensor's dtype and shape, with named sizes that must agree across tensors and metadata
lists, label ranges), and an entry that does not match is deleted and counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.errors import DataError

_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


CACHE_ENV = "POISONLAB_CACHE"
DEFAULT_CACHE = "~/.cache/poisonlab"
# Where the cache is, for help texts.
CACHE_LOCATION = f"${CACHE_ENV}, else {DEFAULT_CACHE}"


def cache_dir() -> Path:
    """The cache folder: `$POISONLAB_CACHE`, else `~/.cache/poisonlab`; created on demand."""
    path = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create cache directory {path}: {exc.strerror}") from exc
    return path


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's content (sha256 by default), read in 1 MiB blocks."""
    h = hashlib.new(algorithm)
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    return h.hexdigest()


def make_key(name: str, *parts: str) -> str:
    """A cache key `<name>-<16 hex digits>` derived from any identifying strings."""
    h = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return f"{name}-{h}"


def _paths(key: str) -> tuple[Path, Path]:
    if not _KEY_PATTERN.match(key):
        raise DataError(f"invalid cache key {key!r}: use letters, digits, '.', '_' or '-'")
    base = cache_dir()
    return base / f"{key}.safetensors", base / f"{key}.json"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache entry is ordinary data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_cached(key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Store tensors and JSON-serialisable metadata under `key`, replacing any old entry."""
    tensor_path, meta_path = _paths(key)
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _atomic_write(tensor_path, lambda tmp: save_file(contiguous, tmp))
    text = json.dumps(meta, sort_keys=True)
    _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


Size = int | str  # a fixed size, or a name whose value must agree wherever it appears


@dataclass(frozen=True)
class Expected:
    """What a loader would build. tensors: name → (dtype, shape), a shape entry an int or a size
    name; lists: metadata key → length (a list of strings); labels: tensor → size name K, its
    values in [0, K)."""

    tensors: Mapping[str, tuple[torch.dtype, tuple[Size, ...]]]
    lists: Mapping[str, Size] = field(default_factory=dict)
    labels: Mapping[str, Size] = field(default_factory=dict)

    def problem(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str | None:
        """Why the entry is not what the loader builds, or None."""
        sizes: dict[str, int] = {}

        def agree(size: Size, actual: int, where: str) -> str | None:
            expected = sizes.setdefault(size, actual) if isinstance(size, str) else size
            return None if expected == actual else f"{where} is {actual}, expected {expected}"

        if set(tensors) != set(self.tensors):
            return f"tensors {sorted(tensors)}, expected {sorted(self.tensors)}"
        for name, (dtype, shape) in self.tensors.items():
            t = tensors[name]
            if t.dtype != dtype or t.dim() != len(shape):
                return f"{name} is {t.dtype} {list(t.shape)}, expected {dtype} of {len(shape)} dims"
            for i, size in enumerate(shape):
                if (bad := agree(size, int(t.shape[i]), f"{name} dim {i}")) is not None:
                    return bad
        for key, size in self.lists.items():
            values = meta.get(key)
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                return f"metadata {key} is not a list of names"
            if (bad := agree(size, len(values), f"len({key})")) is not None:
                return bad
        for name, size in self.labels.items():
            t, k = tensors[name], sizes.get(size) if isinstance(size, str) else size
            if t.numel() and (k is None or int(t.min()) < 0 or int(t.max()) >= k):
                return f"{name} holds labels outside [0, {k})"
        return None


def load_cached(key: str, expected: Expected | None = None
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The tensors and metadata stored under `key`, or None when absent, unreadable or not
    what `expected` declares (such an entry is deleted, so the caller rebuilds it)."""
    tensor_path, meta_path = _paths(key)
    if not (tensor_path.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        tensors = load_file(tensor_path)
    except (OSError, ValueError, RecursionError, SafetensorError):  # deep JSON: RecursionError
        return None
    if expected is not None and (not isinstance(meta, dict)
                                 or expected.problem(tensors, meta) is not None):
        for path in (meta_path, tensor_path):
            path.unlink(missing_ok=True)
        return None
    return tensors, meta


# What a supervised loader builds: uint8 train images, int64 labels, uint8 test images, labels,
# class names.
RawSupervised = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def supervised_layout(channels: int, size: Size, classes: Size = "K") -> Expected:
    """A supervised entry: uint8 images [N, channels, size, size] and [M, ...] (train, test),
    int64 labels in [0, classes), `classes` class names."""
    image = (channels, size, size)
    return Expected(
        tensors={"x_train": (torch.uint8, ("N", *image)), "y_train": (torch.int64, ("N",)),
                 "x_test": (torch.uint8, ("M", *image)), "y_test": (torch.int64, ("M",))},
        lists={"classes": classes}, labels={"y_train": classes, "y_test": classes})


def cached_supervised(key: str, build: Callable[[], RawSupervised],
                      expected: Expected | None = None) -> SupervisedData:
    """Load a supervised set from the cache, or `build()` it (uint8 images) and cache it.

    Images are stored as uint8 (a quarter of float32's size) and returned as float32 in [0, 1].
    `expected` (see `supervised_layout`) checks a cached entry before it is used.
    """
    cached = load_cached(key, expected)
    if cached is None:
        x_train, y_train, x_test, y_test, classes = build()
        tensors = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        save_cached(key, tensors, {"classes": classes})
    else:
        tensors, meta = cached
        classes = list(meta["classes"])
    return SupervisedData(
        train=ImageSet(tensors["x_train"].float().div_(255.0), tensors["y_train"].long()),
        test=ImageSet(tensors["x_test"].float().div_(255.0), tensors["y_test"].long()),
        classes=classes,
    )
