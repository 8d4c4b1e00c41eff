"""SimCLR's image augmentations as batched tensor operations on the images' device.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (appendix A), as the BadEncoder reference (Jia, Liu, Gong, IEEE S&P
2022; jinyuan-jia/BadEncoder) composes them for CIFAR-10, in this order:

1. random resized crop to the input size: area fraction s ~ U(0.08, 1), aspect ratio
   r = exp(U(log 3/4, log 4/3)), w = round(√(s·A·r)), h = round(√(s·A/r)); up to ten draws, the
   first that fits the image is used, else the whole image; the box is resampled bilinearly;
2. horizontal flip with probability 0.5;
3. with probability 0.8 colour jitter: brightness, contrast, saturation factors
   f ~ U(max(0, 1 − 0.4), 1 + 0.4), hue shift δ ~ U(−0.1, 0.1) (in turns of the colour wheel),
   applied in a random order per image;
   brightness x·f, contrast f·x + (1 − f)·mean(gray(x)), saturation f·x + (1 − f)·gray(x)
   (each clipped to [0, 1]), hue (H + δ) mod 1 in HSV;
4. with probability 0.2 grayscale, gray = 0.299 R + 0.587 G + 0.114 B copied to the three channels.

Every image of a batch draws its own parameters from one `torch.Generator` (on the CPU, so a seed
gives the same views on every device), always in the same order and number, so the same generator
state gives the same output. Images are float32 [N, C, H, W] in [0, 1] and stay in [0, 1].

Deviations from the reference (which augments one PIL image at a time in uint8):
- Arithmetic is in float32, without PIL's rounding to 8 bits after each step.
- The resized crop samples the box with bilinear interpolation at the output pixels' centres,
  clamped to the box (as PIL's resize of the cropped box); PIL would also antialias when the
  box is larger than the output, which never happens for a crop resized to the input size.
- The ten crop candidates are drawn at once for every image (the same distribution as drawing
  until one fits).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch.nn import functional as F

from poisonlab.config import Settings, make_settings
from poisonlab.errors import ShapeError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L")
_CROP_TRIES = 10


class AugmentConfig(Settings):
    """Strengths of the SimCLR augmentations (defaults: the BadEncoder reference for CIFAR-10).

    crop: random resized crop on/off (the BadEncoder injection augments its reference inputs
    without it); crop_scale: (min, max) area fraction of the box; crop_ratio: (min, max) aspect
    ratio w/h; flip_p: horizontal flip probability; jitter_p: probability of colour jitter;
    brightness, contrast, saturation: factor ranges [max(0, 1 − v), 1 + v]; hue: shift range
    [−v, v] in turns (≤ 0.5); grayscale_p: probability of grayscale.
    """

    crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = Field(0.5, ge=0, le=1)
    jitter_p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)

    @field_validator("crop_scale")
    @classmethod
    def _scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError("need 0 < min <= max <= 1")
        return v

    @field_validator("crop_ratio")
    @classmethod
    def _ratio(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1]:
            raise ValueError("need 0 < min <= max")
        return v


def _check_images(x: torch.Tensor, rgb: bool = False) -> None:
    if x.dim() != 4 or (rgb and x.shape[1] != 3):
        want = "[N, 3, H, W]" if rgb else "[N, C, H, W]"
        raise ShapeError(f"augmentation expects images {want}, got {list(x.shape)}")


def _uniform(n: int, low: float, high: float, gen: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


# --- deterministic operations (per-image parameters as tensors [N]) ---------------------------
def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma [N, 1, H, W] of RGB images [N, 3, H, W]."""
    w = torch.tensor(GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _per_image(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x·f, clipped to [0, 1]."""
    return (x * _per_image(factor, x)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f·x + (1 − f)·m with m the image's mean luma, clipped to [0, 1]."""
    f = _per_image(factor, x)
    mean = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """f·x + (1 − f)·gray(x), clipped to [0, 1]."""
    f = _per_image(factor, x)
    return (f * x + (1 - f) * rgb_to_grayscale(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB [N, 3, H, W] in [0, 1] → HSV with hue in turns [0, 1)."""
    r, g, b = x.unbind(1)
    v, argmax = x.max(1)
    c = v - x.min(1).values
    s = torch.where(v > 0, c / v.clamp_min(1e-12), torch.zeros_like(v))
    safe_c = torch.where(c > 0, c, torch.ones_like(c))
    # Sector of the colour wheel by the largest channel (ties: red, then green, as max() picks).
    h = torch.where(argmax == 0, (g - b) / safe_c,
                    torch.where(argmax == 1, 2 + (b - r) / safe_c, 4 + (r - g) / safe_c))
    h = torch.where(c > 0, torch.remainder(h / 6, 1.0), torch.zeros_like(h))
    return torch.stack((h, s, v), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (hue in turns) → RGB: channel n = v − v·s·clip(min(k, 4 − k), 0, 1),
    k = (n + 6h) mod 6 with n = 5, 3, 1 for R, G, B."""
    h, s, v = hsv.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(n + 6 * h, 6.0)
        out.append(v - v * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [−0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + shift.to(device=x.device, dtype=x.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def resized_crop(
    x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Crop box (top, left, height, width) of each image ([N, 4] integers) and resize it to
    `size` (default the input's) bilinearly, sampling at output pixel centres clamped to the box."""
    _check_images(x)
    n, _, h, w = x.shape
    out_h, out_w = size if size is not None else (h, w)
    boxes = boxes.to(device=x.device, dtype=x.dtype)
    top, left, bh, bw = boxes.unbind(1)

    def axis(start, extent, out, full):
        # Pixel coordinates of the output centres inside the box, then normalised for grid_sample.
        u = torch.arange(out, device=x.device, dtype=x.dtype) + 0.5
        pos = start[:, None] + u[None, :] * (extent / out)[:, None] - 0.5
        pos = torch.minimum(torch.maximum(pos, start[:, None]), (start + extent - 1)[:, None])
        return (2 * pos + 1) / full - 1

    gy, gx = axis(top, bh, out_h, h), axis(left, bw, out_w, w)
    grid = torch.stack(
        (gx[:, None, :].expand(n, out_h, out_w), gy[:, :, None].expand(n, out_h, out_w)), -1
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- random augmentations ------------------------------------------------------------------
def sample_crop_boxes(
    n: int, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[N, 4] boxes (top, left, height, width) of RandomResizedCrop: the first of ten candidates
    that fits the image, else the whole image."""
    area = h * w
    target = area * _uniform(n * _CROP_TRIES, scale[0], scale[1], generator)
    log_r = _uniform(n * _CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    cw = torch.sqrt(target * log_r).round().view(n, _CROP_TRIES)
    ch = torch.sqrt(target / log_r).round().view(n, _CROP_TRIES)
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp_min(0)[:, None]
    bw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((n,), float(w)))
    bh = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((n,), float(h)))
    u = torch.rand(2, n, generator=generator)
    top = torch.floor(u[0] * (h - bh + 1)).clamp(max=h - bh)
    left = torch.floor(u[1] * (w - bw + 1)).clamp(max=w - bw)
    return torch.stack((top, left, bh, bw), 1).long()


def random_resized_crop(
    x: torch.Tensor, generator: torch.Generator | None = None,
    scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """RandomResizedCrop of every image (its own box), resized to `size` (default the input's)."""
    _check_images(x)
    boxes = sample_crop_boxes(x.shape[0], x.shape[2], x.shape[3], scale, ratio, generator)
    return resized_crop(x, boxes, size)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5):
    """Mirror each image left–right with probability p."""
    _check_images(x)
    flip = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def color_jitter(
    x: torch.Tensor, generator: torch.Generator | None = None, brightness: float = 0.4,
    contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1, p: float = 0.8,
) -> torch.Tensor:
    """With probability p per image, brightness/contrast/saturation/hue jitter in a random order."""
    _check_images(x, rgb=True)
    n = x.shape[0]
    apply = torch.rand(n, generator=generator) < p
    factors = [
        _uniform(n, max(0.0, 1 - brightness), 1 + brightness, generator),
        _uniform(n, max(0.0, 1 - contrast), 1 + contrast, generator),
        _uniform(n, max(0.0, 1 - saturation), 1 + saturation, generator),
        _uniform(n, -hue, hue, generator),
    ]
    order = torch.rand(n, 4, generator=generator).argsort(1)  # a random permutation per image
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    out = x.clone()
    for position in range(4):
        for op_index, op in enumerate(ops):
            chosen = torch.nonzero(apply & (order[:, position] == op_index))[:, 0]
            if len(chosen):
                idx = chosen.to(x.device)
                out[idx] = op(out[idx], factors[op_index][chosen])
    return out


def random_grayscale(x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.2):
    """Replace each image by its luma in all channels with probability p."""
    _check_images(x, rgb=True)
    gray = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(gray[:, None, None, None], rgb_to_grayscale(x).expand_as(x), x)


class Augmentation:
    """The SimCLR view generator: `Augmentation(**settings)(x, generator)` → one augmented view of
    every image (crop → flip → colour jitter → grayscale)."""

    Config = AugmentConfig

    def __init__(self, *, config: AugmentConfig | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        _check_images(x, rgb=True)
        if c.crop:
            x = random_resized_crop(x, generator, c.crop_scale, c.crop_ratio)
        x = random_flip(x, generator, c.flip_p)
        x = color_jitter(x, generator, c.brightness, c.contrast, c.saturation, c.hue, c.jitter_p)
        return random_grayscale(x, generator, c.grayscale_p)
