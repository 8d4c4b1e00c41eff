"""The detection zoo's settings and its seeded model specs (see poisonlab.audit.detection_zoo):
which data set, trigger family, target and poison rate each model gets, and its trigger."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from poisonlab.attacks.triggers import (
    Trigger,
    blend_trigger,
    random_patch,
    sig_trigger,
    warp_trigger,
)
from poisonlab.audit.checks import DETECTORS, ScanConfig
from poisonlab.config import Seed, Settings
from poisonlab.errors import ConfigError
from poisonlab.models import Arch
from poisonlab.training.supervised import TrainConfig

FAMILIES = ("patch", "blend", "sig", "warp")
ZOO_DATASETS = ("mnist", "cifar10", "glyphs")
NUM_CLASSES = 10  # every zoo data set has ten classes
STATISTICS = {"nc": "anomaly index of the candidate label", "mmbd": "-log p"}


class Recipe(Settings):
    """How the models of one data set are trained: an architecture drawn from `archs`, a seeded
    subset of `train_size` training images (the same for every model of the zoo), `test_size`
    test images for BA, ASR and Neural Cleanse's clean sample, and a schedule (SGD with momentum
    0.9, weight decay 5e-4, cosine learning rate, no augmentation: a flip would move the
    patches)."""

    archs: tuple[Arch, ...] = ("small_cnn",)
    train_size: int = Field(10_000, ge=10)
    test_size: int = Field(2_000, ge=10)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0, allow_inf_nan=False)

    @field_validator("archs")
    @classmethod
    def _some(cls, archs: tuple[str, ...]) -> tuple[str, ...]:
        if not archs:
            raise ValueError("give at least one architecture")
        return archs

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


class Recipes(Settings):
    """One training recipe per zoo data set: short schedules sized for 2 CPU cores
    (benchmarks/bench_detection_zoo.py --estimate measures and extrapolates them)."""

    mnist: Recipe = Field(default_factory=lambda: Recipe(train_size=10_000, test_size=2_000,
                                                         epochs=4))
    cifar10: Recipe = Field(default_factory=lambda: Recipe(train_size=15_000, test_size=2_000,
                                                           epochs=4))
    glyphs: Recipe = Field(default_factory=lambda: Recipe(archs=("tiny_cnn", "small_cnn"),
                                                          train_size=5_000, test_size=1_000,
                                                          epochs=4))


def _subset(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """`values` without repeats when each is one of `allowed` (and there is one), else a
    ValueError naming the first unknown."""
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"unknown {what} '{unknown[0] if unknown else ''}' (known: "
                         f"{', '.join(allowed)})")
    return tuple(dict.fromkeys(values))


class ZooConfig(Settings):
    """The zoo's generator (backdoored, clean, seed, datasets, families, poison_rate,
    blend_alpha, recipes: what the models are) and the evaluation (asr_threshold, seeds,
    detectors, scan: how they are judged). Changing the first part makes another zoo (refused
    on an existing folder); the second can change between runs on one zoo."""

    backdoored: int = Field(20, ge=0)
    clean: int = Field(20, ge=0)
    seed: Seed = 0
    datasets: tuple[str, ...] = ZOO_DATASETS
    families: tuple[str, ...] = FAMILIES
    poison_rate: tuple[float, float] = (0.05, 0.2)
    blend_alpha: tuple[float, float] = (0.1, 0.2)
    recipes: Recipes = Field(default_factory=Recipes)
    asr_threshold: float = Field(0.8, gt=0, le=1)
    seeds: tuple[Seed, ...] = (0, 1, 2)
    detectors: tuple[str, ...] = tuple(DETECTORS)
    scan: ScanConfig = Field(default_factory=ScanConfig)

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(values, ZOO_DATASETS, "data set")

    @field_validator("families")
    @classmethod
    def _families(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(values, FAMILIES, "trigger family")

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d for d in DETECTORS if d in _subset(values, tuple(DETECTORS), "detector"))

    @field_validator("poison_rate", "blend_alpha")
    @classmethod
    def _interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high < 1:
            raise ValueError(f"must be 0 < low <= high < 1, got {list(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if not seeds:
            raise ValueError("give at least one seed")
        return tuple(dict.fromkeys(seeds))

    def generator_part(self) -> dict[str, Any]:
        """The settings that define the models (stored in zoo.json, compared on resume)."""
        keys = ("backdoored", "clean", "seed", "datasets", "families", "poison_rate",
                "blend_alpha")
        dumped = self.model_dump(mode="json")
        out = {k: dumped[k] for k in keys}
        out["recipes"] = {name: dumped["recipes"][name] for name in self.datasets}
        return out

    def recipe(self, dataset: str) -> Recipe:
        if dataset not in ZOO_DATASETS:
            raise ConfigError(f"no training recipe for data set '{dataset}' (recipes: "
                              f"{', '.join(ZOO_DATASETS)})")
        return getattr(self.recipes, dataset)


# --- specs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: what it is trained on, how, and with which backdoor (family None,
    trigger {}, target None and poison_rate None for a clean model)."""

    id: str
    dataset: str
    arch: str
    backdoored: bool
    family: str | None
    trigger: dict[str, Any]
    target: int | None
    poison_rate: float | None
    train_seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(**dict(data))


