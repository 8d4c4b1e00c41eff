"""The contract every membership attack shares.

An attack answers one question per record: was it in the target model's training set? It sees
the target only through what the attacker queried (`Queried`: the records' labels and the
target's probability vectors, logits or predicted labels on them). Attacks that learn from
reference models (shadow models trained like the target on data the attacker owns, or reference
models trained on known halves of the records) get those models' queried outputs with their
membership masks (`Reference`) in `fit`; attacks that need none return themselves from `fit`.
`score(queried)` returns one membership score per record, higher = more likely a member; the ROC
metrics of poisonlab.metrics threshold them. `query(model, x, labels)` asks a model for exactly
what the attack scores; callers that keep outputs (e.g. cached logits) build `Queried` directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from poisonlab.attacks.membership.common import as_index, check_records
from poisonlab.config import Settings, make_settings
from poisonlab.errors import ShapeError
from poisonlab.training.supervised import predict_proba

QueryField = Literal["probs", "logits", "predicted"]


@dataclass(frozen=True)
class Queried:
    """What the attacker obtained from one model on N records with known labels.

    labels: [N] the records' class labels (any integer tensor; stored as int64).
    probs: [N, classes] the released probability vectors (after any output defence).
    logits: [A, N, classes] logits under A query views of the records (A = 1: the records alone).
    predicted: [Q, N] the labels predicted for Q perturbed queries of every record.
    An attack reads the field it needs (its `needs`) and ignores the others.
    """

    labels: torch.Tensor
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    predicted: torch.Tensor | None = None

    def __post_init__(self) -> None:
        labels = as_index(self.labels)
        object.__setattr__(self, "labels", labels)
        if self.probs is not None:
            check_records(self.probs, labels, "probs")
        if self.logits is not None:
            if self.logits.dim() != 3:
                raise ShapeError("logits must be [views, records, classes], got shape "
                                 f"{tuple(self.logits.shape)}")
            check_records(self.logits[0], labels, "logits")
        if self.predicted is not None and (self.predicted.dim() != 2
                                           or self.predicted.shape[1] != len(labels)):
            raise ShapeError(f"predicted labels must be [queries, {len(labels)}], got shape "
                             f"{tuple(self.predicted.shape)}")

    def __len__(self) -> int:
        return len(self.labels)

    def need(self, field: QueryField, attack: str) -> torch.Tensor:
        """The tensor in `field`, or a one-line ShapeError naming what `attack` is missing."""
        value = getattr(self, field)
        if value is None:
            raise ShapeError(f"the {attack} attack scores {field}: the queried outputs have none")
        return value


@dataclass(frozen=True)
class Reference:
    """One reference model as the attacker saw it: its outputs on records (`queried`) and which of
    those records it was trained on (`member`, bool [N]; 0/1 values are accepted)."""

    queried: Queried
    member: torch.Tensor

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.member).flatten()
        if m.numel() != len(self.queried):
            raise ShapeError(f"membership and labels differ in length ({m.numel()} vs "
                             f"{len(self.queried)})")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ShapeError("membership must be 0 (out) or 1 (in)")
        object.__setattr__(self, "member", m.bool())


class MembershipAttack(ABC):
    """Base of the membership attacks: `fit(references)` then `score(queried)` → scores [N].

    Subclasses set `name` (the registry key), `needs` (the field of Queried they score) and
    `Config` (their settings).
    """

    name: ClassVar[str]
    needs: ClassVar[QueryField] = "probs"
    Config: ClassVar[type[Settings]]

    def __init__(self, *, config: Any = None, seed: int = 0, **settings: Any) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = seed

    def fit(self, references: Sequence[Reference]) -> MembershipAttack:  # noqa: ARG002
        """Learn from reference models' outputs; attacks that need none return self."""
        return self

    @abstractmethod
    def score(self, queried: Queried) -> torch.Tensor:
        """Membership scores [N] (float), higher = more likely a member."""

    def query(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> Queried:
        """Ask `model` for what this attack scores on records x with their labels."""
        return Queried(labels, probs=predict_proba(model, x))
