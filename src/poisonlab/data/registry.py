"""Data sets by name: where their files live, how to load them, and a summary for `data info`.

A data set's directory is, in order: the explicit `data_dir`, `$POISONLAB_DATA/<name>`, or
`./data/<name>`. The embedded glyph set needs no directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from poisonlab.data.cifar10 import load_cifar10
from poisonlab.data.glyphs import load_glyph_supervised, load_glyphs
from poisonlab.data.mnist import load_mnist
from poisonlab.data.omniglot import load_omniglot
from poisonlab.data.types import FewShotData, SupervisedData
from poisonlab.errors import ConfigError, DataError

DATASETS = ("omniglot", "cifar10", "mnist", "glyphs")
DOWNLOADABLE = ("omniglot", "cifar10", "mnist")
SUPERVISED = ("cifar10", "mnist", "glyphs")


def check_name(name: str, allowed: tuple[str, ...] = DATASETS) -> str:
    """`name` itself if it is one of `allowed`, else a DataError listing them."""
    if name not in allowed:
        raise DataError(f"unknown data set {name!r}: choose one of {', '.join(allowed)}")
    return name


DATA_ENV = "POISONLAB_DATA"
# Where a named data set is looked for without --data-dir, for help texts.
DATA_LOCATION = f"${DATA_ENV}/NAME, else ./data/NAME"


def default_data_dir(name: str) -> Path:
    """`$POISONLAB_DATA/<name>` when POISONLAB_DATA is set, else `./data/<name>`."""
    base = os.environ.get(DATA_ENV)
    return (Path(base).expanduser() if base else Path("data")) / name


def resolve_data_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The directory holding `name`'s files; a DataError suggesting a download when absent."""
    path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir(name)
    if not path.exists():
        hint = f"poisonlab data download {name}" + (f" --data-dir {path}" if data_dir else "")
        raise DataError(f"{name} data not found at {path}: run `{hint}` or pass --data-dir")
    return path


def refuse_data_dir(name: str, data_dir: str | Path | None) -> None:
    """A ConfigError when a data folder is given for the embedded glyph set, which reads no
    files: the folder would be silently ignored (a user who meant to run on their data would
    get results on the glyphs)."""
    if name == "glyphs" and data_dir is not None:
        raise ConfigError(f"--data-dir {data_dir} is not used: the data set is the embedded "
                          "glyphs, which reads no files (name a data set that does, e.g. "
                          "--set data.dataset=..., or drop --data-dir)")


def load_dataset(name: str, data_dir: str | Path | None = None) -> FewShotData | SupervisedData:
    """Load a data set by name: omniglot and glyphs are few-shot banks, cifar10 and mnist
    supervised train/test sets."""
    check_name(name)
    refuse_data_dir(name, data_dir)
    if name == "glyphs":
        return load_glyphs()
    path = resolve_data_dir(name, data_dir)
    if name == "omniglot":
        return load_omniglot(path)
    if name == "cifar10":
        return load_cifar10(path)
    return load_mnist(path)


def _value_range(*tensors: torch.Tensor) -> list[float]:
    """[min, max] over the non-empty tensors (no concatenated copy of large image sets)."""
    present = [t for t in tensors if t.numel()]
    if not present:
        return [0.0, 0.0]
    low = min(float(t.min()) for t in present)
    high = max(float(t.max()) for t in present)
    return [round(low, 6), round(high, 6)]


def describe_dataset(data: FewShotData | SupervisedData) -> dict[str, Any]:
    """A JSON-ready summary: kind, classes, images per split, image shape and value range."""
    if isinstance(data, FewShotData):
        return {
            "kind": "few-shot",
            "num_classes": data.num_classes,
            "samples_per_class": data.samples_per_class,
            "num_images": data.num_classes * data.samples_per_class,
            "num_groups": len(set(data.groups)),
            "image_shape": list(data.images.shape[2:]),
            "value_range": _value_range(data.images),
            "class_names_head": data.class_names[:5],
        }
    if isinstance(data, SupervisedData):
        splits = {"train": data.train, "test": data.test}
        return {
            "kind": "supervised",
            "num_classes": data.num_classes,
            "classes": list(data.classes),
            "images": {split: len(s) for split, s in splits.items()},
            "images_per_class": {
                split: torch.bincount(s.y, minlength=data.num_classes).tolist()
                for split, s in splits.items()
            },
            "image_shape": list(data.train.x.shape[1:]),
            "value_range": _value_range(data.train.x, data.test.x),
        }
    raise DataError(f"cannot describe {type(data).__name__}: not a poisonlab data set")


def load_supervised(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> SupervisedData:
    """A supervised train/test set by name: cifar10 or mnist from `data_dir`, or the embedded
    glyph set (no files; its splits are shuffled by `seed`)."""
    check_name(name, SUPERVISED)
    refuse_data_dir(name, data_dir)
    if name == "glyphs":
        return load_glyph_supervised(seed=seed)
    return load_dataset(name, data_dir)
