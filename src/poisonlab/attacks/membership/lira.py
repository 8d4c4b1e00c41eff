"""Likelihood-ratio attack (LiRA).

Carlini, Chien, Nasr, Song, Terzis, Tramèr, "Membership Inference Attacks From First Principles",
IEEE S&P 2022. N shadow models are trained on random halves of a data pool, so every record is IN
for about half of them. For each record the logit-scaled confidence φ = log(p_y) − log(Σ_{j≠y} p_j)
is fitted with a Gaussian over the IN models and one over the OUT models. Online: the score is the
log-likelihood ratio log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²) of the target's φ. Offline
(OUT models only): the one-sided z-score (φ − μ_out) / σ_out. With several augmented queries (e.g.
the flipped image) each query gets its own fit and the scores are averaged. global_variance uses
one pooled variance for all records (better with few shadow models).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from poisonlab.attacks.membership.common import as_index, logit_confidence
from poisonlab.errors import ConfigError, DataError
from poisonlab.training.supervised import predict_logits

Transform = Callable[[torch.Tensor], torch.Tensor]


def random_halves(num_models: int, num_records: int, generator: torch.Generator) -> torch.Tensor:
    """Bool [num_models, num_records]: each record is IN for exactly ⌊num_models/2⌋ models, the
    models chosen at random per record (the split of Carlini et al.)."""
    if num_models < 2:
        raise ConfigError(f"LiRA needs at least 2 shadow models, got {num_models}")
    order = torch.rand(num_models, num_records, generator=generator).argsort(0)
    return order < num_models // 2


def _masked_fit(stats: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-record mean and variance [N, A] of stats [S, N, A] over the models where mask [S, N]."""
    m = mask[:, :, None].to(stats.dtype)
    count = m.sum(0)
    mean = (m * stats).sum(0) / count.clamp_min(1)
    var = (m * (stats - mean) ** 2).sum(0) / count.clamp_min(1)
    return mean, var


def _log_normal(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * math.pi * var))


class LiRA:
    """Online or offline LiRA; `query` computes φ per augmentation, `infer` scores the target."""

    def __init__(
        self,
        online: bool = True,
        global_variance: bool = False,
        augmentations: Sequence[Transform] | None = None,
        min_var: float = 1e-6,
    ) -> None:
        self.online, self.global_variance = online, global_variance
        self.augmentations = list(augmentations) if augmentations else [lambda x: x]
        self.min_var = min_var

    def query(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logit-scaled confidences [N, A] of `model` on x under each augmentation."""
        labels = as_index(labels)
        cols = [logit_confidence(predict_logits(model, t(x)), labels) for t in self.augmentations]
        return torch.stack(cols, 1)

    def _variance(self, var: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Per-record variances; records with fewer than 2 observations (or all, when
        global_variance) use the variance pooled over the records."""
        enough = count >= 2
        pooled = var[enough].mean(0) if bool(enough.any()) else torch.ones(var.shape[1])
        if self.global_variance:
            return pooled.expand_as(var).clamp_min(self.min_var)
        return torch.where(enough[:, None], var, pooled).clamp_min(self.min_var)

    def infer(
        self, target_stats: torch.Tensor, shadow_stats: torch.Tensor, shadow_in: torch.Tensor
    ) -> torch.Tensor:
        """Scores [N] from the target's φ [N, A] (or [N]), the shadows' φ [S, N, A] (or [S, N]) and
        membership of each record in each shadow's training set, bool [S, N]."""
        t = target_stats if target_stats.dim() == 2 else target_stats[:, None]
        s = shadow_stats if shadow_stats.dim() == 3 else shadow_stats[:, :, None]
        m = shadow_in.bool()
        if s.shape[1:] != t.shape or m.shape != s.shape[:2]:
            raise DataError(
                f"LiRA shapes disagree: target {tuple(t.shape)}, shadows {tuple(s.shape)}, "
                f"membership {tuple(m.shape)}"
            )
        t, s = t.double(), s.double()
        out_mean, out_var = _masked_fit(s, ~m)
        out_var = self._variance(out_var, (~m).sum(0))
        if int((~m).sum(0).min()) == 0:
            raise DataError("every record needs at least one shadow model that did not train on it")
        if not self.online:
            return ((t - out_mean) / out_var.sqrt()).mean(1).float()
        if int(m.sum(0).min()) == 0:
            raise DataError("online LiRA needs at least one shadow model trained on every record")
        in_mean, in_var = _masked_fit(s, m)
        in_var = self._variance(in_var, m.sum(0))
        llr = _log_normal(t, in_mean, in_var) - _log_normal(t, out_mean, out_var)
        return llr.mean(1).float()
