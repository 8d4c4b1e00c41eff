"""The backdoor-defence protocol: poisoned training, Neural Cleanse detection, three defences, BA/ASR.

Per attack, a model is trained on all-to-one poisoned data (poisonlab.attacks.backdoor_injection),
or reloaded from an earlier run trained on the same poisoned data; Neural Cleanse scans it on the
defender's clean subset (a seeded fraction of the unpoisoned training set); MCL and two baselines
(plain fine-tuning, Neural Cleanse unlearning with the reverse-engineered trigger of the true
target) purify it on that subset with one fine-tuning schedule (`defense.finetune`); benign
accuracy (BA) and attack success rate (ASR) are measured before and after. A clean control model
is trained and scanned too. Everything measured comes back as the dataclasses below;
`BackdoorResults.to_metrics()` is the run's metrics.json.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger, Trigger, make_trigger
from poisonlab.config import BaseConfig, Settings, validate_config
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.defenses.finetuning import FineTuning, NCUnlearning
from poisonlab.defenses.mcl import MCL
from poisonlab.defenses.neural_cleanse import DetectionResult, NeuralCleanse
from poisonlab.device import default_device
from poisonlab.errors import ConfigError
from poisonlab.evaluation.backdoor_results import (
    DEFENSES,
    AttackModels,
    AttackResult,
    BaAsr,
    BackdoorResults,
    CleanControl,
)
from poisonlab.models import Arch, build_model
from poisonlab.progress import progress_bar
from poisonlab.runs import Run
from poisonlab.training.supervised import (
    RunCheckpoint,
    TrainConfig,
    evaluate,
    place,
    train_classifier,
)

EXPERIMENT = "backdoor-defense"


class DataConfig(Settings):
    """dataset: the supervised set. train_size, test_size: seeded subsets (None: all).
    downsample: average-pool factor of the images. clean_fraction: the defender's clean subset,
    a share of the (unpoisoned) training set."""

    dataset: Literal["cifar10", "mnist", "glyphs"] = "cifar10"
    train_size: int | None = Field(None, ge=10)
    test_size: int | None = Field(None, ge=10)
    downsample: int = Field(1, ge=1)
    clean_fraction: float = Field(0.05, gt=0, le=1)


class AttackConfig(BackdoorInjection.Config):
    """The injection's settings (target, poison_rate), plus: attacks: one backdoored model per
    trigger. blend_alpha: Blend's mixing ratio. clean_control: also train and scan a model on the
    unpoisoned data."""

    attacks: list[Literal["badnets", "blend", "grid", "trojan"]] = Field(
        default_factory=lambda: ["badnets", "blend", "grid"], min_length=1)
    blend_alpha: float = Field(0.2, gt=0, le=1)
    clean_control: bool = True


class DetectionConfig(NeuralCleanse.Config):
    """Neural Cleanse's settings, plus `samples`: how many clean images of the subset it sees."""

    samples: int = Field(1000, ge=1)


class DefenseConfig(MCL.Config):
    """MCL's settings; its `finetune` schedule is also the schedule of both baselines (the three
    defences are compared on the same clean subset and schedule). `unlearning_fraction`: the
    share of each batch NC unlearning stamps (NCUnlearning.Config.fraction)."""

    unlearning_fraction: float = NCUnlearning.Config.model_fields["fraction"]


class ProtocolConfig(BaseConfig):
    """What the protocol measures with: the architecture and the settings of each stage."""

    arch: Arch = "resnet20"
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        epochs=200, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
        augment=True, channels_last=True))
    attack: AttackConfig = Field(default_factory=lambda: AttackConfig(target=5))
    nc: DetectionConfig = Field(default_factory=DetectionConfig)
    defense: DefenseConfig = Field(default_factory=DefenseConfig)


# --- data --------------------------------------------------------------------------------------


