"""Backdoor triggers: objects with `apply(x)`, shared by attacks, defences and metrics.

A trigger here is a mask trigger, x' = (1 − m)·x + m·p, with a mask m in [0, 1] and a pattern p
in [0, 1] of the image's shape, an additive trigger x' = clip(x + δ, 0, 1), or a warp (x resampled
along a fixed displaced grid). They cover:
- BadNets (Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
  Model Supply Chain", 2017): a small checkerboard patch in a corner, and a grid of pixels.
- Blend (Chen, Liu, Li, Lu, Song, "Targeted Backdoor Attacks on Deep Learning Systems Using Data
  Poisoning", 2017): a full-image pattern mixed in with ratio α (mask = α everywhere).
- Trojan-style square (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018): a solid
  square stamp with a coloured pattern.
- Random patches (`random_patch`): a BadNets-style stamp of seeded size, position anywhere in
  the image and a random binary or coloured pattern, for detector benchmarks where the trigger
  must not always sit in the same corner.
- SIG (Barni, Kallas, Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without
  Label Poisoning", ICIP 2019): an additive horizontal sinusoid (`sig_trigger`).
- WaNet (Nguyen, Tran, "WaNet – Imperceptible Warping-based Backdoor Attack", ICLR 2021): a fixed
  smooth warping field (`warp_trigger`, a `WarpTrigger`).
- Reverse-engineered triggers of Neural Cleanse (mask + pattern) and MCL (additive δ).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn import functional as F

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


class WarpTrigger(Trigger):
    """x' = grid_sample(x, grid): every output pixel (i, j) reads x, bilinearly, at the point
    grid[i, j] = (column, row) in the normalised coordinates of `F.grid_sample` with
    align_corners=True (−1 and 1 are the centres of the first and last pixels). `grid` is
    [H, W, 2]; the identity grid leaves the image unchanged (up to float rounding)."""

    def __init__(self, grid: torch.Tensor, name: str = "warp") -> None:
        if grid.dim() != 3 or grid.shape[-1] != 2:
            raise ShapeError(f"warp grid must be [H, W, 2], got {tuple(grid.shape)}")
        self.grid = grid.detach().float()
        self.name = name

    @property
    def size(self) -> tuple[int, int]:
        return int(self.grid.shape[0]), int(self.grid.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        if x.dim() not in (3, 4) or tuple(x.shape[-2:]) != (h, w):
            raise ShapeError(f"trigger '{self.name}' is for images of {h}×{w}, got a tensor "
                             f"{tuple(x.shape)}")
        single = x.dim() == 3
        batch = x[None] if single else x
        if batch.shape[0] == 0:
            return x.clone()
        grid = self.grid.to(batch.device, batch.dtype).expand(batch.shape[0], h, w, 2)
        out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border",
                            align_corners=True).clamp(0, 1)
        return out[0] if single else out

    def displacement(self) -> torch.Tensor:
        """The grid minus the identity grid [H, W, 2] (normalised units)."""
        return self.grid - identity_grid(*self.size)

    def visual(self) -> torch.Tensor:
        """The displacement magnitude per pixel, scaled to [0, 1] ([1, H, W])."""
        magnitude = self.displacement().norm(dim=-1)[None]
        return magnitude / magnitude.amax().clamp_min(1e-12)


def identity_grid(h: int, w: int) -> torch.Tensor:
    """The sampling grid [H, W, 2] that `F.grid_sample(align_corners=True)` maps to the image
    itself: (x, y) = (column, row), each from −1 to 1."""
    rows = torch.linspace(-1, 1, h)
    cols = torch.linspace(-1, 1, w)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    return torch.stack((xx, yy), dim=-1)


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


PATCH_PATTERNS = ("binary", "color")


def random_patch(
    image_shape: Sequence[int], seed: int = 0, size: int | None = None,
    pattern: str | None = None, sizes: tuple[int, int] | None = None,
) -> MaskTrigger:
    """A patch stamp with its size, position and pattern drawn from `seed`.

    size: side of the square patch (default: drawn uniformly from `sizes`, by default from
    max(2, min(H, W) // 10) to max(3, min(H, W) // 5), i.e. 2–5 pixels on 28×28 and 3–6 on
    32×32). Position: the top-left corner drawn uniformly among all positions where the patch
    fits, anywhere in the image (BadNets used one corner; a detector benchmark should not learn
    the corner). pattern: "binary" (each pixel black or white, the same in every channel),
    "color" (each pixel and channel uniform in [0, 1]), or None (either, drawn); a binary
    pattern that came out one colour gets its first pixel flipped (an all-black stamp does not
    show on MNIST's black ground). The mask is 1 on the patch (it replaces the image there)."""
    c, h, w = _shape(image_shape)
    g = torch.Generator().manual_seed(int(seed))
    if sizes is None:
        sizes = (max(2, min(h, w) // 10), max(3, min(h, w) // 5))
    low, high = int(sizes[0]), int(sizes[1])
    if size is None:
        if not 1 <= low <= high:
            raise ConfigError(f"patch sizes must be 1 <= low <= high, got {sizes}")
        size = int(torch.randint(low, high + 1, (1,), generator=g))
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"patch of size {size} does not fit a {h}×{w} image")
    if pattern is None:
        pattern = PATCH_PATTERNS[int(torch.randint(0, len(PATCH_PATTERNS), (1,), generator=g))]
    if pattern not in PATCH_PATTERNS:
        raise ConfigError(f"patch pattern must be one of {PATCH_PATTERNS}, got '{pattern}'")
    top = int(torch.randint(0, h - size + 1, (1,), generator=g))
    left = int(torch.randint(0, w - size + 1, (1,), generator=g))
    if pattern == "binary":
        bits = (torch.rand(1, size, size, generator=g) < 0.5).float()
        if size > 1 and bits.min() == bits.max():  # one colour only: invisible on that ground
            bits[0, 0, 0] = 1 - bits[0, 0, 0]
        block = bits.expand(c, size, size)
    else:
        block = torch.rand(c, size, size, generator=g)
    mask = torch.zeros(1, h, w)
    stamp = torch.zeros(c, h, w)
    mask[:, top:top + size, left:left + size] = 1.0
    stamp[:, top:top + size, left:left + size] = block
    return MaskTrigger(mask, stamp, name=f"patch-{pattern}")


def sig_trigger(
    image_shape: Sequence[int], delta: float = 20 / 255, frequency: float = 6
) -> AdditiveTrigger:
    """SIG (Barni, Kallas, Tondi, ICIP 2019): x' = clip(x + v, 0, 1) with the horizontal
    sinusoid v(i, j) = Δ·sin(2π·j·f / W) (column j of W, the same in every row and channel).
    Defaults Δ = 20/255, f = 6 as in the paper's MNIST/GTSRB experiments (its eq. 3). With an
    integer f < W every row of v sums to zero (v is zero-mean along a row).

    Deviation: the paper's attack is clean-label (only images of the target class carry the
    signal, their labels unchanged); here it is a trigger like any other, so
    poisonlab.attacks.backdoor_injection uses it dirty-label (other labels' images, relabelled)
    unless the caller picks target-class images."""
    c, h, w = _shape(image_shape)
    if not 0 < delta <= 1:
        raise ConfigError(f"sig delta must be in (0, 1], got {delta}")
    if frequency <= 0:
        raise ConfigError(f"sig frequency must be positive, got {frequency}")
    j = torch.arange(w, dtype=torch.float64)
    row = (float(delta) * torch.sin(2 * math.pi * j * float(frequency) / w)).float()
    return AdditiveTrigger(row.expand(c, h, w).clone(), name="sig")


def warp_trigger(
    image_shape: Sequence[int], strength: float = 0.5, grid_size: int = 4, seed: int = 0
) -> WarpTrigger:
    """WaNet's warping field (Nguyen, Tran, ICLR 2021, sec. 3.2 and 4.1).

    A k×k control grid P of 2-vectors, uniform in (−1, 1) (drawn from `seed`), normalised by its
    mean absolute value, P ← P / mean|P|, is upsampled bicubically (align_corners=True) to the
    image's H×W, giving a smooth displacement field; the warp's sampling grid is
    M = clamp(identity + (s / H)·upsample(P), −1, 1), applied with F.grid_sample (bilinear,
    align_corners=True). Defaults k = 4, s = 0.5, the paper's CIFAR-10 / MNIST settings. A
    strength of 0 is the identity. With s = 0.5 on 32×32 images a pixel moves by about 0.25
    pixel on average: the warp is imperceptible, and hard to learn.

    Deviation: one fixed field, nothing else. The paper's "noise mode" (training also on
    images warped by randomly perturbed grids, with their true labels, so that only the exact
    warp triggers) is a training recipe, not part of the trigger, and is not reproduced; nor is
    its per-batch poisoning (here the poisoned images are warped once). The clamp keeps the grid
    inside the image, so grid_sample's padding never comes into play."""
    _, h, w = _shape(image_shape)
    if strength < 0:
        raise ConfigError(f"warp strength must be >= 0, got {strength}")
    if grid_size < 2:
        raise ConfigError(f"warp grid_size must be at least 2, got {grid_size}")
    g = torch.Generator().manual_seed(int(seed))
    control = torch.rand(1, 2, grid_size, grid_size, generator=g) * 2 - 1
    control = control / control.abs().mean()
    field = F.interpolate(control, size=(h, w), mode="bicubic", align_corners=True)
    field = field[0].permute(1, 2, 0)  # [H, W, 2]: (x, y) displacement per pixel
    grid = (identity_grid(h, w) + float(strength) / h * field).clamp(-1, 1)
    return WarpTrigger(grid, name="warp")


TRIGGERS = {
    "badnets": badnets_patch,
    "grid": grid_trigger,
    "blend": blend_trigger,
    "trojan": trojan_square,
    "sig": sig_trigger,
    "warp": warp_trigger,
}
# The named triggers whose pattern is drawn from a `seed` option (a scan builds them with its seed).
SEEDED_TRIGGERS = ("blend", "warp")


def make_trigger(name: str, image_shape: Sequence[int], **kwargs) -> Trigger:
    """Build a trigger by name: badnets, grid, blend, trojan, sig or warp (blend and warp draw
    their pattern from a `seed` option)."""
    if name not in TRIGGERS:
        raise ConfigError(f"unknown trigger '{name}' (known: {', '.join(sorted(TRIGGERS))})")
    try:
        return TRIGGERS[name](image_shape, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for trigger '{name}': {exc}") from exc
