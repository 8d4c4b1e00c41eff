"""The registry of architectures by name (each architecture module registers itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from pydantic import AfterValidator
from torch import nn

from poisonlab.errors import ConfigError

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
