"""The embedded glyph set: an Omniglot-like few-shot bank that poisonlab renders itself.

Omniglot (Lake, Salakhutdinov and Tenenbaum, "Human-level concept learning through
probabilistic program induction", Science 2015) has 1623 characters from 50 alphabets, each
drawn by 20 people. This module builds a stand-in that needs no download: each class is one
Unicode letter of one of several scripts (Latin, Greek, Cyrillic, Armenian, Georgian, Hebrew,
Arabic, Canadian syllabics, Tifinagh, ...), rendered from the DejaVu Sans font that matplotlib
ships. Only code points the font maps (its cmap) are used; letters that come out empty or
(nearly) identical to an earlier class (Latin "A" and Greek "Α", "l" and "I") are dropped.

Each sample of a class plays the part of one drawer: its own random affine transform
(rotation, scale, aspect, shear, translation), a smooth elastic displacement (a cubic spline
through a random 4x4 control grid, as in Simard, Steinkraus and Platt, "Best Practices for
Convolutional Neural Networks Applied to Visual Document Analysis", ICDAR 2003) and a stroke
width (the template is blurred once; each sample thresholds it at its own level, a soft
dilation or erosion). Warping runs on whole batches with `F.grid_sample` at 64 px; the result
is resampled to the output size with a Lanczos-3 filter written as two matrix products.

Results are cached (`poisonlab.data.cache`) as uint8 images keyed by the generator version,
the arguments and the matplotlib and Pillow versions that draw the fonts.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from poisonlab.data.cache import Expected, load_cached, make_key, save_cached
from poisonlab.data.types import FewShotData, ImageSet, SupervisedData
from poisonlab.errors import ConfigError, DataError

GENERATOR_VERSION = "2"
FONT_FILE = "DejaVuSans.ttf"
# Unicode character-name prefix -> script name used as the class group.
SCRIPTS = {
    "LATIN": "Latin",
    "GREEK": "Greek",
    "COPTIC": "Coptic",
    "CYRILLIC": "Cyrillic",
    "ARMENIAN": "Armenian",
    "GEORGIAN": "Georgian",
    "HEBREW": "Hebrew",
    "ARABIC": "Arabic",
    "NKO": "NKo",
    "LAO": "Lao",
    "CANADIAN SYLLABICS": "Canadian syllabics",
    "OGHAM": "Ogham",
    "TIFINAGH": "Tifinagh",
    "LISU": "Lisu",
    "OLD ITALIC": "Old Italic",
}
# Letters of the supervised set, chosen to look unlike each other (first ones first).
SUPERVISED_LETTERS = "AKMSZΩΦλRXGΨδBΓEHNθξ"
DUPLICATE_DISTANCE = 0.15  # templates closer than this (relative L2 at 28 px) are one class
RENDER_SIZE = 64  # working resolution of templates and warps
GLYPH_BOX = 0.69  # the longer side of a template's glyph, as a fraction of the canvas
CHUNK = 2048  # images warped at once

# Distortion ranges per sample.
ROTATION_DEG = 15.0
SCALE = (0.8, 1.15)
ASPECT = 0.1
SHEAR = 0.25
TRANSLATE = 0.12  # in units of half the image
ELASTIC = 0.08  # standard deviation of the control-point displacements, same units
STROKE_LEVEL = (0.25, 0.75)  # threshold of the blurred template: low = bold, high = thin
STROKE_BLUR = 1.2  # Gaussian sigma in pixels at 64 px
STROKE_SLOPE = 6.0


def font_file(name: str = FONT_FILE) -> Path:
    """Path of a TrueType font shipped with matplotlib (mpl-data/fonts/ttf)."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise DataError(f"font {name} not found at {path}: the glyph set needs matplotlib's fonts")
    return path


def script_of(char: str) -> str | None:
    """The script (a SCRIPTS value) of a letter, from its Unicode name; None for others."""
    name = unicodedata.name(char, "")
    for prefix, script in SCRIPTS.items():
        if name.startswith(prefix + " "):
            return script
    return None


