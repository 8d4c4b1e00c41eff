"""Experiment `membership`: membership inference on an overfit classifier, attacks and defences.

Wires: a supervised training set split into four disjoint parts (target-in, target-out,
shadow-in, shadow-out; Shokri et al. 2017) → the target trained on target-in, shadow models
trained on the shadow parts, LiRA shadow models on random halves of target-in ∪ target-out
(Carlini et al. 2022) → the attacks shadow (attack MLP), lira_online, lira_offline, label_only
(Choquette-Choo et al. 2021) and threshold (Yeom et al. 2018), each scored on target-in (members)
against target-out (non-members) → the defences (dropout, early stopping, DP-SGD, labels only,
rounding, top-k),
each as a pair of the stated attack's numbers and the target's test accuracy → the target ×
shadow architecture matrix of the shadow attack's accuracy, with normal and dropout-trained
targets → figures and an HTML report. Every trained model, query and score is kept in the run,
so `--resume` skips what is done.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from poisonlab.attacks.membership import (
    LabelOnlyAttack,
    LiRA,
    ShadowModelAttack,
    ThresholdAttack,
    default_augmentations,
    random_halves,
)
from poisonlab.attacks.membership.label_only import label_oracle
from poisonlab.config import BaseConfig
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.defenses.membership_outputs import OUTPUT_DEFENSES, apply_output_defense
from poisonlab.device import default_device, seed_everything
from poisonlab.errors import ConfigError
from poisonlab.metrics import membership_metrics
from poisonlab.models import available_models, build_model
from poisonlab.runs import Run
from poisonlab.training.supervised import (
    RunCheckpoint,
    TrainConfig,
    place,
    predict_logits,
    train_classifier,
)

NAME = "membership"
ATTACKS = ("shadow", "lira_online", "lira_offline", "label_only", "threshold")
DEFENSES = ("none", "dropout", "early_stopping", "dp_sgd", "labels_only", "rounding", "top_k")
RESNETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
PARTS = ("target_in", "target_out", "shadow_in", "shadow_out")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _known_arch(name: str) -> str:
    if name not in available_models():
        raise ValueError(f"unknown architecture '{name}' (known: {', '.join(available_models())})")
    return name


class DataConfig(_Section):
    dataset: Literal["auto", "cifar10", "mnist", "glyphs"] = "cifar10"  # auto: mnist if --data-dir
    part_size: int = Field(12500, ge=10)  # records in each of the four disjoint parts
    test_size: int | None = Field(None, ge=10)  # test records for the targets' test accuracy
    downsample: int = Field(1, ge=1)  # average-pool factor (smoke: 14×14 glyphs)


class TrainSection(_Section):
    """How the target and every shadow model are trained (the shadows mimic the target)."""

    arch: str = "resnet20"  # the target of the attacks and defences
    epochs: int = Field(100, ge=1)  # early stopping: fewer epochs
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "onecycle", "step", "none"] = "cosine"
    augment: bool = False  # the seed's target overfits: no augmentation
    channels_last: bool = True

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _known_arch(v)


class ShadowSection(_Section):
    """Shokri et al.'s attack: shadow models and the attack MLP (classes → hidden… → 1)."""

    count: int = Field(1, ge=1)  # shadows per architecture; beyond the first: halves of shadow-in ∪ out
    hidden: list[int] = Field(default_factory=lambda: [16, 16], min_length=1)
    per_class: bool = False
    sort_probs: bool = False
    attack_model: Literal["mlp", "boosting"] = "mlp"  # boosting: gradient-boosted trees
    epochs: int = Field(200, ge=1)
    lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(256, ge=1)


class LiRASection(_Section):
    shadows: int = Field(16, ge=2)  # models on random halves of target-in ∪ target-out
    global_variance: bool = False
    flip_query: bool = True  # also query the horizontally flipped image; scores averaged
    reuse_shadow: bool = True  # Shokri shadows of the target's architecture join as OUT models


class LabelOnlySection(_Section):
    records: int = Field(2000, ge=2)  # evaluated records, half members (each costs many queries)
    max_shift: int = Field(1, ge=0)
    flip: bool = True
    noise_std: float = Field(0.0, ge=0)
    noise_samples: int = Field(0, ge=0)