def _balanced(rng: np.random.Generator, values: Sequence[str], n: int) -> list[str]:
    """`n` values covering `values` as evenly as possible, in a shuffled order."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _crossed(rng: np.random.Generator, families: Sequence[str], datasets: Sequence[str],
             n: int) -> list[tuple[str, str]]:
    """`n` (family, data set) pairs: families as even as the count allows, each family spread
    over the data sets as evenly as it allows (model i: family i mod F, data set
    (i div F + i mod F) mod D, which also keeps the data sets' totals even), in a shuffled
    order with shuffled names."""
    fam = [families[i] for i in rng.permutation(len(families))]
    sets = [datasets[i] for i in rng.permutation(len(datasets))]
    f, d = len(fam), len(sets)
    pairs = [(fam[i % f], sets[(i // f + i % f) % d]) for i in range(n)]
    return [pairs[i] for i in rng.permutation(n)]


def generate_specs(cfg: ZooConfig) -> list[ModelSpec]:
    """The zoo's specs, all drawn from `cfg.seed`: the backdoored models first, then the clean
    ones; trigger families and data sets crossed and as balanced as the counts allow (20
    backdoored models: 5 per family, 7/7/6 per data set, every family on every data set)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x7A6F6F]))
    n_bd, n_clean = cfg.backdoored, cfg.clean
    crossed = _crossed(rng, cfg.families, cfg.datasets, n_bd)
    families = [f for f, _ in crossed]
    bd_sets = [d for _, d in crossed]
    clean_sets = _balanced(rng, cfg.datasets, n_clean)
    specs = []
    for i in range(n_bd + n_clean):
        backdoored = i < n_bd
        dataset = bd_sets[i] if backdoored else clean_sets[i - n_bd]
        arch = str(rng.choice(cfg.recipe(dataset).archs))
        train_seed = int(rng.integers(0, 2**31))
        trigger_seed = int(rng.integers(0, 2**31))
        target = int(rng.integers(0, NUM_CLASSES))
        rate = round(float(rng.uniform(*cfg.poison_rate)), 4)
        alpha = round(float(rng.uniform(*cfg.blend_alpha)), 4)
        if not backdoored:
            specs.append(ModelSpec(f"{i:03d}-{dataset}-clean", dataset, arch, False, None, {},
                                   None, None, train_seed))
            continue
        family = families[i]
        trigger: dict[str, Any] = {"family": family}
        if family in ("patch", "blend", "warp"):
            trigger["seed"] = trigger_seed
        if family == "blend":
            trigger["alpha"] = alpha
        specs.append(ModelSpec(f"{i:03d}-{dataset}-{family}", dataset, arch, True, family,
                               trigger, target, rate, train_seed))
    return specs


def build_trigger(spec: ModelSpec, image_shape: Sequence[int]) -> Trigger:
    """The trigger of a backdoored spec, for images of (C, H, W) `image_shape`."""
    if not spec.backdoored:
        raise ConfigError(f"model {spec.id} is clean: it has no trigger")
    t = spec.trigger
    family = t["family"]
    if family == "patch":
        return random_patch(image_shape, seed=t["seed"])
    if family == "blend":
        return blend_trigger(image_shape, alpha=t["alpha"], seed=t["seed"])
    if family == "sig":
        return sig_trigger(image_shape)
    if family == "warp":
        return warp_trigger(image_shape, seed=t["seed"])
    raise ConfigError(f"unknown trigger family '{family}' in spec {spec.id}")


# --- files -------------------------------------------------------------------------------------
