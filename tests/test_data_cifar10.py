"""CIFAR-10 loader: the real image-folder archive, tiny fixtures of the official python and binary
batches, image folders, bad inputs, and the restricted unpickler refusing code."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.data import cifar10
from poisonlab.data.cifar10 import CLASSES, load_cifar10
from poisonlab.data.image_folder import load_image_folder
from poisonlab.data.safe_pickle import safe_load_file, safe_loads
from poisonlab.errors import DataError


@pytest.fixture(scope="session")
def real_cifar10(shared_data):
    # The session cache (tests/conftest.py) is set before any fixture runs.
    start = time.perf_counter()
    data = load_cifar10(shared_data / "cifar10")
    print(f"\nCIFAR-10 first load in this session: {time.perf_counter() - start:.2f} s")
    return data


def test_real_cifar10_has_50000_train_and_10000_test_images(real_cifar10):
    data = real_cifar10
    assert data.classes == CLASSES
    assert data.train.x.shape == (50_000, 3, 32, 32) and data.test.x.shape == (10_000, 3, 32, 32)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.int64
    assert torch.bincount(data.train.y).tolist() == [5000] * 10
    assert torch.bincount(data.test.y).tolist() == [1000] * 10
    assert float(data.test.x.min()) >= 0.0 and float(data.test.x.max()) <= 1.0
    assert 0.3 < float(data.test.x.mean()) < 0.7


def test_second_load_reads_the_cache(real_cifar10, shared_data, monkeypatch):
    monkeypatch.setitem(cifar10._BUILDERS, "folder", lambda *a: pytest.fail("decoded again"))
    start = time.perf_counter()
    again = load_cifar10(shared_data / "cifar10")
    print(f"\nCIFAR-10 cached load: {time.perf_counter() - start:.2f} s")
    assert torch.equal(again.test.x, real_cifar10.test.x)
    assert torch.equal(again.train.y, real_cifar10.train.y)


# --- tiny fixtures in the official formats -------------------------------------------------

def _records(n: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(v) for v in rng.integers(0, 10, n)]


class _Python2Pickler(pickle._Pickler):
    """Writes byte strings as Python 2 `str` opcodes, as the official batches (cPickle) do."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def _py2_dumps(obj) -> bytes:
    out = io.BytesIO()
    _Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def _write_python_batches(folder: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH]):
        data, labels = batches[name] = _records(n, i)
        batch = {b"batch_label": b"batch", b"labels": labels, b"data": data,
                 b"filenames": [b"f%d.png" % k for k in range(n)]}
        # The official files are Python 2 pickles; one batch as Python 3 writes protocol 2.
        raw = pickle.dumps(batch, protocol=2) if i == 2 else _py2_dumps(batch)
        (folder / name).write_bytes(raw)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": n}
    (folder / "batches.meta").write_bytes(_py2_dumps(meta))
    return batches