class DPSection(_Section):
    """DP-SGD (Abadi et al. 2016): give noise_multiplier or target_epsilon (the other null)."""

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.5, gt=0)
    momentum: float = Field(0.9, ge=0)
    noise_multiplier: float | None = Field(1.0, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float | None = Field(None, gt=0, lt=1)  # None: 1 / training records
    accountant: Literal["rdp", "prv", "gdp"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_setting(self) -> DPSection:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        return self


class DefenseSection(_Section):
    defenses: list[Literal["none", "dropout", "early_stopping", "dp_sgd", "labels_only",
                           "rounding", "top_k"]] = (
        Field(default_factory=lambda: list(DEFENSES), min_length=1))
    attack: Literal["shadow", "threshold"] = "shadow"  # the attack every defence is measured with
    dropout: float = Field(0.5, gt=0, lt=1)  # before the final linear layer
    # early stopping: the target's recipe (and learning-rate schedule) cut to this many epochs
    early_stopping_epochs: int = Field(25, ge=1)
    decimals: int = Field(1, ge=0)  # rounding
    top_k: int = Field(1, ge=1)
    dp: DPSection = Field(default_factory=DPSection)


class MatrixSection(_Section):
    """Target × shadow architectures, shadow-attack accuracy; again with dropout-trained targets."""

    targets: list[str] = Field(default_factory=lambda: list(RESNETS))
    shadows: list[str] = Field(default_factory=lambda: list(RESNETS))
    dropout: bool = True

    @field_validator("targets", "shadows")
    @classmethod
    def _archs(cls, v: list[str]) -> list[str]:
        return [_known_arch(a) for a in v]


class Config(BaseConfig):
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 keeps torch's default
    attacks: list[Literal["shadow", "lira_online", "lira_offline", "label_only", "threshold"]] = (
        Field(default_factory=lambda: list(ATTACKS), min_length=1))
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    shadow: ShadowSection = Field(default_factory=ShadowSection)
    lira: LiRASection = Field(default_factory=LiRASection)
    label_only: LabelOnlySection = Field(default_factory=LabelOnlySection)
    threshold_score: Literal["loss", "confidence", "max_confidence"] = "loss"
    defense: DefenseSection = Field(default_factory=DefenseSection)
    matrix: MatrixSection = Field(default_factory=MatrixSection)


PRESETS: dict[str, dict] = {
    "smoke": {
        "threads": 1,
        "data": {"dataset": "auto", "part_size": 200, "test_size": 500, "downsample": 2},
        "train": {"arch": "tiny_cnn", "epochs": 15, "batch_size": 32, "optimizer": "adam",
                  "lr": 0.01, "weight_decay": 0.0, "schedule": "none", "channels_last": False},
        "shadow": {"epochs": 100, "batch_size": 400},
        "lira": {"shadows": 4, "global_variance": True},
        "label_only": {"records": 200, "flip": False},
        "defense": {"early_stopping_epochs": 4,
                    "dp": {"epochs": 10, "batch_size": 100, "lr": 0.5}},
        "matrix": {"targets": ["tiny_cnn"], "shadows": ["tiny_cnn", "small_cnn"]},
    },
    # CIFAR-10, overfit ResNet-20 target on 12,500 images without augmentation. Speed (ResNet-20,
    # batch 64, one thread): 39 s per epoch on an idle core (0.2 s per step), 77 CPU-s per epoch
    # when three jobs share the two cores; ResNet-32 costs 1.6x, DP-SGD's per-sample gradients
    # 2.5x. Models at E = 16 epochs: target, shadow, dropout target and 2 LiRA shadows 5 x 16 x 39
    # = 3,120 s; matrix shadow ResNet-32 1,000 s; DP-SGD 3 epochs 290 s; plus about 310,000
    # inference queries (10-15 min): about 1.4 hours on one idle core. 16 epochs rather than 12
    # and one attack MLP per class: at 12 epochs the target (train 0.990 / test 0.673) gave shadow
    # attack accuracy 0.648 / AUC 0.676 with one MLP and 0.698 / 0.729 per class (all three forms
    # are reported in `shadow_variants`).
    "cpu": {
        "threads": 1,
        "data": {"dataset": "cifar10", "part_size": 12500, "test_size": 5000},
        "train": {"arch": "resnet20", "epochs": 16, "batch_size": 64, "lr": 0.05,
                  "weight_decay": 0.0, "schedule": "cosine", "augment": False},
        "shadow": {"per_class": True},
        "lira": {"shadows": 2, "global_variance": True},
        "label_only": {"records": 1000},
        "defense": {"early_stopping_epochs": 4,
                    "dp": {"epochs": 3, "batch_size": 256, "lr": 0.5, "noise_multiplier": 1.0}},
        "matrix": {"targets": ["resnet20"], "shadows": ["resnet20", "resnet32"]},
    },
    "paper": {},
}


# --- data ---------------------------------------------------------------------------------------


def load_data(cfg: Config, data_dir: Path | None) -> tuple[SupervisedData, str]:
    """The supervised set named by cfg.data (auto: MNIST from --data-dir, else the glyph set)."""
    name = cfg.data.dataset
    if name == "auto":
        name = "mnist" if data_dir is not None else "glyphs"
    if name == "glyphs":
        from poisonlab.data.glyphs import load_glyph_supervised

        data = load_glyph_supervised(seed=cfg.seed)
    else:
        from poisonlab.data.registry import load_dataset

        data = load_dataset(name, data_dir)
    test = data.test
    if cfg.data.test_size is not None and cfg.data.test_size < len(test):
        gen = torch.Generator().manual_seed(cfg.seed + 5)
        test = test.subset(torch.randperm(len(test), generator=gen)[: cfg.data.test_size])
    train = data.train
    if cfg.data.downsample > 1:
        pool = torch.nn.functional.avg_pool2d
        train = ImageSet(pool(train.x, cfg.data.downsample), train.y)
        test = ImageSet(pool(test.x, cfg.data.downsample), test.y)
    return SupervisedData(train, test, data.classes), name


def split_parts(train: ImageSet, part_size: int, seed: int) -> dict[str, ImageSet]:
    """Four disjoint parts of `part_size` records drawn by a seeded permutation (see PARTS)."""
    if 4 * part_size > len(train):
        raise ConfigError(f"data.part_size={part_size} needs {4 * part_size} training records, "
                          f"the data set has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return {name: train.subset(order[i * part_size : (i + 1) * part_size])
            for i, name in enumerate(PARTS)}


def check_feasible(cfg: Config, data: SupervisedData) -> None:
    """Every size and architecture checked before any training (one-line ConfigError)."""
    n = cfg.data.part_size
    if 4 * n > len(data.train):
        raise ConfigError(f"data.part_size={n} needs 4 × {n} = {4 * n} training records, the "
                          f"data set has {len(data.train)}")
    if "label_only" in cfg.attacks and cfg.label_only.records > 2 * n:
        raise ConfigError(f"label_only.records={cfg.label_only.records} exceeds the {2 * n} "
                          "evaluation records")
    dropout = cfg.defense.dropout
    archs = {(a, 0.0) for a in [cfg.train.arch, *cfg.matrix.targets, *cfg.matrix.shadows]}
    archs |= {(a, dropout) for a in cfg.matrix.targets if cfg.matrix.dropout}
    archs |= {(cfg.train.arch, dropout)} if "dropout" in cfg.defense.defenses else set()
    for arch, p in sorted(archs):
        build(arch, data, p)
    stop = cfg.defense.early_stopping_epochs
    if "early_stopping" in cfg.defense.defenses and stop >= cfg.train.epochs:
        raise ConfigError(f"defense.early_stopping_epochs={stop} must be fewer than the "
                          f"target's train.epochs={cfg.train.epochs}")
    if "dp_sgd" in cfg.defense.defenses:
        from poisonlab.defenses.dp_sgd import dp_compatible

        dp_compatible(build(cfg.train.arch, data))


def _concat(*sets: ImageSet) -> ImageSet:
    return ImageSet(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]))


