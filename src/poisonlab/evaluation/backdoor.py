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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger, Trigger, make_trigger
from poisonlab.config import BaseConfig, Distinct, Settings, validate_config
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
from poisonlab.evaluation.pieces import run_pieces
from poisonlab.executors import Executor
from poisonlab.models import Arch, build_model, check_fits
from poisonlab.progress import progress_bar
from poisonlab.runs import Run, StateFile
from poisonlab.training.supervised import (
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

    attacks: Annotated[list[Literal["badnets", "blend", "grid", "trojan"]], Distinct] = Field(
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
    shape = tuple(train.x.shape[1:])
    check_fits(build_model(cfg.arch, num_classes=data.num_classes, in_channels=shape[0]), shape,
               cfg.arch)
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


def saved_model(run: Run, name: str, sources: list[Run] = ()) -> dict | None:
    """The weights of model `name` kept in this run or in a `sources` run (copied into this
    run, which stays self-contained and poolable in its turn), or None."""
    for origin in (run, *sources):
        saved = origin.load_checkpoint(f"model-{name}")
        if saved is not None:
            if origin is not run:
                run.save_checkpoint(f"model-{name}", *saved)
            run.log(f"{name}: model loaded from run {origin.id}")
            return saved[0]
    return None


def train_model(cfg: ProtocolConfig, job: ModelJob, train: ImageSet, shape, classes: int,
                progress: bool) -> tuple[nn.Module, list[float] | None]:
    """Model `job.name`: its given weights, or trained on `train` from the seed's initialisation
    (the epoch state kept in `job.state`); with the epoch times when trained."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, num_classes=classes, in_channels=shape[0])
    if job.weights is not None:
        model.load_state_dict(job.weights)
        return place(model, default_device(), cfg.train.channels_last).eval(), None
    history = train_classifier(model, train, cfg.train, progress=progress, checkpoint=job.state,
                               seed=cfg.seed)
    return model.eval(), history["epoch_seconds"]


def scan(cfg: ProtocolConfig, model: nn.Module, clean: ImageSet, classes: int,
         progress: bool) -> DetectionResult:
    """Neural Cleanse on the first `nc.samples` images of the clean subset."""
    x = clean.x[: cfg.nc.samples]
    with progress_bar(cfg.nc.inversion.steps, "neural cleanse", enabled=progress) as bar:
        return NeuralCleanse(config=cfg.nc, seed=cfg.seed).detect(
            model, x, classes, progress=lambda status: bar.advance(status=status))


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


@dataclass
class ModelJob:
    """One piece: the model `name` (an attack, or "clean" for the control) with its detection
    and defences; `weights` when the run or a source run already trained it; `state` keeps the
    training's epochs."""

    name: str
    weights: dict | None
    state: StateFile


@dataclass
class ModelOutcome:
    """What a piece returns: its result, and the weights and epoch times of a model it trained."""

    result: AttackResult | CleanControl
    weights: dict | None
    epoch_seconds: list[float] | None


def model_piece(job: ModelJob, *, cfg: ProtocolConfig, data: SupervisedData, clean: ImageSet,
                progress: bool) -> ModelOutcome:
    """Train (or take) the model of one attack or of the clean control, scan it and (an attack)
    defend it; seeded by cfg.seed alone."""
    shape, classes = tuple(data.train.x.shape[1:]), data.num_classes
    if job.name == "clean":
        model, secs = train_model(cfg, job, data.train, shape, classes, progress)
        weights = _weights(model, secs)
        detection = scan(cfg, model, clean, classes, progress)
        return ModelOutcome(CleanControl(evaluate(model, data.test), detection.to_dict()),
                            weights, secs)
    trigger = build_trigger(cfg, job.name, shape)
    poisoned = BackdoorInjection(trigger, config=cfg.attack, seed=cfg.seed).poison(data.train).data
    t0 = time.perf_counter()
    model, secs = train_model(cfg, job, poisoned, shape, classes, progress)
    weights = _weights(model, secs)  # as trained, before anything touches the model
    t1 = time.perf_counter()
    target = cfg.attack.target
    backdoored = BaAsr(**backdoor_metrics(model, trigger, data.test, target))
    detection = scan(cfg, model, clean, classes, progress)
    t2 = time.perf_counter()
    d = defend(cfg, model, trigger, clean, data.test, detection, progress)
    result = AttackResult(backdoored, float(detection.anomaly_index[target]), detection.to_dict(),
                          d["defences"], d["mcl_inversion"],
                          d["seconds"] | {"train": t1 - t0, "neural_cleanse": t2 - t1},
                          AttackModels(model, trigger, d["purified"], d["mcl_trigger"],
                                       d["nc_trigger"]))
    return ModelOutcome(result, weights, secs)


def _weights(model: nn.Module, trained: list[float] | None) -> dict | None:
    return None if trained is None else {k: v.detach().cpu().clone()
                                         for k, v in model.state_dict().items()}


def recorded(cfg: ProtocolConfig, run: Run, job: ModelJob, data: SupervisedData,
             sources: list[Run] = ()) -> ModelOutcome | None:
    """The result of piece `job` kept in this run, or in a source run that defended the same
    model alike (then copied into this run); None if none holds it."""
    if job.weights is None:
        return None
    if job.name == "clean":
        saved = run.load_state("result-clean")
        return None if saved is None else ModelOutcome(CleanControl(
            saved["entry"]["benign_accuracy"], saved["entry"]["nc"]), None, None)
    for origin in (run, *(s for s in sources if same_defence(cfg, s))):
        saved = origin.load_state(f"result-{job.name}")
        if saved is not None:  # a resumed run, or a source run that defended this model alike
            purified = origin.load_checkpoint(f"model-{job.name}-mcl")[0]
            if origin is not run:  # keep this run self-contained
                run.save_checkpoint(f"model-{job.name}-mcl", purified,
                                    {"arch": "purified", "model": job.name})
                run.save_state(f"result-{job.name}", saved)
            run.log(f"{job.name}: results loaded from run {origin.id}")
            shape = tuple(data.train.x.shape[1:])
            model, _ = train_model(cfg, job, data.train, shape, data.num_classes, False)
            result = AttackResult.from_dict(saved["entry"])
            result.models = _restore_models(cfg, saved, purified, model,
                                            build_trigger(cfg, job.name, shape))
            return ModelOutcome(result, None, None)
    return None


def record(cfg: ProtocolConfig, run: Run, job: ModelJob, outcome: ModelOutcome) -> None:
    """Keep a piece's outcome in the run: the model it trained, its result; log it."""
    if outcome.weights is not None:
        run.save_checkpoint(f"model-{job.name}", outcome.weights,
                            {"arch": cfg.arch, "model": job.name})
        job.state.discard()
        secs = outcome.epoch_seconds or []
        run.log(f"{job.name}: trained {cfg.train.epochs} epochs in {sum(secs):.0f}s "
                f"({sum(secs) / max(1, len(secs)):.1f}s/epoch this session)")
    result = outcome.result
    if isinstance(result, CleanControl):
        run.save_state("result-clean", {"entry": result.to_dict()})
        return
    _save_result(run, job.name, result)
    run.log(f"{job.name}: BA {result.backdoored.benign_accuracy:.4f} ASR "
            f"{result.backdoored.attack_success_rate:.4f} -> MCL ASR "
            f"{result.defences['mcl'].attack_success_rate:.4f}; NC index "
            f"{result.nc_anomaly_index:.2f}")


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


def evaluate_defences(cfg: ProtocolConfig, run: Run, data: SupervisedData, clean: ImageSet,
                      progress: bool = True, sources: list[Run] = (),
                      executor: Executor | None = None) -> BackdoorResults:
    """The whole protocol on loaded data: every attack, then the clean control, each a piece
    (`model_piece`) run on `executor` (None: local) and recorded in the run as it completes."""
    results = BackdoorResults(cfg.data.dataset, cfg.arch, cfg.attack.target, len(clean), {},
                              [source.id for source in sources] if sources else None)
    names = [*cfg.attack.attacks, *(["clean"] if cfg.attack.clean_control else [])]
    jobs = {name: ModelJob(name, saved_model(run, name, sources), run.state_file(f"train-{name}"))
            for name in names}
    inner = progress and (executor is None or executor.name == "local")
    out = run_pieces(executor, model_piece, jobs,
                     load=lambda name: recorded(cfg, run, jobs[name], data, sources),
                     save=lambda name, outcome: record(cfg, run, jobs[name], outcome),
                     shared={"cfg": cfg, "data": data, "clean": clean, "progress": inner},
                     description="backdoor models" if progress else "")
    for name in cfg.attack.attacks:
        results.attacks[name] = out[name].result
    if cfg.attack.clean_control:
        results.clean_model = out["clean"].result
    return results