def load_data(cfg: ProtocolConfig, data_dir: Path | None) -> SupervisedData:
    """The supervised set named by cfg.data, subsampled and downsampled as configured."""
    name = cfg.data.dataset
    data = load_supervised(name, data_dir, seed=cfg.seed)
    part = data.subsampled(cfg.data.train_size, cfg.data.test_size,
                           torch.Generator().manual_seed(cfg.seed))
    train, test = part.train, part.test
    train, test = train.downsampled(cfg.data.downsample), test.downsampled(cfg.data.downsample)
    if cfg.attack.target >= data.num_classes:
        raise ConfigError(f"attack.target={cfg.attack.target} is not a label of {name} "
                          f"({data.num_classes} classes)")
    return SupervisedData(train, test, data.classes)


def build_trigger(cfg: ProtocolConfig, name: str, image_shape) -> Trigger:
    options = {"alpha": cfg.attack.blend_alpha, "seed": cfg.seed} if name == "blend" else {}
    return make_trigger(name, image_shape, **options)


def clean_subset(train: ImageSet, fraction: float, seed: int) -> ImageSet:
    """The defender's clean data: a seeded `fraction` of the (unpoisoned) training set."""
    n = max(1, round(fraction * len(train)))
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))[:n])


# --- reuse of earlier runs ---------------------------------------------------------------------


def models_source(cfg: ProtocolConfig, run: Run, model: str | None) -> list[Run]:
    """The earlier runs whose trained models `--model` names (run ids, comma-separated).

    Reusing a model is only sound when it was trained on the same poisoned data: the seed, the
    architecture, the data and training settings and the attack settings other than which attacks
    run (and whether the clean control does) must be equal; the defence settings may differ. Each
    model is taken from the first listed run that has it; models none of them has are trained.
    """
    if model is None:
        return []
    sources = []
    for run_id in (part.strip() for part in model.split(",") if part.strip()):
        source = Run.open(run_id, root=run.root)
        if source.experiment != EXPERIMENT:
            raise ConfigError(f"--model {run_id}: run {source.id} is a '{source.experiment}' run, "
                              f"not '{EXPERIMENT}'")
        theirs = validate_config(type(cfg), source.config)
        per_model = {"attacks", "clean_control"}  # which models a run holds, not how they were made
        for section in ("seed", "arch", "data", "train", "attack"):
            a, b = getattr(theirs, section), getattr(cfg, section)
            if section == "attack":
                a, b = a.model_dump(exclude=per_model), b.model_dump(exclude=per_model)
            if a != b:
                raise ConfigError(f"--model {run_id}: run {source.id} was trained with different "
                                  f"'{section}' settings; its models cannot be reused here")
        sources.append(source)
    if not sources:
        raise ConfigError(f"--model {model!r}: no run id given")
    return sources


def same_defence(cfg: ProtocolConfig, source: Run) -> bool:
    """Whether `source` (already checked to hold the same models) detected and defended alike."""
    theirs = validate_config(type(cfg), source.config)
    # A run recorded before a setting existed ran without it, whatever its default is now.
    recorded = all(_same_keys(source.config.get(name, {}), getattr(cfg, name).model_dump())
                   for name in ("nc", "defense"))
    return recorded and theirs.nc == cfg.nc and theirs.defense == cfg.defense


def _same_keys(recorded: Any, current: Any) -> bool:
    """Whether the recorded section has exactly the keys (at every depth) of the current one."""
    if not isinstance(current, dict):
        return not isinstance(recorded, dict)
    return (isinstance(recorded, dict) and set(recorded) == set(current)
            and all(_same_keys(recorded[k], v) for k, v in current.items()))


# --- stages ------------------------------------------------------------------------------------


