"""Projected gradient steps on a few-shot support set, through the fine-tuning that follows.

The shared core of the support-set attacks (`support_backdoor`, `adversarial_support`): only the
support images move, within an L∞ ball of radius ε around the originals (and within [0, 1] when
`clamp`); labels never change. The objective is evaluated after fine-tuning on the perturbed
support set, so its gradient flows through the inner-loop gradient steps (second order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor

from poisonlab.config import Settings, make_settings, validate_config
from poisonlab.training.maml import Params, TaskForward, adapt, expand_params

Epsilon = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]  # images are in [0, 1]
"""An L∞ budget ε: finite and >= 0 (also the element type of an experiment's sweep of ε)."""


class SupportAttackConfig(Settings):
    """Settings shared by the support-set attacks: the budget, PGD and the victim's fine-tuning.

    epsilon: the L∞ budget ε of the perturbation δ of the support images, ||δ||∞ ≤ ε.
    step_size: the PGD step γ (each step moves a pixel by γ · sign of its gradient).
    iterations: the number L of PGD steps (0: only the random start).
    finetune_steps, finetune_lr: the victim's fine-tuning g((X, Y), θ*), which the attacker
        knows: gradient steps on the support loss and their learning rate.
    clamp: keep the poisoned images in [0, 1].
    random_start: start at δ ~ U(−ε, ε) as Algorithm 1 does; False starts at δ = 0.
    """

    epsilon: Epsilon = 0.3
    step_size: float = Field(0.01, gt=0, allow_inf_nan=False)
    iterations: int = Field(10, ge=0)
    finetune_steps: int = Field(1, ge=1)
    finetune_lr: float = Field(0.5, gt=0, allow_inf_nan=False)
    clamp: bool = True
    random_start: bool = True


@dataclass
class PoisonResult:
    """support_x: the poisoned support images [B, n, C, H, W]; losses: the attack loss per PGD
    iteration and task [L, B] (at the iterate the step was computed from)."""

    support_x: Tensor
    losses: Tensor


def project(x: Tensor, original: Tensor, epsilon: float, clamp: bool) -> Tensor:
    """X + clip(X̃ − X, −ε, ε), then into [0, 1] if `clamp`."""
    x = original + (x - original).clamp(-epsilon, epsilon)
    return x.clamp(0.0, 1.0) if clamp else x


def support_pgd(
    objective: Callable[[Tensor], Tensor],
    support_x: Tensor,
    config: SupportAttackConfig,
    *,
    descend: bool,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> PoisonResult:
    """Signed-gradient PGD on `support_x` for a per-task objective [B] (descent or ascent), with
    the budget, step, iterations, clamp and start of `config`.

    `start` is the initial perturbation (default δ ~ U(−ε, ε), drawn with `generator`, as in
    Algorithm 1; δ = 0 with `config.random_start=False`).
    """
    c = config
    original = support_x.detach()
    if start is None and not c.random_start:
        start = torch.zeros_like(original)
    if start is None:
        noise = torch.rand(original.shape, generator=generator, dtype=original.dtype)
        start = (noise.to(original.device) * 2 - 1) * c.epsilon
    x = project(original + start, original, c.epsilon, c.clamp)
    direction = -1.0 if descend else 1.0
    losses = []
    for _ in range(c.iterations):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            loss = objective(x)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        x = project(x.detach() + direction * c.step_size * grad.sign(), original, c.epsilon,
                    c.clamp)
    stacked = torch.stack(losses) if losses else original.new_zeros(0, original.shape[0])
    return PoisonResult(support_x=x.detach(), losses=stacked)


class SupportAttack:
    """Common part of the support-set attacks: θ*, the settings, the victim's fine-tuning."""

    Config = SupportAttackConfig

    def __init__(self, forward: TaskForward, theta: Params, *,
                 config: SupportAttackConfig | None = None, **settings) -> None:
        if isinstance(config, self.Config) and type(config) is not self.Config:
            # A richer config (another attack's, an evaluation's): keep this attack's fields,
            # validated as this attack's Config.
            config = validate_config(self.Config,
                                     config.model_dump(include=set(self.Config.model_fields)))
        self.config = make_settings(self.Config, config, **settings)
        self.forward, self.theta = forward, {k: v.detach() for k, v in theta.items()}

    def finetuned(self, support_x: Tensor, support_y: Tensor) -> Params:
        """g((X̃, Y), θ*) per task, differentiable w.r.t. the support images."""
        batched = expand_params(self.theta, support_x.shape[0])
        return adapt(self.forward, batched, support_x, support_y, self.config.finetune_steps,
                     self.config.finetune_lr, create_graph=True)

    def run_pgd(self, objective, support_x: Tensor, descend: bool, start: Tensor | None,
                generator: torch.Generator | None) -> PoisonResult:
        return support_pgd(objective, support_x, self.config, descend=descend, start=start,
                           generator=generator)
