"""Download the official data set files with checksums, atomic writes and resume.

Each file streams to `<file>.part`; when complete its digest is checked and the file is moved into
place with `os.replace`, so `<file>` is either absent or whole and verified. An interrupted
download leaves only the `.part`, which the next call resumes with an HTTP Range request (when the
server answers 206) or restarts from scratch (200). A file already present with the right checksum
is skipped. A mismatch deletes the `.part` and raises DownloadError with both digests. Each file
has a size bound (a few times its published size): a server that announces or sends more is cut
off, the `.part` deleted, so a wrong mirror cannot fill the disk.

Checksums: the official sources publish MD5 digests only, and no SHA-256 can be derived offline,
so the official files are verified against their published MD5 (as in torchvision). Callers may
pass their own `sha256:`/`md5:` digests per file, e.g. for a mirror.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from poisonlab.data.registry import DOWNLOADABLE, check_name
from poisonlab.errors import DownloadError

_BLOCK = 1 << 20
_TIMEOUT = 60.0
_MIB = 1 << 20
_SCHEMES = ("http", "https", "ftp", "file")


@dataclass(frozen=True)
class RemoteFile:
    """A file of a data set, its expected digest ("<algorithm>:<hex>") and the most bytes a
    download of it may take."""

    name: str
    checksum: str
    max_bytes: int = 1024 * _MIB


# Base URL and files of each data set. Every checksum below is the published MD5. (The test
# copies in shared/data are repacked, so their SHA-256 sums do not describe these files.)
SOURCES: dict[str, tuple[str, tuple[RemoteFile, ...]]] = {
    "omniglot": (
        "https://github.com/brendenlake/omniglot/raw/master/python/",
        (
            RemoteFile("images_background.zip", "md5:68d2efa1b9178cc56df9314c21c6e718", 64 * _MIB),
            RemoteFile("images_evaluation.zip", "md5:6b91aef0f799c5bb55b94e3f2daec811", 64 * _MIB),
        ),
    ),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        (RemoteFile("cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a",
                    512 * _MIB),),
    ),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            RemoteFile("train-images-idx3-ubyte.gz", "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
                       64 * _MIB),
            RemoteFile("train-labels-idx1-ubyte.gz", "md5:d53e105ee54ea40749a09fcbcd1e9432",
                       4 * _MIB),
            RemoteFile("t10k-images-idx3-ubyte.gz", "md5:9fb629c4189551a2d022fa330f9573f3",
                       16 * _MIB),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "md5:ec29112dd5afa0611ce80d1b7f02629c",
                       4 * _MIB),
        ),
    ),
}


@dataclass(frozen=True)
class DownloadAction:
    """What happened to one file: downloaded, resumed or skipped."""

    name: str
    path: Path
    action: str
    size: int
    checksum: str

    def __str__(self) -> str:
        if self.action == "skipped":
            return f"{self.name}: already present, checksum ok"
        return f"{self.name}: {self.action} ({self.size:,} bytes, checksum ok)"


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def _parse_checksum(name: str, checksum: str) -> tuple[str, str]:
    algorithm, _, hexdigest = checksum.partition(":")
    if algorithm not in ("sha256", "md5") or not hexdigest:
        raise DownloadError(f"checksum for {name} must be 'sha256:<hex>' or 'md5:<hex>', got {checksum!r}")
    return algorithm, hexdigest.lower()


def _open(url: str, offset: int):
    headers = {"User-Agent": "poisonlab"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=_TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the .part already holds the whole file
            return None
        raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot download {url}: {reason}") from exc
    except (ValueError, http.client.HTTPException) as exc:  # a malformed URL or reply
        raise DownloadError(f"cannot download {url}: {exc}") from exc


class _TooLarge(DownloadError):
    """The server sent or announced more bytes than the file's bound."""


def _stream(response, out, url: str, done: int, total: int | None, limit: int, progress,
            task) -> None:
    """Copy the response body to `out`; a body cut short raises DownloadError (the caller
    keeps the partial file for a later resume), one past `limit` bytes raises _TooLarge."""
    try:
        for block in iter(lambda: response.read(_BLOCK), b""):
            if done + len(block) > limit:
                raise _TooLarge(f"download of {url} exceeds {limit:,} bytes, far more than the "
                                "file should take: not the expected file (wrong --mirror?)")
            out.write(block)
            done += len(block)
            if progress is not None:
                progress.update(task, completed=done)
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"download of {url} interrupted after {done:,} bytes: {exc}") from exc
    if total is not None and done < total:
        raise DownloadError(f"download of {url} interrupted after {done:,} of {total:,} bytes")


