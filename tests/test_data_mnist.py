"""MNIST loader: the real IDX files, tiny IDX fixtures (plain and gzipped) and malformed files."""

from __future__ import annotations

import gzip
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonlab.data import mnist
from poisonlab.data.mnist import load_mnist
from poisonlab.errors import DataError


@pytest.fixture(scope="session")
def real_mnist(shared_data):
    # The session cache (tests/conftest.py) is set before any fixture runs.
    start = time.perf_counter()
    data = load_mnist(shared_data / "mnist")
    print(f"\nMNIST first load in this session: {time.perf_counter() - start:.2f} s")
    return data


def test_real_mnist_has_60000_train_and_10000_test_digits(real_mnist):
    data = real_mnist
    assert data.train.x.shape == (60_000, 1, 28, 28) and data.test.x.shape == (10_000, 1, 28, 28)
    assert data.train.x.dtype == torch.float32 and data.test.y.dtype == torch.int64
    assert data.classes == [str(d) for d in range(10)]
    assert float(data.train.x.min()) == 0.0 and float(data.train.x.max()) == 1.0
    counts = torch.bincount(data.train.y, minlength=10)
    assert int(counts.sum()) == 60_000 and int(counts.min()) > 5000
    assert torch.bincount(data.test.y).sum() == 10_000


def test_second_load_reads_the_cache(real_mnist, shared_data, monkeypatch):
    monkeypatch.setattr(mnist, "_read_split", lambda *a: pytest.fail("parsed IDX files again"))
    start = time.perf_counter()
    again = load_mnist(shared_data / "mnist")
    print(f"\nMNIST cached load: {time.perf_counter() - start:.2f} s")
    assert torch.equal(again.train.x, real_mnist.train.x)


def _idx(data: np.ndarray) -> bytes:
    magic = 0x0800 | data.ndim
    return struct.pack(f">I{data.ndim}I", magic, *data.shape) + data.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int = 6, n_test: int = 3, gz: bool = False) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    for key, array in arrays.items():
        raw = _idx(array)
        name = mnist.FILES[key] + (".gz" if gz else "")
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_tiny_idx_files(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(data.train.x, expected)
    assert data.test.y.tolist() == arrays["test_labels"].tolist()


def test_truncated_file_is_named(tmp_path):
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte has 4710 bytes, expected 4720 .*truncated"):
        load_mnist(tmp_path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated"):
        load_mnist(tmp_path)


def test_wrong_magic_dims_and_counts_are_named(tmp_path):
    arrays = _write_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(_idx(arrays["test_images"]))  # images where labels belong
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte has magic number 0x00000803, expected 0x00000801"):
        load_mnist(tmp_path)
    labels.write_bytes(_idx(arrays["test_labels"][:2]))
    with pytest.raises(DataError, match=r"has 3 images but .*t10k-labels-idx1-ubyte has 2 labels"):
        load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(np.zeros((3, 32, 32))))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds 32x32 images, expected 28x28"):
        load_mnist(tmp_path)


def test_missing_file_and_folder_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_mnist(tmp_path / "nowhere")
    _write_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte \(or train-labels-idx1-ubyte\.gz\) is missing"):
        load_mnist(tmp_path)


def test_corrupt_gzip_is_named(tmp_path):
    _write_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
        load_mnist(tmp_path)


def test_a_gzip_bomb_is_refused_before_it_fills_memory(tmp_path, monkeypatch):
    """A small .gz of zeros declaring more than any MNIST file holds is refused as it inflates
    (the limit is lowered here so the test stays small; the real one is 64 MiB)."""
    _write_mnist(tmp_path)
    monkeypatch.setattr(mnist, "MAX_IDX_BYTES", 100_000)
    bomb = gzip.compress(struct.pack(">IIII", 0x803, 2000, 28, 28) + bytes(2000 * 784))
    assert len(bomb) < 5000
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz unpacks to more than"):
        load_mnist(tmp_path)


def test_a_concatenated_gzip_file_is_read_whole(tmp_path):
    arrays = _write_mnist(tmp_path)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:100])
                                                          + gzip.compress(raw[100:]))
    expected = torch.from_numpy(arrays["train_images"].astype(np.float32) / 255).unsqueeze(1)
    assert torch.equal(load_mnist(tmp_path).train.x, expected)


def test_dimensions_whose_product_wraps_around_are_named(tmp_path):
    _write_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">IIII", 0x803, 2**22, 2**22, 2**20))  # 2^64 bytes declared, 16 present
    with pytest.raises(DataError, match=r"has 16 bytes, expected 18446744073709551632"):
        load_mnist(tmp_path)


def test_a_sparse_file_larger_than_any_mnist_file_is_refused_before_it_is_read(tmp_path):
    """A sparse 3 GiB file costs nothing on disk; it was hashed for the cache key and read
    whole (3 GiB of memory) before its size was compared with its header."""
    _write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    with open(path, "r+b") as f:
        f.truncate(3 * 2**30)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is 3,221,225,472 bytes, "
                                        r"larger than any MNIST file"):
        load_mnist(tmp_path)


def test_an_mnist_file_that_is_a_fifo_is_refused_not_waited_for(tmp_path):
    import os

    _write_mnist(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        mnist.read_idx(path, 1)
