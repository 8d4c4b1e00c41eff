"""Adversarial support poisoning (ASP): the untargeted availability attack on a few-shot task.

Oldewage, Bronskill, Turner, "Adversarial attacks are a surprisingly strong baseline for poisoning
few-shot meta-learners" (2022); Xu et al., "Yet meta learning can adapt fast, it can also break
easily" (SDM 2021). Perturb the support images within ||δ||∞ ≤ ε to MAXIMISE the loss of the whole
query set after fine-tuning: δ* = argmax CE(F(X', g((X + δ, Y), θ*)), Y'). Unlike the support-set
backdoor it needs the query set and its labels (or a surrogate of them). Same PGD, ascending.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from poisonlab.attacks.support_pgd import PoisonResult, SupportAttack, SupportAttackConfig
from poisonlab.errors import ShapeError


class AdversarialSupportPoisoning(SupportAttack):
    """Untargeted support-set poisoning that degrades accuracy on the whole query set.

    Settings: `SupportAttackConfig` (epsilon, step_size, iterations, finetune_steps, finetune_lr,
    clamp, random_start), as `AdversarialSupportPoisoning(forward, theta, *, config=None,
    **settings)`.
    """

    Config = SupportAttackConfig

    def query_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Mean query cross-entropy per task [B] after fine-tuning on the support set."""
        logits = self.forward(self.finetuned(support_x, support_y), query_x)
        return F.cross_entropy(logits.flatten(0, 1), query_y.flatten(), reduction="none").view(
            query_y.shape).mean(1)

    def poison(
        self,
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        start: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PoisonResult:
        """Poison a batch of support sets [B, n, C, H, W] against their query sets."""
        if query_x.shape[0] != support_x.shape[0]:
            raise ShapeError(f"query_x has {query_x.shape[0]} tasks, support_x {support_x.shape[0]}")

        def objective(x: Tensor) -> Tensor:
            return self.query_loss(x, support_y, query_x, query_y)

        return self.run_pgd(objective, support_x, False, start, generator)
