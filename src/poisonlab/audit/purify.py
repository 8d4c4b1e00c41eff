"""`purify`: remove a backdoor from a model you did not train with MCL (poisonlab.defenses.mcl)
on a little clean data; the target label is the one a Neural Cleanse scan flags when it is not
given. Benign accuracy (BA) and, with a known trigger (named, or a file: audit.trigger), attack
success rate (ASR) are measured before and after on a clean test set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poisonlab.attacks.backdoor_injection import attack_success_rate
from poisonlab.attacks.triggers import Trigger
from poisonlab.audit.checks import ScanConfig
from poisonlab.audit.data import class_names, num_classes, sample
from poisonlab.audit.trigger import TriggerSource
from poisonlab.config import make_settings
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mcl import MCL
from poisonlab.defenses.neural_cleanse import MIN_LABELS, DetectionResult, NeuralCleanse
from poisonlab.errors import ConfigError
from poisonlab.progress import progress_bar
from poisonlab.training.supervised import evaluate

DETECT_SAMPLES = 200  # clean images Neural Cleanse uses to find the target


@dataclass
class Measured:
    """Benign accuracy on the test set and attack success rate of the known trigger (None when
    not measured)."""

    benign_accuracy: float | None = None
    attack_success_rate: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in (("benign_accuracy", self.benign_accuracy),
                                  ("attack_success_rate", self.attack_success_rate))
                if v is not None}


@dataclass
class PurifyReport:
    """The purified model, the target it was purified for (with the detection that chose it,
    None when it was given), the number of clean images and the metrics before and after."""

    model: nn.Module
    target: int
    clean_images: int
    before: Measured
    after: Measured
    detection: DetectionResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """target, clean_images, before, after (as in purify's --json line)."""
        return {"target": self.target, "clean_images": self.clean_images,
                "before": self.before.to_dict(), "after": self.after.to_dict()}


def known_trigger(trigger: str | TriggerSource | None, shape: Sequence[int], seed: int,
                  mask: Path | str | None = None) -> Trigger | None:
    """The trigger for images of `shape`: named (badnets, blend, grid, trojan; blend draws its
    pattern with `seed`) or a trigger file, with the mask image `mask` (see
    poisonlab.audit.trigger); None without one."""
    source = trigger if isinstance(trigger, TriggerSource) else TriggerSource.parse(trigger, mask)
    return source.build(shape, seed) if source is not None else None


def find_target(model: nn.Module, clean: ImageSet, *, config: NeuralCleanse.Config | None = None,
                seed: int = 0, progress: bool = False) -> DetectionResult:
    """Neural Cleanse on DETECT_SAMPLES of `clean` (drawn with `seed`); ConfigError when the
    scan finds no candidate at all (neither flagged nor inconclusive), since there is then no
    target to purify. An inconclusive scan's candidate is the target (see `target_of`)."""
    config = config or ScanConfig().detection()
    k = num_classes(model, clean.x)
    if k < MIN_LABELS:  # its verdict would be inconclusive, its candidate a coin toss
        raise ConfigError(f"the model has {k} classes, and Neural Cleanse cannot pick a target "
                          f"among fewer than {MIN_LABELS}: pass --target L")
    detector = NeuralCleanse(config=config, seed=seed)
    with progress_bar(config.inversion.steps, "neural cleanse", enabled=progress) as bar:
        detection = detector.detect(model, sample(clean, DETECT_SAMPLES, seed).x, k,
                                    progress=lambda status: bar.advance(status=status))
    if target_of(detection) is None:
        raise ConfigError("Neural Cleanse flags no label, so there is no target to purify: "
                          "pass --target L to purify anyway")
    return detection


def target_of(detection: DetectionResult) -> int | None:
    """The label purify defends: the flagged target, else an inconclusive scan's candidate."""
    if detection.target is not None:
        return detection.target
    return detection.candidate if detection.status == "inconclusive" else None


def measure(model: nn.Module, test: ImageSet | None, trigger: Trigger | None,
            target: int) -> Measured:
    """BA on `test` and ASR of `trigger` towards `target` (nothing without a test set)."""
    if test is None:
        return Measured()
    asr = attack_success_rate(model, trigger, test, target) if trigger is not None else None
    return Measured(evaluate(model, test), asr)


def purify(model: nn.Module, clean: ImageSet, *, target: int | None = None,
           config: MCL.Config | None = None, detect: NeuralCleanse.Config | None = None,
           seed: int = 0, progress: bool = False, test: ImageSet | None = None,
           trigger: Trigger | None = None, classes: Sequence[str] | None = None) -> PurifyReport:
    """MCL on `clean` for `target` (default: the label Neural Cleanse with `detect` flags);
    returns the purified copy of `model` (left untouched) with BA/ASR before and after on
    `test` (ASR for a known `trigger`). classes: the clean data's class names, checked against
    the model's labels."""
    config = make_settings(MCL.Config, config)
    k = len(class_names(classes or [], num_classes(model, clean.x)))
    detection = None
    if target is None:
        detection = find_target(model, clean, config=detect, seed=seed, progress=progress)
        target = target_of(detection)
    elif not 0 <= target < k:
        raise ConfigError(f"--target {target} is not a label of the model (0..{k - 1})")
    before = measure(model, test, trigger, target)
    method = MCL(config=config, seed=seed)
    with progress_bar(method.steps(), "MCL", enabled=progress) as bar:
        purified = method.purify(model, clean, target,
                                 progress=lambda status: bar.advance(status=status)).model
    broken = [k for k, v in purified.state_dict().items()
              if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:  # never hand back (or let the CLI write) weights that are no model
        raise ConfigError(f"MCL diverged: {len(broken)} of {len(purified.state_dict())} tensors "
                          f"of the purified model are not finite (e.g. {broken[0]}); lower "
                          "--ce-weight / --distill-weight or the learning rate")
    return PurifyReport(purified, int(target), len(clean), before,
                        measure(purified, test, trigger, target), detection)
