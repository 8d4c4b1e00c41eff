"""Threshold baseline on the loss or the confidence of the target's output.

Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting", CSF 2018: a record whose loss is low (confidence high) is declared a member. The
score is thresholded by the ROC metrics, so no threshold is fixed here.
"""

from __future__ import annotations

import torch

from poisonlab.attacks.membership.common import as_index, check_records
from poisonlab.errors import ConfigError

SCORES = ("loss", "confidence", "max_confidence")


class ThresholdAttack:
    """score="loss": −cross-entropy = log p_y; "confidence": p_y; "max_confidence": max_j p_j
    (needs no label). Input: probability vectors [N, classes]."""

    def __init__(self, score: str = "loss", eps: float = 1e-12) -> None:
        if score not in SCORES:
            raise ConfigError(f"threshold score must be one of {SCORES}, got '{score}'")
        self.score = score
        self.eps = eps

    def infer(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Membership scores [N], higher = more likely a member."""
        if self.score == "max_confidence":
            if probs.dim() != 2:
                raise ConfigError(f"probs must be [records, classes], got {tuple(probs.shape)}")
            return probs.max(1).values.float()
        if labels is None:
            raise ConfigError(f"threshold score '{self.score}' needs the records' labels")
        labels = as_index(labels)
        check_records(probs, labels, "probs")
        p_y = probs.gather(1, labels[:, None]).squeeze(1).float()
        return p_y.clamp_min(self.eps).log() if self.score == "loss" else p_y
