"""Omniglot loader: the real release, a tiny release in the same layout, bad inputs, class split."""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.data import omniglot
from poisonlab.data.omniglot import load_omniglot, split_omniglot_classes
from poisonlab.errors import ConfigError, DataError


@pytest.fixture(scope="session")
def real_omniglot(shared_data):
    # The session cache (tests/conftest.py) is set before any fixture runs.
    start = time.perf_counter()
    data = load_omniglot(shared_data / "omniglot")
    print(f"\nOmniglot first load in this session: {time.perf_counter() - start:.2f} s")
    return data


def test_real_omniglot_has_1623_characters_of_20_drawings_from_50_alphabets(real_omniglot):
    data = real_omniglot
    assert data.images.shape == (1623, 20, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert float(data.images.min()) == 0.0 and float(data.images.max()) == 1.0
    assert len(set(data.groups)) == 50
    assert len(set(data.class_names)) == 1623
    assert all(name.split("/")[0] == group for name, group in zip(data.class_names, data.groups, strict=True))
    # Background set (964 characters, 30 alphabets) first, each set sorted.
    assert len(set(data.groups[:964])) == 30 and len(set(data.groups[964:])) == 20
    assert data.class_names[:964] == sorted(data.class_names[:964])
    assert data.class_names[964:] == sorted(data.class_names[964:])
    # Strokes are 1 on a 0 background: most pixels are background.
    assert float((data.images < 0.5).float().mean()) > 0.8


def test_second_load_reads_the_cache(real_omniglot, shared_data, monkeypatch):
    monkeypatch.setattr(omniglot, "_build", lambda *a: pytest.fail("decoded PNGs again"))
    start = time.perf_counter()
    again = load_omniglot(shared_data / "omniglot")
    print(f"\nOmniglot cached load: {time.perf_counter() - start:.2f} s")
    assert torch.equal(again.images, real_omniglot.images)
    assert again.class_names == real_omniglot.class_names


# --- a tiny release in the official layout ---------------------------------------------------

def _drawing(seed: int, size: tuple[int, int] = (105, 105)) -> bytes:
    """A 1-bit PNG: white background with one black block placed by `seed`."""
    pixels = np.full((size[1], size[0]), 255, dtype=np.uint8)
    r, c = 10 + (seed * 7) % 60, 10 + (seed * 13) % 60
    pixels[r : r + 30, c : c + 30] = 0
    out = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(out, format="PNG")
    return out.getvalue()


def _tiny_release(root: Path, per_class: int = 20, odd_size: str | None = None) -> Path:
    """2 sets x 2 alphabets x 2 characters, as the official zips."""
    root.mkdir(parents=True, exist_ok=True)
    for set_index, set_name in enumerate(omniglot.SETS):
        with zipfile.ZipFile(root / f"{set_name}.zip", "w", zipfile.ZIP_STORED) as zf:
            for a in range(2):
                for c in range(2):
                    folder = f"{set_name}/Script{set_index}{a}/character{c + 1:02d}"
                    for k in range(per_class):
                        name = f"{folder}/{c:04d}_{k + 1:02d}.png"
                        size = (100, 105) if name == odd_size else (105, 105)
                        zf.writestr(name, _drawing(k + 3 * c + a, size))
    return root


def _extracted_release(tmp_path: Path) -> Path:
    """The tiny release's zips extracted into one folder, as a user unpacks them."""
    root = _tiny_release(tmp_path / "r")
    folder = tmp_path / "folders"
    for set_name in omniglot.SETS:
        with zipfile.ZipFile(root / f"{set_name}.zip") as zf:
            zf.extractall(folder)
    return folder


def test_tiny_release_from_zips_and_folders_agree(tmp_path):
    zips = _tiny_release(tmp_path / "zips")
    data = load_omniglot(zips)
    assert data.images.shape == (8, 20, 1, 28, 28)
    assert data.class_names[:2] == ["Script00/character01", "Script00/character02"]
    assert data.groups == ["Script00"] * 2 + ["Script01"] * 2 + ["Script10"] * 2 + ["Script11"] * 2
    image = data.images[0, 0, 0]  # seed 0: black block at rows/cols 10..39 of 105
    assert float(image[5, 5]) > 0.9 and float(image[25, 25]) < 0.05

    folders = tmp_path / "folders"
    for set_name in omniglot.SETS:
        with zipfile.ZipFile(zips / f"{set_name}.zip") as zf:
            zf.extractall(folders)
    from_folders = load_omniglot(folders, workers=1)
    assert torch.equal(from_folders.images, data.images)
    assert from_folders.class_names == data.class_names


def test_missing_root_and_missing_set_are_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_omniglot(tmp_path / "nowhere")
    root = _tiny_release(tmp_path / "r")
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="images_evaluation.zip"):
        load_omniglot(root)


def test_file_that_is_not_a_zip_is_named(tmp_path):
    root = _tiny_release(tmp_path / "r")
    (root / "images_background.zip").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DataError, match=r"images_background\.zip is not a readable zip"):
        load_omniglot(root)


