"""Projected gradient steps on a few-shot support set, through the fine-tuning that follows.

The shared core of the support-set attacks (`support_backdoor`, `adversarial_support`): only the
support images move, within an L∞ ball of radius ε around the originals (and within [0, 1] when
`clamp`); labels never change. The objective is evaluated after fine-tuning on the perturbed
support set, so its gradient flows through the inner-loop gradient steps (second order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from poisonlab.errors import ConfigError
from poisonlab.training.maml import Params, TaskForward, adapt, expand_params


@dataclass
class PoisonResult:
    """support_x: the poisoned support images [B, n, C, H, W]; losses: the attack loss per PGD
    iteration and task [L, B] (at the iterate the step was computed from)."""

    support_x: Tensor
    losses: Tensor


def check_budget(epsilon: float, step_size: float, iterations: int) -> None:
    """One-line errors for impossible PGD settings."""
    if not epsilon >= 0:
        raise ConfigError(f"epsilon={epsilon} must be >= 0")
    if not step_size > 0:
        raise ConfigError(f"step_size={step_size} must be > 0")
    if iterations < 0:
        raise ConfigError(f"iterations={iterations} must be >= 0")


def project(x: Tensor, original: Tensor, epsilon: float, clamp: bool) -> Tensor:
    """X + clip(X̃ − X, −ε, ε), then into [0, 1] if `clamp`."""
    x = original + (x - original).clamp(-epsilon, epsilon)
    return x.clamp(0.0, 1.0) if clamp else x


def support_pgd(
    objective: Callable[[Tensor], Tensor],
    support_x: Tensor,
    epsilon: float,
    step_size: float,
    iterations: int,
    descend: bool,
    clamp: bool = True,
    start: Tensor | None = None,
    generator: torch.Generator | None = None,
    random_start: bool = True,
) -> PoisonResult:
    """Signed-gradient PGD on `support_x` for a per-task objective [B] (descent or ascent).

    `start` is the initial perturbation (default δ ~ U(−ε, ε), drawn with `generator`, as in
    Algorithm 1; δ = 0 with `random_start=False`).
    """
    check_budget(epsilon, step_size, iterations)
    original = support_x.detach()
    if start is None and not random_start:
        start = torch.zeros_like(original)
    if start is None:
        noise = torch.rand(original.shape, generator=generator, dtype=original.dtype)
        start = (noise.to(original.device) * 2 - 1) * epsilon
    x = project(original + start, original, epsilon, clamp)
    direction = -1.0 if descend else 1.0
    losses = []
    for _ in range(iterations):
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            loss = objective(x)
            (grad,) = torch.autograd.grad(loss.sum(), x)
        losses.append(loss.detach())
        x = project(x.detach() + direction * step_size * grad.sign(), original, epsilon, clamp)
    stacked = torch.stack(losses) if losses else original.new_zeros(0, original.shape[0])
    return PoisonResult(support_x=x.detach(), losses=stacked)


class SupportAttack:
    """Common settings of the support-set attacks: θ*, the budget and the victim's fine-tuning."""

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
        random_start: bool = True,
    ) -> None:
        check_budget(epsilon, step_size, iterations)
        if finetune_steps < 1:
            raise ConfigError(f"finetune_steps={finetune_steps} must be >= 1")
        self.forward, self.theta = forward, {k: v.detach() for k, v in theta.items()}
        self.epsilon, self.step_size, self.iterations = epsilon, step_size, iterations
        self.finetune_steps, self.finetune_lr, self.clamp = finetune_steps, finetune_lr, clamp
        self.random_start = random_start

    def finetuned(self, support_x: Tensor, support_y: Tensor) -> Params:
        """g((X̃, Y), θ*) per task, differentiable w.r.t. the support images."""
        batched = expand_params(self.theta, support_x.shape[0])
        return adapt(self.forward, batched, support_x, support_y, self.finetune_steps,
                     self.finetune_lr, create_graph=True)

    def run_pgd(self, objective, support_x: Tensor, descend: bool, start: Tensor | None,
                generator: torch.Generator | None) -> PoisonResult:
        return support_pgd(objective, support_x, self.epsilon, self.step_size, self.iterations,
                           descend=descend, clamp=self.clamp, start=start, generator=generator,
                           random_start=self.random_start)
