"""The registry of architectures by name (each architecture module registers itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

from poisonlab.errors import ConfigError, ShapeError

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `fn` under `name`."""

    def decorate(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' registered twice")
        _REGISTRY[name] = fn
        return fn

    return decorate


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build architecture `name`; unknown names get a one-line error listing the known ones."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown architecture '{name}' (known: {', '.join(available_models())})")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def known_arch(name: str) -> str:
    """`name` itself if it is a registered architecture (a settings validator)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown architecture '{name}' (known: {', '.join(available_models())})")
    return name


# A settings field naming an architecture: validated against the registry when the config is built.
Arch = Annotated[str, AfterValidator(known_arch)]


def check_fits(model: nn.Module, image_shape: tuple[int, ...], arch: str) -> nn.Module:
    """`model` if it takes images of (C, H, W) `image_shape` (a forward pass of zeros), else a
    ShapeError: images shrunk below an architecture's poolings (a large downsample factor)
    failed inside torch only once training began."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *image_shape))  # 2: batch-statistics norms need >1
    except RuntimeError as exc:
        c, h, w = image_shape
        raise ShapeError(f"{arch} cannot take images of {c}x{h}x{w} (CxHxW): "
                         f"{str(exc).splitlines()[0][:160]}") from None
    finally:
        model.train(was_training)
    return model
