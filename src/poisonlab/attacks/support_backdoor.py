"""Backdoor poisoning of a few-shot support set (Kato, Takahashi, Suzuki 2023).

"Backdoor attacks on meta-learning" in the support-set setting: the attacker changes only the
support images X of a meta-test task (labels untouched, ||δ||∞ ≤ ε) so that after the victim
fine-tunes the meta-trained θ* on (X + δ, Y), ONE trigger query X'_tr is classified as the
attacker's label Y'_adv, while the other queries stay mostly correct. Algorithm 1:

    δ ~ U(−ε, ε); X̃ ← X + δ
    repeat L times:
        X̃ ← X̃ − γ · sign(∇_X̃ CE(F(X'_tr, g((X̃, Y), θ*)), Y'_adv))    # through fine-tuning g
        X̃ ← X + clip(X̃ − X, −ε, ε)     (and into [0, 1], switchable)

The attacker knows θ*, the support set and the trigger only: `poison` takes no other query and no
query label, so the API cannot leak them.

Deviation, stated: the CNN uses BatchNorm with batch statistics, so a prediction depends on the
batch it is made in. The victim classifies its query set as one batch (transductive, as in the
MAML reference); the attacker does not know those queries, so it classifies the trigger inside a
stand-in batch (`trigger_batch`):
- "clean_support" (default): the trigger with the CLEAN support images, known to the attacker and
  distributed like the queries;
- "support": with the poisoned support images; a batch of perturbed images has statistics unlike
  the victim's, so the attack then optimises the wrong prediction;
- "alone": the trigger by itself, the consistent choice when the victim, too, classifies the
  trigger by itself (the "paper" protocol of `poisonlab.evaluation.fewshot`, eq. 12 as written).

Extension, ours and off by default: `keep_support=λ > 0` minimises
CE(trigger → Y'_adv) + λ · mean CE(clean support images → their labels), both under the poisoned
fine-tuning and in the attacker's stand-in batch. It uses only what the attacker already has (the
support set and its labels). Why: under the transductive protocol Algorithm 1 flips the trigger's
whole class (its classmates among the queries are misclassified with it); keeping the clean
support images right keeps the classmates right, at a small cost in attack success as λ grows.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poisonlab.attacks.support_pgd import PoisonResult, SupportAttack, SupportAttackConfig
from poisonlab.errors import ShapeError
from poisonlab.training.maml import Params, TaskForward

TriggerBatch = Literal["clean_support", "support", "alone"]


class SupportBackdoorConfig(SupportAttackConfig):
    """The settings of `SupportBackdoor`: those of every support-set attack (`SupportAttackConfig`:
    epsilon, step_size, iterations, finetune_steps, finetune_lr, clamp, random_start) and

    trigger_batch: the attacker's stand-in batch for the trigger ("clean_support", "support",
        "alone"; see the module docstring).
    keep_support: λ of the keep_support extension (0: Algorithm 1's objective).
    """

    trigger_batch: TriggerBatch = "clean_support"
    keep_support: float = Field(0.0, ge=0, allow_inf_nan=False)


class SupportBackdoor(SupportAttack):
    """Targeted support-set poisoning: one trigger query → the attacker's label."""

    Config = SupportBackdoorConfig
    config: SupportBackdoorConfig

    def __init__(self, forward: TaskForward, theta: Params, *,
                 config: SupportBackdoorConfig | None = None, **settings) -> None:
        super().__init__(forward, theta, config=config, **settings)

    def trigger_loss(self, support_x: Tensor, support_y: Tensor, trigger_x: Tensor, target: Tensor,
                     clean_support_x: Tensor | None = None) -> Tensor:
        """CE(F(X'_tr, g((X̃, Y), θ*)), Y'_adv) per task [B], differentiable w.r.t. support_x,
        plus keep_support × the mean CE of the clean support images under g((X̃, Y), θ*) (in the
        stand-in batch when they are in it, else as a batch of their own).

        `clean_support_x` (default: support_x) forms the stand-in batch for "clean_support".
        """
        adapted = self.finetuned(support_x, support_y)
        clean = support_x if clean_support_x is None else clean_support_x
        companions = {"support": support_x, "clean_support": clean}.get(self.config.trigger_batch)
        clean_logits = None
        if companions is None:  # "alone"
            logits = self.forward(adapted, trigger_x)[:, 0]
        else:
            all_logits = self.forward(adapted, torch.cat([companions, trigger_x], dim=1))
            logits = all_logits[:, -1]
            if companions is clean:
                clean_logits = all_logits[:, :-1]
        loss = F.cross_entropy(logits, target, reduction="none")
        keep_support = self.config.keep_support
        if keep_support:
            if clean_logits is None:  # the clean support images are not in the stand-in batch
                clean_logits = self.forward(adapted, clean)
            keep = F.cross_entropy(clean_logits.flatten(0, 1), support_y.flatten(), reduction="none")
            loss = loss + keep_support * keep.view(support_y.shape).mean(1)
        return loss

    def poison(
        self,
        support_x: Tensor,
        support_y: Tensor,
        trigger_x: Tensor,
        target: Tensor,
        start: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> PoisonResult:
        """Poison a batch of support sets.

        support_x [B, n, C, H, W], support_y [B, n], trigger_x [B, 1, C, H, W] (or [B, C, H, W]),
        target [B]: the label each task's trigger should receive.
        """
        trigger_x = _one_trigger_per_task(trigger_x, support_x)
        target = torch.as_tensor(target, device=support_x.device).reshape(-1)
        if target.shape[0] != support_x.shape[0]:
            raise ShapeError(f"target has {target.shape[0]} labels for {support_x.shape[0]} tasks")

        clean = support_x.detach()

        def objective(x: Tensor) -> Tensor:
            return self.trigger_loss(x, support_y, trigger_x, target, clean)

        return self.run_pgd(objective, support_x, True, start, generator)


def _one_trigger_per_task(trigger_x: Tensor, support_x: Tensor) -> Tensor:
    if trigger_x.dim() == support_x.dim() - 1:
        trigger_x = trigger_x.unsqueeze(1)
    if trigger_x.dim() != support_x.dim() or trigger_x.shape[1] != 1:
        raise ShapeError(
            f"trigger_x must hold exactly one query image per task ([B, 1, C, H, W]), "
            f"got shape {tuple(trigger_x.shape)}: the attacker sees only the trigger"
        )
    if trigger_x.shape[0] != support_x.shape[0] or trigger_x.shape[2:] != support_x.shape[2:]:
        raise ShapeError(
            f"trigger_x shape {tuple(trigger_x.shape)} does not fit support_x {tuple(support_x.shape)}"
        )
    return trigger_x