def _write_binary_batches(folder: Path, n: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate([*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH]):
        data, labels = batches[name] = _records(n, 10 + i)
        records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data], axis=1)
        (folder / f"{name}.bin").write_bytes(records.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    return batches


def _targz(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(folder, arcname=folder.name)
    return out


def _check_against(data, batches) -> None:
    train = [batches[name] for name in cifar10.TRAIN_BATCHES]
    x_train = torch.from_numpy(np.concatenate([d for d, _ in train])).reshape(-1, 3, 32, 32)
    assert torch.equal(data.train.x, x_train.float() / 255)
    assert data.train.y.tolist() == [label for _, labels in train for label in labels]
    test_data, test_labels = batches[cifar10.TEST_BATCH]
    # Channel planes: the first 1024 bytes of a record are the red plane, row-major.
    assert torch.equal(data.test.x[0, 0].flatten(), torch.from_numpy(test_data[0, :1024]).float() / 255)
    assert data.test.y.tolist() == test_labels and data.classes == CLASSES


def test_python_batches_from_folder_and_tarball(tmp_path):
    batches = _write_python_batches(tmp_path / "root" / "cifar-10-batches-py")
    _check_against(load_cifar10(tmp_path / "root"), batches)
    archive = _targz(tmp_path / "root" / "cifar-10-batches-py", tmp_path / "cifar-10-python.tar.gz")
    _check_against(load_cifar10(archive), batches)


def test_binary_batches_from_folder_and_tarball(tmp_path):
    batches = _write_binary_batches(tmp_path / "cifar-10-batches-bin")
    _check_against(load_cifar10(tmp_path / "cifar-10-batches-bin"), batches)
    archive_dir = tmp_path / "dl"
    archive_dir.mkdir()
    _targz(tmp_path / "cifar-10-batches-bin", archive_dir / "cifar-10-binary.tar.gz")
    _check_against(load_cifar10(archive_dir), batches)


def test_truncated_binary_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    _write_binary_batches(folder)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin has 12192 bytes, not a multiple of 3073"):
        load_cifar10(folder)


def test_missing_or_malformed_python_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_python_batches(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError, match=r"test_batch is missing"):
        load_cifar10(folder)
    (folder / "test_batch").write_bytes(_py2_dumps({b"labels": [1]}))
    with pytest.raises(DataError, match=r"test_batch is not a CIFAR-10 batch"):
        load_cifar10(folder)
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError, match=r"cannot unpickle .*test_batch"):
        load_cifar10(folder)


def test_missing_location_and_unknown_contents(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no CIFAR-10 data found"):
        load_cifar10(tmp_path)


# --- image folders ---------------------------------------------------------------------------

def _write_image_tree(root: Path, size=(32, 32), odd: str | None = None) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):
        for c in CLASSES:
            folder = root / split / c
            folder.mkdir(parents=True)
            for k in range(count):
                name = f"{split}/{c}/{k:04d}.png"
                shape = (31, 32, 3) if name == odd else (*size, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)


def test_image_folder_layout_as_folder_and_tarball(tmp_path):
    root = tmp_path / "cifar-png"
    _write_image_tree(root)
    data = load_cifar10(root)
    assert data.train.x.shape == (20, 3, 32, 32) and data.test.x.shape == (10, 3, 32, 32)
    assert data.train.y.tolist() == [label for label in range(10) for _ in range(2)]
    pixels = np.array(Image.open(root / "test/cat/0000.png"))  # PNG is lossless
    assert torch.equal(data.test.x[3], torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "cifar10-png.tar.gz", "w:gz") as tf:
        for split in ("train", "test"):
            tf.add(root / split, arcname=split)
    from_archive = load_cifar10(packed)
    assert torch.equal(from_archive.train.x, data.train.x)
    assert torch.equal(from_archive.test.y, data.test.y)


def test_image_folder_errors_name_the_file_or_class(tmp_path):
    root = tmp_path / "odd"
    _write_image_tree(root, odd="train/frog/0001.png")
    with pytest.raises(DataError, match=r"train/frog/0001\.png is 32x31, expected 32x32"):
        load_cifar10(root)
    other = tmp_path / "missing-class"
    _write_image_tree(other)
    for f in (other / "test" / "ship").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"classes missing \['ship'\]"):
        load_cifar10(other)


def test_generic_image_folder(tmp_path):
    rng = np.random.default_rng(1)
    for c, n in (("b", 2), ("a", 3)):
        (tmp_path / c).mkdir()
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (5, 7), dtype=np.uint8)).save(tmp_path / c / f"{k}.png")
    images, classes = load_image_folder(tmp_path)
    assert classes == ["a", "b"]
    assert images.x.shape == (5, 1, 5, 7) and images.y.tolist() == [0, 0, 0, 1, 1]
    rgb, _ = load_image_folder(tmp_path, image_size=(5, 7), channels=3)
    assert rgb.x.shape == (5, 3, 5, 7)
    with pytest.raises(DataError, match=r"0\.png is 7x5, expected 6x6"):
        load_image_folder(tmp_path, image_size=(6, 6))
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "b" / "9.png")
    with pytest.raises(DataError, match=r"b/9\.png is 7x6, expected 7x5"):
        load_image_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no class sub-folders"):
        load_image_folder(empty)
    (empty / "c").mkdir()
    with pytest.raises(DataError, match="has no images"):
        load_image_folder(empty)


# --- the restricted unpickler ------------------------------------------------------------------