# --- models -------------------------------------------------------------------------------------


def build(arch: str, data: SupervisedData, dropout: float = 0.0) -> torch.nn.Module:
    """Architecture `arch` for this data set, with dropout before its last layer when > 0."""
    options = {"dropout": dropout} if dropout > 0 else {}
    try:
        return build_model(arch, data.num_classes, int(data.train.x.shape[1]), **options)
    except TypeError:
        raise ConfigError(f"architecture '{arch}' has no dropout option") from None


def train_model(cfg: Config, run: Run, name: str, arch: str, train: ImageSet,
                data: SupervisedData, seed: int, progress: bool,
                dropout: float = 0.0, epochs: int | None = None) -> torch.nn.Module:
    """Train (or reload from the run) model `name` on `train` with the cfg.train recipe (cut to
    `epochs` when given). The initial weights come from `seed` alone, so they do not depend on
    which models a resumed run skipped."""
    torch.manual_seed(seed)
    model = build(arch, data, dropout)
    saved = run.load_checkpoint(f"model-{name}")
    if saved is not None:
        model.load_state_dict(saved[0])
        run.log(f"{name}: model loaded from the run")
        return place(model, default_device(), cfg.train.channels_last).eval()
    t = cfg.train
    epochs = epochs or t.epochs
    tc = TrainConfig(epochs=epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                     weight_decay=t.weight_decay, optimizer=t.optimizer, schedule=t.schedule,
                     augment=t.augment, channels_last=t.channels_last)
    history = train_classifier(model, train, tc, progress=progress,
                               checkpoint=RunCheckpoint(run, f"train-{name}"), seed=seed)
    run.save_checkpoint(f"model-{name}", model.state_dict(), {"arch": arch, "model": name,
                                                               "dropout": dropout})
    secs = sum(history["epoch_seconds"])
    run.log(f"{name}: trained {epochs} epochs on {len(train)} records in {secs:.0f}s, train "
            f"accuracy {history['train_acc'][-1]:.4f}")
    return model.eval()