def train_model(cfg: ProtocolConfig, run: Run, name: str, train: ImageSet, shape, classes: int,
                progress: bool, sources: list[Run] = ()) -> nn.Module:
    """Train model `name` on `train`, or reload it from this run or from a `sources` run."""
    model = build_model(cfg.arch, num_classes=classes, in_channels=shape[0])
    for origin in (run, *sources):
        saved = origin.load_checkpoint(f"model-{name}")
        if saved is not None:
            model.load_state_dict(saved[0])
            if origin is not run:  # keep this run self-contained, and poolable in its turn
                run.save_checkpoint(f"model-{name}", *saved)
            run.log(f"{name}: model loaded from run {origin.id}")
            return place(model, default_device(), cfg.train.channels_last).eval()
    torch.manual_seed(cfg.seed)
    history = train_classifier(model, train, cfg.train, progress=progress,
                               checkpoint=RunCheckpoint(run, f"train-{name}"), seed=cfg.seed)
    run.save_checkpoint(f"model-{name}", model.state_dict(), {"arch": cfg.arch, "model": name})
    secs = sum(history["epoch_seconds"])
    run.log(f"{name}: trained {cfg.train.epochs} epochs on {len(train)} images in {secs:.0f}s "
            f"({secs / max(1, len(history['epoch_seconds'])):.1f}s/epoch this session)")
    return model.eval()


def scan(cfg: ProtocolConfig, model: nn.Module, clean: ImageSet, classes: int,
         progress: bool) -> DetectionResult:
    """Neural Cleanse on the first `nc.samples` images of the clean subset."""
    x = clean.x[: cfg.nc.samples]
    with progress_bar(classes, "neural cleanse", enabled=progress) as bar:
        return NeuralCleanse(config=cfg.nc, seed=cfg.seed).detect(
            model, x, classes, progress=lambda label: bar.advance(status=f"label {label}"))


