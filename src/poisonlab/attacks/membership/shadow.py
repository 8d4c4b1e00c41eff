"""Shadow-model membership inference.

Shokri, Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine Learning Models",
IEEE S&P 2017. Shadow models are trained like the target on data the attacker owns; their
probability vectors on their own training records ("in", label 1) and on held-out records ("out",
label 0) train a binary attack model, which is then applied to the target's probability vectors.
Default attack model: MLP classes → 16 → 16 → 1 with a sigmoid. Options: one attack model per
class (as in the paper), probability vectors sorted in decreasing order (class-agnostic), any
number of shadow models (one Reference each), and gradient-boosted trees (scikit-learn's
HistGradientBoostingClassifier) instead of the MLP: the trees see the probability vector, the
probability of the record's own label and, unless one model per class, that label as a
categorical feature, so they can learn per-class confidence thresholds in one model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.membership.base import MembershipAttack, Queried, Reference
from poisonlab.config import Settings
from poisonlab.errors import DataError, ShapeError


def attack_mlp(in_features: int, hidden: Sequence[int] = (16, 16)) -> nn.Sequential:
    """MLP in_features → hidden… → 1 (a logit; the sigmoid is applied by `score`)."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class ShadowModelAttack(MembershipAttack):
    """Attack model(s) fitted on the shadow models' probability vectors (`fit(references)`), then
    applied to the target's (`score(queried)`: membership probabilities)."""

    name = "shadow"
    needs = "probs"

    class Config(Settings):
        """hidden: widths of the attack MLP's hidden layers. per_class: one attack model per class
        (as in the paper). sort_probs: probability vectors sorted in decreasing order.
        epochs, lr, batch_size: the attack MLP's Adam training. model: "mlp" or "boosting"
        (gradient-boosted trees, the `sklearn` optional dependency)."""

        hidden: tuple[Annotated[int, Field(ge=1)], ...] = Field((16, 16), min_length=1)
        per_class: bool = False
        sort_probs: bool = False
        epochs: int = Field(200, ge=1)
        lr: float = Field(1e-2, gt=0)
        batch_size: int = Field(256, ge=1)
        model: Literal["mlp", "boosting"] = "mlp"

    def __init__(self, *, config: Config | None = None, seed: int = 0, **settings) -> None:
        super().__init__(config=config, seed=seed, **settings)
        self.models: dict[int, object] = {}  # an MLP or a fitted tree ensemble per group

    def _features(self, probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = probs.float()
        x = p.sort(1, descending=True).values if self.config.sort_probs else p
        if self.config.model == "mlp":
            return x
        own = p.gather(1, labels[:, None])
        extra = [] if self.config.per_class else [labels[:, None].float()]
        return torch.cat([x, own, *extra], 1)

    def fit(self, references: Sequence[Reference]) -> ShadowModelAttack:
        """Train on every shadow model's probability vectors, the records' labels and membership
        (in the shadow's training set or not)."""
        if not references:
            raise ShapeError("the shadow-model attack needs at least one shadow model's outputs")
        p = torch.cat([r.queried.need("probs", self.name) for r in references])
        y = torch.cat([r.queried.labels for r in references])
        m = torch.cat([r.member for r in references]).float()
        x = self._features(p, y)
        gen = torch.Generator().manual_seed(self.seed)
        groups = y.unique().tolist() if self.config.per_class else [-1]
        train = self._train_one if self.config.model == "mlp" else self._train_trees
        for c in groups:
            sel = (y == c) if c >= 0 else torch.ones_like(y, dtype=torch.bool)
            self.models[c] = train(x[sel], m[sel], gen)
        return self

    def _train_trees(self, x: torch.Tensor, m: torch.Tensor, gen: torch.Generator):
        from sklearn.ensemble import HistGradientBoostingClassifier

        if m.min() == m.max():
            raise DataError("the shadow records of a group are all in or all out: nothing to learn")
        categorical = [x.shape[1] - 1] if not self.config.per_class else None
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        trees = HistGradientBoostingClassifier(categorical_features=categorical, random_state=seed)
        return trees.fit(x.numpy(), m.numpy())

    def _score(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.config.model == "mlp":
            return torch.sigmoid(model(x).squeeze(1))
        return torch.from_numpy(model.predict_proba(x.numpy())[:, 1]).float()

    def _train_one(self, x: torch.Tensor, m: torch.Tensor, gen: torch.Generator) -> nn.Module:
        c = self.config
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        model = attack_mlp(x.shape[1], c.hidden)
        opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        for _ in range(c.epochs):
            perm = torch.randperm(len(m), generator=gen)
            for i in range(0, len(m), c.batch_size):
                idx = perm[i : i + c.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(x[idx]).squeeze(1), m[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return model.eval()

    @torch.no_grad()
    def score(self, queried: Queried) -> torch.Tensor:
        """Membership probabilities [N] of the target's probability vectors."""
        if not self.models:
            raise ShapeError("the shadow-model attack must be fitted before score")
        probs, labels = queried.need("probs", self.name), queried.labels
        x = self._features(probs, labels)
        if not self.config.per_class:
            return self._score(self.models[-1], x)
        out = torch.full((len(labels),), 0.5)
        for c, model in self.models.items():
            sel = labels == c
            if bool(sel.any()):
                out[sel] = self._score(model, x[sel])
        return out
