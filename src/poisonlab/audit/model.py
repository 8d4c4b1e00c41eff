"""Loading a model you did not train: weights only (never unpickled), architecture by name,
number of classes and input channels read from the weights, input shape from the file's
metadata or the architecture."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from poisonlab.errors import ModelFileError
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import load_into, load_weights

# Input shape the architectures are built for, when the model file does not say.
DEFAULT_INPUT = {"resnet": (3, 32, 32), "small_cnn": (1, 28, 28), "tiny_cnn": (1, 28, 28)}

Shape = tuple[int, int, int]


def load_model(path: Path | str, arch: str, *, in_channels: int | None = None,
               image_size: int | None = None) -> tuple[nn.Module, Shape]:
    """Build `arch` and load the weights file `path` into it (safetensors, or
    torch.load(weights_only=True): never arbitrary code); returns the model in eval mode and the
    (C, H, W) it expects. The number of classes comes from the 2-D `head.weight`; the input
    channels from `in_channels` (e.g. those of the data), else the first 4-D weight. H and W
    come from `image_size`, else the file's `input_shape` metadata, else the architecture
    (0, 0 when unknown: any size is accepted)."""
    path = Path(path)
    state, meta = load_weights(path)
    head = state.get("head.weight")
    if head is None or head.dim() != 2:
        raise ModelFileError(f"cannot tell the number of classes from {path}: it has no 2-D "
                             "'head.weight' tensor")
    channels = in_channels
    if channels is None:
        first = next((v for v in state.values() if v.dim() == 4), None)
        channels = int(first.shape[1]) if first is not None else 3
    model = build_model(arch, num_classes=int(head.shape[0]), in_channels=channels)
    load_into(model, state, name=arch)
    shape_channels = in_channels if in_channels is not None else model_channels(model)
    return model.eval(), input_shape(arch, meta, image_size, shape_channels, path)


def input_shape(arch: str, meta: Mapping[str, str], image_size: int | None, channels: int,
                path: Path | str = "the model file") -> Shape:
    """(C, H, W) the model expects: `image_size`, else the file's metadata, else the arch's."""
    if image_size is not None:
        return (channels, image_size, image_size)
    if "input_shape" in meta:
        try:
            shape = tuple(int(v) for v in json.loads(meta["input_shape"]))
        except (ValueError, TypeError, OverflowError, RecursionError):
            shape = None
        if shape is not None:
            if len(shape) != 3 or min(shape) < 1:
                raise ModelFileError(f"the input_shape metadata of {path} is "
                                     f"{meta['input_shape']}, not [C, H, W]")
            return shape  # type: ignore[return-value]
    for prefix, shape in DEFAULT_INPUT.items():
        if arch.startswith(prefix):
            return shape
    return (channels, 0, 0)  # unknown: accept the data's size


def model_channels(model: nn.Module) -> int:
    """Input channels of the model's first convolution (3 without one)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else 3
