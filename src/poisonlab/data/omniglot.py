"""Omniglot: 1623 handwritten characters from 50 alphabets, 20 drawings each.

Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic program
induction", Science 350(6266), 2015. Official release: github.com/brendenlake/omniglot
(`python/images_background.zip`, `python/images_evaluation.zip`).

`load_omniglot(root)` reads both sets (the zips, or their extracted folders
`images_background/<Alphabet>/characterNN/*.png`), background set first, alphabets and characters
sorted, and preprocesses each 105x105 drawing as in the MAML set-up (Finn et al., 2017): resize to
28x28 with Lanczos filtering and invert, so strokes are 1 and the background 0. The result is
cached (uint8) under a key made of the source checksums, so later loads skip the PNG decoding.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from poisonlab.config import read_small_bytes
from poisonlab.data.archive import ArchiveBudget
from poisonlab.data.cache import Expected, file_digest, load_cached, make_key, save_cached
from poisonlab.data.image_folder import default_workers, open_image, run_chunks, split_chunks
from poisonlab.data.types import FewShotData
from poisonlab.errors import ConfigError, DataError

SETS = ("images_background", "images_evaluation")
SOURCE_SIZE = 105
IMAGE_SIZE = 28
SAMPLES_PER_CLASS = 20
NUM_CLASSES = 1623
REFERENCE_SPLIT = (1100, 100, 423)  # train / validation / test classes (MAML, Finn et al. 2017)
_FORMAT = "omniglot-v1-lanczos28-inverted"


@dataclass(frozen=True)
class _Source:
    """One of the two sets, as a zip file or an extracted folder."""

    set_name: str
    path: Path

    @property
    def is_zip(self) -> bool:
        return self.path.suffix == ".zip"


# A character: ((alphabet, character), [(name for messages, member name or file path)]).
_Character = tuple[tuple[str, str], list[tuple[str, str]]]


def _find_sources(root: Path) -> list[_Source]:
    if not root.is_dir():
        raise DataError(f"Omniglot folder {root} does not exist")
    sources = []
    for set_name in SETS:
        archive, folder = root / f"{set_name}.zip", root / set_name
        if archive.is_file():
            sources.append(_Source(set_name, archive))
        elif folder.is_dir():
            sources.append(_Source(set_name, folder))
        else:
            raise DataError(f"Omniglot: neither {archive} nor {folder} exists")
    return sources


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip file: {exc}") from exc


def _group_characters(src: _Source, members: list[tuple[str, str]]) -> list[_Character]:
    """Group (relative path, locator) pairs into characters, checking 20 drawings each."""
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for rel, locator in members:
        alphabet, character, _ = rel.split("/")
        grouped.setdefault((alphabet, character), []).append((rel, locator))
    if not grouped:
        raise DataError(f"no Omniglot images found in {src.path} (expected {src.set_name}/...)")
    characters = []
    for key in sorted(grouped):
        files = sorted(grouped[key])
        if len(files) != SAMPLES_PER_CLASS:
            raise DataError(
                f"{src.path}: {key[0]}/{key[1]} has {len(files)} images, "
                f"expected {SAMPLES_PER_CLASS}"
            )
        named = [(f"{src.path}:{loc}" if src.is_zip else loc, loc) for _, loc in files]
        characters.append((key, named))
    return characters


def _list_characters(src: _Source) -> list[_Character]:
    members: list[tuple[str, str]] = []
    if src.is_zip:
        with _open_zip(src.path) as zf:
            for info in zf.infolist():
                parts = info.filename.split("/")
                if len(parts) == 4 and parts[0] == src.set_name and parts[3].endswith(".png"):
                    members.append(("/".join(parts[1:]), info.filename))
    else:
        for alphabet in os.scandir(src.path):
            if not alphabet.is_dir():
                continue
            for character in os.scandir(alphabet.path):
                if character.is_dir():
                    members.extend(
                        (f"{alphabet.name}/{character.name}/{f.name}", f.path)
                        for f in os.scandir(character.path)
                        if f.name.endswith(".png")
                    )
    return _group_characters(src, members)


# An Omniglot drawing is a PNG of under 1 KB, a whole set under 6 MB.
_MEMBER_LIMIT, _TOTAL_LIMIT = 2**20, 256 * 2**20


def _read_bytes(src: _Source, characters: list[_Character]) -> list[tuple[str, bytes]]:
    files = [f for _, fs in characters for f in fs]
    if not src.is_zip:  # regular files of at most a member's size: a FIFO blocked for ever
        items = []
        for name, loc in files:
            try:
                items.append((name, read_small_bytes(Path(loc), _MEMBER_LIMIT, "an Omniglot image")))
            except OSError as exc:
                raise DataError(f"cannot read Omniglot image {loc}: {exc.strerror or exc}") from None
        return items
    items = []
    budget = ArchiveBudget(src.path, "Omniglot", _MEMBER_LIMIT, _TOTAL_LIMIT)
    with _open_zip(src.path) as zf:
        for name, member in files:
            try:
                budget.take(member, zf.getinfo(member).file_size)
                items.append((name, zf.read(member)))
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataError(f"corrupt zip member {name}: {exc}") from exc
            except (RuntimeError, NotImplementedError) as exc:  # encrypted, unknown compression
                raise DataError(f"cannot unpack zip member {name} of {src.path}: {exc} (the "
                                "Omniglot release is neither)") from exc
    return items


def _decode_chunk(items: Sequence[tuple[str, bytes]]) -> np.ndarray:
    """105x105 drawings -> uint8 [n, 28, 28] with strokes 255 and background 0."""
    out = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, (name, data) in enumerate(items):
        image = open_image(name, data)
        if image.size != (SOURCE_SIZE, SOURCE_SIZE):
            raise DataError(
                f"image {name} is {image.size[0]}x{image.size[1]}, "
                f"expected {SOURCE_SIZE}x{SOURCE_SIZE}"
            )
        small = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        out[i] = 255 - np.frombuffer(small.tobytes(), np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
    return out


def _fingerprint(src: _Source) -> str:
    """Zip: sha256 of the file. Folder: names, sizes and modification times of its PNGs."""
    if src.is_zip:
        return f"{src.set_name}:sha256:{file_digest(src.path)}"
    lines = []
    for dirpath, _, names in os.walk(src.path):
        for name in names:
            st = os.stat(os.path.join(dirpath, name))
            lines.append(f"{os.path.relpath(dirpath, src.path)}/{name} {st.st_size} {st.st_mtime_ns}")
    return f"{src.set_name}:stat:" + make_key("tree", *sorted(lines))


def load_omniglot(root: str | Path, workers: int | None = None) -> FewShotData:
    """All 1623 Omniglot characters: float32 [classes, 20, 1, 28, 28] in [0, 1], strokes = 1.

    Class names are "Alphabet/characterNN", groups are the alphabets. `workers` processes
    decode the PNGs on a first load (default 2); later loads read the cache.
    """
    sources = _find_sources(Path(root))
    key = make_key("omniglot", _FORMAT, *(_fingerprint(s) for s in sources))
    cached = load_cached(key, Expected({"images": (torch.uint8, ("K", 20, 1, 28, 28))},
                                       lists={"class_names": "K", "groups": "K"}))
    if cached is None:
        images, names, groups = _build(sources, workers)
        save_cached(key, {"images": images}, {"class_names": names, "groups": groups})
    else:
        images, names, groups = cached[0]["images"], cached[1]["class_names"], cached[1]["groups"]
    return FewShotData(images=images.float().div_(255.0), class_names=names, groups=groups)


def _build(sources: list[_Source], workers: int | None) -> tuple[torch.Tensor, list, list]:
    names: list[str] = []
    groups: list[str] = []
    items: list[tuple[str, bytes]] = []
    for src in sources:
        characters = _list_characters(src)
        items.extend(_read_bytes(src, characters))
        names.extend(f"{alphabet}/{character}" for (alphabet, character), _ in characters)
        groups.extend(alphabet for (alphabet, _), _ in characters)
    if len(set(names)) != len(names):
        raise DataError(f"Omniglot sets in {sources[0].path.parent} repeat a character name")
    chunks = split_chunks(items, 8 * default_workers())
    pixels = np.concatenate(run_chunks(_decode_chunk, chunks, workers))
    images = torch.from_numpy(pixels).reshape(
        len(names), SAMPLES_PER_CLASS, 1, IMAGE_SIZE, IMAGE_SIZE
    )
    return images, names, groups


def split_omniglot_classes(
    num_classes: int = NUM_CLASSES,
    seed: int = 0,
    sizes: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint (train, validation, test) class indices, each a sorted LongTensor.

    The class indices are shuffled with `seed` and cut into `sizes`. sizes=None uses the
    reference MAML split 1100/100/423 scaled to `num_classes` (exactly 1100/100/423 for the
    1623 Omniglot classes; for other banks validation and test get round(n*100/1623) and
    round(n*423/1623) classes, at least 1 each when n >= 3, and train the rest). Explicit sizes
    must be non-negative and sum to num_classes.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    if sizes is None:
        sizes = _scaled_sizes(num_classes)
    if len(sizes) != 3 or min(sizes) < 0 or sum(sizes) != num_classes:
        raise ConfigError(
            f"split sizes {tuple(sizes)} must be three non-negative counts summing to "
            f"num_classes={num_classes}"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_classes, generator=generator)
    train, val, test = torch.split(order, list(sizes))
    return train.sort().values, val.sort().values, test.sort().values


def _scaled_sizes(n: int) -> tuple[int, int, int]:
    _, ref_val, ref_test = REFERENCE_SPLIT
    total = sum(REFERENCE_SPLIT)
    val, test = round(n * ref_val / total), round(n * ref_test / total)
    if n >= 3:
        val, test = max(val, 1), max(test, 1)
    val, test = min(val, n), min(test, max(n - val, 0))
    return n - val - test, val, test