def train_dp_target(cfg: Config, run: Run, train: ImageSet, data: SupervisedData,
                    progress: bool) -> tuple[torch.nn.Module, dict]:
    """The target architecture trained with DP-SGD (or reloaded): (model, privacy numbers)."""
    from poisonlab.defenses.dp_sgd import DPSGDConfig, dp_compatible, train_dp_sgd

    model = dp_compatible(build(cfg.train.arch, data))
    saved = run.load_checkpoint("model-target-dpsgd")
    if saved is not None:
        model.load_state_dict(saved[0])
        run.log("target-dpsgd: model loaded from the run")
        return model.to(default_device()).eval(), saved[1]["privacy"]
    d = cfg.defense.dp
    dc = DPSGDConfig(epochs=d.epochs, batch_size=d.batch_size, lr=d.lr, momentum=d.momentum,
                     noise_multiplier=d.noise_multiplier, target_epsilon=d.target_epsilon,
                     max_grad_norm=d.max_grad_norm, delta=d.delta, accountant=d.accountant,
                     seed=cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)
    result = train_dp_sgd(build(cfg.train.arch, data), train, dc, progress=progress,
                          checkpoint=RunCheckpoint(run, "train-target-dpsgd"))
    privacy = {"epsilon": result.epsilon, "delta": result.delta, "steps": result.steps,
               "noise_multiplier": result.noise_multiplier, "sample_rate": result.sample_rate,
               "max_grad_norm": d.max_grad_norm, "accountant": d.accountant}
    run.save_checkpoint("model-target-dpsgd", result.model.state_dict(), {"privacy": privacy})
    run.log(f"target-dpsgd: {d.epochs} epochs, ε = {result.epsilon:.3f} at δ = {result.delta:.2e}"
            f", train accuracy {result.history['train_acc'][-1]:.4f}")
    return result.model.to(default_device()).eval(), privacy


