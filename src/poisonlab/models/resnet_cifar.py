"""CIFAR ResNets (ResNet-20/32/44/56/110).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, section 4.2: a 3×3
stem with 16 filters, then three stages of n basic blocks each with 16, 32 and 64 filters (stride 2
at the start of stages 2 and 3), global average pooling and a linear head; depth = 6n + 2.
Shortcuts that change shape use a 1×1 convolution with batch norm (option B), the common choice.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.errors import ConfigError
from poisonlab.models.registry import register_model

DEPTHS = (20, 32, 44, 56, 110)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity (or projected) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-stem ResNet body shared by ResNet-(6n+2) and the CIFAR ResNet-18: a 3×3 stride-1
    stem (no max-pool), `per_stage` basic blocks per entry of `planes` (stride 2 entering every
    stage but the first), global average pooling (`features`), optional dropout, a linear head."""

    def __init__(self, planes: list[int], per_stage: int, num_classes: int, in_channels: int,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(planes[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        in_planes = planes[0]
        for stage, p in enumerate(planes):
            for i in range(per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, p, stride))
                in_planes = p
        self.blocks = nn.Sequential(*blocks)
        self.feature_dim = in_planes
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations after global average pooling: [N, feature_dim]."""
        out = self.blocks(self.stem(x))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


class ResNetCifar(CifarResNet):
    """ResNet of depth 6n+2 for small images; `features` gives the pooled 64·width activations."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 width: int = 1, dropout: float = 0.0) -> None:
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ConfigError(f"ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        super().__init__([16 * width, 32 * width, 64 * width], (depth - 2) // 6, num_classes,
                         in_channels, dropout)


def init_weights(model: nn.Module) -> None:
    """He (fan-out) initialisation of the convolutions, unit/zero batch-norm affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _builder(depth: int):
    def build(num_classes: int, in_channels: int = 3, **kwargs) -> ResNetCifar:
        return ResNetCifar(depth, num_classes=num_classes, in_channels=in_channels, **kwargs)

    build.__doc__ = f"ResNet-{depth} for CIFAR-sized images (He et al. 2016)."
    return build


for _depth in DEPTHS:
    register_model(f"resnet{_depth}")(_builder(_depth))