def _fetch(url: str, part: Path, limit: int, progress: Progress | None) -> str:
    """Stream `url` into `part` (at most `limit` bytes), resuming it when possible; returns
    downloaded or resumed."""
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, offset)
    if response is None:
        return "resumed"
    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
            raise DownloadError(f"cannot resume {url}: unexpected Content-Range")
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        total = int(length) + start if length and length.isdecimal() else None
        if total is not None and total > limit:
            raise _TooLarge(f"{url} is {total:,} bytes, far more than the file should take "
                            f"(at most {limit:,}): not the expected file (wrong --mirror?)")
        task = progress.add_task(part.name.removesuffix(".part"), total=total) if progress else None
        with open(part, "ab" if resumed else "wb") as out:
            _stream(response, out, url, start, total, limit, progress, task)
    return "resumed" if resumed else "downloaded"


def fetch_file(url: str, dest: Path, checksum: str, progress: Progress | None = None,
               max_bytes: int = RemoteFile.max_bytes) -> DownloadAction:
    """Download `url` to `dest` (at most `max_bytes`) unless it is already there with the
    right checksum."""
    algorithm, expected = _parse_checksum(dest.name, checksum)
    if dest.is_file() and _digest(dest, algorithm) == expected:
        return DownloadAction(dest.name, dest, "skipped", dest.stat().st_size, checksum)
    part = dest.with_name(dest.name + ".part")
    try:
        action = _fetch(url, part, max_bytes, progress)
    except _TooLarge:
        part.unlink(missing_ok=True)
        raise
    actual = _digest(part, algorithm)
    if actual != expected:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"checksum mismatch for {dest.name} from {url}: expected {algorithm} {expected}, "
            f"got {actual}"
        )
    os.replace(part, dest)
    return DownloadAction(dest.name, dest, action, dest.stat().st_size, checksum)


def download_dataset(
    name: str,
    dest_dir: str | Path,
    base_url: str | None = None,
    checksums: dict[str, str] | None = None,
    show_progress: bool = True,
) -> list[DownloadAction]:
    """Fetch the official files of `name` (omniglot, cifar10 or mnist) into `dest_dir`.

    base_url replaces the official location (a mirror holding the same file names);
    checksums maps file names to "sha256:<hex>" or "md5:<hex>" digests that replace the built-in
    published ones. Returns one action per file, in order.
    """
    if name == "glyphs":
        raise DownloadError("glyphs is embedded in poisonlab: there is nothing to download")
    check_name(name, DOWNLOADABLE)
    official_url, files = SOURCES[name]
    base = _base_url(base_url) if base_url is not None else official_url
    dest = Path(dest_dir).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {dest}: {exc.strerror}") from exc
    overrides = checksums or {}
    console = Console(stderr=True)
    progress = Progress(  # a bar only on a terminal: elsewhere it left a blank line in the log
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=console, transient=True, disable=not (show_progress and console.is_terminal),
    )
    actions = []
    with progress:
        for remote in files:
            checksum = overrides.get(remote.name, remote.checksum)
            actions.append(fetch_file(base + remote.name, dest / remote.name, checksum, progress,
                                      remote.max_bytes))
    return actions


def _base_url(mirror: str) -> str:
    """A mirror as a base URL ending in '/': a URL of a known scheme, or an existing folder
    (as a file:// URL); anything else raises DownloadError."""
    text = mirror.strip()
    scheme = urllib.parse.urlsplit(text).scheme.lower()
    if scheme in _SCHEMES:
        return text.rstrip("/") + "/"
    folder = Path(text).expanduser()
    if folder.is_dir():
        return folder.resolve().as_uri() + "/"
    raise DownloadError(f"--mirror must be a URL ({', '.join(s + '://' for s in _SCHEMES)}) or "
                        f"an existing folder, got {mirror!r}")
