"""CIFAR-10: 60,000 32x32 colour images in 10 classes (50,000 train, 10,000 test).

Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", tech. report, University of
Toronto, 2009. Official release: www.cs.toronto.edu/~kriz/cifar.html.

`load_cifar10(root)` detects the format from what `root` holds:
(a) the python batches: `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
    `cifar-10-python.tar.gz`, read with the restricted unpickler (never plain pickle);
(b) the binary batches: `cifar-10-batches-bin/` (data_batch_1..5.bin, test_batch.bin: records of
    1 label byte + 3072 pixel bytes, R, G then B planes) or `cifar-10-binary.tar.gz`;
(c) an image folder `train/<class>/*.png|jpg` and `test/<class>/...`, as a folder or a .tar.gz.
Archives are read in memory, never extracted. The decoded uint8 images are cached under a key
made of the source's checksum (archives) or file sizes and times (folders).
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from poisonlab.data.archive import ArchiveBudget
from poisonlab.data.cache import cached_supervised, file_digest, make_key, supervised_layout
from poisonlab.data.image_folder import IMAGE_EXTENSIONS, decode_images
from poisonlab.data.safe_pickle import safe_loads
from poisonlab.data.types import SupervisedData
from poisonlab.errors import DataError

CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
RECORD_BYTES = 1 + 3 * 32 * 32
_FORMAT = "cifar10-v1"

# Reads a member ("data_batch_1", "train/cat/0001.png", ...) of a source folder or archive.
_Reader = Callable[[str], bytes]


def load_cifar10(root: str | Path, workers: int | None = None) -> SupervisedData:
    """CIFAR-10 as float32 images [N, 3, 32, 32] in [0, 1] with int64 labels (see module doc)."""
    root = Path(root)
    kind, source = _detect(root)
    fingerprint = _fingerprint(source)
    key = make_key("cifar10", _FORMAT, kind, fingerprint)
    return cached_supervised(key, lambda: _BUILDERS[kind](source, workers),
                             supervised_layout(3, 32, len(CLASSES)))


def _detect(root: Path) -> tuple[str, Path]:
    """(format, source path): format is python, binary or folder; source a folder or archive."""
    if root.is_file():
        return _archive_kind(root), root
    if not root.is_dir():
        raise DataError(f"CIFAR-10 location {root} does not exist")
    for kind, folder, marker in (
        ("python", "cifar-10-batches-py", "data_batch_1"),
        ("binary", "cifar-10-batches-bin", "data_batch_1.bin"),
    ):
        if (root / marker).is_file():
            return kind, root
        if (root / folder / marker).is_file():
            return kind, root / folder
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "folder", root
    for name, kind in (("cifar-10-python.tar.gz", "python"), ("cifar-10-binary.tar.gz", "binary")):
        if (root / name).is_file():
            return kind, root / name
    archives = sorted(p for p in root.iterdir() if p.name.endswith((".tar.gz", ".tgz", ".tar")))
    if len(archives) == 1:
        return _archive_kind(archives[0]), archives[0]
    raise DataError(
        f"no CIFAR-10 data found in {root}: expected cifar-10-batches-py/, cifar-10-batches-bin/, "
        "train/ and test/ folders, or one .tar.gz of them"
    )


def _archive_kind(path: Path) -> str:
    try:
        with tarfile.open(path) as tf:
            for member in tf:
                parts = member.name.split("/")
                if "cifar-10-batches-py" in parts:
                    return "python"
                if "cifar-10-batches-bin" in parts:
                    return "binary"
                if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                    return "folder"
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable tar archive: {exc}") from exc
    raise DataError(f"{path} holds no CIFAR-10 batches or train/<class>/ images")


def _fingerprint(source: Path) -> str:
    if source.is_file():
        return f"sha256:{file_digest(source)}"
    lines = []
    for dirpath, _, names in os.walk(source):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            lines.append(f"{os.path.relpath(dirpath, source)}/{name} {st.st_size} {st.st_mtime_ns}")
    return "stat:" + make_key("tree", *sorted(lines))


# The largest member of a CIFAR-10 archive is a 30.7 MB batch, the whole data set 180 MB.
_MEMBER_LIMIT, _TOTAL_LIMIT = 64 * 2**20, 1024 * 2**20


def _archive_members(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The regular files of a (gzipped) tar whose path inside the archive is `wanted`, read in
    memory from a stream (the archive is never decompressed whole), sizes checked first."""
    budget = ArchiveBudget(path, "CIFAR-10", _MEMBER_LIMIT, _TOTAL_LIMIT)
    members = {}
    try:
        with tarfile.open(path, mode="r:*") as tf:
            for member in tf:
                if member.isfile() and wanted(member.name):
                    budget.take(member.name, member.size)
                    members[member.name] = tf.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} is not a readable tar archive: {exc}") from exc
    return members


def _batch_reader(source: Path) -> _Reader:
    """Reader of batch files by base name, from a batches folder or an archive holding one."""
    if source.is_dir():
        def read_file(name: str) -> bytes:
            path = source / name
            if not path.is_file():
                raise DataError(f"CIFAR-10 batch file {path} is missing")
            return path.read_bytes()

        return read_file
    names = {*(f"{b}{suffix}" for b in (*TRAIN_BATCHES, TEST_BATCH) for suffix in ("", ".bin")),
             "batches.meta", "batches.meta.txt"}
    members = _archive_members(source, lambda member: member.rsplit("/", 1)[-1] in names)
    by_name = {m.rsplit("/", 1)[-1]: (m, data) for m, data in members.items()}

    def read_member(name: str) -> bytes:
        if name not in by_name:
            raise DataError(f"CIFAR-10 batch file {name} is missing from {source}")
        return by_name[name][1]

    return read_member


