"""The data of the poisoning study: the training subset, the clean test set, the target images.

The reference (wronnyhuang/metapoison, data.py) trains on the first images of each class in file
order (500 per class: 5,000 CIFAR-10 images) and takes its target from the test images of the
target class; the poisons are the first `budget` training images of the poison class (or a
seeded choice, MetaPoison.Config.poison_choice).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from poisonlab.data.image_folder import load_image_folder
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.errors import ConfigError, DataError
from poisonlab.evaluation.metapoison_config import DataConfig, TargetConfig


@dataclass
class Target:
    """One target: its id (index among the test images of the target class), the image
    [C, H, W] and its true class."""

    id: int
    x: torch.Tensor
    label: int


@dataclass
class PoisonData:
    """The training subset, the clean test set (for the victims' accuracy), the whole test
    split (where the targets come from), the class names and the data set's name."""

    train: ImageSet
    test: ImageSet
    target_pool: ImageSet
    classes: list[str]
    dataset: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def glyphs_as_rgb(data: SupervisedData) -> SupervisedData:
    """The grey 28×28 glyphs as RGB images zero-padded to 32×32, the size ConvNetBN's five
    pools expect, so the smoke preset runs the real surrogate."""

    def rgb(s: ImageSet) -> ImageSet:
        x = s.x.expand(-1, 3, -1, -1) if s.x.shape[1] == 1 else s.x
        pad = max(0, 32 - x.shape[-1]) // 2
        return ImageSet(F.pad(x, (pad, pad, pad, pad)).contiguous(), s.y)

    return SupervisedData(rgb(data.train), rgb(data.test), data.classes)


def load_folder(root: Path, test_fraction: float) -> SupervisedData:
    """An image folder: `train/` and `test/` of class folders, or class folders split per class
    (the last `test_fraction` of each class, in file order, is the test split)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, classes = load_image_folder(root / "train")
        test, test_classes = load_image_folder(root / "test", image_size=tuple(train.x.shape[2:]))
        if test_classes != classes:
            raise DataError(f"{root}: train/ and test/ hold different class folders")
        return SupervisedData(train, test, classes)
    images, classes = load_image_folder(root)
    train_idx, test_idx = [], []
    for c in range(len(classes)):
        members = (images.y == c).nonzero().flatten()
        n_test = int(len(members) * test_fraction)
        if n_test < 1 or n_test >= len(members):
            raise DataError(f"class folder {root / classes[c]} has {len(members)} images: too "
                            "few to split off a test image")
        train_idx.append(members[: len(members) - n_test])
        test_idx.append(members[len(members) - n_test:])
    return SupervisedData(images.subset(torch.cat(train_idx)), images.subset(torch.cat(test_idx)),
                          classes)


def first_per_class(train: ImageSet, per_class: int | None) -> ImageSet:
    """The first `per_class` images of each class, kept in file order (all when None)."""
    if per_class is None:
        return train
    keep = torch.zeros(len(train), dtype=torch.bool)
    for c in train.y.unique().tolist():
        members = (train.y == c).nonzero().flatten()
        if len(members) < per_class:
            raise ConfigError(f"data.train_per_class={per_class}, but class {c} has only "
                              f"{len(members)} training images")
        keep[members[:per_class]] = True
    return train.subset(keep.nonzero().flatten())


def load_data(cfg: DataConfig, data_dir: Path | None, seed: int) -> PoisonData:
    """The study's data named by cfg (see DataConfig)."""
    name = cfg.dataset
    if name == "auto":
        name = "cifar10" if data_dir is not None else "glyphs"
    if name == "folder":
        if data_dir is None:
            raise ConfigError("data.dataset=folder needs --data-dir")
        data = load_folder(Path(data_dir), cfg.test_fraction)
    else:
        data = load_supervised(name, data_dir, seed=seed)
        if name == "glyphs":
            data = glyphs_as_rgb(data)
    test = data.test
    if cfg.test_size is not None and cfg.test_size < len(test):
        test = test.subset(torch.arange(cfg.test_size))
    return PoisonData(first_per_class(data.train, cfg.train_per_class), test, data.test,
                      list(data.classes), name)


def check_classes(cfg: TargetConfig, data: PoisonData) -> None:
    """Every class named by cfg exists (one-line ConfigError)."""
    n = data.num_classes
    for key, value in (("poison_class", cfg.poison_class), ("target_class", cfg.target_class),
                       ("adv_class", cfg.adversarial)):
        if value >= n:
            raise ConfigError(f"targets.{key}={value} is out of range: {data.dataset} has "
                              f"{n} classes")


def targets(cfg: TargetConfig, data: PoisonData) -> list[Target]:
    """The target images: ids among the test images of the target class, in file order."""
    check_classes(cfg, data)
    test_pool = data.target_pool
    members = (test_pool.y == cfg.target_class).nonzero().flatten()
    if max(cfg.ids) >= len(members):
        raise ConfigError(f"targets.ids reach {max(cfg.ids)}, but the target class "
                          f"{cfg.target_class} has {len(members)} test images")
    return [Target(i, test_pool.x[members[i]].clone(), cfg.target_class) for i in cfg.ids]
