"""Output-side defences against membership inference: release less of the probability vector.

Shokri, Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine Learning Models",
IEEE S&P 2017, §VI: restrict the output to the top-k classes, round it to a few decimals, or return
only the label. Each function maps probability vectors [N, classes] to what the service releases,
in the same shape, so every score-based attack still runs on it. (Choquette-Choo et al. 2021 show
that label-only output is still attackable: poisonlab.attacks.membership.label_only.)
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from poisonlab.errors import ConfigError

OUTPUT_DEFENSES = ("none", "labels_only", "rounding", "top_k")


def _check(probs: torch.Tensor) -> None:
    if probs.dim() != 2:
        raise ConfigError(f"probabilities must be [records, classes], got {tuple(probs.shape)}")


def labels_only(probs: torch.Tensor) -> torch.Tensor:
    """One-hot vector of the predicted class."""
    _check(probs)
    return F.one_hot(probs.argmax(1), probs.shape[1]).to(probs.dtype)


def round_scores(probs: torch.Tensor, decimals: int = 1) -> torch.Tensor:
    """Probabilities rounded to `decimals` decimal places."""
    _check(probs)
    if decimals < 0:
        raise ConfigError(f"decimals must be >= 0, got {decimals}")
    return torch.round(probs, decimals=decimals)


def top_k(probs: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Only the k largest probabilities kept (the others set to 0)."""
    _check(probs)
    if not 1 <= k <= probs.shape[1]:
        raise ConfigError(f"top_k k must be in [1, {probs.shape[1]}], got {k}")
    values, idx = probs.topk(k, dim=1)
    return torch.zeros_like(probs).scatter(1, idx, values)


def apply_output_defense(name: str, probs: torch.Tensor, decimals: int = 1, k: int = 1) -> torch.Tensor:
    """Apply the output defence `name` (one of OUTPUT_DEFENSES)."""
    if name == "none":
        return probs
    if name == "labels_only":
        return labels_only(probs)
    if name == "rounding":
        return round_scores(probs, decimals)
    if name == "top_k":
        return top_k(probs, k)
    raise ConfigError(f"unknown output defence '{name}' (known: {', '.join(OUTPUT_DEFENSES)})")
