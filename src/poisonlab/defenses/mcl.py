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

Two additions, both on by default, both switchable off for the reference's stage 2 exactly
(`MCL.Config.reference()`; `purify --distill-weight 0 --no-bn-recalibration`; in the experiment
`defense.distill_weight=0`, `defense.recalibrate_bn=false`). Both address the clean accuracy the
reference stage 2 loses on small clean subsets:
- `recalibrate_bn`: the student is trained in train mode on triggered inputs x + δ only, so its
  batch-norm running statistics end up describing x + δ, not clean images. They are re-estimated
  on the clean subset afterwards (a forward pass, no training); this matters most when the
  inverted δ covers the whole image (Blend).
- `distill_weight`: a self-distillation term on the clean inputs, KL(p_θb(x) ‖ p_θ(x)), keeps the
  student's clean predictions those of the backdoored model (which is accurate on clean inputs)
  while the contrastive term unlearns the trigger; with a few thousand clean images and lr 0.1 the
  reference loss alone lets the clean function drift.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import update_bn

from poisonlab.attacks.triggers import Trigger
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.defenses.finetuning import FineTuneConfig, fine_tune_loop
from poisonlab.defenses.neural_cleanse import (
    InversionConfig,
    InversionResult,
    reverse_engineer_trigger,
)
from poisonlab.errors import ShapeError
from poisonlab.progress import StatusFn

# MCL's stage-1 settings: additive δ, the NC cost schedule with the reference constants.
REFERENCE_INVERSION = InversionConfig(
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

    class Config(Settings):
        """Both stages: the reference settings plus the two additions of the module docstring
        (`MCL.Config.reference()` drops them).

        inversion: stage 1 (default: the reference's; a partial mapping changes only the keys
            it names). finetune: stage 2's schedule.
        temperature: τ of the contrastive loss.
        ce_weight: weight of an optional cross-entropy term on clean inputs (0 in the reference).
        distill_weight: weight of the clean self-distillation term (0 = the reference loss).
        recalibrate_bn: re-estimate batch-norm statistics on the clean images after stage 2.
        """

        inversion: InversionConfig = REFERENCE_INVERSION
        finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
        temperature: float = Field(0.5, gt=0)
        ce_weight: float = Field(0.0, ge=0)
        distill_weight: float = Field(1.0, ge=0)
        recalibrate_bn: bool = True

        @field_validator("inversion", mode="before")
        @classmethod
        def _on_reference(cls, value: Any) -> Any:
            """A mapping changes the reference stage 1, not Neural Cleanse's defaults."""
            if isinstance(value, dict):
                return {**REFERENCE_INVERSION.model_dump(), **value}
            return value

        @classmethod
        def reference(cls, **changes: Any) -> MCL.Config:
            """The reference implementation's stage 2 exactly: contrastive loss only, running
            statistics left as training leaves them."""
            return cls(**{"distill_weight": 0.0, "recalibrate_bn": False, **changes})

    def __init__(self, *, config: MCL.Config | None = None, seed: int = 0, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = int(seed)

    def invert(self, model: nn.Module, clean: ImageSet, target: int,
               progress: StatusFn | None = None) -> InversionResult:
        """Stage 1: the additive trigger δ that sends clean images to `target`."""
        return reverse_engineer_trigger(model, clean.x, target, self.config.inversion,
                                        seed=self.seed, progress=progress)

    def contrastive_finetune(self, model: nn.Module, clean: ImageSet, trigger: Trigger,
                             progress: StatusFn | None = None) -> tuple[nn.Module, list[float]]:
        """Stage 2 on a copy of `model` (θ_b = `model`, left untouched)."""
        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        student = copy.deepcopy(model)
        cfg = self.config

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            xt = trigger.apply(x)
            with torch.no_grad():
                z_pos, z_neg = frozen.features(x), frozen.features(xt)
            value = model_contrastive_loss(m.features(xt), z_pos, z_neg, cfg.temperature)
            if cfg.ce_weight > 0 or cfg.distill_weight > 0:
                logits = m(x)
                if cfg.ce_weight > 0:
                    value = value + cfg.ce_weight * F.cross_entropy(logits, y)
                if cfg.distill_weight > 0:
                    with torch.no_grad():
                        head = getattr(frozen, "head", None)
                        teacher = F.log_softmax(head(z_pos) if head is not None else frozen(x), 1)
                    value = value + cfg.distill_weight * F.kl_div(
                        F.log_softmax(logits, dim=1), teacher, log_target=True,
                        reduction="batchmean")
            return value

        losses = fine_tune_loop(student, clean, cfg.finetune, loss, progress, seed=self.seed)
        if cfg.recalibrate_bn:
            recalibrate_batchnorm(student, clean.x, cfg.finetune.batch_size)
        return student, losses

    def steps(self) -> int:
        """How many times `purify` calls its progress callback (at most: inversion may stop early)."""
        return self.config.inversion.steps + self.config.finetune.epochs

    def purify(self, model: nn.Module, clean: ImageSet, target: int,
               progress: StatusFn | None = None) -> PurifyResult:
        """Both stages; returns a purified copy of `model`. `progress(status)` is called after each
        inversion pass and each fine-tuning epoch."""
        if not hasattr(model, "features"):
            raise ShapeError("MCL needs a model with a features(x) method (penultimate features)")
        inversion = self.invert(model, clean, target, progress)
        purified, losses = self.contrastive_finetune(model, clean, inversion.trigger, progress)
        return PurifyResult(purified, int(target), inversion, losses)


def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 64) -> nn.Module:
    """Re-estimate `model`'s batch-norm running statistics on the images `x` (in place; weights
    unchanged); torch's `update_bn` does the pass (cumulative averages, modes restored)."""
    device = next(model.parameters()).device
    update_bn((x[i : i + batch_size] for i in range(0, len(x), batch_size)), model, device)
    return model.eval()

