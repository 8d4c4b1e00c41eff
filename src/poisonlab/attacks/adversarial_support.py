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

from poisonlab.attacks.support_pgd import PoisonResult, check_budget, support_pgd
from poisonlab.errors import ConfigError
from poisonlab.training.maml import Params, TaskForward, adapt, expand_params


class AdversarialSupportPoisoning:
    """Untargeted support-set poisoning that degrades accuracy on the whole query set."""

    def __init__(
        self,
        forward: TaskForward,
        theta: Params,
        epsilon: float = 0.3,
        step_size: float = 0.01,
        iterations: int = 10,
        finetune_steps: int = 1,
        finetune_lr: float = 0.5,
        clamp: bool = True,
    ) -> None:
        check_budget(epsilon, step_size, iterations)
        if finetune_steps < 1:
            raise ConfigError(f"finetune_steps={finetune_steps} must be >= 1")
        self.forward, self.theta = forward, {k: v.detach() for k, v in theta.items()}
        self.epsilon, self.step_size, self.iterations = epsilon, step_size, iterations
        self.finetune_steps, self.finetune_lr, self.clamp = finetune_steps, finetune_lr, clamp

    def query_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor) -> Tensor:
        """Mean query cross-entropy per task [B] after fine-tuning on the support set."""
        batched = expand_params(self.theta, support_x.shape[0])
        adapted = adapt(self.forward, batched, support_x, support_y, self.finetune_steps,
                        self.finetune_lr, create_graph=True)
        logits = self.forward(adapted, query_x)
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
            raise ConfigError(f"query_x has {query_x.shape[0]} tasks, support_x {support_x.shape[0]}")

        def objective(x: Tensor) -> Tensor:
            return self.query_loss(x, support_y, query_x, query_y)

        return support_pgd(objective, support_x, self.epsilon, self.step_size, self.iterations,
                           descend=False, clamp=self.clamp, start=start, generator=generator)
