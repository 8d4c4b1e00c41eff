"""Labelled image folders (`<root>/<class>/<image>`) and the shared image-decoding helpers.

Classes are the sub-folder names, sorted; label i is `classes[i]`. Every image must have the
same size (the given `image_size`, else the first image's); a mismatch is a DataError naming the
file. Decoding uses Pillow in a small pool of forked worker processes (2 by default: decoding
tens of thousands of small files is dominated by per-file Python overhead, which threads do not
overlap).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from poisonlab.config import read_small_bytes
from poisonlab.data.types import ImageSet
from poisonlab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
IMAGE_FILE_LIMIT = 256 * 2**20  # bytes of one image file: far above any training image

T = TypeVar("T")
R = TypeVar("R")

# An image to decode: (name used in error messages, encoded bytes or a file path).
ImageItem = tuple[str, "bytes | Path"]


def default_workers() -> int:
    """Worker processes used for decoding: 2, or 1 on a single-core machine."""
    return max(1, min(2, os.cpu_count() or 1))


def run_chunks(fn: Callable[[T], R], chunks: Sequence[T], workers: int | None = None) -> list[R]:
    """`[fn(c) for c in chunks]`, spread over forked worker processes where available.

    `fn` must be a module-level function that touches no torch state (forked children only
    decode with Pillow/NumPy). The exception of the first failing chunk, in order, is re-raised
    here, so errors name the same file as a serial run would.

    Worker w takes chunks w, w + n, w + 2n, ... and sends each result back on a pipe of its own,
    whose writing end only it holds. A worker that dies (killed, out of memory), even half-way
    through sending, is then an end of file on its pipe, and its chunks are decoded here
    instead. (ProcessPoolExecutor shares one result pipe whose writing end the parent also
    holds: a worker stopped while sending left its manager thread waiting for the rest of the
    message, and shutdown hung.)
    """
    workers = default_workers() if workers is None else workers
    can_fork = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    if workers <= 1 or len(chunks) <= 1 or not can_fork:
        return [fn(c) for c in chunks]
    ctx = multiprocessing.get_context("fork")
    count = min(workers, len(chunks))
    processes, pipes = [], []
    try:
        for w in range(count):
            reader, writer = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_work, args=(fn, chunks[w::count], writer), daemon=True)
            process.start()
            writer.close()  # before the next fork, so that no other process holds it
            processes.append(process)
            pipes.append(reader)
        results = []
        for i, chunk in enumerate(chunks):
            outcome = _receive(pipes[i % count])
            if outcome is None:  # the worker is gone: this chunk and its others decode here
                pipes[i % count] = None
                results.append(fn(chunk))
                continue
            ok, value = outcome
            if not ok:
                raise value
            results.append(value)
        return results
    finally:
        # Done, failed or interrupted (Ctrl-C, SIGTERM): stop the workers now. Waiting for them
        # to finish their chunks, each a share of the whole data set, is slow, and a killed
        # parent left them decoding as orphans.
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in pipes:
            if pipe is not None:
                pipe.close()


def _receive(pipe):
    """The next (ok, value) a worker sent, or None once it is gone."""
    if pipe is None:
        return None
    try:
        return pipe.recv()
    except (EOFError, OSError):
        return None


def _work(fn: Callable[[T], R], chunks: Sequence[T], writer) -> None:
    """A worker: each chunk's (True, result), or (False, exception) and stop."""
    _default_sigterm()
    for chunk in chunks:
        try:
            outcome = (True, fn(chunk))
        except Exception as exc:  # noqa: BLE001 - re-raised in the parent
            outcome = (False, exc)
        try:
            writer.send(outcome)
        except Exception as exc:  # noqa: BLE001 - an exception that does not pickle
            writer.send((False, DataError(str(exc) if outcome[0] else str(outcome[1]))))
        if not outcome[0]:
            break
    writer.close()