def test_bad_crc_names_the_member(tmp_path):
    root = _tiny_release(tmp_path / "r")
    archive = root / "images_evaluation.zip"
    raw = bytearray(archive.read_bytes())
    png = _drawing(0)  # stored uncompressed: flip a byte inside the first drawing's data
    start = raw.find(png[:64])
    raw[start + len(png) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupt zip member .*images_evaluation\.zip:.*\.png"):
        load_omniglot(root)


def test_wrong_image_size_names_the_file(tmp_path):
    odd = "images_background/Script01/character02/0001_07.png"
    root = _tiny_release(tmp_path / "r", odd_size=odd)
    with pytest.raises(DataError, match=rf"{odd} is 100x105, expected 105x105"):
        load_omniglot(root)


def test_wrong_drawing_count_names_the_character(tmp_path):
    root = _tiny_release(tmp_path / "r", per_class=19)
    with pytest.raises(DataError, match=r"Script00/character01 has 19 images, expected 20"):
        load_omniglot(root)


def test_corrupt_png_names_the_file(tmp_path):
    folder = _extracted_release(tmp_path)
    bad = folder / "images_evaluation/Script10/character01/0000_03.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot decode image .*0000_03\.png"):
        load_omniglot(folder, workers=1)
    shutil.rmtree(folder / "images_evaluation")
    with pytest.raises(DataError, match="images_evaluation"):
        load_omniglot(folder)


# --- class split ---------------------------------------------------------------------------

def test_reference_split_is_1100_100_423_disjoint_and_seeded():
    train, val, test = split_omniglot_classes(seed=0)
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert train.dtype == torch.long
    everything = torch.cat([train, val, test])
    assert torch.equal(everything.sort().values, torch.arange(1623))
    again = split_omniglot_classes(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(again, (train, val, test), strict=True))
    other = split_omniglot_classes(seed=1)
    assert not torch.equal(other[0], train)


def test_split_scales_to_other_banks_or_takes_explicit_sizes():
    train, val, test = split_omniglot_classes(num_classes=40, seed=3)
    assert (len(train), len(val), len(test)) == (28, 2, 10)
    assert len(set(torch.cat([train, val, test]).tolist())) == 40
    tiny = split_omniglot_classes(num_classes=3)
    assert [len(t) for t in tiny] == [1, 1, 1]
    explicit = split_omniglot_classes(num_classes=10, sizes=(6, 2, 2))
    assert [len(t) for t in explicit] == [6, 2, 2]
    with pytest.raises(ConfigError, match="summing to num_classes=10"):
        split_omniglot_classes(num_classes=10, sizes=(6, 2, 1))


def test_a_zip_member_past_the_format_bound_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    """The declared size of each drawing is checked before it is read (a 2 MB zip with a 1.5 GB
    member of zeros used to be unpacked into memory)."""
    monkeypatch.setenv("POISONLAB_CACHE", str(tmp_path / "cache"))  # the same drawings, unread
    zips = _tiny_release(tmp_path / "zips")
    largest = max(i.file_size for i in zipfile.ZipFile(zips / "images_background.zip").infolist())
    monkeypatch.setattr(omniglot, "_MEMBER_LIMIT", largest - 1)
    with pytest.raises(DataError, match=r"images_background.zip: member .*\.png unpacks to "
                                        r"\d+ bytes, more than the \d+ bytes any Omniglot file"):
        load_omniglot(zips, workers=1)
    monkeypatch.setattr(omniglot, "_MEMBER_LIMIT", largest)
    monkeypatch.setattr(omniglot, "_TOTAL_LIMIT", 10 * largest)
    with pytest.raises(DataError, match="unpacks to more than"):
        load_omniglot(zips, workers=1)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("flags", 0x1, "is encrypted"), ("method", 98, "compression method is not supported"),
], ids=["encrypted", "unknown-compression"])
def test_a_zip_member_that_cannot_be_unpacked_is_named(tmp_path, field, value, message):
    """Encryption or an unknown compression method set on every member (local and central
    headers): one DataError naming the member, not zipfile's RuntimeError/NotImplementedError."""
    import struct

    root = _tiny_release(tmp_path / "r")
    archive = root / "images_background.zip"
    raw = bytearray(archive.read_bytes())
    for signature, flags_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(signature)
        while at >= 0:
            offset = at + flags_at + (2 if field == "method" else 0)
            old = struct.unpack_from("<H", raw, offset)[0]
            struct.pack_into("<H", raw, offset, old | value if field == "flags" else value)
            at = raw.find(signature, at + 4)
    archive.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"cannot unpack zip member .*\.png of .*"
                                        rf"images_background\.zip: .*{message}"):
        load_omniglot(root)


def test_a_fifo_among_extracted_drawings_is_refused_not_read(tmp_path):
    """An extracted release with a FIFO named like a drawing blocked the loader for ever."""
    import os

    folder = _extracted_release(tmp_path)
    bad = folder / "images_evaluation/Script10/character01/0000_03.png"
    bad.unlink()
    os.mkfifo(bad)
    with pytest.raises(DataError, match=r"cannot read Omniglot image .*0000_03\.png: not a "
                                         r"regular file"):
        load_omniglot(folder, workers=1)