def candidate_letters(font: Path) -> list[tuple[str, int]]:
    """(script, code point) of every letter of SCRIPTS the font maps, in code point order.

    Letters are Unicode categories Lu, Ll, Lt and Lo without a canonical decomposition (so no
    precomposed accented forms); presentation forms (U+FB00..U+FFFF) are left out.
    """
    from fontTools.ttLib import TTFont

    with TTFont(str(font), lazy=True) as tt:
        cmap = tt.getBestCmap()
    out = []
    for code in sorted(cmap):
        char = chr(code)
        if 0xFB00 <= code <= 0xFFFF or unicodedata.category(char) not in ("Lu", "Ll", "Lt", "Lo"):
            continue
        script = script_of(char)
        if script is not None and not unicodedata.decomposition(char):
            out.append((script, code))
    return out


def render_templates(font: Path, codes: list[int], size: int = RENDER_SIZE) -> Tensor:
    """Centred glyph images [len(codes), size, size] in [0, 1], longer side GLYPH_BOX * size."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    pil_font = ImageFont.truetype(str(font), round(1.6 * size))
    box = round(GLYPH_BOX * size)
    out = np.zeros((len(codes), size, size), dtype=np.uint8)
    for i, code in enumerate(codes):
        img = Image.new("L", (4 * size, 4 * size), 0)
        ImageDraw.Draw(img).text((size, size), chr(code), font=pil_font, fill=255)
        bbox = img.getbbox()
        if bbox is None:
            continue
        crop = img.crop(bbox)
        scale = box / max(crop.size)
        w, h = (max(1, round(s * scale)) for s in crop.size)
        crop = crop.resize((w, h), Image.LANCZOS)
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(crop, ((size - w) // 2, (size - h) // 2))
        out[i] = np.asarray(canvas)
    return torch.from_numpy(out).float().div_(255)


def distinct_indices(templates: Tensor, threshold: float = DUPLICATE_DISTANCE) -> list[int]:
    """Indices of templates kept in order: non-empty and not within `threshold` of a kept one.

    Distance: L2 between 28x28 blurred versions, divided by the root of their summed ink.
    """
    small = F.interpolate(templates[:, None], size=(28, 28), mode="bilinear", antialias=True)
    flat = F.avg_pool2d(small, 3, 1, 1).flatten(1)
    ink = flat.sum(1)
    dist = torch.cdist(flat, flat) / (ink[:, None] + ink[None, :]).clamp_min(1e-6).sqrt()
    alive = ink > 0.02 * ink.max()
    keep = []
    for i in range(len(flat)):
        if alive[i]:
            keep.append(i)
            alive &= dist[i] >= threshold
    return keep


@functools.lru_cache(maxsize=2)
def glyph_bank(size: int = RENDER_SIZE) -> tuple[list[tuple[str, int]], Tensor]:
    """All distinct letters (script, code point) and their templates [n, size, size]."""
    font = font_file()
    letters = candidate_letters(font)
    templates = render_templates(font, [code for _, code in letters], size)
    keep = distinct_indices(templates)
    return [letters[i] for i in keep], templates[keep]


def _lanczos_matrix(n_in: int, n_out: int, lobes: int = 3) -> Tensor:
    """[n_out, n_in] Lanczos resampling weights (as PIL: the kernel widens when shrinking)."""
    stretch = max(n_in / n_out, 1.0)
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)
    offset = (torch.arange(n_in, dtype=torch.float64)[None, :] + 0.5 - centres[:, None]) / stretch
    weights = torch.sinc(offset) * torch.sinc(offset / lobes) * (offset.abs() < lobes)
    return (weights / weights.sum(1, keepdim=True)).float()


def _gauss_matrix(n: int, sigma: float) -> Tensor:
    """[n, n] row-normalised Gaussian blur weights."""
    i = torch.arange(n, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return weights / weights.sum(1, keepdim=True)


def _warp_basis(size: int, control: int = 4) -> Tensor:
    """[2 * (3 + control**2), size*size*2]: maps a sample's warp coefficients (x row, then y
    row) straight to its sampling grid in grid_sample's [size, size, 2] layout.

    Per coordinate the bases are x, y and 1 at pixel centres, then bicubic splines through a
    control x control grid.
    """
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")
    affine = torch.stack([gx, gy, torch.ones_like(gx)]).view(3, -1)
    eye = torch.eye(control).view(control, 1, control, 1).expand(-1, -1, -1, 4).contiguous()
    spline = F.interpolate(eye, size=(size, 4), mode="bicubic", align_corners=True)[:, 0, :, 0]
    spline2d = torch.einsum("ih,jw->ijhw", spline, spline).reshape(control * control, -1)
    single = torch.cat([affine, spline2d])  # [k, size*size]
    basis = torch.zeros(2, len(single), size * size, 2)
    basis[0, ..., 0] = single
    basis[1, ..., 1] = single
    return basis.view(2 * len(single), -1)


def _warp_params(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Per-sample warp coefficients [n, 2, 19] (affine then elastic) and stroke levels [n]."""

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=gen)

    angle = uniform(-1, 1) * math.radians(ROTATION_DEG)
    scale, aspect = uniform(*SCALE), uniform(1 - ASPECT, 1 + ASPECT)
    shear = uniform(-SHEAR, SHEAR)
    tx, ty = uniform(-TRANSLATE, TRANSLATE), uniform(-TRANSLATE, TRANSLATE)
    sx, sy = scale * aspect, scale / aspect
    cos, sin = torch.cos(angle), torch.sin(angle)
    # grid_sample maps output to input coordinates: the inverse of the drawn transform.
    affine = torch.stack(
        [
            torch.stack([cos / sx, (shear * cos - sin) / sx, tx], 1),
            torch.stack([sin / sy, (cos + shear * sin) / sy, ty], 1),
        ],
        1,
    )
    elastic = torch.randn(n, 2, 16, generator=gen) * ELASTIC
    return torch.cat([affine, elastic], 2), uniform(*STROKE_LEVEL)


