"""Threshold baseline on the loss or the confidence of the target's output.

Yeom, Giacomelli, Fredrikson, Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting", CSF 2018: a record whose loss is low (confidence high) is declared a member. The
score is thresholded by the ROC metrics, so no threshold is fixed here.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from poisonlab.attacks.membership.base import MembershipAttack, Queried
from poisonlab.config import Settings


class ThresholdAttack(MembershipAttack):
    """Scores the target's released probability vectors (`Queried.probs`); needs no references."""

    name = "threshold"
    needs = "probs"

    class Config(Settings):
        """score: "loss" = −cross-entropy = log p_y; "confidence" = p_y; "max_confidence" =
        max_j p_j (ignores the label). eps: floor of p_y before the log."""

        score: Literal["loss", "confidence", "max_confidence"] = "loss"
        eps: float = Field(1e-12, gt=0)

    def score(self, queried: Queried) -> torch.Tensor:
        """Membership scores [N], higher = more likely a member."""
        probs = queried.need("probs", self.name)
        if self.config.score == "max_confidence":
            return probs.max(1).values.float()
        p_y = probs.gather(1, queried.labels[:, None]).squeeze(1).float()
        return p_y.clamp_min(self.config.eps).log() if self.config.score == "loss" else p_y
