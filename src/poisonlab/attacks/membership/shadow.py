"""Shadow-model membership inference.

Shokri, Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine Learning Models",
IEEE S&P 2017. Shadow models are trained like the target on data the attacker owns; their
probability vectors on their own training records ("in", label 1) and on held-out records ("out",
label 0) train a binary attack model, which is then applied to the target's probability vectors.
Default attack model: MLP classes → 16 → 16 → 1 with a sigmoid. Options: one attack model per
class (as in the paper), probability vectors sorted in decreasing order (class-agnostic), any
number of shadow models (pass one tensor per shadow model), and gradient-boosted trees
(scikit-learn's HistGradientBoostingClassifier) instead of the MLP: the trees see the probability
vector, the probability of the record's own label and, unless one model per class, that label as
a categorical feature, so they can learn per-class confidence thresholds in one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.membership.common import as_index, check_records
from poisonlab.errors import ConfigError, DataError


def attack_mlp(in_features: int, hidden: Sequence[int] = (16, 16)) -> nn.Sequential:
    """MLP in_features → hidden… → 1 (a logit; the sigmoid is applied by `infer`)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _cat(parts: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return parts if isinstance(parts, torch.Tensor) else torch.cat(list(parts))


class ShadowModelAttack:
    """Attack model(s) trained on shadow-model outputs; `fit(...)` then `infer(...)`."""

    def __init__(
        self,
        hidden: Sequence[int] = (16, 16),
        per_class: bool = False,
        sort_probs: bool = False,
        epochs: int = 200,
        lr: float = 1e-2,
        batch_size: int = 256,
        seed: int = 0,
        model: Literal["mlp", "boosting"] = "mlp",
    ) -> None:
        if epochs < 1 or lr <= 0 or batch_size < 1:
            raise ConfigError(f"need epochs >= 1, lr > 0, batch_size >= 1 (got {epochs}, {lr}, {batch_size})")
        if model not in ("mlp", "boosting"):
            raise ConfigError(f"unknown attack model '{model}' (known: mlp, boosting)")
        self.hidden, self.per_class, self.sort_probs = tuple(hidden), per_class, sort_probs
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.model = model
        self.models: dict[int, object] = {}  # an MLP or a fitted tree ensemble per group

    def _features(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = probs.float()
        x = p.sort(1, descending=True).values if self.sort_probs else p
        if self.model == "mlp":
            return x
        own = p.gather(1, labels[:, None])
        extra = [] if self.per_class else [labels[:, None].float()]
        return torch.cat([x, own, *extra], 1)

    def fit(
        self,
        probs: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor | Sequence[torch.Tensor],
        membership: torch.Tensor | Sequence[torch.Tensor],
    ) -> ShadowModelAttack:
        """Train on shadow probability vectors [N, classes] (or one tensor per shadow model), the
        records' class labels and membership (1 = in the shadow's training set, 0 = out)."""
        p, y, m = _cat(probs), as_index(_cat(labels)), _cat(membership).float().flatten()
        check_records(p, y, "shadow probs")
        if m.numel() != y.numel():
            raise DataError(f"membership and labels differ in length ({m.numel()} vs {y.numel()})")
        if not bool(((m == 0) | (m == 1)).all()):
            raise DataError("membership must be 0 (out) or 1 (in)")
        x = self._features(p, y)
        gen = torch.Generator().manual_seed(self.seed)
        groups = y.unique().tolist() if self.per_class else [-1]
        train = self._train_one if self.model == "mlp" else self._train_trees
        for c in groups:
            sel = (y == c) if c >= 0 else torch.ones_like(y, dtype=torch.bool)
            self.models[c] = train(x[sel], m[sel], gen)
        return self

    def _train_trees(self, x: torch.Tensor, m: torch.Tensor, gen: torch.Generator):
        from sklearn.ensemble import HistGradientBoostingClassifier

        if m.min() == m.max():
            raise DataError("the shadow records of a group are all in or all out: nothing to learn")
        categorical = [x.shape[1] - 1] if not self.per_class else None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        trees = HistGradientBoostingClassifier(categorical_features=categorical, random_state=seed)
        return trees.fit(x.numpy(), m.numpy())

    def _score(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.model == "mlp":
            return torch.sigmoid(model(x).squeeze(1))
        return torch.from_numpy(model.predict_proba(x.numpy())[:, 1]).float()

    def _train_one(self, x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> nn.Module:
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = attack_mlp(x.shape[1], self.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=self.lr)
        for _ in range(self.epochs):
            perm = torch.randperm(len(m), generator=gen)
            for i in range(0, len(m), self.batch_size):
                idx = perm[i : i + self.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), m[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.eval()

    @torch.no_grad()
    def infer(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Membership probabilities [N] of the target's probability vectors."""
        if not self.models:
            raise ConfigError("the shadow-model attack must be fitted before infer")
        labels = as_index(labels)
        check_records(probs, labels, "probs")
        x = self._features(probs, labels)
        if not self.per_class:
            return self._score(self.models[-1], x)
        out = torch.full((len(labels),), 0.5)
        for c, model in self.models.items():
            sel = labels == c
            if bool(sel.any()):
                out[sel] = self._score(model, x[sel])
        return out
