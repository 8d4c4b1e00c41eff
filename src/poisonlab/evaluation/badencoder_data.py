"""Data of the BadEncoder experiment: the pre-training set, the shadow subset, the downstream
tasks and the reference inputs (see poisonlab.evaluation.badencoder_protocol for the choices).

Without a data set, pre-training and the `synthetic` downstream task are seeded textures (class =
stripe orientation / checkerboard / flat, in a random colour, 32×32 RGB), so the smoke preset runs
anywhere in seconds; they check the wiring, not the published numbers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from poisonlab.data.image_folder import open_image
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.errors import ConfigError, DataError
from poisonlab.evaluation.badencoder import DownstreamTask, check_task, load_downstream

SYNTHETIC_CLASSES = 4

def textures(n: int, seed: int, classes: int = SYNTHETIC_CLASSES) -> ImageSet:
    """n 32×32 RGB images whose class is a texture in a random colour, seeded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % classes
    stripes = ((torch.arange(32) // 2) % 2).float()[:, None].expand(32, 32)
    patterns = torch.stack([stripes, stripes.T, (stripes + stripes.T) % 2,
                            torch.full((32, 32), 0.5)])[:classes]
    colour = 0.25 + 0.5 * torch.rand(n, 3, 1, 1, generator=g)
    x = colour + 0.4 * (patterns[y][:, None] - 0.5) + 0.05 * torch.randn(n, 3, 32, 32, generator=g)
    return ImageSet(x.clamp(0, 1), y)


def _synthetic(n: int, seed: int) -> SupervisedData:
    return SupervisedData(textures(n, seed), textures(max(8, n // 4), seed + 1),
                          ["horizontal", "vertical", "checker", "flat"])


def load_pretraining(cfg: Any, data_dir: Path | None) -> tuple[SupervisedData, str]:
    """The pre-training set (training split for SimCLR, test split for kNN and the scan)."""
    name = cfg.data.pretrain
    if name == "auto":
        name = "cifar10" if data_dir is not None else "synthetic"
    data = (_synthetic(cfg.data.synthetic_size, cfg.seed) if name == "synthetic"
            else load_supervised("cifar10", data_dir))
    part = data.subsampled(cfg.data.pretrain_size, cfg.data.test_size,
                           torch.Generator().manual_seed(cfg.seed))
    return part, name


def shadow_set(train: ImageSet, size: int | None, seed: int) -> Tensor:
    """The attacker's unlabelled shadow images: a seeded subset of the pre-training images."""
    if size is None or size >= len(train):
        return train.x
    return train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))[:size]]


def task_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "folder"


def load_tasks(cfg: Any, data_dir: Path | None) -> list[DownstreamTask]:
    """Every configured downstream task, checked (classes, target) before any training."""
    d = cfg.downstream
    sources: list[tuple[str, SupervisedData]] = []
    for name in d.tasks:
        if name == "synthetic":
            sources.append((name, _synthetic(max(256, cfg.data.synthetic_size // 4), cfg.seed + 10)))
        else:
            where = data_dir if name == "cifar10" else _mnist_dir(d.mnist_dir, data_dir)
            sources.append((name, load_downstream(name, where, seed=cfg.seed)))
    if d.folder is not None:
        if not Path(d.folder).is_dir():
            raise DataError(f"downstream.folder: {d.folder} is not a folder")
        sources.append((task_name(Path(d.folder).name), load_downstream(d.folder, seed=cfg.seed)))
    if not sources:
        raise ConfigError("downstream.tasks is empty and no downstream.folder is given")
    tasks = [DownstreamTask(name, data, cfg.data.target) for name, data in sources]
    for task in tasks:
        check_task(task)
    return tasks


def _mnist_dir(given: Path | None, data_dir: Path | None) -> Path | None:
    if given is not None:
        return given
    if data_dir is not None and (Path(data_dir).parent / "mnist").is_dir():
        return Path(data_dir).parent / "mnist"
    return None


def references(cfg: Any, task: DownstreamTask) -> Tensor:
    """The reference inputs for `task`: the given image files, else drawn from its training split."""
    if cfg.data.reference_images is not None:
        return load_reference_images(cfg.data.reference_images)
    train = task.data.train
    idx = torch.nonzero(train.y == task.target).flatten()
    g = torch.Generator().manual_seed(cfg.seed + 2)
    return train.x[idx[torch.randperm(len(idx), generator=g)[: cfg.data.references]]]


def load_reference_images(path: Path) -> Tensor:
    """RGB [K, 3, H, W] of an image file or a folder of images, at their own size."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data.reference_images: {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    images = []
    for p in files:
        with open_image(str(p), p) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        images.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    sizes = {tuple(x.shape) for x in images}
    if not images or len(sizes) > 1:
        raise DataError(f"data.reference_images: {path} needs images of one size, got {sizes}")
    return torch.stack(images)
