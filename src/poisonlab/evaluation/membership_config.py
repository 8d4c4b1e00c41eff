"""Settings of the membership-inference study (poisonlab.evaluation.membership).

Each section is a technique's own settings, nested: the target's recipe is a TrainConfig, the
attacks' sections are their `Config`s, DP-SGD's is `DPSGD.Config`. Where the study needs more
than the technique (how many shadow models, how many records the label-only attack queries),
the section extends the technique's Config by those fields, so every setting is declared once.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from poisonlab.attacks.membership import LabelOnlyAttack, LiRA, ShadowModelAttack, ThresholdAttack
from poisonlab.config import Distinct, Settings
from poisonlab.defenses.dp_sgd import DPSGD
from poisonlab.defenses.membership_outputs import Rounding, TopK
from poisonlab.models import Arch
from poisonlab.training.supervised import TrainConfig

ATTACKS = ("shadow", "lira_online", "lira_offline", "label_only", "threshold")
DEFENSES = ("none", "dropout", "early_stopping", "dp_sgd", "labels_only", "rounding", "top_k")
RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]

AttackName = Literal["shadow", "lira_online", "lira_offline", "label_only", "threshold"]
DefenseName = Literal["none", "dropout", "early_stopping", "dp_sgd", "labels_only", "rounding",
                      "top_k"]


class DataConfig(Settings):
    """dataset: the supervised set (auto: MNIST when a data folder is given, else the embedded
    glyphs). part_size: records in each of the four disjoint parts (target-in, target-out,
    shadow-in, shadow-out). test_size: test records for the targets' test accuracy (None: all).
    downsample: average-pool factor of the images."""

    dataset: Literal["auto", "cifar10", "mnist", "glyphs"] = "cifar10"
    part_size: int = Field(12500, ge=10)
    test_size: int | None = Field(None, ge=10)
    downsample: int = Field(1, ge=1)


class ShadowStudy(ShadowModelAttack.Config):
    """The shadow-model attack's settings, and count: shadow models per architecture (the first
    trains on shadow-in; every further one on a random half of shadow-in ∪ shadow-out)."""

    count: int = Field(1, ge=1)


class LiRAStudy(LiRA.Config):
    """LiRA's settings (`online` is set by the attack name: lira_online, lira_offline), and
    shadows: reference models on random halves of target-in ∪ target-out; flip_query: also query
    the horizontally flipped records (scores averaged); reuse_shadow: the Shokri shadows of the
    target's architecture, trained on disjoint data, join as OUT models."""

    shadows: int = Field(16, ge=2)
    flip_query: bool = True
    reuse_shadow: bool = True


class LabelOnlyStudy(LabelOnlyAttack.Config):
    """The label-only attack's settings, and records: evaluated records, half members (each
    costs many queries)."""

    records: int = Field(2000, ge=2)


class DefenseConfig(Settings):
    """defenses: the ones measured. attack: the attack every defence is measured with.
    dropout: rate before the final linear layer. early_stopping_epochs: the target's recipe (and
    learning-rate schedule) cut to this many epochs. rounding, top_k: the output defences'
    settings. dp: DP-SGD's."""

    defenses: Annotated[list[DefenseName], Distinct] = Field(default_factory=lambda: list(DEFENSES), min_length=1)
    attack: Literal["shadow", "threshold"] = "shadow"
    dropout: float = Field(0.5, gt=0, lt=1)
    early_stopping_epochs: int = Field(25, ge=1)
    rounding: Rounding.Config = Field(default_factory=Rounding.Config)
    top_k: TopK.Config = Field(default_factory=TopK.Config)
    dp: DPSGD.Config = Field(default_factory=DPSGD.Config)


class MatrixConfig(Settings):
    """Target × shadow architectures of the shadow attack; with dropout: again with
    dropout-trained targets (rate defense.dropout)."""

    targets: Annotated[list[Arch], Distinct] = Field(default_factory=lambda: list(RESNETS))
    shadows: Annotated[list[Arch], Distinct] = Field(default_factory=lambda: list(RESNETS))
    dropout: bool = True


class StudyConfig(Settings):
    """attacks: the ones run on the target. arch: the target's architecture (the shadows mimic
    it). train: the recipe of the target and of every shadow and reference model (the seed's
    target overfits: no augmentation)."""

    attacks: Annotated[list[AttackName], Distinct] = Field(default_factory=lambda: list(ATTACKS), min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    arch: Arch = "resnet20"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=100, channels_last=True))
    shadow: ShadowStudy = Field(default_factory=ShadowStudy)
    lira: LiRAStudy = Field(default_factory=LiRAStudy)
    label_only: LabelOnlyStudy = Field(default_factory=LabelOnlyStudy)
    threshold: ThresholdAttack.Config = Field(default_factory=ThresholdAttack.Config)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)
    matrix: MatrixConfig = Field(default_factory=MatrixConfig)

    @model_validator(mode="after")
    def _early_stopping_stops_early(self) -> StudyConfig:
        stop = self.defense.early_stopping_epochs
        if "early_stopping" in self.defense.defenses and stop >= self.train.epochs:
            raise ValueError(f"defense.early_stopping_epochs={stop} must be fewer than the "
                             f"target's train.epochs={self.train.epochs}")
        return self
