"""Backdoor triggers: objects with `apply(x)`, shared by attacks, defences and metrics.

Every trigger here is a mask trigger, x' = (1 − m)·x + m·p, with a mask m in [0, 1] and a pattern p
in [0, 1] of the image's shape, or an additive trigger x' = clip(x + δ, 0, 1). They cover:
- BadNets (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
  Model Supply Chain", 2017): a small checkerboard patch in a corner, and a grid of pixels.
- Blend (Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
  Poisoning", 2017): a full-image pattern mixed in with ratio α (mask = α everywhere).
- Trojan-style square (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): a solid
  square stamp with a coloured pattern.
- Reverse-engineered triggers of Neural Cleanse (mask + pattern) and MCL (additive δ).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from poisonlab.errors import ConfigError, ShapeError

CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


class Trigger:
    """Base class: `apply(x)` stamps the trigger on images [N, C, H, W] (or one image [C, H, W])."""

    name = "trigger"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def visual(self) -> torch.Tensor:
        """An image [C, H, W] in [0, 1] that shows the trigger (for figures)."""
        raise NotImplementedError


class MaskTrigger(Trigger):
    """x' = (1 − mask)·x + mask·pattern; mask [1 or C, H, W], pattern [C, H, W], both in [0, 1]."""

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor, name: str = "mask") -> None:
        if mask.dim() != 3 or pattern.dim() != 3:
            raise ShapeError(f"trigger mask and pattern must be [C, H, W], got {tuple(mask.shape)} "
                              f"and {tuple(pattern.shape)}")
        if mask.shape[-2:] != pattern.shape[-2:] or mask.shape[0] not in (1, pattern.shape[0]):
            raise ShapeError(f"trigger mask {tuple(mask.shape)} does not fit pattern "
                              f"{tuple(pattern.shape)}")
        self.mask = mask.detach().float().clamp(0, 1)
        self.pattern = pattern.detach().float().clamp(0, 1)
        self.name = name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.pattern.shape)  # type: ignore[return-value]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, self.image_shape, self.name)
        m = self.mask.to(x.device, x.dtype)
        p = self.pattern.to(x.device, x.dtype)
        return (1 - m) * x + m * p

    def visual(self) -> torch.Tensor:
        return (self.mask * self.pattern).expand(self.image_shape).clone()

    def mask_l1(self) -> float:
        """L1 norm of the mask over pixels (the size Neural Cleanse compares across labels)."""
        return float(self.mask.amax(0).sum())


class AdditiveTrigger(Trigger):
    """x' = clip(x + δ, 0, 1) with δ [C or 1, H, W] (the pattern MCL's stage 1 inverts)."""

    def __init__(self, delta: torch.Tensor, name: str = "additive") -> None:
        if delta.dim() != 3:
            raise ShapeError(f"additive trigger must be [C, H, W], got {tuple(delta.shape)}")
        self.delta = delta.detach().float()
        self.name = name

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(x, tuple(self.delta.shape), self.name, channels_may_broadcast=True)
        return (x + self.delta.to(x.device, x.dtype)).clamp(0, 1)

    def visual(self) -> torch.Tensor:
        d = self.delta.abs()
        return d / d.amax().clamp_min(1e-12)


def _check_shape(x: torch.Tensor, shape: tuple, name: str, channels_may_broadcast=False) -> None:
    got = tuple(x.shape[-3:])
    ok = got == shape or (channels_may_broadcast and shape[0] == 1 and got[1:] == shape[1:])
    if x.dim() not in (3, 4) or not ok:
        raise ShapeError(f"trigger '{name}' is for images {shape}, got a tensor {tuple(x.shape)}")


def _corner_slices(shape, size: tuple[int, int], corner: str, margin: int) -> tuple[slice, slice]:
    _, h, w = shape
    sh, sw = size
    if corner not in CORNERS:
        raise ConfigError(f"corner must be one of {CORNERS}, got '{corner}'")
    if sh + margin > h or sw + margin > w:
        raise ConfigError(f"trigger of size {size} with margin {margin} does not fit {h}×{w}")
    top = h - margin - sh if corner.startswith("bottom") else margin
    left = w - margin - sw if corner.endswith("right") else margin
    return slice(top, top + sh), slice(left, left + sw)


def _stamp(shape, block: torch.Tensor, block_mask: torch.Tensor, corner, margin, name) -> MaskTrigger:
    c, h, w = shape
    rows, cols = _corner_slices(shape, tuple(block.shape[-2:]), corner, margin)
    mask = torch.zeros(1, h, w)
    pattern = torch.zeros(c, h, w)
    mask[:, rows, cols] = block_mask
    pattern[:, rows, cols] = block
    return MaskTrigger(mask, pattern, name=name)