def distort(templates: Tensor, samples: int, out_size: int, gen: torch.Generator) -> Tensor:
    """`samples` distorted drawings of each template: float [C, samples, out_size, out_size].

    `templates` [C, R, R] are clean glyphs. All random draws happen before the batched work,
    so the result does not depend on CHUNK. The grids of a class's samples are stacked along
    the height, so one grid_sample call per chunk reads each template once.
    """
    num, size = templates.shape[0], templates.shape[-1]
    blur = _gauss_matrix(size, STROKE_BLUR * size / RENDER_SIZE)
    soft = blur @ templates @ blur.T
    soft = soft / soft.amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)  # thin glyphs stay whole
    coeffs, levels = _warp_params(num * samples, gen)
    coeffs = coeffs.view(num, samples, -1)
    levels = levels.view(num, samples, 1, 1)
    basis = _warp_basis(size)
    resample = _lanczos_matrix(size, out_size)
    per_chunk = max(1, CHUNK // samples)
    grid_buffer = torch.empty(per_chunk * samples, basis.shape[1])  # reused: no page faults
    out = torch.empty(num, samples, out_size, out_size)
    for start in range(0, num, per_chunk):
        part = slice(start, start + per_chunk)
        m = len(coeffs[part])
        grid = torch.mm(
            coeffs[part].reshape(m * samples, -1), basis, out=grid_buffer[: m * samples]
        )
        x = F.grid_sample(
            soft[part].unsqueeze(1), grid.view(m, samples * size, size, 2), align_corners=False
        ).view(m, samples, size, size)
        x = x.sub_(levels[part]).mul_(STROKE_SLOPE).add_(0.5).clamp_(0, 1)
        out[part] = (resample @ x @ resample.T).clamp_(0, 1)
    return out


def _quantise(images: Tensor) -> Tensor:
    """uint8 levels, as stored in the cache (generated and cached loads are then identical)."""
    return images.mul(255).round_().to(torch.uint8)


def _cache_key(name: str, *parts: object) -> str:
    versions = [importlib.metadata.version(p) for p in ("matplotlib", "pillow")]
    return make_key(name, GENERATOR_VERSION, *versions, *(str(p) for p in parts))


def _check(name: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}={value} must be {bound}")


def load_glyphs(
    num_classes: int = 1200, samples: int = 20, seed: int = 0, size: int = 28
) -> FewShotData:
    """The glyph bank: images [num_classes, samples, 1, size, size] float32 in [0, 1].

    Classes are a seeded random subset of the distinct letters, kept in script order; names
    are "<script>/U+XXXX" and groups the scripts. Cached after the first call.
    """
    _check("samples", samples, 1)
    _check("size", size, 8, 128)
    _check("num_classes", num_classes, 1)
    key = _cache_key("glyphs", num_classes, samples, seed, size)
    hit = load_cached(key, Expected({"images": (torch.uint8, (num_classes, samples, 1, size, size))},
                                    lists={"class_names": num_classes, "groups": num_classes}))
    if hit is not None:
        tensors, meta = hit
        images = tensors["images"].float().div_(255)
        return FewShotData(images, list(meta["class_names"]), list(meta["groups"]))
    letters, templates = glyph_bank(max(RENDER_SIZE, 2 * size))
    if num_classes > len(letters):
        raise DataError(
            f"num_classes={num_classes} exceeds the {len(letters)} distinct glyphs available"
        )
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(letters), generator=gen)[:num_classes].sort().values
    stored = _quantise(distort(templates[chosen], samples, size, gen)).unsqueeze(2)
    names = [f"{letters[i][0]}/U+{letters[i][1]:04X}" for i in chosen.tolist()]
    groups = [letters[i][0] for i in chosen.tolist()]
    save_cached(key, {"images": stored}, {"class_names": names, "groups": groups})
    return FewShotData(stored.float().div_(255), names, groups)


