"""Output-side defences against membership inference: release less of the probability vector.

Shokri, Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine Learning Models",
IEEE S&P 2017, §VI: restrict the output to the top-k classes, round it to a few decimals, or return
only the label. Each defence maps probability vectors [N, classes] to what the service releases,
in the same shape (`release(probs)`), so every score-based attack still runs on it.
(Choquette-Choo et al. 2021 show that label-only output is still attackable:
poisonlab.attacks.membership.label_only.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch.nn import functional as F

from poisonlab.config import Settings, make_settings
from poisonlab.errors import ConfigError, ShapeError


class OutputDefense:
    """Base: `release(probs)` → what the service returns, same shape [N, classes]."""

    name: ClassVar[str]

    class Config(Settings):
        """No settings."""

    def __init__(self, *, config: Any = None, **settings: Any) -> None:
        self.config = make_settings(self.Config, config, **settings)

    def release(self, probs: torch.Tensor) -> torch.Tensor:
        """The probability vectors as released (here: unchanged)."""
        _check(probs)
        return probs


def _check(probs: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ShapeError(f"probabilities must be [records, classes], got {tuple(probs.shape)}")


class NoDefense(OutputDefense):
    """The full probability vector."""

    name = "none"


class LabelsOnly(OutputDefense):
    """One-hot vector of the predicted class."""

    name = "labels_only"

    def release(self, probs: torch.Tensor) -> torch.Tensor:
        _check(probs)
        return F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)


class Rounding(OutputDefense):
    """Probabilities rounded to `decimals` decimal places."""

    name = "rounding"

    class Config(Settings):
        """decimals: decimal places kept."""

        decimals: int = Field(1, ge=0)

    def release(self, probs: torch.Tensor) -> torch.Tensor:
        _check(probs)
        return torch.round(probs, decimals=self.config.decimals)


class TopK(OutputDefense):
    """Only the k largest probabilities kept (the others set to 0)."""

    name = "top_k"

    class Config(Settings):
        """k: probabilities kept per record (at most the number of classes)."""

        k: int = Field(1, ge=1)

    def release(self, probs: torch.Tensor) -> torch.Tensor:
        _check(probs)
        k = self.config.k
        if k > probs.shape[1]:
            raise ShapeError(f"top_k k={k} exceeds the {probs.shape[1]} classes")
        values, idx = probs.topk(k, dim=1)
        return torch.zeros_like(probs).scatter(1, idx, values)


OUTPUT_DEFENSES: dict[str, type[OutputDefense]] = {
    cls.name: cls for cls in (NoDefense, LabelsOnly, Rounding, TopK)
}


def get_output_defense(name: str, **kwargs: Any) -> OutputDefense:
    """The output defence `name` built with `kwargs` (config= or its settings); an unknown name
    is a one-line ConfigError listing the known ones."""
    if name not in OUTPUT_DEFENSES:
        raise ConfigError(f"unknown output defence '{name}' (known: {', '.join(OUTPUT_DEFENSES)})")
    return OUTPUT_DEFENSES[name](**kwargs)
