"""The clean images an audit uses: an image folder or a named data set's split, checked
against the model's input shape, and the samples drawn from them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from poisonlab.audit.model import InputShape
from poisonlab.config import Settings
from poisonlab.data.glyphs import load_glyph_supervised
from poisonlab.data.image_folder import load_image_folder, peek_image, scan_image_folder
from poisonlab.data.registry import check_name, load_dataset, refuse_data_dir
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError, ShapeError


class CleanSubset(Settings):
    """The share of the defender's clean data that is used, drawn with the seed.

    fraction: the share of the clean images used, from a folder and from a named data set's
        training split alike; None: all of a folder, DATASET_FRACTION of a data set (a folder
        is what the user chose to give; a training split is far more than a defender has).
    """

    DATASET_FRACTION: ClassVar[float] = 0.05

    fraction: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)

    def draw(self, images: ImageSet, seed: int, *, folder: bool) -> ImageSet:
        """The share of `images` to use (at least one); `folder`: they are a folder's."""
        fraction = self.fraction
        if fraction is None:
            fraction = 1.0 if folder else self.DATASET_FRACTION
        if fraction == 1.0:
            return images
        return sample(images, max(1, round(fraction * len(images))), seed)


def load_clean(data: Path | None, dataset: str | None, data_dir: Path | None, split: str,
               seed: int, shape: Sequence[int] | None = None) -> tuple[ImageSet, list[str]]:
    """Clean labelled images and class names from an image folder or a named data set's
    `split` ("train" or "test"). With `shape`, the model's (C, H, W) (H = 0: any size), a
    folder whose images do not fit is refused from the image headers, before any is decoded
    (a folder of huge images would otherwise fill memory first)."""
    if (data is None) == (dataset is None):
        raise ConfigError("give exactly one of a data folder (--data/--clean-data) or --dataset")
    if data is not None:
        if shape is None or not shape[1]:
            return load_image_folder(data)
        _, files = scan_image_folder(data)
        check_shape(peek_image(str(files[0][0]), files[0][0]), shape, str(data))
        return load_image_folder(data, image_size=(shape[1], shape[2]), channels=shape[0])
    refuse_data_dir(str(dataset), data_dir)
    if dataset == "glyphs":
        sup = load_glyph_supervised(seed=seed)
    else:
        sup = load_dataset(check_name(dataset, ("cifar10", "mnist")), data_dir)
    return (sup.train if split == "train" else sup.test), sup.classes


def load_clean_for(load: Callable[[int | None], tuple[nn.Module, Sequence[int]]],
                   data: Path | None, dataset: str | None, data_dir: Path | None, split: str,
                   seed: int) -> tuple[ImageSet, list[str], nn.Module, Sequence[int]]:
    """Clean images (`load_clean`) and the model they are for, `load(in_channels)` → (model,
    input shape). For a folder the model comes first, built for the channels of the folder's
    first image (read from its header), so that images the model cannot take are refused
    before they are decoded; a named data set (of a known, small image size) comes first."""
    if data is None:
        images, classes = load_clean(None, dataset, data_dir, split, seed)
        net, shape = load(int(images.x.shape[1]))
        return images, classes, net, shape
    if dataset is not None:
        raise ConfigError("give exactly one of a data folder (--data/--clean-data) or --dataset")
    _, files = scan_image_folder(data)
    net, shape = load(peek_image(str(files[0][0]), files[0][0])[0])
    images, classes = load_clean(data, None, data_dir, split, seed, shape=shape)
    return images, classes, net, shape


def check_images(images: ImageSet, shape: Sequence[int], source: str) -> None:
    """DataError when there are no images, ShapeError when they do not have the (C, H, W) the
    model expects (`check_shape`)."""
    if len(images) == 0:
        raise DataError(f"no images in {source}")
    check_shape(tuple(images.x.shape[1:]), shape, source)


def check_shape(got: Sequence[int], shape: Sequence[int], source: str) -> None:
    """ShapeError when images of (C, H, W) `got` do not have the (C, H, W) the model expects
    (H = 0: any size); a `shape` from load_model (an InputShape) adds why the model expects
    it and which option changes it."""
    got = tuple(got)
    if shape[1] and got != tuple(shape):
        why = shape.explain(got) if isinstance(shape, InputShape) else ""
        raise ShapeError(f"images in {source} are {got[0]}x{got[1]}x{got[2]} (CxHxW), but the "
                         f"model expects {shape[0]}x{shape[1]}x{shape[2]}{why}")


def sample(images: ImageSet, n: int, seed: int) -> ImageSet:
    """`n` images drawn without replacement with `seed` (all of them when there are fewer)."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[:n])


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of outputs of `model`: its head's, else those on one image of `x`."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def class_names(classes: Sequence[str], k: int) -> list[str]:
    """The data's class names, extended with the label number up to the model's `k` classes."""
    if len(classes) > k:
        raise ShapeError(f"the data has {len(classes)} classes but the model only {k}")
    return list(classes) + [str(i) for i in range(len(classes), k)]
