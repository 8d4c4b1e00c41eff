"""Image encoders for self-supervised learning: the CIFAR-stem ResNet-18 and any registered
classifier's `features`, behind one interface.

An *encoder* maps images [N, 3, H, W] in [0, 1] to features [N, D] (`encoder(x)`), and says its
`feature_dim` D. It normalises its input itself, so every consumer (SimCLR pre-training, the
BadEncoder injection, downstream classifiers, scans) feeds plain [0, 1] images and a trigger is
stamped on the image, before normalisation, as in the reference.

The CIFAR-stem ResNet-18 (`resnet18` in the registry) is the encoder of SimCLR on CIFAR-10 in
Jia, Liu, Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised
Learning", IEEE S&P 2022 (reference code jinyuan-jia/BadEncoder, after leftthomas/SimCLR): the
ResNet-18 of He et al. 2016 with its 7×7 stride-2 stem convolution replaced by a 3×3 stride-1 one
and the max-pool removed, so a 32×32 image keeps its resolution into the first stage; four stages
of two basic blocks with base·(1, 2, 4, 8) channels (strides 1, 2, 2, 2), global average pooling,
no classifier. Its features are 8·base-dimensional (512 for the paper's base 64). `base_channels`
makes the width configurable (the paper: 64; a CPU: 16–32), a deviation for cost only.
Shortcuts that change shape are a 1×1 strided convolution with batch norm, as in torchvision; the
initialisation is torchvision's (Kaiming-normal fan-out convolutions, batch norm γ = 1, β = 0).

Input normalisation: the reference's transforms end with
`Normalize(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))` (CIFAR-10 statistics),
applied after augmentation and after stamping a trigger, for pre-training, injection and every
downstream set alike. `Encoder` does the same as its first operation, x̂ = (x − μ) / σ per channel;
μ and σ are fixed buffers, not saved in weight files (they belong to the architecture).

`build_encoder(name, **kwargs)` wraps any registered architecture that has `features(x)` (e.g.
`resnet18`, `resnet20`) into an `Encoder`; the classifier head is dropped.
"""

from __future__ import annotations

import torch
from torch import nn

from poisonlab.errors import ConfigError, ShapeError
from poisonlab.models.registry import build_model, register_model
from poisonlab.models.resnet_cifar import CifarResNet

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class ResNet18Cifar(CifarResNet):
    """CIFAR-stem ResNet-18 (3×3 stride-1 stem, no max-pool); `features` gives the pooled
    8·base_channels activations, `forward` a linear head on them."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, base_channels: int = 64) -> None:
        if base_channels < 1:
            raise ConfigError(f"base_channels must be at least 1, got {base_channels}")
        super().__init__([base_channels * m for m in (1, 2, 4, 8)], 2, num_classes, in_channels)


@register_model("resnet18")
def _resnet18(num_classes: int, in_channels: int = 3, **kwargs) -> ResNet18Cifar:
    """CIFAR-stem ResNet-18 (BadEncoder's SimCLR encoder); kwargs: base_channels (default 64)."""
    return ResNet18Cifar(num_classes=num_classes, in_channels=in_channels, **kwargs)


class Encoder(nn.Module):
    """images [N, C, H, W] in [0, 1] → features [N, feature_dim]: per-channel normalisation
    (x − mean) / std, then `backbone.features`."""

    def __init__(
        self,
        backbone: nn.Module,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
    ) -> None:
        super().__init__()
        if not callable(getattr(backbone, "features", None)):
            raise ShapeError(f"{type(backbone).__name__} has no features(x): it cannot be an encoder")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ConfigError(f"normalisation needs one positive std per mean, got {mean} / {std}")
        # The classifier head is not part of an encoder (and stays out of its weight files).
        if isinstance(getattr(backbone, "head", None), nn.Module):
            backbone.head = nn.Identity()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        dim = getattr(backbone, "feature_dim", None)
        self.feature_dim = int(dim) if dim is not None else self._probe_dim(len(mean))

    def _probe_dim(self, channels: int) -> int:
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            dim = self.backbone.features(torch.zeros(1, channels, 32, 32)).shape[-1]
        self.backbone.train(was_training)
        return int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ShapeError(
                f"encoder expects images [N, {self.mean.shape[1]}, H, W], got {list(x.shape)}"
            )
        return self.backbone.features((x - self.mean) / self.std)


def build_encoder(
    name: str,
    *,
    in_channels: int = 3,
    mean: tuple[float, ...] = CIFAR10_MEAN,
    std: tuple[float, ...] = CIFAR10_STD,
    **kwargs,
) -> Encoder:
    """An `Encoder` on registered architecture `name` (e.g. "resnet18" with base_channels=32,
    "resnet20" with width=1); kwargs go to the architecture's builder."""
    # num_classes only sizes the head, which Encoder drops.
    backbone = build_model(name, num_classes=2, in_channels=in_channels, **kwargs)
    return Encoder(backbone, mean=mean, std=std)
