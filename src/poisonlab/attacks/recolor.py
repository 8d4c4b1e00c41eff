"""A smooth colour transform: per-image offsets on a coarse colour-space grid, looked up trilinearly.

MetaPoison (Huang, Geiping, Fowl, Taylor, Goldstein, "MetaPoison: Practical General-purpose
Clean-label Data Poisoning", NeurIPS 2020, section 3) perturbs each poison by a colour transform
in the spirit of ReColorAdv (Laidlaw and Feizi, "Functional Adversarial Attacks", NeurIPS 2019)
before the additive δ. A pixel with colour c (in a perceptual colour space) becomes

    f(c) = c + Σ_corners w_corner(c) · g[corner],

the trilinear interpolation of a G×G×G grid g of offsets over the colour cube (the reference
stores eye + g and interpolates that; the identity part interpolates to c exactly, so the two are
the same map). Each offset is kept within ±ε_c and the shifted grid point inside the colour range;
the smoothness penalty is the mean squared finite difference between neighbouring grid points
scaled by the grid resolution,

    S(g) = mean over (image, axis a, neighbours, channel) of ((g[i] − g[i + e_a]) · G)².

Reference behaviour (wronnyhuang/metapoison, recolor.py) and deviations:
- colour space: the reference converts to YUV (BT.601, TensorFlow's rgb_to_yuv matrix) although
  its help text and the paper say LUV; YUV is the default here and CIE L*u*v* (D65, sRGB
  primaries, coordinates L*/100, u*/100, v*/100) an option.
- grid range: the reference spans Y ∈ [0, 1], U, V ∈ [−0.5, 0.5] and extends constantly beyond
  it, so saturated colours (|V| up to 0.615) are clamped even by the identity grid. Here the grid
  spans the whole sRGB gamut of the chosen space (YUV: U ∈ ±0.436, V ∈ ±0.615), so the identity
  grid reproduces every image up to the float error of the colour-space round trip.
- ε_c is one value for the three channels (the reference allows one per channel, default equal).
Images are [N, 3, H, W] in [0, 1] RGB; the output is RGB and not clipped (the caller clips).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from poisonlab.config import Settings, make_settings
from poisonlab.errors import ShapeError

# TensorFlow's tf.image.rgb_to_yuv kernel (BT.601): yuv = rgb @ _RGB_TO_YUV.
_RGB_TO_YUV = ((0.299, -0.14714119, 0.61497538),
               (0.587, -0.28886916, -0.51496512),
               (0.114, 0.43601035, -0.10001026))
# sRGB primaries (D65) linear RGB → XYZ, as rows: xyz = M @ rgb.
_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)
# The colour cube each space's grid spans (per channel min, max): the sRGB gamut.
_RANGES = {
    "yuv": ((0.0, 1.0), (-0.43601035, 0.43601035), (-0.61497538, 0.61497538)),
    "luv": ((0.0, 1.0), (-0.84, 1.76), (-1.35, 1.08)),
}


def _matrix(rows, like: Tensor) -> Tensor:
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def _srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(x: Tensor) -> Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def _white_uv() -> tuple[float, float]:
    xn, yn, zn = _WHITE
    d = xn + 15 * yn + 3 * zn
    return 4 * xn / d, 9 * yn / d


def _rgb_to_luv(rgb: Tensor) -> Tensor:
    """[..., 3] sRGB in [0, 1] → (L*/100, u*/100, v*/100)."""
    xyz = _srgb_to_linear(rgb) @ _matrix(_RGB_TO_XYZ, rgb).T
    x, y, z = xyz.unbind(-1)
    eps = (6 / 29) ** 3
    lum = torch.where(y > eps, 116 * y.clamp(min=eps) ** (1 / 3) - 16, (29 / 3) ** 3 * y)
    d = (x + 15 * y + 3 * z).clamp(min=1e-12)
    un, vn = _white_uv()
    u = 13 * lum * (4 * x / d - un)
    v = 13 * lum * (9 * y / d - vn)
    return torch.stack([lum, u, v], -1) / 100


def _luv_to_rgb(luv: Tensor) -> Tensor:
    lum, u, v = (luv * 100).unbind(-1)
    dark = lum <= 1e-8
    lsafe = torch.where(dark, torch.ones_like(lum), lum)
    un, vn = _white_uv()
    up = u / (13 * lsafe) + un
    vp = (v / (13 * lsafe) + vn).clamp(min=1e-8)
    y = torch.where(lsafe > 8, ((lsafe + 16) / 116) ** 3, lsafe * (3 / 29) ** 3)
    x = y * 9 * up / (4 * vp)
    z = y * (12 - 3 * up - 20 * vp) / (4 * vp)
    xyz = torch.where(dark.unsqueeze(-1), torch.zeros_like(luv), torch.stack([x, y, z], -1))
    return _linear_to_srgb(xyz @ torch.linalg.inv(_matrix(_RGB_TO_XYZ, luv).double()).T.to(luv.dtype))


class Recolor:
    """The smooth colour transform: `apply(x, grid)`, `project(grid)`, `smoothness(grid)`."""

    class Config(Settings):
        """grid_size: grid points per colour axis (G; the grid holds G³ offsets per image).
        epsilon: bound on each offset, |g| ≤ ε_c, in colour-space units (Y spans [0, 1]).
        space: colour space of the grid: "yuv" (the reference code) or "luv" (the paper's text)."""

        grid_size: int = Field(10, ge=2, le=64)
        epsilon: float = Field(0.04, ge=0.0, le=1.0)
        space: Literal["yuv", "luv"] = "yuv"

    def __init__(self, *, config: Config | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)

    def identity(self, n: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
        """The zero offsets of `n` images: [n, G, G, G, 3] (the transform is then the identity)."""
        g = self.config.grid_size
        return torch.zeros(n, g, g, g, 3, dtype=dtype, device=device)

    def to_space(self, rgb: Tensor) -> Tensor:
        """[N, 3, H, W] RGB → [N, H, W, 3] colour coordinates."""
        c = rgb.movedim(1, -1)
        if self.config.space == "yuv":
            return c @ _matrix(_RGB_TO_YUV, c)
        return _rgb_to_luv(c)

    def to_rgb(self, c: Tensor) -> Tensor:
        """[N, H, W, 3] colour coordinates → [N, 3, H, W] RGB (not clipped)."""
        if self.config.space == "yuv":
            inv = torch.linalg.inv(_matrix(_RGB_TO_YUV, c).double()).to(c.dtype)
            return (c @ inv).movedim(-1, 1)
        return _luv_to_rgb(c).movedim(-1, 1)

    def _bounds(self, like: Tensor) -> tuple[Tensor, Tensor]:
        r = torch.tensor(_RANGES[self.config.space], dtype=like.dtype, device=like.device)
        return r[:, 0], r[:, 1]

    def apply(self, x: Tensor, grid: Tensor) -> Tensor:
        """Recolour images x [N, 3, H, W] (RGB in [0, 1]) with offsets grid [N, G, G, G, 3]
        (axes Y/L, U, V, then the offset's channel), differentiable in both."""
        g = self.config.grid_size
        if x.dim() != 4 or x.shape[1] != 3:
            raise ShapeError(f"recolor needs RGB images [N, 3, H, W], got {tuple(x.shape)}")
        if grid.shape != (x.shape[0], g, g, g, 3):
            raise ShapeError(f"colour grid must be [{x.shape[0]}, {g}, {g}, {g}, 3] for "
                             f"{x.shape[0]} images, got {tuple(grid.shape)}")
        c = self.to_space(x)
        lo, hi = self._bounds(c)
        # grid_sample coordinates in [-1, 1] (align_corners: ±1 are the outer grid points),
        # ordered (x, y, z) = (last, middle, first) grid axis = (V, U, Y).
        unit = ((c - lo) / (hi - lo) * 2 - 1).flip(-1).unsqueeze(1)  # [N, 1, H, W, 3]
        table = grid.permute(0, 4, 1, 2, 3)  # [N, 3, G(Y), G(U), G(V)]
        offset = F.grid_sample(table, unit, mode="bilinear", padding_mode="border",
                               align_corners=True)  # [N, 3, 1, H, W]
        return self.to_rgb(c + offset[:, :, 0].movedim(1, -1))

    def project(self, grid: Tensor) -> Tensor:
        """Offsets clipped to ±ε_c, then so that every shifted grid point stays in the colour
        range (as the reference does after each step)."""
        eps = self.config.epsilon
        g = grid.clamp(-eps, eps)
        lo, hi = self._bounds(g)
        axes = [torch.linspace(float(lo[i]), float(hi[i]), self.config.grid_size,
                               dtype=g.dtype, device=g.device) for i in range(3)]
        eye = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        # The final clamp keeps |g| ≤ ε_c exact (the range clip only shrinks an offset, but its
        # subtraction can round past ε_c by an ulp).
        return (torch.maximum(torch.minimum(eye + g, hi), lo) - eye).clamp(-eps, eps)

    def smoothness(self, grid: Tensor) -> Tensor:
        """S(g): mean of the squared neighbour differences times G, over all images and axes."""
        g = self.config.grid_size
        diffs = [(grid.narrow(a, 0, g - 1) - grid.narrow(a, 1, g - 1)) * g for a in (1, 2, 3)]
        return torch.cat([(d ** 2).reshape(-1) for d in diffs]).mean()
