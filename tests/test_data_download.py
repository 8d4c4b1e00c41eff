"""Downloads against a local HTTP server on 127.0.0.1: fresh, skipped, resumed (206), restarted
(200), interrupted, checksum mismatch, and the built-in published checksums."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from poisonlab.data.download import SOURCES, download_dataset, fetch_file
from poisonlab.errors import DataError, DownloadError

MNIST_NAMES = [f.name for f in SOURCES["mnist"][1]]


@dataclass
class _State:
    files: dict[str, bytes]
    ranges: bool = True  # answer Range requests with 206
    cut: set[str] = field(default_factory=set)  # send half the body, then close
    no_length: bool = False  # send no Content-Length (the body ends when the connection does)
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(state: _State):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            name = self.path.rsplit("/", 1)[-1]
            wanted = self.headers.get("Range")
            state.requests.append((name, wanted))
            data = state.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = int(wanted.removeprefix("bytes=").rstrip("-")) if wanted and state.ranges else 0
            if start >= len(data) > 0:
                self.send_error(416)
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
            if state.no_length:
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in state.cut:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def server():
    """A local server of four MNIST-named random files; yields (state, base URL, checksums)."""
    rng = np.random.default_rng(0)
    files = {name: rng.bytes(200_000 + 1000 * i) for i, name in enumerate(MNIST_NAMES)}
    state = _State(files)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    sums = {name: "sha256:" + hashlib.sha256(data).hexdigest() for name, data in files.items()}
    try:
        yield state, f"http://127.0.0.1:{httpd.server_address[1]}/mnist", sums
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _get(tmp_path, server_info, **kwargs):
    state, url, sums = server_info
    return download_dataset("mnist", tmp_path, base_url=url, checksums=sums, show_progress=False, **kwargs)


def test_download_then_skip_when_present(tmp_path, server):
    state = server[0]
    actions = _get(tmp_path, server)
    assert [a.action for a in actions] == ["downloaded"] * 4
    for name, data in state.files.items():
        assert (tmp_path / name).read_bytes() == data
    assert not list(tmp_path.glob("*.part"))
    state.requests.clear()
    again = _get(tmp_path, server)
    assert [a.action for a in again] == ["skipped"] * 4
    assert str(again[0]) == f"{MNIST_NAMES[0]}: already present, checksum ok"
    assert state.requests == []


def test_partial_file_is_resumed_with_a_range_request(tmp_path, server):
    state = server[0]
    name = MNIST_NAMES[1]
    (tmp_path / f"{name}.part").write_bytes(state.files[name][:1234])
    actions = _get(tmp_path, server)
    assert [a.action for a in actions] == ["downloaded", "resumed", "downloaded", "downloaded"]
    assert (name, "bytes=1234-") in state.requests
    assert (tmp_path / name).read_bytes() == state.files[name]
    assert not (tmp_path / f"{name}.part").exists()


def test_complete_part_answered_416_is_verified_and_kept(tmp_path, server):
    state = server[0]
    name = MNIST_NAMES[0]
    (tmp_path / f"{name}.part").write_bytes(state.files[name])
    actions = _get(tmp_path, server)
    assert actions[0].action == "resumed"
    assert (tmp_path / name).read_bytes() == state.files[name]


def test_download_restarts_cleanly_when_the_server_ignores_range(tmp_path, server):
    state = server[0]
    state.ranges = False
    name = MNIST_NAMES[2]
    (tmp_path / f"{name}.part").write_bytes(b"stale bytes from another file" * 40)
    actions = _get(tmp_path, server)
    assert actions[2].action == "downloaded"
    assert (tmp_path / name).read_bytes() == state.files[name]


def test_interrupted_download_leaves_only_the_part_and_resumes(tmp_path, server):
    state = server[0]
    name = MNIST_NAMES[0]
    state.cut.add(name)
    with pytest.raises(DownloadError, match=rf"download of .*{name} interrupted"):
        _get(tmp_path, server)
    assert not (tmp_path / name).exists()
    assert (tmp_path / f"{name}.part").stat().st_size == len(state.files[name]) // 2
    state.cut.clear()
    actions = _get(tmp_path, server)
    assert actions[0].action == "resumed"
    assert (tmp_path / name).read_bytes() == state.files[name]


def test_checksum_mismatch_deletes_the_part_and_names_both_digests(tmp_path, server):
    state, url, sums = server
    name = MNIST_NAMES[3]
    bad = dict(sums, **{name: "sha256:" + "0" * 64})
    actual = hashlib.sha256(state.files[name]).hexdigest()
    with pytest.raises(DownloadError, match=rf"checksum mismatch for {name} .*expected sha256 0{{64}}, got {actual}"):
        download_dataset("mnist", tmp_path, base_url=url, checksums=bad, show_progress=False)
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.part").exists()


def test_published_md5_is_checked_by_default(tmp_path, server, shared_data):
    # The shared MNIST copies wrap the canonical IDX bytes in different .gz files than the
    # official ones, so their MD5 must not match the published one.
    state, url, _ = server
    name = MNIST_NAMES[0]
    state.files[name] = (shared_data / "mnist" / name).read_bytes()
    with pytest.raises(DownloadError, match=r"expected md5 f68b3c2dcbeaaa9fbdd348bbdeb94873, got [0-9a-f]{32}"):
        download_dataset("mnist", tmp_path, base_url=url, show_progress=False)


def test_missing_file_and_bad_names(tmp_path, server):
    state = server[0]
    del state.files[MNIST_NAMES[2]]
    with pytest.raises(DownloadError, match=rf"cannot download .*{MNIST_NAMES[2]}: HTTP 404"):
        _get(tmp_path, server)
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        download_dataset("imagenet", tmp_path)
    with pytest.raises(DownloadError, match="glyphs is embedded"):
        download_dataset("glyphs", tmp_path)
    with pytest.raises(DownloadError, match="must be 'sha256:<hex>' or 'md5:<hex>'"):
        _get(tmp_path, server[:2] + ({MNIST_NAMES[0]: "crc32:1234"},))


@pytest.mark.parametrize("announced", [True, False])
def test_a_file_over_its_size_bound_is_cut_off_and_its_part_deleted(tmp_path, server, announced):
    """A wrong mirror serving something huge must not fill the disk: an announced length over
    the bound is refused before reading, an unannounced body is cut off at the bound."""
    state, url, sums = server
    state.no_length = not announced
    name = MNIST_NAMES[0]
    dest = tmp_path / name
    with pytest.raises(DownloadError, match="far more than the file should take"):
        fetch_file(f"{url}/{name}", dest, sums[name], max_bytes=100_000)
    assert not dest.exists() and not (tmp_path / (name + ".part")).exists()
    action = fetch_file(f"{url}/{name}", dest, sums[name], max_bytes=len(state.files[name]))
    assert action.action == "downloaded" and dest.read_bytes() == state.files[name]


def test_every_official_file_has_a_size_bound():
    for _, files in SOURCES.values():
        for remote in files:
            assert remote.max_bytes < 1 << 30, remote.name


def test_a_mirror_folder_is_read_as_files(tmp_path, server):
    state, _, sums = server
    folder = tmp_path / "mirror"
    folder.mkdir()
    for name, data in state.files.items():
        (folder / name).write_bytes(data)
    actions = download_dataset("mnist", tmp_path / "out", base_url=str(folder), checksums=sums,
                               show_progress=False)
    assert [a.action for a in actions] == ["downloaded"] * 4
    assert (tmp_path / "out" / MNIST_NAMES[0]).read_bytes() == state.files[MNIST_NAMES[0]]


@pytest.mark.parametrize("mirror", ["not a url", "gopher://host/", "/no/such/folder"])
def test_a_mirror_that_is_neither_url_nor_folder_is_refused(tmp_path, mirror):
    with pytest.raises(DownloadError, match="--mirror must be a URL"):
        download_dataset("mnist", tmp_path, base_url=mirror, show_progress=False)
    assert list(tmp_path.iterdir()) == []
