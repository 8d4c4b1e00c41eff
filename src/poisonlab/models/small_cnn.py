"""Small CNN for 28×28 images (MNIST, the glyph set), and a tiny variant for fast tests.

The architecture is the two-convolution MNIST network used in the backdoor literature (e.g. Gu,
Dolan-Gavitt, Garg, "BadNets", 2017; Wang et al., "Neural Cleanse", S&P 2019): conv(32)-conv(64)
with max pooling, a fully connected layer of 128 units (the penultimate features) and a linear
head. Pooling to a fixed 4×4 grid lets it accept any input size of at least 16×16.
"""

from __future__ import annotations

import torch
from torch import nn

from poisonlab.errors import ConfigError
from poisonlab.models.registry import register_model


class SmallCNN(nn.Module):
    """conv-BN-ReLU-pool ×2 → FC(hidden) → [dropout] → head; `features` is the FC output."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        c1, c2 = channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.ReLU(inplace=True))
        self.feature_dim = hidden
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (the FC layer after pooling): [N, hidden]."""
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@register_model("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 1, **kwargs) -> SmallCNN:
    """Two-convolution CNN for MNIST-sized images (32/64 channels, 128 hidden units)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("tiny_cnn")
def tiny_cnn(num_classes: int, in_channels: int = 1, **kwargs) -> SmallCNN:
    """A narrow SmallCNN (8/16 channels, 64 hidden units) for fast tests."""
    kwargs.setdefault("channels", (8, 16))
    kwargs.setdefault("hidden", 64)
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, **kwargs)