def load_glyph_supervised(
    num_classes: int = 10, train_per_class: int = 500, test_per_class: int = 100, seed: int = 0
) -> SupervisedData:
    """A small supervised set of 28x28 glyphs: the first `num_classes` of SUPERVISED_LETTERS.

    Train and test images are independent draws of the same distortions; each split is
    shuffled by `seed`. Class names are "<script>/U+XXXX". Cached after the first call.
    """
    _check("num_classes", num_classes, 2, len(SUPERVISED_LETTERS))
    _check("train_per_class", train_per_class, 1)
    _check("test_per_class", test_per_class, 1)
    key = _cache_key("glyphs-supervised", num_classes, train_per_class, test_per_class, seed)
    n_train, n_test = num_classes * train_per_class, num_classes * test_per_class
    hit = load_cached(key, Expected(
        {"train_x": (torch.uint8, (n_train, 1, 28, 28)), "train_y": (torch.int64, (n_train,)),
         "test_x": (torch.uint8, (n_test, 1, 28, 28)), "test_y": (torch.int64, (n_test,))},
        lists={"classes": num_classes}, labels={"train_y": num_classes, "test_y": num_classes}))
    if hit is not None:
        t, meta = hit
        return SupervisedData(
            ImageSet(t["train_x"].float().div_(255), t["train_y"].long()),
            ImageSet(t["test_x"].float().div_(255), t["test_y"].long()),
            list(meta["classes"]),
        )
    codes = [ord(c) for c in SUPERVISED_LETTERS[:num_classes]]
    templates = render_templates(font_file(), codes)
    gen = torch.Generator().manual_seed(seed)
    images = _quantise(distort(templates, train_per_class + test_per_class, 28, gen))
    tensors = {}
    for split, part in (("train", slice(train_per_class)), ("test", slice(train_per_class, None))):
        x = images[:, part].reshape(-1, 1, 28, 28)
        y = torch.arange(num_classes).repeat_interleave(images[:, part].shape[1])
        order = torch.randperm(len(y), generator=gen)
        tensors[f"{split}_x"], tensors[f"{split}_y"] = x[order], y[order]
    classes = [f"{script_of(chr(c))}/U+{c:04X}" for c in codes]
    save_cached(key, tensors, {"classes": classes})
    return SupervisedData(
        ImageSet(tensors["train_x"].float().div_(255), tensors["train_y"]),
        ImageSet(tensors["test_x"].float().div_(255), tensors["test_y"]),
        classes,
    )
