"""Scan a pre-trained image encoder you did not train for a backdoor: `scan_encoder`.

    from poisonlab.audit import load_encoder, scan_encoder
    encoder, shape = load_encoder("encoder.safetensors", "resnet20")
    report = scan_encoder(encoder, images, report_dir=Path("scan-encoder"))
    print(report.verdict, report.to_dict())

The scan needs no labels and no knowledge of the trigger: poisonlab.defenses.encoder_scan
(after DECREE, Feng et al., CVPR 2023) inverts the smallest mask-and-pattern trigger that makes
the encoder map the clean images to one tight cluster, and flags the encoder when that trigger
covers less than the threshold share of the image (PL1). An encoder is any module mapping
images [N, C, H, W] in [0, 1] to features [N, D]; `load_encoder` builds one from a weights file
and a registered architecture (a model with `features(x)`, e.g. a classifier whose head is
dropped, is used through its features).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from poisonlab.audit.checks import verdict_text
from poisonlab.audit.model import InputShape, Shape, head_classes, input_shape, model_channels
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.defenses.encoder_scan import EncoderScan, EncoderScanResult
from poisonlab.errors import DataError, ShapeError
from poisonlab.models import build_model
from poisonlab.progress import progress_bar
from poisonlab.report.encoder_scan import encoder_scan_section, encoder_trigger_figure
from poisonlab.report.html import Section, write_html_report
from poisonlab.runs.checkpoints import load_into, load_weights, save_weights

TRIGGER_FIGURE = "encoder_trigger.png"
TRIGGER_FILE = "encoder_trigger.safetensors"
SUMMARY_FILE = "encoder_scan.json"
DUMMY_CLASSES = 10  # builds a classifier architecture whose head the encoder file lacks


class EncoderAuditConfig(Settings):
    """Settings of `scan_encoder`.

    samples: clean images drawn (with the seed) for the scan (the reference draws 50 for
        CIFAR-sized encoders: 0.5% of the CIFAR-10 test split, one mini-batch).
    scan: the inversion; the audit's budget is 200 passes and 2 restarts (the scan's own
        defaults are the reference's 1,000 passes and one run), so that a scan of a small
        CIFAR encoder on a CPU takes minutes; the rest are the reference's settings.
    """

    samples: int = Field(50, ge=2)
    scan: EncoderScan.Config = Field(
        default_factory=lambda: EncoderScan.Config(steps=200, restarts=2))


class FeatureEncoder(nn.Module):
    """A model with `features(x)` (a classifier, or a self-supervised model with a projection
    head) used as an encoder: forward(x) = model.features(x)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def load_encoder(path: Path | str, arch: str, *, in_channels: int | None = None,
                 image_size: int | None = None) -> tuple[nn.Module, Shape]:
    """Build `arch` and load the weights file `path` (safetensors, or
    torch.load(weights_only=True): never arbitrary code); returns the encoder in eval mode and
    the (C, H, W) it expects. A file with a 2-D `head.weight` is a classifier (its head is
    loaded and then not used); a file without one may lack every `head.*` key of the
    architecture; any other key that does not fit is a ModelFileError. The encoder is the
    model's `features(x)` when it has one, else the model itself. Input channels: `in_channels`,
    else those of the file's weight for the first convolution; H and W as for `load_model`."""
    path = Path(path)
    state, meta = load_weights(path)
    head = state.get("head.weight")
    classes = (head_classes(head, path) if head is not None and head.dim() == 2
               else DUMMY_CLASSES)
    channels = in_channels if in_channels is not None else _file_channels(state, arch, classes)
    model = build_model(arch, num_classes=classes, in_channels=channels)
    load_into(model, _with_model_head(state, model), name=arch, source=str(path))
    encoder = FeatureEncoder(model) if callable(getattr(model, "features", None)) else model
    shape_channels = in_channels if in_channels is not None else model_channels(model)
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return encoder.eval(), input_shape(arch, meta, image_size, shape_channels, path,
                                       weights_fix_channels=has_conv)


def _file_channels(state: dict[str, torch.Tensor], arch: str, classes: int) -> int:
    """Input channels of the file's weight for the architecture's first convolution (3 when
    the architecture has none or the file lacks it). Safetensors files list their tensors in
    name order, so the first 4-D tensor of the file need not be the first layer's."""
    probe = build_model(arch, num_classes=classes, in_channels=3)
    name = next((n for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)), None)
    weight = state.get(f"{name}.weight", state.get(f"module.{name}.weight"))
    return int(weight.shape[1]) if weight is not None and weight.dim() == 4 else 3