def defend(cfg: ProtocolConfig, model: nn.Module, trigger: Trigger, clean: ImageSet,
           test: ImageSet, detection: DetectionResult, progress: bool = False) -> dict[str, Any]:
    """MCL and the two baselines against one backdoored model: BA/ASR, MCL's inversion, wall
    times, and the purified model with both inverted triggers."""
    target, schedule = cfg.attack.target, cfg.defense.finetune
    mcl = MCL(config=cfg.defense, seed=cfg.seed)
    out: dict[str, Any] = {}
    timing: dict[str, float] = {}
    with progress_bar(mcl.steps() + 2 * schedule.epochs, "defences", enabled=progress) as bar:
        def step(stage: str):
            return lambda status: bar.advance(status=f"{stage} {status}")

        t0 = time.perf_counter()
        purified = mcl.purify(model, clean, target, progress=step("MCL"))
        timing["mcl"] = time.perf_counter() - t0
        out["mcl"] = backdoor_metrics(purified.model, trigger, test, target)
        t0 = time.perf_counter()
        tuned = FineTuning(config=schedule, seed=cfg.seed).purify(
            model, clean, progress=step("fine-tuning"))
        out["fine_tuning"] = backdoor_metrics(tuned, trigger, test, target)
        timing["fine_tuning"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        nc_trigger = detection.results[target].trigger
        unlearning = NCUnlearning(finetune=schedule, fraction=cfg.defense.unlearning_fraction,
                                  seed=cfg.seed)
        unlearned = unlearning.purify(model, clean, nc_trigger, progress=step("NC unlearning"))
        out["nc_unlearning"] = backdoor_metrics(unlearned, trigger, test, target)
        timing["nc_unlearning"] = time.perf_counter() - t0
    return {"defences": {name: BaAsr(**out[name]) for name in DEFENSES},
            "mcl_inversion": {"norm": purified.inversion.norm,
                              "attack_success": purified.inversion.attack_success},
            "seconds": timing, "purified": purified.model,
            "mcl_trigger": purified.inversion.trigger, "nc_trigger": nc_trigger}


def run_attack(cfg: ProtocolConfig, run: Run, name: str, data: SupervisedData, clean: ImageSet,
               progress: bool, sources: list[Run] = ()) -> AttackResult:
    """Train (or reload) the model of one attack, scan it, defend it."""
    shape = tuple(data.train.x.shape[1:])
    trigger = build_trigger(cfg, name, shape)
    injection = BackdoorInjection(trigger, config=cfg.attack, seed=cfg.seed)
    poisoned = injection.poison(data.train).data
    t0 = time.perf_counter()
    model = train_model(cfg, run, name, poisoned, shape, data.num_classes, progress, sources)
    t1 = time.perf_counter()
    for origin in (run, *(s for s in sources if same_defence(cfg, s))):
        saved = origin.load_state(f"result-{name}")
        if saved is not None:  # a resumed run, or a source run that defended this model alike
            purified = origin.load_checkpoint(f"model-{name}-mcl")[0]
            if origin is not run:  # keep this run self-contained
                run.save_checkpoint(f"model-{name}-mcl", purified, {"arch": "purified", "model": name})
                run.save_state(f"result-{name}", saved)
            run.log(f"{name}: results loaded from run {origin.id}")
            result = AttackResult.from_dict(saved["entry"])
            result.models = _restore_models(cfg, saved, purified, model, trigger)
            return result
    target = cfg.attack.target
    backdoored = BaAsr(**backdoor_metrics(model, trigger, data.test, target))
    detection = scan(cfg, model, clean, data.num_classes, progress)
    t2 = time.perf_counter()
    d = defend(cfg, model, trigger, clean, data.test, detection, progress)
    result = AttackResult(backdoored, float(detection.anomaly_index[target]), detection.to_dict(),
                          d["defences"], d["mcl_inversion"],
                          d["seconds"] | {"train": t1 - t0, "neural_cleanse": t2 - t1},
                          AttackModels(model, trigger, d["purified"], d["mcl_trigger"],
                                       d["nc_trigger"]))
    _save_result(run, name, result)
    run.log(f"{name}: BA {backdoored.benign_accuracy:.4f} ASR "
            f"{backdoored.attack_success_rate:.4f} -> MCL ASR "
            f"{result.defences['mcl'].attack_success_rate:.4f}; NC index "
            f"{result.nc_anomaly_index:.2f}")
    return result


def _save_result(run: Run, name: str, result: AttackResult) -> None:
    models = result.models
    run.save_checkpoint(f"model-{name}-mcl", models.purified_model.state_dict(),
                        {"arch": "purified", "model": name})
    run.save_state(f"result-{name}", {"entry": result.to_dict(), "nc_mask": models.nc_trigger.mask,
                                      "nc_pattern": models.nc_trigger.pattern,
                                      "mcl_delta": models.mcl_trigger.delta})


def _restore_models(cfg: ProtocolConfig, saved: dict, weights: dict, model: nn.Module,
                    trigger: Trigger) -> AttackModels:
    purified = build_model(cfg.arch, num_classes=int(model.head.out_features),
                           in_channels=int(saved["mcl_delta"].shape[0]))
    purified.load_state_dict(weights)
    purified = place(purified, default_device(), cfg.train.channels_last).eval()
    return AttackModels(model, trigger, purified, AdditiveTrigger(saved["mcl_delta"]),
                        MaskTrigger(saved["nc_mask"], saved["nc_pattern"]))


def clean_control(cfg: ProtocolConfig, run: Run, data: SupervisedData, clean: ImageSet,
                  progress: bool, sources: list[Run] = ()) -> CleanControl:
    """Train (or reload) the model on unpoisoned data and scan it."""
    shape = tuple(data.train.x.shape[1:])
    model = train_model(cfg, run, "clean", data.train, shape, data.num_classes, progress, sources)
    detection = scan(cfg, model, clean, data.num_classes, progress)
    return CleanControl(evaluate(model, data.test), detection.to_dict())


def evaluate_defences(cfg: ProtocolConfig, run: Run, data: SupervisedData, clean: ImageSet,
                      progress: bool = True, sources: list[Run] = ()) -> BackdoorResults:
    """The whole protocol on loaded data: every attack, then the clean control."""
    results = BackdoorResults(cfg.data.dataset, cfg.arch, cfg.attack.target, len(clean), {},
                              [source.id for source in sources] if sources else None)
    for name in cfg.attack.attacks:
        results.attacks[name] = run_attack(cfg, run, name, data, clean, progress, sources)
    if cfg.attack.clean_control:
        results.clean_model = clean_control(cfg, run, data, clean, progress, sources)
    return results
