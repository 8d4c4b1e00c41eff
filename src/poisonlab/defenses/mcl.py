"""MCL: backdoor elimination by model-contrastive learning.

Yue, Lv, Liu, Wang, Zhang, "Model-Contrastive Learning for Backdoor Elimination", ACM MM 2023.

Stage 1, trigger inversion: an additive pattern δ (x' = clip(x + δ, 0, 1)) optimised so that the
backdoored model sends clean inputs to the target label, with an L1 size term and the Neural
Cleanse cost schedule (reference: 100 steps, Adam lr 0.1 betas (0.5, 0.9), initial cost 1e-3,
success bound 0.9, patience 10, cost ×1.5 up and ÷1.5^1.5 down).

Stage 2, model-contrastive fine-tuning: θ starts from the backdoored weights, θ_b is a frozen copy;
with penultimate features f,
    anchor z = f_θ(x + δ),  positive z⁺ = f_θb(x),  negative z⁻ = f_θb(x + δ)
    L = −log( e^{cos(z,z⁺)/τ} / (e^{cos(z,z⁺)/τ} + e^{cos(z,z⁻)/τ}) ),  τ = 0.5
so triggered inputs are pulled to the clean representation and pushed away from the backdoored
one (no cross-entropy term in the reference). Reference schedule: 20 epochs over the clean subset,
batch 64, SGD momentum 0.9, weight decay 1e-4, lr 0.1 / 0.01 (epochs 1–9) / 0.001 (from 10).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import Trigger
from poisonlab.data.types import ImageSet
from poisonlab.defenses.finetuning import FineTuneConfig, fine_tune_loop
from poisonlab.defenses.neural_cleanse import (
    InversionConfig,
    InversionResult,
    NeuralCleanse,
    reverse_engineer_trigger,
)
from poisonlab.errors import ConfigError


def reference_inversion() -> InversionConfig:
    """MCL's stage-1 settings (additive δ, NC cost schedule with the reference constants)."""
    return InversionConfig(
        steps=100,
        batch_size=64,
        lr=0.1,
        betas=(0.5, 0.9),
        init_cost=1e-3,
        success_threshold=0.9,
        patience=10,
        cost_multiplier=1.5,
        early_stop=False,
        parametrization="additive",
    )


@dataclass
class MCLConfig:
    """Both stages; defaults are the reference settings."""

    inversion: InversionConfig = field(default_factory=reference_inversion)
    finetune: FineTuneConfig = field(default_factory=FineTuneConfig)
    temperature: float = 0.5
    ce_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"MCL temperature must be > 0, got {self.temperature}")


def model_contrastive_loss(
    z: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Mean over the batch of −log(e^{cos(z,z⁺)/τ} / (e^{cos(z,z⁺)/τ} + e^{cos(z,z⁻)/τ}))."""
    pos = F.cosine_similarity(z, z_pos, dim=1) / temperature
    neg = F.cosine_similarity(z, z_neg, dim=1) / temperature
    return -(pos - torch.logaddexp(pos, neg)).mean()


@dataclass
class PurifyResult:
    """The purified model, the target it was purified for, and the inverted trigger."""

    model: nn.Module
    target: int
    inversion: InversionResult
    losses: list[float]


class MCL:
    """`purify(model, clean, target)`: invert the target's trigger, then contrastive fine-tuning."""

    def __init__(self, cfg: MCLConfig | None = None) -> None:
        self.cfg = cfg or MCLConfig()

    def invert(self, model: nn.Module, clean: ImageSet, target: int) -> InversionResult:
        """Stage 1: the additive trigger δ that sends clean images to `target`."""
        return reverse_engineer_trigger(model, clean.x, target, self.cfg.inversion)

    def contrastive_finetune(self, model: nn.Module, clean: ImageSet, trigger: Trigger) -> tuple[nn.Module, list[float]]:
        """Stage 2 on a copy of `model` (θ_b = `model`, left untouched)."""
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(model)
        tau, ce_weight = self.cfg.temperature, self.cfg.ce_weight

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            xt = trigger.apply(x)
            with torch.no_grad():
                z_pos, z_neg = frozen.features(x), frozen.features(xt)
            value = model_contrastive_loss(m.features(xt), z_pos, z_neg, tau)
            if ce_weight > 0:
                value = value + ce_weight * F.cross_entropy(m(x), y)
            return value

        losses = fine_tune_loop(student, clean, self.cfg.finetune, loss)
        return student, losses

    def purify(self, model: nn.Module, clean: ImageSet, target: int) -> PurifyResult:
        """Both stages; returns a purified copy of `model`."""
        if not hasattr(model, "features"):
            raise ConfigError("MCL needs a model with a features(x) method (penultimate features)")
        inversion = self.invert(model, clean, target)
        purified, losses = self.contrastive_finetune(model, clean, inversion.trigger)
        return PurifyResult(purified, int(target), inversion, losses)


def detect_target(
    model: nn.Module, x: torch.Tensor, num_classes: int, cfg: InversionConfig | None = None
) -> tuple[int | None, dict]:
    """The target label from a Neural Cleanse scan: the flagged label with the largest anomaly
    index, or None when nothing is flagged; also returns the scan's summary."""
    result = NeuralCleanse(cfg).detect(model, x, num_classes)
    if not result.flagged:
        return None, result.to_dict()
    best = max(result.flagged, key=lambda label: float(result.anomaly_index[label]))
    return best, result.to_dict()
