"""`poisonlab data info` and `poisonlab data download`, through poisonlab.cli.main."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from poisonlab.cli import main
from poisonlab.data import download
from poisonlab.data.download import RemoteFile


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_info_mnist_json_and_text(shared_data, capsys):
    assert main(["data", "info", "mnist", "--dir", str(shared_data / "mnist"), "--json"]) == 0
    info = _last_json(capsys.readouterr().out)
    assert info["name"] == "mnist" and info["kind"] == "supervised"
    assert info["images"] == {"train": 60_000, "test": 10_000}
    assert info["image_shape"] == [1, 28, 28] and info["value_range"] == [0.0, 1.0]
    assert sum(info["images_per_class"]["test"]) == 10_000 and info["load_seconds"] >= 0
    assert main(["data", "info", "mnist", "--dir", str(shared_data / "mnist")]) == 0
    text = capsys.readouterr().out
    assert "train: 60,000 images" in text and "image shape: 1x28x28" in text


def test_info_omniglot_reports_alphabets(shared_data, capsys):
    assert main(["data", "info", "omniglot", "--dir", str(shared_data / "omniglot"), "--json"]) == 0
    info = _last_json(capsys.readouterr().out)
    assert (info["num_classes"], info["samples_per_class"], info["num_groups"]) == (1623, 20, 50)
    assert info["image_shape"] == [1, 28, 28]
    print(f"\nOmniglot load time reported by `data info`: {info['load_seconds']} s")


def test_info_finds_data_through_poisonlab_data(shared_data, capsys, monkeypatch):
    monkeypatch.setenv("POISONLAB_DATA", str(shared_data))
    assert main(["data", "info", "mnist", "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["num_classes"] == 10


@pytest.mark.skipif(
    importlib.util.find_spec("poisonlab.data.glyphs") is None, reason="glyph set not installed"
)
def test_info_glyphs_needs_no_directory(capsys):
    assert main(["data", "info", "glyphs", "--json"]) == 0
    info = _last_json(capsys.readouterr().out)
    assert info["kind"] == "few-shot" and info["num_classes"] > 0


def test_unknown_name_and_missing_folder_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["data", "info", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown data set 'imagenet': choose one of omniglot, cifar10, mnist, glyphs"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("POISONLAB_DATA", raising=False)
    assert main(["data", "info", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "data/cifar10" in err and "poisonlab data download cifar10" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["data", "download", "imagenet"]) == 2
    assert "unknown data set 'imagenet'" in capsys.readouterr().err


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A static file server over a folder holding one MNIST-named file; its checksum is wired
    into the download table in place of the published one."""
    served = tmp_path / "served"
    served.mkdir()
    payload = b"not really mnist" * 1000
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(payload)
    remote = RemoteFile("t10k-labels-idx1-ubyte.gz", "sha256:" + hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(download.SOURCES, "mnist", ("https://unused.invalid/", (remote,)))
    handler = partial(_QuietHandler, directory=str(served))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served, payload
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def test_download_from_mirror_then_skip(tmp_path, capsys, mirror):
    url, served, payload = mirror
    dest = tmp_path / "mnist"
    assert main(["data", "download", "mnist", "--dir", str(dest), "--mirror", url]) == 0
    out = capsys.readouterr().out
    assert "t10k-labels-idx1-ubyte.gz: downloaded (16,000 bytes, checksum ok)" in out
    assert (dest / "t10k-labels-idx1-ubyte.gz").read_bytes() == payload
    assert main(["data", "download", "mnist", "--dir", str(dest), "--mirror", url]) == 0
    assert "t10k-labels-idx1-ubyte.gz: already present, checksum ok" in capsys.readouterr().out
    (served / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    (dest / "t10k-labels-idx1-ubyte.gz").unlink()
    assert main(["data", "download", "mnist", "--dir", str(dest), "--mirror", url]) == 2
    assert "checksum mismatch for t10k-labels-idx1-ubyte.gz" in capsys.readouterr().err
