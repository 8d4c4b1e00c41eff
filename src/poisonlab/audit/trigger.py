"""The trigger the user suspects, and scan's "trigger" check: how often it sends clean images to a
target label.

A trigger is named (badnets, blend, grid, trojan, sig, warp:
poisonlab.attacks.triggers.make_trigger) or a file, read once into a `TriggerSource` and built for the model's input shape:
- an image (PNG, JPEG, ...; read with Pillow, as grayscale or RGB to match the model): without a
  mask, a pattern p = pixels / 255 added to the images, x' = clip(x + p, 0, 1); with a mask
  image (grayscale, m = pixels / 255), x' = (1 − m)·x + m·p;
- a .safetensors file with `pattern` [C, H, W] and an optional `mask` [1, H, W], [C, H, W] or
  [H, W] (float, or uint8 read as / 255): with a mask, pattern and mask in [0, 1] make the same
  blend; without one, the pattern (in [−1, 1]) is added.
Its height and width must be the model's: a trigger is not resized (that would change it). A
1-channel pattern serves a 3-channel model (the same pattern in every channel), and a gray image
stored as RGB a 1-channel model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file

from poisonlab.attacks.backdoor_injection import triggered_set
from poisonlab.attacks.triggers import (
    SEEDED_TRIGGERS,
    TRIGGERS,
    AdditiveTrigger,
    MaskTrigger,
    Trigger,
    make_trigger,
)
from poisonlab.audit.checks import CheckResult, ScanContext
from poisonlab.errors import ConfigError, DataError, ShapeError, require_regular_file
from poisonlab.report.html import Section, Table
from poisonlab.report.style import new_figure, save_figure
from poisonlab.training.supervised import predict_logits

TENSOR_FILE = ".safetensors"
PATTERN, MASK = "pattern", "mask"  # the tensors of a .safetensors trigger file
# ASR from which the trigger check says the trigger works: it sends most non-target images to
# the target (a trigger that does nothing sends about 1/classes of them there).
WORKS_AT = 0.5
TRIGGER_FIGURE = "given_trigger.png"


@dataclass(frozen=True)
class TriggerSource:
    """A trigger as given: `name` (a name of TRIGGERS, or the file's path) and, for a file, its
    pattern [C, H, W] and mask ([1 or C, H, W]; None: the pattern is added)."""

    name: str
    pattern: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @classmethod
    def parse(cls, trigger: str | None, mask: Path | str | None = None) -> TriggerSource | None:
        """The trigger named or stored in `trigger` (with the mask image `mask`), read and
        checked before any work; None without one. Bad input is a one-line DataError or
        ConfigError naming --trigger or --trigger-mask."""
        if trigger is None:
            if mask is not None:
                raise ConfigError("--trigger-mask needs a --trigger image file to mask")
            return None
        if trigger in TRIGGERS:
            if mask is not None:
                raise ConfigError(f"--trigger-mask applies to a --trigger image file, not to "
                                  f"the named trigger '{trigger}'")
            return cls(trigger)
        path = Path(trigger)
        if path.exists() and not path.is_file():
            raise DataError(f"--trigger {trigger}: not a regular file (a folder, FIFO, socket or "
                            "device?)")
        if not path.is_file():
            raise DataError(f"--trigger {trigger}: neither a known trigger "
                            f"({', '.join(sorted(TRIGGERS))}) nor a file")
        if path.suffix.lower() == TENSOR_FILE:
            if mask is not None:
                raise ConfigError(f"--trigger-mask applies to an image --trigger file; {path} "
                                  f"can hold its own '{MASK}' tensor")
            pattern, file_mask = _read_tensors(path)
            return cls(str(path), pattern, file_mask)
        pattern = _read_image(path, "--trigger")
        file_mask = _unit(_read_image(path=Path(mask), option="--trigger-mask", gray=True),
                          f"the --trigger-mask {mask}") if mask is not None else None
        return cls(str(path), pattern, file_mask)

    def build(self, shape: Sequence[int], seed: int = 0) -> Trigger:
        """The trigger for images of (C, H, W) `shape`: a named one built for it (blend draws
        its pattern with `seed`, as does warp its field), a file's checked against it (ShapeError
        when it differs)."""
        shape = tuple(int(v) for v in shape)
        if self.pattern is None:
            return make_trigger(self.name, shape, **({"seed": seed} if self.name in
                                                     SEEDED_TRIGGERS else {}))
        c, h, w = shape
        pattern = self.pattern
        if tuple(pattern.shape[1:]) != (h, w) or (
                self.mask is not None and tuple(self.mask.shape[1:]) != (h, w)):
            sizes = f"{pattern.shape[1]}x{pattern.shape[2]}"
            if self.mask is not None and tuple(self.mask.shape[1:]) != tuple(pattern.shape[1:]):
                sizes += f" with a {self.mask.shape[1]}x{self.mask.shape[2]} mask"
            raise ShapeError(f"--trigger {self.name} is {sizes}, but the model takes {h}x{w} "
                             "images (a trigger is not resized)")
        if pattern.shape[0] == 1 and c > 1:
            pattern = pattern.expand(c, h, w)
        elif c == 1 and pattern.shape[0] == 3 and bool((pattern == pattern[:1]).all()):
            pattern = pattern[:1]  # a gray image stored as RGB (or through a palette)
        if pattern.shape[0] != c:
            raise ShapeError(f"--trigger {self.name} has {pattern.shape[0]} channels, but the "
                             f"model takes {c}-channel images")
        name = Path(self.name).name
        if self.mask is None:
            return AdditiveTrigger(pattern, name=name)
        mask = self.mask
        if mask.shape[0] not in (1, c):
            raise ShapeError(f"the mask of --trigger {self.name} has {mask.shape[0]} channels; "
                             f"it needs {'1' if c == 1 else f'1 or {c}'}")
        return MaskTrigger(mask, pattern, name=name)


def _read_image(path: Path, option: str, gray: bool = False) -> torch.Tensor:
    """Pixels / 255 [C, H, W] of an image file (RGB, or one channel for a grayscale image or
    when `gray`)."""
    if not path.is_file():
        raise DataError(f"{option} {path}: no such file")
    try:
        with Image.open(path) as image:
            mode = "L" if gray or image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
            pixels = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{option} {path}: cannot read it as an image ({_reason(exc)})") from None
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def _read_tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`pattern` and `mask` of a .safetensors trigger file, checked."""
    try:
        require_regular_file(path)
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(f"--trigger {path}: not a readable safetensors file ({_reason(exc)})"
                        ) from None
    unknown = sorted(set(tensors) - {PATTERN, MASK})
    if PATTERN not in tensors or unknown:
        raise DataError(f"--trigger {path} holds {', '.join(sorted(tensors)) or 'no tensors'}: "
                        f"expected '{PATTERN}' [C, H, W] and optionally '{MASK}'")
    pattern = _as_float(tensors[PATTERN], f"'{PATTERN}' of --trigger {path}")
    if pattern.dim() != 3:
        raise ShapeError(f"'{PATTERN}' of --trigger {path} must be [C, H, W], got "
                         f"{list(pattern.shape)}")
    if MASK not in tensors:
        if float(pattern.abs().max()) > 1:
            raise DataError(f"'{PATTERN}' of --trigger {path} (added to the images: it has no "
                            f"'{MASK}') must be in [-1, 1], found values up to "
                            f"{float(pattern.abs().max()):.4g}")
        return pattern, None
    mask = _as_float(tensors[MASK], f"'{MASK}' of --trigger {path}")
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ShapeError(f"'{MASK}' of --trigger {path} must be [1, H, W], [C, H, W] or [H, W], "
                         f"got {list(tensors[MASK].shape)}")
    return (_unit(pattern, f"'{PATTERN}' of --trigger {path}"),
            _unit(mask, f"'{MASK}' of --trigger {path}"))


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _as_float(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """A float copy of `tensor` (uint8 / 255); DataError for an empty tensor, other types or
    non-finite values."""
    if tensor.numel() == 0:
        raise DataError(f"{what} is empty (shape {list(tensor.shape)})")
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise DataError(f"{what} has dtype {str(tensor.dtype).removeprefix('torch.')}: "
                        "expected float (or uint8)")
    tensor = tensor.float()
    if not bool(torch.isfinite(tensor).all()):
        raise DataError(f"{what} holds NaN or infinite values")
    return tensor


def _unit(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor` itself when it is in [0, 1], else a DataError (never clipped silently)."""
    low, high = float(tensor.min()), float(tensor.max())
    if low < 0 or high > 1:
        raise DataError(f"{what} must be in [0, 1], found values in [{low:.4g}, {high:.4g}]")
    return tensor


# --- the trigger check of scan --------------------------------------------------------------------


@dataclass
class TriggerScanContext(ScanContext):
    """A scan's context with the trigger to measure and its target label (None: no trigger)."""

    trigger: Trigger | None = None
    target: int | None = None


@dataclass
class TriggerResult(CheckResult):
    """The given trigger's attack success rate: the share of the `images` clean images outside
    the target label that it sends to `target`, and the share of them the model puts there
    without it."""

    trigger: str
    target: int
    target_class: str
    images: int
    attack_success_rate: float
    without_trigger: float
    figure: Path | None = None
    name = "trigger"

    @property
    def detected(self) -> bool:
        """True when the trigger works: it sends at least WORKS_AT of the images to the
        target."""
        return self.attack_success_rate >= WORKS_AT

    @property
    def verdict(self) -> str:
        state = "WORKS" if self.detected else "does not take over the model"
        return (f"trigger {self.trigger}: {state}, sends {self.attack_success_rate:.1%} of "
                f"{self.images} clean images of other labels to label {self.target} "
                f"({self.target_class}); {self.without_trigger:.1%} go there without it")

    def section(self) -> Section:
        table = Table(["trigger", "target", "images", "attack success rate", "without trigger"],
                      [[self.trigger, f"{self.target} ({self.target_class})", self.images,
                        self.attack_success_rate, self.without_trigger]])
        return Section("Given trigger", [self.verdict], [table],
                       [self.figure] if self.figure is not None else [])

    def to_dict(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "target": self.target, "class": self.target_class,
                "images": self.images, "attack_success_rate": self.attack_success_rate,
                "without_trigger": self.without_trigger, "works": self.detected}


def trigger_check(ctx: ScanContext) -> TriggerResult:
    """The attack success rate of the context's trigger towards its target on the clean sample
    (its images of the target label left out)."""
    if not isinstance(ctx, TriggerScanContext) or ctx.trigger is None or ctx.target is None:
        raise ConfigError("the trigger check needs --trigger and --target")
    target = ctx.target
    if not 0 <= target < len(ctx.classes):
        raise ConfigError(f"--target {target} is not a label of the model "
                          f"(0..{len(ctx.classes) - 1})")
    others = ctx.clean.subset(torch.nonzero(ctx.clean.y != target).flatten())
    if len(others) == 0:
        raise DataError(f"every clean image is of label {target}: the trigger's success rate "
                        "needs images of other labels")
    stamped = triggered_set(ctx.trigger, others, target)
    asr = _share(predict_logits(ctx.model, stamped.x).argmax(1) == target)
    base = _share(predict_logits(ctx.model, others.x).argmax(1) == target)
    figure = (_figure(ctx.report_dir / TRIGGER_FIGURE, ctx.trigger, others.x[0])
              if ctx.report_dir is not None else None)
    return TriggerResult(getattr(ctx.trigger, "name", "trigger"), target, ctx.classes[target],
                         len(others), asr, base, figure)


def _share(hits: torch.Tensor) -> float:
    return float(hits.float().mean()) if len(hits) else math.nan


def _figure(path: Path, trigger: Trigger, example: torch.Tensor) -> Path:
    """The trigger as it shows, a clean image and the same image with the trigger."""
    fig, axes = new_figure(6.0, 2.3, ncols=3)
    for ax, (title, image) in zip(axes, (("trigger", trigger.visual()), ("clean", example),
                                         ("triggered", trigger.apply(example))), strict=True):
        image = image.detach().clamp(0, 1)
        ax.imshow(image[0].numpy() if image.shape[0] == 1 else image.permute(1, 2, 0).numpy(),
                  cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    return save_figure(fig, path)
