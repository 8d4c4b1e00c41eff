"""MNIST: 70,000 28x28 handwritten digits (60,000 train, 10,000 test).

LeCun, Bottou, Bengio & Haffner, "Gradient-based learning applied to document recognition",
Proc. IEEE 86(11), 1998. Official files: the four IDX files (train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte), gzipped or not.

IDX format: a big-endian header (magic 0x00000803 for 3-D uint8 images, 0x00000801 for 1-D uint8
labels, then one uint32 per dimension) followed by the data. Magic numbers, dimensions and file
lengths are checked; the decoded uint8 tensors are cached by the files' checksums.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from poisonlab.config import read_small_bytes
from poisonlab.data.cache import cached_supervised, file_digest, make_key, supervised_layout
from poisonlab.data.types import SupervisedData
from poisonlab.errors import DataError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CLASSES = [str(d) for d in range(10)]
_MAGIC = {1: 0x00000801, 3: 0x00000803}  # uint8 data with 1 or 3 dimensions
_FORMAT = "mnist-v1"


def find_file(root: Path, base: str) -> Path:
    """`<root>/<base>` or `<root>/<base>.gz`; a DataError naming both when neither exists, and
    one naming the file when it is larger than any MNIST file (checked before it is hashed or
    read: a sparse file can declare gigabytes at no cost)."""
    for path in (root / base, root / f"{base}.gz"):
        if path.is_file():
            if path.stat().st_size > MAX_IDX_BYTES:
                raise DataError(f"{path} is {path.stat().st_size:,} bytes, larger than any "
                                f"MNIST file ({MAX_IDX_BYTES // 2**20} MiB at most)")
            return path
    raise DataError(f"MNIST file {root / base} (or {base}.gz) is missing")


# The largest IDX file of MNIST is 47,040,016 bytes (60,000 images); a file that unpacks to more
# is corrupt or hostile (a few MB of gzipped zeros can declare gigabytes).
MAX_IDX_BYTES = 64 * 2**20


def _gunzip(raw: bytes, path: Path) -> bytes:
    """The gzip members of `raw` concatenated, refused as soon as they pass MAX_IDX_BYTES."""
    limit = MAX_IDX_BYTES
    out: list[bytes] = []
    size = 0
    while raw:
        inflate = zlib.decompressobj(wbits=31)  # one gzip member
        out.append(inflate.decompress(raw, limit + 1 - size))
        size += len(out[-1])
        if size > limit or inflate.unconsumed_tail:
            raise DataError(f"{path} unpacks to more than {limit // 2**20} MiB, more than any "
                            "MNIST file (a corrupt or hostile file)")
        if not inflate.eof:
            raise DataError(f"cannot read {path}: the gzip stream is truncated")
        raw = inflate.unused_data
    return b"".join(out)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of uint8 data with `ndim` dimensions, gzipped or not, as a NumPy array."""
    try:  # no larger than the largest unpacked file (a gzipped one is smaller still)
        raw = read_small_bytes(path, MAX_IDX_BYTES, "an MNIST file")
        if raw[:2] == b"\x1f\x8b":
            raw = _gunzip(raw, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated: {len(raw)} bytes, shorter than its IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != _MAGIC[ndim]:
        raise DataError(f"{path} has magic number {magic:#010x}, expected {_MAGIC[ndim]:#010x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)  # Python ints: uint32 dimensions cannot wrap around
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes, expected {expected} for dimensions {list(dims)}"
            + (" (truncated)" if len(raw) < expected else "")
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = find_file(root, FILES[f"{split}_images"])
    labels_path = find_file(root, FILES[f"{split}_labels"])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{images_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path} has a label {int(labels.max())} outside 0..9")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_mnist(root: str | Path) -> SupervisedData:
    """MNIST as float32 images [N, 1, 28, 28] in [0, 1] with int64 labels 0..9."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MNIST folder {root} does not exist")
    paths = [find_file(root, base) for base in FILES.values()]
    key = make_key("mnist", _FORMAT, *(f"{p.name}:{file_digest(p)}" for p in paths))

    def build():
        x_train, y_train = _read_split(root, "train")
        x_test, y_test = _read_split(root, "test")
        return x_train, y_train, x_test, y_test, list(CLASSES)

    return cached_supervised(key, build, supervised_layout(1, 28, len(CLASSES)))