def _default_sigterm() -> None:
    """Forked workers must not inherit a run's SIGTERM→KeyboardInterrupt handler: they are
    stopped with SIGTERM, and the inherited handler printed a traceback for each. A Ctrl-C
    reaches the whole process group: the parent handles it and stops the workers, so they
    ignore SIGINT (each printed a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def split_chunks(items: Sequence[T], count: int) -> list[Sequence[T]]:
    """`items` cut into at most `count` contiguous, nearly equal, non-empty slices."""
    count = max(1, min(count, len(items)))
    bounds = [round(i * len(items) / count) for i in range(count + 1)]
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def open_image(name: str, source: bytes | Path,
               size: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode one image; unreadable or corrupt data is a DataError naming it, and
    so is an image past PIL's decompression-bomb limit (PIL only warns up to twice the limit:
    a file of a few kB that decodes to gigabytes is refused, not decoded). With `size`
    ((width, height), Pillow's order), an image of another size is refused from its header,
    before it is decoded."""
    image = _open_lazily(name, source)
    if image.mode.startswith(("I", "F")):  # Pillow's convert to 8 bits clips, not scales, them
        raise DataError(f"image {name} has {image.mode} pixels (16-bit, 32-bit or float): "
                        "convert it to 8 bits per channel")
    if size is not None and image.size != tuple(size):
        raise DataError(f"image {name} is {image.size[0]}x{image.size[1]}, expected "
                        f"{size[0]}x{size[1]}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from exc
    return image


def peek_image(name: str, source: bytes | Path) -> tuple[int, int, int]:
    """The (channels, height, width) an image decodes to, read from its header alone (a
    grayscale mode is 1 channel, any other 3, as `decode_images` takes them)."""
    image = _open_lazily(name, source)
    return (1 if image.mode in _GRAY_MODES else 3, image.size[1], image.size[0])


def _open_lazily(name: str, source: bytes | Path) -> Image.Image:
    """The image with its header read and its pixels not yet decoded."""
    try:
        data = (source if isinstance(source, bytes)
                else read_small_bytes(Path(source), IMAGE_FILE_LIMIT, "an image"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError(f"cannot decode image {name}: not an image format Pillow reads "
                        "(truncated or not an image?)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DataError(f"cannot decode image {name}: {exc}") from exc


def _decode_chunk(job: tuple[Sequence[ImageItem], tuple[int, int], str]) -> np.ndarray:
    items, size, mode = job
    channels = 1 if mode == "L" else 3
    out = np.empty((len(items), size[1], size[0], channels), dtype=np.uint8)
    for i, (name, source) in enumerate(items):
        image = open_image(name, source, size)
        if image.mode != mode:
            try:
                image = image.convert(mode)
            except (OSError, ValueError) as exc:  # e.g. LAB or CMYK-with-alpha
                raise DataError(f"cannot convert image {name} from {image.mode} to {mode}: "
                                f"{exc}") from None
        # tobytes + frombuffer is cheaper than np.asarray (array interface) for tiny images
        out[i] = np.frombuffer(image.tobytes(), np.uint8).reshape(size[1], size[0], channels)
    return out


def decode_images(
    items: Sequence[ImageItem],
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    workers: int | None = None,
) -> torch.Tensor:
    """Decode images into a uint8 tensor [N, C, H, W].

    image_size is (height, width); None takes the first image's. channels is 1 (grayscale) or 3
    (RGB); None takes 1 if the first image is grayscale, else 3.
    """
    if not items:
        raise DataError("no images to decode")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    if image_size is None or channels is None:
        first = peek_image(*items[0])
        image_size = image_size or first[1:]
        channels = channels or first[0]
    size = (int(image_size[1]), int(image_size[0]))  # Pillow's (width, height)
    mode = "L" if channels == 1 else "RGB"
    jobs = [(c, size, mode) for c in split_chunks(items, 4 * default_workers())]
    arrays = run_chunks(_decode_chunk, jobs, workers)
    return torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()


def class_order(names) -> list[str]:
    """Class folder names in label order: by number when every name is a decimal integer (so
    folders 0, 1, ..., 10 are labels 0..10, not the text order 0, 1, 10, 2), else sorted as text."""
    names = list(names)
    if names and all(n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def scan_image_folder(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sub-folder names in `class_order`) and every (image path, label), in a fixed
    order."""
    root = Path(root)
    if not root.is_dir():
        what = ("is a file, not a folder" if root.exists() else "is a symlink that leads "
                "nowhere (dangling, or a loop)" if root.is_symlink() else "does not exist")
        raise DataError(f"image folder {root} {what}")
    folders = class_order(p.name for p in root.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"image folder {root} has no class sub-folders")
    labels, classes = folder_labels(root, folders)
    files: list[tuple[Path, int]] = []
    for label, name in zip(labels, folders, strict=True):
        images = sorted(p for p in (root / name).iterdir() if _is_image_file(p))
        if not images:
            raise DataError(f"class folder {root / name} has no images")
        files.extend((p, label) for p in images)
    return classes, files


LARGEST_LABEL = 99_999  # a numbered class folder: past it, a model would need absurdly many outputs


def folder_labels(root: Path, folders: list[str]) -> tuple[list[int], list[str]]:
    """The label of each class folder (in `class_order`) and the class names by label. Folders
    named by numbers are those labels (folders 3, 5 and 7 hold labels 3, 5 and 7, and the
    classes are "0" .. "7", so a model's label 3 is folder 3 even when folders are missing);
    otherwise label i is the i-th name."""
    if not all(n.isdecimal() for n in folders):
        return list(range(len(folders))), list(folders)
    labels = [int(n) for n in folders]
    for a, b in pairwise(folders):
        if int(a) == int(b):
            raise DataError(f"class folders {root / a} and {root / b} are the same label "
                            f"{int(a)}: rename one")
    if labels[-1] > LARGEST_LABEL:
        raise DataError(f"class folder {root / folders[-1]}: numbered folders are labels, and "
                        f"label {labels[-1]} is past {LARGEST_LABEL}")
    return labels, [str(i) for i in range(labels[-1] + 1)]


def _is_image_file(path: Path) -> bool:
    """An image by its name; one that is not a regular file (a FIFO would block the read) is
    refused, not skipped, so that no image goes missing unnoticed."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS or path.is_dir():
        return False
    if not path.is_file():
        raise DataError(f"cannot read image {path}: not a regular file (a FIFO, socket or "
                        "device?)")
    return True


def read_image_folder(
    root: str | Path,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    workers: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images [N, C, H, W], int64 labels [N] and the sorted class names of a folder."""
    classes, files = scan_image_folder(root)
    x = decode_images([(str(p), p) for p, _ in files], image_size, channels, workers)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return x, y, classes


def load_image_folder(
    root: str | Path,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> tuple[ImageSet, list[str]]:
    """A labelled image folder as float32 images in [0, 1] plus its class names."""
    x, y, classes = read_image_folder(root, image_size, channels)
    return ImageSet(x.float().div_(255.0), y), classes