def cached_logits(run: Run, key: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of `model` on x, computed once per run (kept as checkpoint logits-<key>)."""
    saved = run.load_checkpoint(f"logits-{key}")
    if saved is not None and saved[0]["logits"].shape[0] == len(x):
        return saved[0]["logits"]
    logits = predict_logits(model, x)
    run.save_checkpoint(f"logits-{key}", {"logits": logits})
    return logits


def _accuracy(logits_or_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits_or_probs.argmax(1) == y).float().mean())


# --- the study: data, models and attack fits shared by every stage --------------------------------


class Study:
    """What every stage shares: the parts, the evaluation records and lazily fitted attacks."""

    def __init__(self, cfg: Config, run: Run, data: SupervisedData, progress: bool) -> None:
        self.cfg, self.run, self.data, self.progress = cfg, run, data, progress
        self.parts = split_parts(data.train, cfg.data.part_size, cfg.seed)
        n = cfg.data.part_size
        self.eval = _concat(self.parts["target_in"], self.parts["target_out"])  # members first
        self.member = torch.cat([torch.ones(n), torch.zeros(n)])
        self.pool = _concat(self.parts["shadow_in"], self.parts["shadow_out"])
        self.pool_masks = shadow_masks(cfg.shadow.count, n, cfg.seed + 3)
        self._attacks: dict[tuple[str, str], ShadowModelAttack] = {}
        self.shadows: dict[str, list[torch.nn.Module]] = {}
        self.privacy: dict | None = None  # DP-SGD's ε, δ and settings once trained

    def target(self, arch: str, dropout: float = 0.0) -> torch.nn.Module:
        name = f"target-{arch}" + ("-dropout" if dropout > 0 else "")
        seed = self.cfg.seed + (1 if dropout > 0 else 0)
        return train_model(self.cfg, self.run, name, arch, self.parts["target_in"], self.data,
                           seed, self.progress, dropout)

    def early_stopped_target(self) -> tuple[str, torch.nn.Module]:
        """The target's architecture and recipe, stopped after defense.early_stopping_epochs."""
        arch, epochs = self.cfg.train.arch, self.cfg.defense.early_stopping_epochs
        name = f"target-{arch}-early{epochs}"
        return name, train_model(self.cfg, self.run, name, arch, self.parts["target_in"],
                                 self.data, self.cfg.seed, self.progress, epochs=epochs)

    def shadow_models(self, arch: str) -> list[torch.nn.Module]:
        if arch not in self.shadows:
            self.shadows[arch] = [
                train_model(self.cfg, self.run, f"shadow-{arch}-{i}", arch,
                            self.pool.subset(mask), self.data, self.cfg.seed + 100 + i,
                            self.progress)
                for i, mask in enumerate(self.pool_masks)]
        return self.shadows[arch]

    def logits(self, key: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return cached_logits(self.run, key, model, x)

    def shadow_attack(self, arch: str, output: str = "none") -> ShadowModelAttack:
        """Shokri et al.'s attack MLP fitted on the `arch` shadows' outputs (after the output
        defence `output`: the attacker sees the defended interface and adapts to it)."""
        if (arch, output) not in self._attacks:
            s, d = self.cfg.shadow, self.cfg.defense
            probs = [apply_output_defense(output, self.logits(f"shadow-{arch}-{i}", m, self.pool.x)
                                          .softmax(1), d.decimals, d.top_k)
                     for i, m in enumerate(self.shadow_models(arch))]
            attack = ShadowModelAttack(s.hidden, s.per_class, s.sort_probs, s.epochs, s.lr,
                                       s.batch_size, seed=self.cfg.seed, model=s.attack_model)
            n = len(self.pool_masks)
            self._attacks[(arch, output)] = attack.fit(probs, [self.pool.y] * n,
                                                       list(self.pool_masks.float()))
        return self._attacks[(arch, output)]

    def test_logits(self, key: str, model: torch.nn.Module) -> torch.Tensor:
        return self.logits(f"{key}-test", model, self.data.test.x)


def shadow_masks(count: int, part_size: int, seed: int) -> torch.Tensor:
    """Bool [count, 2·part_size] over shadow-in ∪ shadow-out: the first shadow trains on
    shadow-in (the seed's split), every further one on a random half."""
    first = torch.cat([torch.ones(part_size), torch.zeros(part_size)]).bool()
    gen = torch.Generator().manual_seed(seed)
    rest = [torch.randperm(2 * part_size, generator=gen) < part_size for _ in range(count - 1)]
    return torch.stack([first, *rest])


# --- attacks ------------------------------------------------------------------------------------


def score_shadow(study: Study, logits: torch.Tensor, arch: str, output: str = "none") -> torch.Tensor:
    d = study.cfg.defense
    probs = apply_output_defense(output, logits.softmax(1), d.decimals, d.top_k)
    return study.shadow_attack(arch, output).infer(probs, study.eval.y)


def score_threshold(study: Study, logits: torch.Tensor, output: str = "none") -> torch.Tensor:
    d = study.cfg.defense
    probs = apply_output_defense(output, logits.softmax(1), d.decimals, d.top_k)
    return ThresholdAttack(study.cfg.threshold_score).infer(probs, study.eval.y)


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def lira_stats(study: Study, key: str, model: torch.nn.Module) -> torch.Tensor:
    """Logit-scaled confidences [N, queries] of `model` on the evaluation records (and flips);
    the logits are kept in the run as logits-<key> (and logits-<key>-flip)."""
    from poisonlab.attacks.membership import logit_confidence

    x, y = study.eval.x, study.eval.y
    queries = [("", x)] + ([("-flip", _flip(x))] if study.cfg.lira.flip_query else [])
    return torch.stack([logit_confidence(study.logits(f"{key}{suffix}", model, q), y)
                        for suffix, q in queries], 1)


def score_lira(study: Study, target: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Online and offline LiRA scores of the target from shadows on halves of the records."""
    cfg = study.cfg
    n = len(study.eval)
    masks = random_halves(cfg.lira.shadows, n, torch.Generator().manual_seed(cfg.seed + 11))
    stats = []
    for k, mask in enumerate(masks):
        model = train_model(cfg, study.run, f"lira-{k:02d}", cfg.train.arch,
                            study.eval.subset(mask), study.data, cfg.seed + 1000 + k,
                            study.progress)
        stats.append(lira_stats(study, f"lira-{k:02d}", model))
    if cfg.lira.reuse_shadow:  # trained on disjoint data: OUT models for every record
        for i, model in enumerate(study.shadow_models(cfg.train.arch)):
            stats.append(lira_stats(study, f"shadow-{cfg.train.arch}-{i}-lira", model))
            masks = torch.cat([masks, torch.zeros(1, n, dtype=torch.bool)])
    shadow_stats = torch.stack(stats)
    target_stats = lira_stats(study, f"target-{cfg.train.arch}", target)
    gv = cfg.lira.global_variance
    return {"lira_online": LiRA(online=True, global_variance=gv).infer(target_stats, shadow_stats, masks),
            "lira_offline": LiRA(online=False, global_variance=gv).infer(target_stats, shadow_stats, masks)}


def label_only_records(study: Study) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the evaluation records (half members, half not) and their membership."""
    r, n = study.cfg.label_only.records, study.cfg.data.part_size
    half = r // 2
    idx = torch.cat([torch.arange(half), n + torch.arange(r - half)])
    return idx, study.member[idx]


def score_label_only(study: Study, target: torch.nn.Module) -> torch.Tensor:
    saved = study.run.load_checkpoint("scores-label_only")
    if saved is not None:
        return saved[0]["scores"]
    lo = study.cfg.label_only
    attack = LabelOnlyAttack(default_augmentations(lo.max_shift, lo.flip), lo.noise_std,
                             lo.noise_samples, seed=study.cfg.seed)
    idx, _ = label_only_records(study)
    scores = attack.infer(label_oracle(target), study.eval.x[idx], study.eval.y[idx])
    study.run.save_checkpoint("scores-label_only", {"scores": scores})
    return scores


def run_attacks(study: Study, target: torch.nn.Module, test_accuracy: float) -> tuple[dict, dict]:
    """Every attack of cfg.attacks on the target: (metrics by attack, (scores, labels) by attack)."""
    cfg = study.cfg
    logits = study.logits(f"target-{cfg.train.arch}", target, study.eval.x)
    scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in cfg.attacks:
        t0 = time.perf_counter()
        if name == "shadow":
            scores[name] = (score_shadow(study, logits, cfg.train.arch), study.member)
        elif name == "threshold":
            scores[name] = (score_threshold(study, logits), study.member)
        elif name == "label_only":
            scores[name] = (score_label_only(study, target), label_only_records(study)[1])
        elif name in ("lira_online", "lira_offline") and name not in scores:
            lira = score_lira(study, target)
            scores |= {k: (v, study.member) for k, v in lira.items() if k in cfg.attacks}
        study.run.log(f"attack {name}: {time.perf_counter() - t0:.0f}s")
    metrics = {name: membership_metrics(*scores[name]) | {"test_accuracy": test_accuracy}
               for name in cfg.attacks}
    return metrics, scores


# name: (per_class, sort_probs, attack model)
SHADOW_VARIANTS = {"default": (False, False, "mlp"), "per_class": (True, False, "mlp"),
                   "sorted": (False, True, "mlp"), "boosting": (False, False, "boosting")}


def shadow_variants(study: Study, logits: torch.Tensor) -> dict[str, dict]:
    """The shadow attack's forms (one MLP; one per class; sorted probabilities; gradient-boosted
    trees) on the same shadows and target, so the configured choice can be compared."""
    s, arch, out = study.cfg.shadow, study.cfg.train.arch, {}
    probs = [study.logits(f"shadow-{arch}-{i}", m, study.pool.x).softmax(1)
             for i, m in enumerate(study.shadow_models(arch))]
    for name, (per_class, sort_probs, model) in SHADOW_VARIANTS.items():
        if (per_class, sort_probs, model) == (s.per_class, s.sort_probs, s.attack_model):
            attack = study.shadow_attack(arch)  # the configured form, already fitted
        else:
            attack = ShadowModelAttack(s.hidden, per_class, sort_probs, s.epochs, s.lr,
                                       s.batch_size, seed=study.cfg.seed, model=model)
            attack.fit(probs, [study.pool.y] * len(probs), list(study.pool_masks.float()))
        scores = attack.infer(logits.softmax(1), study.eval.y)
        metrics = membership_metrics(scores, study.member)
        out[name] = {k: metrics[k] for k in ("attack_accuracy", "auc", "tpr_at_fpr_0.001",
                                             "tpr_at_fpr_0.01")}
    study.run.log("shadow attack variants: " + ", ".join(
        f"{k} acc {v['attack_accuracy']:.4f} AUC {v['auc']:.4f}" for k, v in out.items()))
    return out


# --- defences -----------------------------------------------------------------------------------

def stated_attack(study: Study, logits: torch.Tensor, output: str = "none") -> torch.Tensor:
    """The scores of cfg.defense.attack on a target's evaluation logits, behind `output`."""
    if study.cfg.defense.attack == "threshold":
        return score_threshold(study, logits, output)
    return score_shadow(study, logits, study.cfg.train.arch, output)


def defended_model(study: Study, name: str) -> tuple[str, torch.nn.Module, dict]:
    """(key, model, extra metrics) of a training-side defence (or of the undefended target)."""
    arch = study.cfg.train.arch
    if name == "dropout":
        return f"target-{arch}-dropout", study.target(arch, study.cfg.defense.dropout), {}
    if name == "early_stopping":
        key, model = study.early_stopped_target()
        return key, model, {"epochs": study.cfg.defense.early_stopping_epochs}
    if name == "dp_sgd":
        model, study.privacy = train_dp_target(study.cfg, study.run, study.parts["target_in"],
                                               study.data, study.progress)
        return "target-dpsgd", model, {"epsilon": study.privacy["epsilon"]}
    return f"target-{arch}", study.target(arch), {}


def run_defenses(study: Study) -> dict:
    """Each defence as a pair: the stated attack's numbers and the target's test accuracy; with
    the loss-threshold attack's accuracy and AUC beside (`threshold_attack`), which does not
    depend on the shadows matching the defended recipe."""
    d = study.cfg.defense
    out = {}
    for name in d.defenses:
        output = name if name in OUTPUT_DEFENSES else "none"
        key, model, extra = defended_model(study, name)
        logits = study.logits(key, model, study.eval.x)
        test = apply_output_defense(output, study.test_logits(key, model).softmax(1),
                                    d.decimals, d.top_k)
        entry = membership_metrics(stated_attack(study, logits, output), study.member)
        entry |= {"test_accuracy": _accuracy(test, study.data.test.y), "attack": d.attack}
        if d.attack != "threshold":  # a second opinion that assumes nothing about the recipe
            check = membership_metrics(score_threshold(study, logits, output), study.member)
            entry["threshold_attack"] = {k: check[k] for k in ("attack_accuracy", "auc")}
        out[name] = entry | extra
        study.run.log(f"defence {name}: attack accuracy {entry['attack_accuracy']:.4f}, AUC "
                      f"{entry['auc']:.4f}, test accuracy {entry['test_accuracy']:.4f}")
    return out


# --- the architecture matrix --------------------------------------------------------------------


def matrix_block(study: Study, targets: list[str], dropout: float) -> dict:
    """Shadow-attack accuracy and AUC for every (target, shadow) architecture pair."""
    acc, auc, test_acc = [], [], []
    for t in targets:
        model = study.target(t, dropout)
        key = f"target-{t}" + ("-dropout" if dropout > 0 else "")
        logits = study.logits(key, model, study.eval.x)
        test_acc.append(_accuracy(study.test_logits(key, model), study.data.test.y))
        row = [membership_metrics(score_shadow(study, logits, s), study.member)
               for s in study.cfg.matrix.shadows]
        acc.append([m["attack_accuracy"] for m in row])
        auc.append([m["auc"] for m in row])
    return {"targets": list(targets), "shadows": list(study.cfg.matrix.shadows),
            "attack_accuracy": acc, "auc": auc, "target_test_accuracy": test_acc}


def run_matrix(study: Study) -> dict:
    m = study.cfg.matrix
    if not m.targets or not m.shadows:
        return {}
    out = {"attack": "shadow"} | matrix_block(study, m.targets, 0.0)
    if m.dropout:
        out["dropout"] = matrix_block(study, m.targets, study.cfg.defense.dropout)
        out["dropout"]["rate"] = study.cfg.defense.dropout
    return out


# --- the trial ----------------------------------------------------------------------------------


def run(cfg: Config, run: Run, data_dir: Path | None = None, progress: bool = True) -> dict:
    """One trial: train target, shadows and defended targets; attack; write metrics and report."""
    from poisonlab.report.membership import write_report

    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, dataset = load_data(cfg, data_dir)
    check_feasible(cfg, data)
    study = Study(cfg, run, data, progress)
    run.log(f"data: {dataset}, four parts of {cfg.data.part_size}, test {len(data.test)}, "
            f"device {default_device()}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    target = study.target(cfg.train.arch)
    test_accuracy = _accuracy(study.test_logits(f"target-{cfg.train.arch}", target),
                              data.test.y)
    train_accuracy = _accuracy(study.logits(f"target-{cfg.train.arch}", target, study.eval.x)
                               [: cfg.data.part_size], study.parts["target_in"].y)
    attacks, scores = run_attacks(study, target, test_accuracy)
    variants = (shadow_variants(study, study.logits(f"target-{cfg.train.arch}", target,
                                                    study.eval.x))
                if "shadow" in cfg.attacks else {})
    seconds["attacks"] = time.perf_counter() - t0
    defenses = run_defenses(study)
    seconds["defenses"] = time.perf_counter() - t0 - seconds["attacks"]
    matrix = run_matrix(study)
    seconds["total"] = time.perf_counter() - t0
    metrics = {"dataset": dataset, "arch": cfg.train.arch, "records": len(study.eval),
               "target": {"train_accuracy": train_accuracy, "test_accuracy": test_accuracy},
               "attacks": attacks, "shadow_variants": variants, "defenses": defenses,
               "matrix": matrix, "seconds": seconds}
    if study.privacy is not None:
        metrics["dp_sgd"] = study.privacy
    run.write_metrics(metrics)
    write_report(run, cfg, metrics, scores)
    return metrics


# --- terminal table -----------------------------------------------------------------------------


def render(metrics: dict):
    """Attacks, defences and the architecture matrix (fractions) as rich tables."""
    from rich.console import Group

    from poisonlab.report.html import rich_table
    from poisonlab.report.membership import attack_table, defense_table, matrix_table

    head = (f"membership ({metrics['dataset']}, target {metrics['arch']}: train accuracy "
            f"{metrics['target']['train_accuracy']:.3f}, test {metrics['target']['test_accuracy']:.3f})")
    parts = [rich_table(attack_table(metrics), title=head),
             rich_table(defense_table(metrics), title="defences")]
    matrix = metrics.get("matrix") or {}
    if matrix:
        parts.append(rich_table(matrix_table(matrix),
                                title="shadow-attack accuracy, target × shadow architecture"))
    if "dropout" in matrix:
        parts.append(rich_table(matrix_table(matrix["dropout"], "dropout target"),
                                title="… with dropout-trained targets"))
    return Group(*parts)