class _Payload:
    """Unpickling this with plain pickle would run os.system and create a file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_batch_is_refused_and_never_executed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_python_batches(folder)
    target = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(target)}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle posix\.system from .*data_batch_1: "
                                        r"not allowed in a data file"):
        load_cifar10(folder)
    assert not target.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",
        b"csubprocess\ncheck_output\n((S'true'\nltR.",
        b"\x80\x02cbuiltins\ngetattr\nq\x00.",
    ],
    ids=["eval", "subprocess", "getattr"],
)
def test_restricted_unpickler_refuses_other_callables(tmp_path, payload):
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=r"refusing to unpickle \w+\.\w+ from .*evil\.pkl"):
        safe_load_file(path)


def test_restricted_unpickler_reads_plain_data():
    data = {b"k": [1, 2.5, "s", b"b", (True, None)], b"a": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    loaded = safe_loads(pickle.dumps(data, protocol=2))
    assert loaded[b"k"] == data[b"k"] and np.array_equal(loaded[b"a"], data[b"a"])


@pytest.mark.parametrize("tamper", ["shape", "dtype", "labels", "classes", "deep json"])
def test_a_tampered_cache_entry_is_dropped_and_rebuilt(tmp_path, tamper):
    """A cache entry that is not what the loader builds is never trusted: deleted, rebuilt."""
    import json

    from safetensors.torch import load_file, save_file

    from poisonlab.data.cache import cache_dir

    folder = tmp_path / "cifar-10-batches-py"
    batches = _write_python_batches(folder)
    first = load_cifar10(folder)
    entry = max(cache_dir().glob("cifar10-*.safetensors"), key=lambda p: p.stat().st_mtime)
    tensors, sidecar = load_file(entry), entry.with_suffix(".json")
    if tamper == "shape":
        tensors["x_train"] = tensors["x_train"][:, :, :16]
    elif tamper == "dtype":
        tensors["x_train"] = tensors["x_train"].float() / 255
    elif tamper == "labels":
        tensors["y_test"] = tensors["y_test"] + 10
    elif tamper == "classes":
        sidecar.write_text(json.dumps({"classes": ["a", "b"]}))
    else:  # nested past the JSON decoder's recursion limit
        sidecar.write_text('{"classes": ' + "[" * 100_000 + "]" * 100_000 + "}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, entry)
    again = load_cifar10(folder)
    _check_against(again, batches)
    assert torch.equal(again.train.x, first.train.x) and again.classes == first.classes


class _ZeroStrides:
    """A view of 10,000 CIFAR records over a one-byte buffer (zero strides)."""

    def __reduce__(self):
        return (np.ndarray, ((10000, 3072), np.dtype("u1"), b"x", 0, (0, 0)))


class _HugeEmpty:
    def __reduce__(self):
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (10**10,), b"b"))


class _HugeBytes:
    def __reduce__(self):
        return (bytes, (10**10,))


@pytest.mark.parametrize("payload, message", [
    (_ZeroStrides(), "constructing numpy.ndarray directly is not allowed"),
    (_HugeEmpty(), r"an array of shape \(10000000000,\) asks for 10000000000 bytes, more than"),
    (_HugeBytes(), r"bytes\(10000000000\) asks for 10000000000 bytes, more than"),
], ids=["zero-strides", "huge-array", "huge-bytes"])
def test_a_tiny_batch_cannot_ask_for_gigabytes(tmp_path, payload, message):
    """A few hundred bytes must not make the loader allocate gigabytes: refused, one line."""
    folder = tmp_path / "cifar-10-batches-py"
    _write_python_batches(folder)
    evil = pickle.dumps({b"data": payload, b"labels": [0] * 10}, protocol=2)
    assert len(evil) < 300
    (folder / "data_batch_1").write_bytes(evil)
    with pytest.raises(DataError, match=message) as info:
        load_cifar10(folder)
    assert "data_batch_1" in str(info.value) and "\n" not in str(info.value)


def test_arrays_must_fit_in_the_file():
    """Arrays whose bytes exceed the pickle that holds them cannot come from that pickle."""
    data = pickle.dumps({b"a": np.zeros(4096, dtype=np.uint8)}, protocol=2)
    assert safe_loads(data)[b"a"].shape == (4096,)
    obj_dtype = b"\x80\x02cnumpy\ndtype\nq\x00X\x02\x00\x00\x00O8q\x01\x85q\x02Rq\x03."
    with pytest.raises(DataError, match="object arrays are not allowed"):
        safe_loads(obj_dtype)


def _die_in_a_worker(chunk):
    import multiprocessing
    import os

    if multiprocessing.parent_process() is not None:  # only in a forked worker
        os._exit(1)
    return [2 * v for v in chunk]


def test_a_worker_that_dies_does_not_hang_decoding():
    """A decode worker killed mid-way (out of memory, a signal) costs only speed: the chunks are
    decoded in the calling process instead of waiting for the lost one for ever."""
    from poisonlab.data.image_folder import run_chunks

    assert run_chunks(_die_in_a_worker, [[1, 2], [3], [4, 5]], workers=2) == [[2, 4], [6], [8, 10]]


@pytest.mark.parametrize("limit, message", [
    ("_MEMBER_LIMIT", r"member cifar-10-batches-py/data_batch_1 unpacks to \d+ bytes, more than"),
    ("_TOTAL_LIMIT", r"unpacks to more than \d+ bytes, more than a CIFAR-10 archive holds"),
])
def test_an_archive_that_unpacks_past_the_format_bounds_is_refused(tmp_path, monkeypatch,
                                                                    limit, message):
    """The member sizes are checked from the tar headers before anything is unpacked (a 2 MB
    archive of zeros declaring a 1.5 GB member used to be decompressed whole into memory)."""
    monkeypatch.setenv("POISONLAB_CACHE", str(tmp_path / "cache"))
    _write_python_batches(tmp_path / "root" / "cifar-10-batches-py")
    archive = _targz(tmp_path / "root" / "cifar-10-batches-py", tmp_path / "c.tar.gz")
    batch = (tmp_path / "root" / "cifar-10-batches-py" / "data_batch_1").stat().st_size
    monkeypatch.setattr(cifar10, limit, batch - 1 if limit == "_MEMBER_LIMIT" else 3 * batch)
    with pytest.raises(DataError, match=message):
        load_cifar10(archive)


def test_archive_members_other_than_the_batches_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONLAB_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "root" / "cifar-10-batches-py"
    batches = _write_python_batches(folder)
    (folder / "notes.bin").write_bytes(b"\0" * 40_000)  # larger than the limit below, never read
    archive = _targz(folder, tmp_path / "c.tar.gz")
    monkeypatch.setattr(cifar10, "_MEMBER_LIMIT", 30_000)
    _check_against(load_cifar10(archive), batches)


def _shared_list_bomb(levels: int) -> bytes:
    """L = [L_prev, L_prev] `levels` times: a few hundred bytes whose tree has 2^levels nodes."""
    node: list = [0]
    for _ in range(levels):
        node = [node, node]
    return pickle.dumps({b"label_names": node}, protocol=2)


def test_shared_references_cannot_expand_a_small_pickle_without_bound():
    bomb = _shared_list_bomb(45)
    assert len(bomb) < 1000
    with pytest.raises(DataError, match="shared references expand to more than") as info:
        safe_loads(bomb, "batches.meta")
    assert "batches.meta" in str(info.value) and "\n" not in str(info.value)
    deep: list = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(DataError, match="nested deeper than 64"):
        safe_loads(pickle.dumps(deep, protocol=2))
    fine = {b"label_names": [b"cat"] * 2000, b"labels": list(range(2000))}  # legit sharing
    assert safe_loads(pickle.dumps(fine, protocol=2))[b"labels"][-1] == 1999


def _die_half_way_through_sending(fn, chunks, writer):
    import os
    import struct

    # the header of a 1 MiB message, a few of its bytes, and then the worker is gone
    os.write(writer.fileno(), struct.pack("!i", 2**20) + b"half a message")
    os._exit(1)


def test_a_worker_that_dies_half_way_through_sending_does_not_hang_decoding(monkeypatch):
    """A worker stopped while it sends its result leaves half a message on its pipe. The
    parent must see the end of the file (only the worker holds the writing end) and decode
    that worker's chunks itself; ProcessPoolExecutor's shared result pipe waited for the rest
    of the message for ever (CI hung 900 s in its shutdown)."""
    import time

    from poisonlab.data import image_folder

    monkeypatch.setattr(image_folder, "_work", _die_half_way_through_sending)
    start = time.monotonic()
    assert image_folder.run_chunks(_double, [[1, 2], [3], [4, 5]], workers=2) == [[2, 4], [6], [8, 10]]
    assert time.monotonic() - start < 30


def _double(chunk):
    return [2 * v for v in chunk]
