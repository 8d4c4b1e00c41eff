"""Settings of the targeted clean-label poisoning study (poisonlab.evaluation.metapoison).

Each technique keeps its own settings, nested: MetaPoison's are `MetaPoison.Config` (its
`budget` and `poison_choice` choose the poisons for both attacks), gradient matching's are
`GradientMatching.Config`, the victims' recipe is a `TrainConfig`. The defaults are the reference
quick start (wronnyhuang/metapoison): a 5,000-image CIFAR-10 subset (the first 500 images of each
class in file order), 50 dog poisons, bird targets, 24 surrogates, 61 craft steps, 8 victim
trials of 200 epochs with the surrogates' plain-SGD recipe.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from poisonlab.attacks.gradient_matching import GradientMatching
from poisonlab.attacks.metapoison import MetaPoison
from poisonlab.config import Distinct, Settings
from poisonlab.models import Arch
from poisonlab.training.supervised import TrainConfig


class DataConfig(Settings):
    """dataset: "cifar10" (from --data-dir), "folder" (an image folder at --data-dir: `train/`
    and `test/` sub-folders of class folders, or class folders whose last `test_fraction` of each
    class is the test split), "glyphs" (the embedded set, grey glyphs as RGB padded to 32×32, no
    files), "auto" (cifar10 when --data-dir is given, else glyphs).
    train_per_class: the training subset, the first images of each class in file order (the
    reference's 500 = 5,000 images); None keeps the whole training set.
    test_size: test images for the victims' clean accuracy (the first ones; None: all).
    test_fraction: the test share of each class of a folder without train/test sub-folders."""

    dataset: Literal["auto", "cifar10", "folder", "glyphs"] = "cifar10"
    train_per_class: int | None = Field(500, ge=1)
    test_size: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)


class TargetConfig(Settings):
    """poison_class: the class whose images are perturbed (reference: dog = 5);
    target_class: the class of the target images (bird = 2); adv_class: the class the target
    should be taken for (None: the poison class, as the reference); ids: the targets, indices
    among the test images of the target class (the reference README: 0 and 6 work best)."""

    poison_class: int = Field(5, ge=0)
    target_class: int = Field(2, ge=0)
    adv_class: int | None = Field(None, ge=0)
    ids: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)

    @model_validator(mode="after")
    def _distinct(self) -> TargetConfig:
        if self.target_class == self.poison_class:
            raise ValueError("target_class must differ from poison_class (clean-label poisons "
                             "of the target's own class)")
        if not self.ids or min(self.ids) < 0 or len(set(self.ids)) != len(self.ids):
            raise ValueError(f"ids must be distinct non-negative target indices, got {list(self.ids)}")
        return self

    @property
    def adversarial(self) -> int:
        return self.poison_class if self.adv_class is None else self.adv_class


class VictimConfig(Settings):
    """archs: the victim architectures (the first is the headline victim); trials: victims per
    (attack, target, architecture), trial k trained with seed + k for every attack, so the
    unperturbed baseline and the poisoned victims are paired; transfer_trials: the trials of the
    architectures after the first (None: `trials`; fewer keeps the transfer victims affordable);
    train: the from-scratch recipe (also the recipe of gradient matching's surrogate on the clean
    subset)."""

    archs: Annotated[tuple[Arch, ...], Distinct] = Field(
        ("convnet_bn", "resnet20", "small_cnn"), min_length=1)
    trials: int = Field(8, ge=1)
    transfer_trials: int | None = Field(None, ge=1)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=200, batch_size=125, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="step",
        milestones=(100, 150), augment=False))


    def trials_of(self, arch: str) -> int:
        """Victim trials of architecture `arch`."""
        if arch == self.archs[0] or self.transfer_trials is None:
            return self.trials
        return self.transfer_trials


class StudyConfig(Settings):
    """data, targets, victims: above. surrogates: the architectures the poisons are crafted on
    (the first gives the headline numbers; each is evaluated on every victim architecture, the
    transfer matrix). metapoison: MetaPoison's settings (also the budget and poison choice of
    both attacks). gradient_matching: its settings, at MetaPoison's ε by default so the two
    compare at one budget; attacks: which attacks to run."""

    data: DataConfig = Field(default_factory=DataConfig)
    targets: TargetConfig = Field(default_factory=TargetConfig)
    victims: VictimConfig = Field(default_factory=VictimConfig)
    surrogates: Annotated[tuple[Arch, ...], Distinct] = ("convnet_bn",)
    metapoison: MetaPoison.Config = Field(default_factory=MetaPoison.Config)
    gradient_matching: GradientMatching.Config = Field(
        default_factory=lambda: GradientMatching.Config(epsilon=8 / 255))
    attacks: Annotated[tuple[Literal["metapoison", "gradient_matching"], ...], Distinct] = (
        "metapoison", "gradient_matching")

    @model_validator(mode="after")
    def _nonempty(self) -> StudyConfig:
        if not self.surrogates or not self.attacks:
            raise ValueError("surrogates and attacks must each name at least one")
        return self
