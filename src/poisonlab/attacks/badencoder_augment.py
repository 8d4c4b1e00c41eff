"""The augmentation BadEncoder applies to its reference inputs, as batched tensor operations.

The BadEncoder reference (jinyuan-jia/BadEncoder, datasets/cifar10_dataset.py,
`finetune_transform_cifar10`) augments each reference input, independently for every shadow image
of a batch, with torchvision's

    RandomHorizontalFlip(p=0.5),
    RandomApply([ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)], p=0.8),
    RandomGrayscale(p=0.2)

and no crop. Here the same transforms run on float images [N, 3, H, W] in [0, 1], with one random
draw per image from a seeded `torch.Generator`:
- flip: each image mirrored left–right with probability 0.5;
- colour jitter, applied with probability 0.8: brightness x·b, contrast b·x + (1 − b)·mean(gray(x)),
  saturation b·x + (1 − b)·gray(x) (each b ~ U[0.6, 1.4], result clipped to [0, 1]) and a hue shift
  h ~ U[−0.1, 0.1] of the HSV hue (mod 1), in a random order per image, as ColorJitter draws one;
- grayscale with probability 0.2: every channel set to gray(x) = 0.299·R + 0.587·G + 0.114·B
  (the ITU-R 601 luma PIL uses).
Deviation: the reference applies them to PIL uint8 images, so every step rounds to 1/255; here
they stay in float32 (no rounding between steps). Images with one channel get only the flip and
brightness/contrast (saturation, hue and grayscale are identities on gray images, as in PIL).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLIP_P = 0.5
JITTER_P = 0.8
GRAYSCALE_P = 0.2
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
_LUMA = (0.299, 0.587, 0.114)


def reference_augment(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip, colour jitter and grayscale of the BadEncoder reference, one draw per image."""
    n = x.shape[0]

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(x.device)

    flip = rand(n) < FLIP_P
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    jitter = rand(n) < JITTER_P
    x = torch.where(jitter[:, None, None, None], color_jitter(x, generator), x)
    gray = rand(n) < GRAYSCALE_P
    if x.shape[1] == 3:
        x = torch.where(gray[:, None, None, None], grayscale(x).expand_as(x), x)
    return x


def color_jitter(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """ColorJitter(0.4, 0.4, 0.4, 0.1) per image: four factors and a random order of the four."""
    n = x.shape[0]
    cpu = {"generator": generator}
    factors = [1 + (2 * torch.rand(n, **cpu) - 1) * s for s in (BRIGHTNESS, CONTRAST, SATURATION)]
    hue = (2 * torch.rand(n, **cpu) - 1) * HUE
    order = torch.argsort(torch.rand(n, 4, **cpu), dim=1)  # a uniform permutation per image
    factors = [f.to(x.device)[:, None, None, None] for f in factors]
    hue = hue.to(x.device)[:, None, None]
    order = order.to(x.device)
    ops = (
        lambda v: (factors[0] * v).clamp(0, 1),
        lambda v: _blend(v, grayscale(v).mean((1, 2, 3), keepdim=True), factors[1]),
        lambda v: _blend(v, grayscale(v), factors[2]) if v.shape[1] == 3 else v,
        lambda v: _shift_hue(v, hue) if v.shape[1] == 3 else v,
    )
    for step in range(4):
        which = order[:, step]
        out = x
        for k, op in enumerate(ops):
            out = torch.where((which == k)[:, None, None, None], op(x), out)
        x = out
    return x


def grayscale(x: Tensor) -> Tensor:
    """gray(x) [N, 1, H, W]: the luma of RGB images, the image itself for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    h, s, v = rgb_to_hsv(x).unbind(1)
    return hsv_to_rgb(torch.stack(((h + shift) % 1.0, s, v), 1))


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB [N, 3, H, W] in [0, 1] → HSV with hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h)) % 1.0
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """HSV [N, 3, H, W] (hue in [0, 1)) → RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = (
        (v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q),
    )
    channels = []
    for c in range(3):
        out = torch.zeros_like(v)
        for k, row in enumerate(table):
            out = torch.where(i == k, row[c], out)
        channels.append(out)
    return torch.stack(channels, 1).clamp(0, 1)
