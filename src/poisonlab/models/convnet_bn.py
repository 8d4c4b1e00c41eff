"""ConvNetBN: the five-block convolutional surrogate of MetaPoison.

Huang, Geiping, Fowl, Taylor, Goldstein, "MetaPoison: Practical General-purpose Clean-label Data
Poisoning", NeurIPS 2020, uses as its main surrogate and victim the 5-layer network of Finn et al.'s
MAML code with batch normalisation added: 5 × [3×3 convolution (no bias, "same" padding),
BatchNorm, ReLU, 2×2 max-pool] with 16-32-32-64-64 filters, then a linear layer to the classes.
On 32×32 images the five pools leave 1×1, so the 64 flattened activations are the features.

Behaviour of the reference code (wronnyhuang/metapoison, learners/convnet.py) kept here:
- the input is standardised per channel with the CIFAR-10 mean and std before the first convolution;
- convolution and linear weights use Glorot (Xavier) uniform initialisation, biases zero, BN scale
  one and offset zero, BN epsilon 1e-5;
- BN moving averages use decay 0.9, i.e. torch momentum 0.1 (torch's convention is 1 − decay).
Deviations: the standardisation applies only to 3-channel inputs (its statistics are CIFAR-10's;
other channel counts pass through unchanged), and widths, their number and the image size are
keyword options, so tests can use tiny networks (the linear layer expects widths[-1] ·
(image_size / 2^blocks)² inputs, so images of another size fail at the first forward).

`grouped_logits` runs M ConvNetBN surrogates (their weights stacked, [M, ...] per parameter) as
one network: the M inputs side by side in the channel dimension ([N, M·C, H, W]), every
convolution a grouped convolution with groups = M (group m holds surrogate m's filters, so no
weight crosses between surrogates), batch normalisation over the M·C channels with batch
statistics (per channel, hence per surrogate), and the M linear heads as one batched matrix
product. It is the same function as M separate forwards in training-mode batch normalisation
(without running statistics), for the attacks that differentiate through M surrogates at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from poisonlab.errors import ConfigError
from poisonlab.models.registry import register_model

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


class ConvNetBN(nn.Module):
    """len(widths) × [conv3×3 (no bias), BN, ReLU, maxpool 2×2] → flatten → linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: tuple[int, ...] = (16, 32, 32, 64, 64),
        image_size: int = 32,
        standardize: bool = True,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ConfigError(f"widths must be a non-empty list of positive ints, got {widths}")
        side = image_size // 2 ** len(widths)
        if side < 1:
            raise ConfigError(
                f"image_size {image_size} is too small for {len(widths)} pooling blocks "
                f"(needs at least {2 ** len(widths)})"
            )
        if not 0.0 <= bn_momentum <= 1.0:
            raise ConfigError(f"bn_momentum must be in [0, 1], got {bn_momentum}")
        layers: list[nn.Module] = []
        prev = in_channels
        for w in widths:
            layers += [
                nn.Conv2d(prev, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w, eps=1e-5, momentum=bn_momentum),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            prev = w
        self.blocks = nn.Sequential(*layers)
        self.feature_dim = prev * side * side
        self.head = nn.Linear(self.feature_dim, num_classes)
        use_std = standardize and in_channels == 3
        mean = torch.tensor(CIFAR10_MEAN if use_std else (0.0,) * in_channels)
        std = torch.tensor(CIFAR10_STD if use_std else (1.0,) * in_channels)
        # Constants, not state: kept out of the state dict so checkpoints hold only learned values.
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened activations after the last block: [N, feature_dim]."""
        h = self.blocks((x - self.input_mean) / self.input_std)
        return h.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("convnet_bn")
def convnet_bn(num_classes: int, in_channels: int = 3, **kwargs) -> ConvNetBN:
    """MetaPoison's ConvNetBN (widths 16-32-32-64-64 for 32×32 images unless given)."""
    return ConvNetBN(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _batch_stats_norm(h: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Batch normalisation with batch statistics (biased variance) in elementary operations,
    as one affine map per channel: y = h·a + (bias − mean·a), a = weight / √(var + ε)."""
    var, mean = torch.var_mean(h, (0, 2, 3), keepdim=True, correction=0)
    a = weight.view(1, -1, 1, 1) * torch.rsqrt(var + eps)
    return h * a + (bias.view(1, -1, 1, 1) - mean * a)


def grouped_logits(model: ConvNetBN, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Logits [M, N, classes] of M surrogates of `model`'s architecture, weights `params`
    (each named as in `model.named_parameters()`, stacked: [M, ...]), each on its own images
    x [M, N, C, H, W], as one grouped computation (see the module docstring)."""
    if not isinstance(model, ConvNetBN):
        raise ConfigError(f"grouped_logits needs a ConvNetBN, got {type(model).__name__}")
    members, n = x.shape[:2]
    h = ((x - model.input_mean) / model.input_std).transpose(0, 1).reshape(n, -1, *x.shape[3:])
    for i, layer in enumerate(model.blocks):
        if isinstance(layer, nn.Conv2d):
            h = F.conv2d(h, params[f"blocks.{i}.weight"].flatten(0, 1), padding=1, groups=members)
        elif isinstance(layer, nn.BatchNorm2d):
            h = _batch_stats_norm(h, params[f"blocks.{i}.weight"].flatten(),
                                  params[f"blocks.{i}.bias"].flatten(), layer.eps)
        elif isinstance(layer, nn.ReLU):
            h = F.relu(h)
        elif isinstance(layer, nn.MaxPool2d):
            h = F.max_pool2d(h, 2)
        else:
            raise ConfigError(f"grouped_logits does not know the layer {type(layer).__name__}")
    features = h.reshape(n, members, -1).transpose(0, 1)  # [M, N, F], each surrogate's flatten
    return torch.baddbmm(params["head.bias"].unsqueeze(1), features,
                         params["head.weight"].transpose(1, 2))
