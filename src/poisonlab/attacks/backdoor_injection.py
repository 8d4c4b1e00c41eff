"""Poisoning-based backdoor injection, all-to-one (BadNets threat model).

Gu, Dolan-Gavitt, Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply
Chain", 2017; Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data
Poisoning", 2017. A fraction `poison_rate` of the training set (drawn among images whose label is not the
target) gets the trigger stamped and its label changed to `target`; a model trained on the result
learns to send any triggered input to the target while staying accurate on clean inputs.

Metrics: benign accuracy (BA) on the clean test set; attack success rate (ASR) on triggered test
images whose true label is not the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from poisonlab.attacks.triggers import Trigger
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError
from poisonlab.training.supervised import evaluate, predict_logits


@dataclass
class PoisonedSet:
    """The poisoned training set and the indices of the images that carry the trigger."""

    data: ImageSet
    poisoned: torch.Tensor


class BackdoorInjection:
    """All-to-one poisoning: `poison(train)` stamps `trigger` on a `poison_rate` fraction of the
    training set, relabelled to `target`."""

    class Config(Settings):
        """target: the all-to-one target label. poison_rate: the share of the training set that
        gets the trigger and the target label (drawn among the images of other labels)."""

        target: int = Field(0, ge=0)
        poison_rate: float = Field(0.1, gt=0, lt=1)

    def __init__(self, trigger: Trigger, *, config: Config | None = None, seed: int = 0,
                 **settings: Any) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.trigger = trigger
        self.target = self.config.target
        self.rate = self.config.poison_rate
        self.seed = int(seed)

    def poison(self, train: ImageSet) -> PoisonedSet:
        """Return a copy of `train` with round(poison_rate·N) non-target images triggered and relabelled."""
        if self.target > int(train.y.max()):
            raise ConfigError(f"target label {self.target} is not a label of the training set")
        candidates = torch.nonzero(train.y != self.target).flatten()
        count = round(self.rate * len(train))
        if count > len(candidates):
            raise ConfigError(f"poison rate {self.rate} needs {count} non-target images, "
                              f"only {len(candidates)} exist")
        g = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=g)[:count]].sort().values
        x, y = train.x.clone(), train.y.clone()
        x[chosen] = self.trigger.apply(x[chosen])
        y[chosen] = self.target
        return PoisonedSet(ImageSet(x, y), chosen)

    def triggered_test(self, test: ImageSet) -> ImageSet:
        """Triggered copies of the test images whose true label is not the target, labelled target."""
        return triggered_set(self.trigger, test, self.target)


def triggered_set(trigger: Trigger, data: ImageSet, target: int) -> ImageSet:
    """Non-target images of `data` with `trigger` applied, all labelled `target`."""
    keep = data.y != target
    x = trigger.apply(data.x[keep])
    return ImageSet(x, torch.full((len(x),), int(target), dtype=torch.long))


def attack_success_rate(
    model: nn.Module, trigger: Trigger, test: ImageSet, target: int, batch_size: int = 512
) -> float:
    """Fraction of triggered non-target test images that the model classifies as `target`."""
    data = triggered_set(trigger, test, target)
    if len(data) == 0:
        return float("nan")
    pred = predict_logits(model, data.x, batch_size).argmax(1)
    return float((pred == target).float().mean())


def backdoor_metrics(model: nn.Module, trigger: Trigger, test: ImageSet, target: int) -> dict:
    """{"benign_accuracy", "attack_success_rate"} as fractions."""
    return {
        "benign_accuracy": evaluate(model, test),
        "attack_success_rate": attack_success_rate(model, trigger, test, target),
    }
