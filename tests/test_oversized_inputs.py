"""Images whose size does not fit are refused from their headers, before they are decoded.

A 9000x9000 PNG is a few hundred kB on disk and 243 MB decoded: a folder of them given to
`scan --data` or `purify --clean-data` was decoded whole (4.4 GB for 18 files) before the size
was compared with the model's input, and `craft --target` decoded one (695 MB) before comparing
it with the training images. Each image here has a PNG header that claims 9000x9000 and pixel
data that cannot be decoded: an error about its size (not about its data) shows that nothing
was decoded.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from poisonlab.cli import main
from poisonlab.data.image_folder import load_image_folder, peek_image
from poisonlab.errors import DataError
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import save_weights


def _claims(path, width=9000, height=9000):
    """A PNG whose header says width x height (grayscale) and whose data is one empty row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                       8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))
    return path


def _png(path, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), 100, np.uint8)).save(path)
    return path


def _model(tmp_path):
    state = build_model("tiny_cnn", 10, 1).state_dict()
    return save_weights(tmp_path / "m.safetensors", state, {"input_shape": "[1, 32, 32]"})


def test_the_fake_header_is_read_and_its_data_cannot_be_decoded(tmp_path):
    """The premise of this module: the header alone gives the size; decoding fails."""
    path = _claims(tmp_path / "x.png")
    assert peek_image("x.png", path) == (1, 9000, 9000)
    with pytest.raises(OSError, match="truncated"), Image.open(path) as image:
        image.load()


@pytest.mark.parametrize("command", ["scan", "purify"])
def test_a_folder_of_huge_images_is_refused_for_the_models_input_before_decoding(
        tmp_path, capsys, command):
    for i in range(3):
        _claims(tmp_path / "data" / str(i % 2) / f"{i}.png")
    option = "--data" if command == "scan" else "--clean-data"
    extra = ["--out", str(tmp_path / "p.safetensors"), "--target", "0"] \
        if command == "purify" else ["--report", str(tmp_path / "rep")]
    code = main([command, str(_model(tmp_path)), "--arch", "tiny_cnn", option,
                 str(tmp_path / "data"), *extra, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "are 1x9000x9000 (CxHxW), but the model expects 1x32x32" in err, err
    assert not (tmp_path / "rep").exists()  # and a refused scan leaves no empty report folder


def test_one_huge_image_among_fitting_ones_is_refused_from_its_header(tmp_path):
    _png(tmp_path / "a" / "0.png"), _png(tmp_path / "b" / "1.png")
    _claims(tmp_path / "b" / "2.png")
    with pytest.raises(DataError, match=r"2\.png is 9000x9000, expected 32x32"):
        load_image_folder(tmp_path)


def test_a_huge_craft_target_is_refused_from_its_header(tmp_path, capsys):
    _png(tmp_path / "data" / "a" / "0.png"), _png(tmp_path / "data" / "b" / "1.png")
    code = main(["craft", "gradient-matching", "--data", str(tmp_path / "data"), "--target",
                 str(_claims(tmp_path / "t.png")), "--adv-class", "1", "--budget", "1",
                 "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "t.png is 9000x9000, the training images are 32x32" in err, err
    assert not (tmp_path / "out").exists(), "a refused craft left its --out folder behind"


@pytest.mark.parametrize("kind", ["folder", "device", "missing"])
def test_a_craft_target_that_is_no_image_file_is_named_for_what_it_is(tmp_path, capsys, kind):
    _png(tmp_path / "data" / "a" / "0.png"), _png(tmp_path / "data" / "b" / "1.png")
    target = {"folder": tmp_path / "data", "missing": tmp_path / "nope.png"}.get(kind)
    if target is None:
        target = tmp_path / "zero.png"
        target.symlink_to("/dev/zero")
    code = main(["craft", "gradient-matching", "--data", str(tmp_path / "data"), "--target",
                 str(target), "--adv-class", "1", "--budget", "1", "--out",
                 str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    want = {"folder": "is a folder, not an image", "device": "not a regular file",
            "missing": "does not exist"}[kind]
    assert code == 2 and want in err and len(err.splitlines()) == 1, err


def test_an_undecodable_image_is_named_without_pythons_object_repr(tmp_path):
    """Pillow's message named `<_io.BytesIO object at 0x7f...>` instead of the file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path)
    assert "junk.png" in str(err.value) and "BytesIO" not in str(err.value)
