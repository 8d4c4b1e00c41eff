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
from pydantic import Field
from torch import nn

from poisonlab.attacks.membership.base import MembershipAttack, Queried, Reference
from poisonlab.attacks.membership.common import as_index, logit_confidence
from poisonlab.config import Settings
from poisonlab.errors import ConfigError, DataError, ShapeError
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


class LiRA(MembershipAttack):
    """Online or offline LiRA on logits under the query views (`Queried.logits` [A, N, classes]):
    `fit` on reference models trained on known halves of the records, `score` the target on the
    same records. `augmentations` are the query views (default: the records alone)."""

    name = "lira"
    needs = "logits"

    class Config(Settings):
        """online: the likelihood ratio of IN and OUT fits (False: the offline z-score against
        the OUT fit). global_variance: one variance pooled over the records. min_var: floor of
        every fitted variance."""

        online: bool = True
        global_variance: bool = False
        min_var: float = Field(1e-6, gt=0)

    def __init__(self, augmentations: Sequence[Transform] | None = None, *,
                 config: Config | None = None, seed: int = 0, **settings) -> None:
        super().__init__(config=config, seed=seed, **settings)
        self.augmentations = list(augmentations) if augmentations else [lambda x: x]
        self._fit: dict[str, torch.Tensor] = {}

    def query(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Queried:
        """Logits [A, N, classes] of `model` on x under each augmentation."""
        return Queried(labels, logits=torch.stack([predict_logits(model, t(x))
                                                   for t in self.augmentations]))

    def confidences(self, queried: Queried) -> torch.Tensor:
        """Logit-scaled confidences φ [N, A] of the queried logits, one column per view."""
        logits, labels = queried.need("logits", self.name), as_index(queried.labels)
        return torch.stack([logit_confidence(view, labels) for view in logits], 1)

    def _variance(self, var: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Per-record variances; records with fewer than 2 observations (or all, when
        global_variance) use the variance pooled over the records."""
        enough = count >= 2
        pooled = var[enough].mean(0) if bool(enough.any()) else torch.ones(var.shape[1])
        if self.config.global_variance:
            return pooled.expand_as(var).clamp_min(self.config.min_var)
        return torch.where(enough[:, None], var, pooled).clamp_min(self.config.min_var)

    def fit(self, references: Sequence[Reference]) -> LiRA:
        """Gaussian fits per record (and view) of the references' φ over the models that trained
        on it (IN, online only) and those that did not (OUT)."""
        stats = [self.confidences(r.queried) for r in references]
        if not stats or any(s.shape != stats[0].shape for s in stats):
            raise ShapeError("LiRA shapes disagree: the reference models need φ of one shape, got "
                             f"{[tuple(s.shape) for s in stats]}")
        s = torch.stack(stats).double()
        m = torch.stack([r.member for r in references])
        out_mean, out_var = _masked_fit(s, ~m)
        out_var = self._variance(out_var, (~m).sum(0))
        if int((~m).sum(0).min()) == 0:
            raise DataError("every record needs at least one shadow model that did not train on it")
        self._fit = {"out_mean": out_mean, "out_var": out_var}
        if self.config.online:
            if int(m.sum(0).min()) == 0:
                raise DataError("online LiRA needs at least one shadow model trained on every record")
            in_mean, in_var = _masked_fit(s, m)
            self._fit |= {"in_mean": in_mean, "in_var": self._variance(in_var, m.sum(0))}
        return self

    def score(self, queried: Queried) -> torch.Tensor:
        """Scores [N]: the log-likelihood ratio (online) or z-score (offline), averaged over views."""
        if not self._fit:
            raise ShapeError("LiRA must be fitted before score")
        t = self.confidences(queried).double()
        f = self._fit
        if t.shape != f["out_mean"].shape:
            raise ShapeError(f"LiRA shapes disagree: target φ {tuple(t.shape)}, references "
                             f"{tuple(f['out_mean'].shape)}")
        if not self.config.online:
            return ((t - f["out_mean"]) / f["out_var"].sqrt()).mean(1).float()
        llr = (_log_normal(t, f["in_mean"], f["in_var"])
               - _log_normal(t, f["out_mean"], f["out_var"]))
        return llr.mean(1).float()
