"""Metrics shared by every technique: accuracies, attack success, confidence intervals."""

from __future__ import annotations

import math

import torch
from scipy import stats


def mean_ci95(values: torch.Tensor | list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t over the values).

    With one value the half-width is 0.0 (no spread can be estimated).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(v.mean())
    if v.numel() == 1:
        return mean, 0.0
    sem = float(v.std(unbiased=True)) / math.sqrt(v.numel())
    half = float(stats.t.ppf(0.975, df=v.numel() - 1)) * sem
    return mean, half


def accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction correct along the last example dimension.

    Accepts logits [..., n, classes] or predicted labels [..., n]; returns a tensor of shape [...]
    (one accuracy per task for batched input).
    """
    pred = logits_or_pred.argmax(-1) if logits_or_pred.dim() == labels.dim() + 1 else logits_or_pred
    return (pred == labels).float().mean(-1)