def _with_model_head(state: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """`state` completed with the model's own `head.*` tensors when the file has none (an
    encoder saved without a classifier head); otherwise, or for a model without a head,
    unchanged."""
    if any(k.startswith(("head.", "module.head.")) for k in state):
        return state
    prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
    own = {prefix + k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    return {**state, **own}


@dataclass
class EncoderScanReport:
    """The scan's result, how many clean images it used, the encoder's name and architecture
    as given, and the files written (None without a report folder)."""

    result: EncoderScanResult
    samples: int
    model: str | None = None
    arch: str | None = None
    source: str = "the clean images"
    figure: Path | None = None
    trigger_file: Path | None = None

    name = "encoder_backdoor"

    @property
    def detected(self) -> bool:
        return self.result.backdoored

    @property
    def verdict(self) -> str:
        r = self.result
        size = f"PL1 {r.normalised_l1:.3f}"
        if r.backdoored:
            return (f"encoder backdoor: SUSPECTED (inverted trigger {size} < {r.threshold:g}, "
                    f"mean pairwise cosine {r.similarity:.3f})")
        if not r.reached:
            return (f"encoder backdoor: inconclusive (no inverted trigger reached a mean "
                    f"pairwise cosine of {r.similarity_threshold:g}; best {r.similarity:.3f}, "
                    f"{size}: more steps or restarts may)")
        return f"encoder backdoor: none detected (smallest inverted trigger {size} >= " \
               f"{r.threshold:g})"

    @property
    def notes(self) -> list[str]:
        r = self.result
        h, w = r.trigger.mask.shape[-2:]
        lines = [f"inverted trigger: mask L1 {r.l1:.1f} of {h * w} pixels ({h}x{w}), "
                 f"normalised {r.normalised_l1:.4f}",
                 f"clean images: mean pairwise cosine {r.clean_similarity:.3f} "
                 f"({self.samples} images)"]
        if len(r.restarts) > 1:
            values = ", ".join(f"{v:.3f}" for v in r.normalised_l1s)
            lines.append(f"PL1 over {len(r.restarts)} restarts: {values} (spread {r.spread:.3f})")
        return lines

    def text(self) -> str:
        """The verdict and the notes as printed in the terminal."""
        return verdict_text(self.verdict, self.notes)

    def section(self) -> Section:
        about = (f"{self.model or 'encoder'}" + (f" ({self.arch})" if self.arch else "")
                 + f", {self.samples} clean images from {self.source}.")
        return encoder_scan_section(self.verdict, self.result, self.figure, about)

    def to_dict(self) -> dict[str, Any]:
        """encoder_scan.json: model, arch, samples, the scan's summary and the files."""
        out: dict[str, Any] = {"model": self.model, "arch": self.arch, "samples": self.samples,
                               "verdict": self.verdict, **self.result.to_dict()}
        if self.figure is not None:
            out["figure"] = str(self.figure)
        if self.trigger_file is not None:
            out["trigger_file"] = str(self.trigger_file)
        return out

    def write(self, report_dir: Path) -> Path:
        """The trigger figure and file, encoder_scan.json and report.html in `report_dir`;
        returns the report's path."""
        report_dir.mkdir(parents=True, exist_ok=True)
        trig = self.result.trigger
        self.figure = encoder_trigger_figure(report_dir / TRIGGER_FIGURE, self.result)
        self.trigger_file = save_weights(report_dir / TRIGGER_FILE, {
            "mask": trig.mask, "pattern": trig.pattern}, {"kind": "mask-trigger"})
        (report_dir / SUMMARY_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        title = f"encoder scan: {Path(self.model).name}" if self.model else "encoder scan"
        return write_html_report(report_dir / "report.html", title, [self.section()])


def scan_encoder(encoder: nn.Module, images: torch.Tensor | ImageSet, *,
                 config: EncoderAuditConfig | EncoderScan.Config | None = None, seed: int = 0,
                 progress: bool = False, report_dir: Path | None = None,
                 input_shape: Sequence[int] | None = None, name: str | None = None,
                 arch: str | None = None, source: str = "the clean images",
                 device: torch.device | str | None = None) -> EncoderScanReport:
    """Scan `encoder` with `config.samples` clean `images` ([N, C, H, W] in [0, 1], or an
    ImageSet whose labels are ignored) drawn with `seed`.

    config: EncoderAuditConfig, or just the scan's settings (then 50 samples);
    input_shape: the (C, H, W) the encoder expects, checked against the images (H = 0: any);
    report_dir: where the trigger figure, the trigger (safetensors), encoder_scan.json and
    report.html go (default: nowhere); name, arch, source: how the report names the encoder and
    the images. Images that do not fit raise ShapeError, an empty set DataError.
    """
    if isinstance(config, EncoderScan.Config):
        config = EncoderAuditConfig(scan=config)
    config = make_settings(EncoderAuditConfig, config)
    x = images.x if isinstance(images, ImageSet) else images
    _check_images(x, input_shape, source)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x[order[: config.samples]]
    scanner = EncoderScan(config=config.scan, seed=seed, device=device)
    total = config.scan.steps * config.scan.restarts
    with progress_bar(total, "encoder scan", enabled=progress) as bar:
        result = scanner.scan(encoder, x, progress=lambda status: bar.advance(status=status))
    report = EncoderScanReport(result, len(x), name, arch, source)
    if report_dir is not None:
        report.write(report_dir)
    return report


def _check_images(x: torch.Tensor, shape: Sequence[int] | None, source: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"images in {source} must be [N, C, H, W], got {got}")
    if len(x) == 0:
        raise DataError(f"no images in {source}")
    got = tuple(x.shape[1:])
    if shape is not None and shape[1] and got != tuple(shape):
        why = shape.explain(got) if isinstance(shape, InputShape) else ""
        raise ShapeError(f"images in {source} are {got[0]}x{got[1]}x{got[2]} (CxHxW), but the "
                         f"encoder expects {shape[0]}x{shape[1]}x{shape[2]}{why}")