def _check_labels(labels: np.ndarray, source: str) -> torch.Tensor:
    if labels.dtype.kind not in "iu":  # strings, floats (0.9 would become class 0), objects
        raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{source} has a label outside 0..9")
    return torch.from_numpy(labels.astype(np.int64))


def _python_batch(read: _Reader, name: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    source = f"{where}:{name}" if where.is_file() else str(where / name)
    batch = safe_loads(read(name), source)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{source} is not a CIFAR-10 batch (no b'data' and b'labels' keys)")
    data = batch[b"data"]
    try:
        labels = np.asarray(batch[b"labels"])
    except (ValueError, TypeError) as exc:  # ragged or nested lists
        raise DataError(f"{source}: labels are not a flat list of integers") from exc
    if labels.size == 0:  # np.asarray([]) is float64: "labels must be integers" misled
        raise DataError(f"{source} holds no records")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != RECORD_BYTES - 1 or labels.shape != (data.shape[0],):
        raise DataError(f"{source}: expected uint8 data [N, 3072] and N labels")
    x = torch.from_numpy(data.copy()).reshape(-1, 3, 32, 32)
    return x, _check_labels(labels, source)


def _binary_batch(read: _Reader, name: str, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    source = f"{where}:{name}" if where.is_file() else str(where / name)
    raw = np.frombuffer(read(name), dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DataError(f"{source} has {raw.size} bytes, not a multiple of {RECORD_BYTES}-byte records")
    records = raw.reshape(-1, RECORD_BYTES)
    x = torch.from_numpy(records[:, 1:].copy()).reshape(-1, 3, 32, 32)
    return x, _check_labels(records[:, 0], source)


def _check_class_names(read: _Reader, source: Path, binary: bool) -> None:
    """The batches' own class list must be the official one (the meta file is optional)."""
    name = "batches.meta.txt" if binary else "batches.meta"
    try:
        data = read(name)
    except DataError:
        return
    where = f"{source}:{name}" if source.is_file() else str(source / name)
    if binary:
        names = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    else:
        meta = safe_loads(data, where)
        raw = meta.get(b"label_names", []) if isinstance(meta, dict) else []
        raw = raw if isinstance(raw, list | tuple) else [raw]  # damaged: shown as it is
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in raw]
    if names != CLASSES:
        raise DataError(f"{where} lists classes {names}, expected the CIFAR-10 classes {CLASSES}")


def _build_batches(source: Path, workers: int | None, binary: bool):
    read = _batch_reader(source)
    _check_class_names(read, source, binary)
    load = _binary_batch if binary else _python_batch
    suffix = ".bin" if binary else ""
    train = [load(read, f"{name}{suffix}", source) for name in TRAIN_BATCHES]
    x_test, y_test = load(read, f"{TEST_BATCH}{suffix}", source)
    x_train = torch.cat([x for x, _ in train])
    y_train = torch.cat([y for _, y in train])
    return x_train, y_train, x_test, y_test, list(CLASSES)


def _folder_items(source: Path) -> dict[str, list[tuple[str, bytes | Path, str]]]:
    """Per split, sorted (name for errors, bytes or path, class) of every image."""
    splits: dict[str, list[tuple[str, bytes | Path, str]]] = {"train": [], "test": []}
    if source.is_file():
        def is_image(member: str) -> bool:
            parts = member.split("/")
            return (len(parts) >= 3 and parts[-3] in splits
                    and parts[-1].lower().endswith(IMAGE_EXTENSIONS))

        for member, data in _archive_members(source, is_image).items():
            parts = member.split("/")
            splits[parts[-3]].append((f"{source}:{member}", data, parts[-2]))
    else:
        for split, items in splits.items():
            for class_dir in sorted((source / split).iterdir()):
                if class_dir.is_dir():
                    items.extend(
                        (str(p), p, class_dir.name) for p in sorted(class_dir.iterdir())
                        if p.suffix.lower() in IMAGE_EXTENSIONS
                    )
    for split, items in splits.items():
        items.sort(key=lambda item: item[0])
        found = {c for _, _, c in items}
        if found != set(CLASSES):
            missing, extra = sorted(set(CLASSES) - found), sorted(found - set(CLASSES))
            raise DataError(
                f"CIFAR-10 {split} images in {source}: classes missing {missing}, unexpected {extra}"
            )
    return splits


def _build_folder(source: Path, workers: int | None):
    out = []
    for items in _folder_items(source).values():
        x = decode_images([(name, data) for name, data, _ in items], (32, 32), 3, workers)
        y = torch.tensor([CLASSES.index(c) for _, _, c in items], dtype=torch.int64)
        out.extend([x, y])
    return (*out, list(CLASSES))


_BUILDERS = {
    "python": lambda source, workers: _build_batches(source, workers, binary=False),
    "binary": lambda source, workers: _build_batches(source, workers, binary=True),
    "folder": _build_folder,
}
