"""Neural Cleanse: backdoor detection by per-label trigger reverse-engineering.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor
Attacks in Neural Networks", IEEE S&P 2019.

For each label t, optimise a mask m ∈ [0,1]^{H×W} and a pattern p ∈ [0,1]^{C×H×W} (both through
tanh) so that clean inputs stamped as x' = (1 − m)·x + m·p go to t, with a small |m|_1:
    min  CE(f(x'), t) + λ·|m|_1
The cost λ follows the original schedule: it starts at `init_cost`; after `patience` steps with the
attack success ≥ `success_threshold` it is multiplied by `cost_multiplier`, after `patience` steps
below it divided by `cost_multiplier ** 1.5`; the smallest mask reaching the threshold is kept and
optimisation stops early once it no longer shrinks. A backdoor target needs a much smaller mask
than the other labels: with the L1 norms of all labels, the anomaly index of a label is
|l1 − median| / (1.4826·MAD), and labels below the median with an index > 2 are flagged.

The same optimiser, with an additive pattern x' = clip(x + δ, 0, 1) and |δ|_1 as the size term,
serves MCL's trigger inversion (poisonlab.defenses.mcl).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger, Trigger
from poisonlab.config import Beta, Settings, make_settings
from poisonlab.errors import ShapeError
from poisonlab.progress import StatusFn

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal standard deviation


class InversionConfig(Settings):
    """Settings of one trigger reverse-engineering run (defaults: the original Neural Cleanse).

    steps: passes over the clean sample (each pass is a round of mini-batches of `batch_size`).
    lr, betas: Adam's step size and moment decay rates.
    init_cost: the starting λ of the size term.
    success_threshold: the attack success a trigger must reach to count (and to become the best).
    patience: steps above (below) the threshold before λ is multiplied by `cost_multiplier`
        (divided by `cost_multiplier ** 1.5`).
    early_stop: stop once the best size stopped shrinking: `early_stop_patience` steps without it
        falling below `early_stop_threshold` × its previous best, after λ has gone both up and down.
    parametrization: "mask" (NC, x' = (1 − m)x + m·p) or "additive" (MCL, x' = clip(x + δ)).
    """

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    betas: tuple[Beta, Beta] = (0.5, 0.9)
    init_cost: float = Field(1e-3, gt=0)
    success_threshold: float = Field(0.99, gt=0, le=1)
    patience: int = Field(5, ge=1)
    cost_multiplier: float = Field(2.0, gt=1)
    early_stop: bool = True
    early_stop_threshold: float = Field(0.99, gt=0, le=1)
    early_stop_patience: int = Field(25, ge=1)
    parametrization: Literal["mask", "additive"] = "mask"


@dataclass
class InversionResult:
    """The reverse-engineered trigger of one label and how it was reached."""

    label: int
    trigger: Trigger
    norm: float
    attack_success: float
    reached: bool
    steps_run: int
    cost_history: list[float] = field(default_factory=list)


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode without parameter gradients for the duration; restores both afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


class _Parametrized:
    """Unconstrained tensors → (stamp function, size term) for either parametrization."""

    def __init__(self, kind: str, shape: tuple[int, int, int], gen: torch.Generator, device) -> None:
        c, h, w = shape
        self.kind = kind
        if kind == "mask":
            init = [torch.rand(1, h, w, generator=gen), torch.rand(c, h, w, generator=gen)]
            self.params = [torch.atanh((v - 0.5) * (2 - 1e-4)) for v in init]
        else:
            self.params = [0.01 * torch.randn(c, h, w, generator=gen)]
        self.params = [p.to(device).requires_grad_(True) for p in self.params]

    def parts(self) -> list[torch.Tensor]:
        if self.kind == "mask":
            return [torch.tanh(p) / (2 - 1e-4) + 0.5 for p in self.params]
        return [torch.tanh(self.params[0])]

    def stamp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Triggered batch and the size term (L1 of the mask, or of δ)."""
        if self.kind == "mask":
            mask, pattern = self.parts()
            return (1 - mask) * x + mask * pattern, mask.abs().sum()
        (delta,) = self.parts()
        return (x + delta).clamp(0, 1), delta.abs().sum()

    def trigger(self) -> Trigger:
        parts = [p.detach().cpu() for p in self.parts()]
        if self.kind == "mask":
            return MaskTrigger(parts[0], parts[1], name="reversed")
        return AdditiveTrigger(parts[0], name="reversed")


class _CostSchedule:
    """The Neural Cleanse λ schedule and early stopping, updated once per step."""

    def __init__(self, cfg: InversionConfig) -> None:
        self.cfg = cfg
        self.cost = cfg.init_cost
        self.up = self.down = 0
        self.went_up = self.went_down = False
        self.best = math.inf
        self.early_best = math.inf
        self.early_count = 0

    def update(self, success: float, norm: float) -> tuple[bool, bool]:
        """Record one step; return (new best, stop now)."""
        cfg = self.cfg
        improved = success >= cfg.success_threshold and norm < self.best
        if improved:
            self.best = norm
        if self.best < math.inf:
            stalled = self.best >= cfg.early_stop_threshold * self.early_best
            self.early_count = self.early_count + 1 if stalled else 0
        self.early_best = min(self.best, self.early_best)
        stop = cfg.early_stop and self.went_up and self.went_down
        stop = stop and self.early_count >= cfg.early_stop_patience
        if success >= cfg.success_threshold:
            self.up, self.down = self.up + 1, 0
        else:
            self.up, self.down = 0, self.down + 1
        if self.up >= cfg.patience:
            self.up, self.went_up = 0, True
            self.cost *= cfg.cost_multiplier
        elif self.down >= cfg.patience:
            self.down, self.went_down = 0, True
            self.cost /= cfg.cost_multiplier**1.5
        return improved, stop