def _shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ShapeError(f"image shape must be (C, H, W), got {tuple(image_shape)}")
    return tuple(int(v) for v in image_shape)  # type: ignore[return-value]


def badnets_patch(
    image_shape: Sequence[int], size: int = 3, corner: str = "bottom-right", margin: int = 1
) -> MaskTrigger:
    """BadNets patch: a size×size black-and-white checkerboard (white at its corners)."""
    shape = _shape(image_shape)
    ij = torch.arange(size)
    board = ((ij[:, None] + ij[None, :]) % 2 == 0).float()
    block = board.expand(shape[0], size, size)
    return _stamp(shape, block, torch.ones(size, size), corner, margin, "badnets")


def grid_trigger(
    image_shape: Sequence[int], cells: int = 4, corner: str = "bottom-right", margin: int = 1
) -> MaskTrigger:
    """BadNets grid: a cells×cells lattice of white pixels on a black ground, one pixel apart."""
    shape = _shape(image_shape)
    span = 2 * cells - 1
    ij = torch.arange(span)
    dots = ((ij[:, None] % 2 == 0) & (ij[None, :] % 2 == 0)).float()
    block = dots.expand(shape[0], span, span)
    return _stamp(shape, block, torch.ones(span, span), corner, margin, "grid")


def trojan_square(
    image_shape: Sequence[int],
    size: int = 5,
    corner: str = "bottom-right",
    margin: int = 1,
    color: Sequence[float] | None = None,
    seed: int = 0,
) -> MaskTrigger:
    """Trojan-style square: a solid size×size stamp of one colour (seeded bright if not given)."""
    shape = _shape(image_shape)
    if color is None:  # a bright colour, so the square shows on dark and light images alike
        g = torch.Generator().manual_seed(seed)
        color = (0.5 + 0.5 * torch.rand(shape[0], generator=g)).tolist()
    if len(color) != shape[0]:
        raise ConfigError(f"trojan colour needs {shape[0]} values, got {len(color)}")
    block = torch.tensor(color, dtype=torch.float32)[:, None, None].expand(shape[0], size, size)
    return _stamp(shape, block, torch.ones(size, size), corner, margin, "trojan")


def blend_trigger(
    image_shape: Sequence[int], alpha: float = 0.2, pattern: torch.Tensor | None = None, seed: int = 0
) -> MaskTrigger:
    """Blend: x' = (1 − α)·x + α·p with a full-image pattern p (uniform noise by default)."""
    shape = _shape(image_shape)
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"blend alpha must be in (0, 1], got {alpha}")
    if pattern is None:
        pattern = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(pattern.shape) != shape:
        raise ShapeError(f"blend pattern must have shape {shape}, got {tuple(pattern.shape)}")
    return MaskTrigger(torch.full((1, *shape[1:]), float(alpha)), pattern, name="blend")


def badencoder_patch(
    image_shape: Sequence[int], size: int = 10, top: int = 21, left: int = 21
) -> MaskTrigger:
    """BadEncoder's default trigger (Jia, Liu, Gong, IEEE S&P 2022; reference file
    trigger_pt_white_21_10_ap_replace.npz): a size×size white patch (value 255, i.e. 1.0) that
    replaces rows and columns top..top+size−1 (0-indexed; 21–30 of a 32×32 image by default).
    The position is absolute, not a corner: it is placed at the same pixels on any image size
    and refused (ConfigError) when it does not fit."""
    shape = _shape(image_shape)
    _, h, w = shape
    if size < 1 or top < 0 or left < 0:
        raise ConfigError(f"badencoder patch needs size >= 1 and top, left >= 0, got size {size}, "
                          f"top {top}, left {left}")
    if top + size > h or left + size > w:
        raise ConfigError(f"badencoder patch of size {size} at rows {top}–{top + size - 1}, "
                          f"columns {left}–{left + size - 1} does not fit a {h}×{w} image")
    mask = torch.zeros(1, h, w)
    mask[:, top:top + size, left:left + size] = 1.0
    pattern = torch.zeros(shape)
    pattern[:, top:top + size, left:left + size] = 1.0
    return MaskTrigger(mask, pattern, name="badencoder")


TRIGGERS = {
    "badnets": badnets_patch,
    "grid": grid_trigger,
    "blend": blend_trigger,
    "trojan": trojan_square,
}


def make_trigger(name: str, image_shape: Sequence[int], **kwargs) -> MaskTrigger:
    """Build a trigger by name: badnets, grid, blend or trojan."""
    if name not in TRIGGERS:
        raise ConfigError(f"unknown trigger '{name}' (known: {', '.join(sorted(TRIGGERS))})")
    try:
        return TRIGGERS[name](image_shape, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for trigger '{name}': {exc}") from exc
