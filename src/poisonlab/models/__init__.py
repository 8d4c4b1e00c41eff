"""Model registry: every architecture is built by name.

A builder is `fn(num_classes: int, in_channels: int, **kwargs) -> nn.Module`. Classifiers expose
`features(x)` (penultimate activations after global pooling) and `forward(x) = head(features(x))`.
"""

from __future__ import annotations

# Importing an architecture's module registers it.
from poisonlab.models import (  # noqa: F401
    cnn4,
    convnet_bn,  # noqa: F401
    encoders,
    resnet_cifar,
    small_cnn,
)
from poisonlab.models.registry import (
    Arch,
    Builder,
    available_models,
    build_model,
    check_fits,
    known_arch,
    register_model,
)

__all__ = ["Arch", "Builder", "available_models", "build_model", "check_fits", "known_arch",
           "register_model"]