def reverse_engineer_trigger(
    model: nn.Module, x: torch.Tensor, target: int, cfg: InversionConfig | None = None, *,
    seed: int = 0, progress: StatusFn | None = None,
) -> InversionResult:
    """Find the smallest trigger that sends the clean images `x` [N, C, H, W] to `target`;
    the random start and batch order are drawn from `seed` and `target`; `progress(status)` is
    called after each pass over `x`."""
    cfg = cfg or InversionConfig()
    if len(x) == 0:
        raise ShapeError("trigger inversion needs at least one clean image")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed * 1000 + int(target))
    param = _Parametrized(cfg.parametrization, tuple(x.shape[1:]), gen, device)
    opt = torch.optim.Adam(param.params, lr=cfg.lr, betas=cfg.betas)
    schedule = _CostSchedule(cfg)
    best, costs = None, []
    with frozen_eval(model):
        for _ in range(cfg.steps):
            success, norm = _inversion_step(model, x, target, param, opt, schedule.cost, cfg, gen)
            costs.append(schedule.cost)
            if progress is not None:
                progress(f"inversion: success {success:.2f}, size {norm:.1f}")
            improved, stop = schedule.update(success, norm)
            if improved or not schedule.best < math.inf:
                best = (param.trigger(), norm, success)
            if stop:
                break
    trigger, norm, success = best
    return InversionResult(int(target), trigger, norm, success,
                           schedule.best < math.inf, len(costs), costs)


def _inversion_step(model, x, target, param, opt, cost, cfg, gen) -> tuple[float, float]:
    """One pass over `x` in shuffled mini-batches; returns (attack success, mean size term)."""
    order = torch.randperm(len(x), generator=gen)
    hits, norm_sum, batches = 0, 0.0, 0
    for i in range(0, len(x), cfg.batch_size):
        xb = x[order[i : i + cfg.batch_size]].to(param.params[0].device)
        stamped, size = param.stamp(xb)
        logits = model(stamped)
        labels = torch.full((len(xb),), int(target), device=xb.device)
        loss = F.cross_entropy(logits, labels) + cost * size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hits += int((logits.argmax(1) == labels).sum())
        norm_sum += float(size.detach())
        batches += 1
    return hits / len(x), norm_sum / batches


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|norm − median| / (1.4826·MAD) per label (0 everywhere when all norms are equal)."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    median = torch.quantile(norms, 0.5)
    dev = (norms - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(dev, 0.5)
    if float(mad) == 0.0:
        return torch.zeros_like(norms)
    return dev / mad


def flagged_labels(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Labels whose trigger is smaller than the median with an anomaly index above `threshold`."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    index = anomaly_index(norms)
    below = norms < torch.quantile(norms, 0.5)
    return [int(i) for i in torch.nonzero(below & (index > threshold)).flatten()]


@dataclass
class DetectionResult:
    """Per-label reverse-engineered triggers, their norms, anomaly indices and the verdict."""

    results: list[InversionResult]
    norms: torch.Tensor
    anomaly_index: torch.Tensor
    flagged: list[int]
    threshold: float

    @property
    def backdoored(self) -> bool:
        return bool(self.flagged)

    @property
    def target(self) -> int | None:
        """The flagged label with the largest anomaly index (the likely backdoor target), or
        None when nothing is flagged."""
        if not self.flagged:
            return None
        return max(self.flagged, key=lambda label: float(self.anomaly_index[label]))

    def to_dict(self) -> dict:
        return {
            "backdoored": self.backdoored,
            "flagged": self.flagged,
            "threshold": self.threshold,
            "labels": [
                {
                    "label": r.label,
                    "mask_l1": float(self.norms[r.label]),
                    "anomaly_index": float(self.anomaly_index[r.label]),
                    "attack_success": r.attack_success,
                    "reached_threshold": r.reached,
                    "steps": r.steps_run,
                    "flagged": r.label in self.flagged,
                }
                for r in self.results
            ],
        }


class NeuralCleanse:
    """`detect(model, x, num_classes)` reverse-engineers a trigger per label and flags outliers."""

    class Config(Settings):
        """inversion: the per-label reverse-engineering run (mask parametrization).
        threshold: anomaly index above which a label below the median norm is flagged."""

        inversion: InversionConfig = Field(default_factory=InversionConfig)
        threshold: float = Field(2.0, gt=0)

        @field_validator("inversion")
        @classmethod
        def _mask_only(cls, inversion: InversionConfig) -> InversionConfig:
            if inversion.parametrization != "mask":
                raise ValueError("Neural Cleanse detection uses the mask parametrization, "
                                 f"not '{inversion.parametrization}'")
            return inversion

    def __init__(self, *, config: NeuralCleanse.Config | None = None, seed: int = 0,
                 **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = int(seed)

    def detect(self, model: nn.Module, x: torch.Tensor, num_classes: int,
               progress: Callable[[int], None] | None = None) -> DetectionResult:
        """Run the inversion for every label on clean images `x`; `progress(label)` is called
        after each."""
        if len(x) == 0:
            raise ShapeError("Neural Cleanse needs at least one clean image")
        results = []
        for label in range(num_classes):
            results.append(self.reverse(model, x, label))
            if progress is not None:
                progress(label)
        norms = torch.tensor([r.norm for r in results], dtype=torch.float64)
        threshold = self.config.threshold
        return DetectionResult(results, norms, anomaly_index(norms),
                               flagged_labels(norms, threshold), threshold)

    def reverse(self, model: nn.Module, x: torch.Tensor, target: int) -> InversionResult:
        """The reverse-engineered trigger of one label."""
        return reverse_engineer_trigger(model, x, target, self.config.inversion, seed=self.seed)
