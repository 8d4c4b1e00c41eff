"""Label-only membership inference from the robustness of the predicted label.

Choquette-Choo, Tramèr, Carlini, Papernot, "Label-Only Membership Inference Attacks", ICML 2021.
The attacker sees only predicted labels. Training records tend to stay correctly classified under
small perturbations (the model is further from its decision boundary there), so the score is the
fraction of queries — the record under each augmentation (flips, shifts of a few pixels) and
under random Gaussian noise — whose predicted label equals the true label. This shows that hiding
the scores (labels-only output) does not stop membership inference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.membership.base import MembershipAttack, Queried
from poisonlab.attacks.membership.common import as_index
from poisonlab.config import Settings
from poisonlab.errors import ShapeError
from poisonlab.training.supervised import predict_logits

Transform = Callable[[torch.Tensor], torch.Tensor]
LabelOracle = Callable[[torch.Tensor], torch.Tensor]


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate images [N, C, H, W] by (dy, dx) pixels, filling with zeros."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))
    return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]


def default_augmentations(max_shift: int = 1, flip: bool = True) -> list[Transform]:
    """Identity, every shift by up to `max_shift` pixels on each axis, and each with a flip."""
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    out: list[Transform] = [lambda x, s=s: shift(x, *s) for s in shifts]
    if flip:
        out += [lambda x, s=s: shift(x.flip(-1), *s) for s in shifts]
    return out


def label_oracle(model: nn.Module) -> LabelOracle:
    """The model behind a labels-only interface: x -> predicted labels [N]."""
    return lambda x: predict_logits(model, x).argmax(1)


class LabelOnlyAttack(MembershipAttack):
    """Fraction of perturbed queries still labelled correctly (`Queried.predicted` [Q, N], as
    returned by `query(oracle, x, labels)`); needs no references."""

    name = "label_only"
    needs = "predicted"

    class Config(Settings):
        """max_shift: the queries shift each record by up to this many pixels on each axis (0:
        the record alone). flip: each shift also of the horizontally flipped record.
        noise_samples: further queries with Gaussian noise of standard deviation noise_std
        (clamped to [0, 1])."""

        max_shift: int = Field(1, ge=0)
        flip: bool = True
        noise_std: float = Field(0.0, ge=0)
        noise_samples: int = Field(0, ge=0)

        @model_validator(mode="after")
        def _noise(self) -> LabelOnlyAttack.Config:
            if self.noise_samples > 0 and self.noise_std == 0:
                raise ValueError("noise_samples > 0 needs noise_std > 0")
            return self

    def __init__(self, *, config: Config | None = None, seed: int = 0, **settings) -> None:
        super().__init__(config=config, seed=seed, **settings)
        self.augmentations = default_augmentations(self.config.max_shift, self.config.flip)

    @torch.no_grad()
    def query(self, model: nn.Module | LabelOracle, x: torch.Tensor,
              labels: torch.Tensor) -> Queried:
        """Predicted labels [Q, N] of the oracle (a model is wrapped by label_oracle) on x under
        every augmentation, then under `noise_samples` noise draws seeded by the attack's seed."""
        oracle = label_oracle(model) if isinstance(model, nn.Module) else model
        labels = as_index(labels)
        if x.shape[0] != labels.shape[0]:
            raise ShapeError(f"images and labels differ in length ({x.shape[0]} vs "
                             f"{labels.shape[0]})")
        gen = torch.Generator().manual_seed(self.seed)
        predicted = [oracle(t(x)).cpu() for t in self.augmentations]
        for _ in range(self.config.noise_samples):
            noise = torch.randn(x.shape, generator=gen) * self.config.noise_std
            predicted.append(oracle((x + noise.to(x.device)).clamp(0, 1)).cpu())
        return Queried(labels, predicted=torch.stack(predicted).long())

    def score(self, queried: Queried) -> torch.Tensor:
        """Scores [N] in [0, 1]: the share of queries whose predicted label is the true one."""
        predicted = queried.need("predicted", self.name)
        return (predicted == queried.labels).float().sum(0) / predicted.shape[0]
