"""Experiment `backdoor-defense`: backdoored classifiers, Neural Cleanse detection, MCL purification.

Wires: supervised data (CIFAR-10 from --data-dir; MNIST; or the embedded glyph set) → a model per
attack trained on all-to-one poisoned data (BadNets patch, Blend, grid, Trojan square) plus a clean
control model → Neural Cleanse on each → MCL (Yue et al. 2023) and two baselines (plain
fine-tuning, Neural Cleanse unlearning) on the same clean subset (5% of the training set) →
benign accuracy / attack success rate before and after → figures and an HTML report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import Trigger, make_trigger
from poisonlab.config import BaseConfig, validate_config
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.defenses.finetuning import FineTuneConfig, fine_tune, nc_unlearning
from poisonlab.defenses.mcl import MCL, MCLConfig, reference_inversion
from poisonlab.defenses.neural_cleanse import DetectionResult, InversionConfig, NeuralCleanse
from poisonlab.device import default_device, seed_everything
from poisonlab.errors import ConfigError
from poisonlab.models import build_model
from poisonlab.runs import Run
from poisonlab.training.supervised import RunCheckpoint, TrainConfig, place, train_classifier

NAME = "backdoor-defense"
DEFENSES = ("mcl", "fine_tuning", "nc_unlearning")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    dataset: Literal["cifar10", "mnist", "glyphs"] = "cifar10"
    train_size: int | None = Field(None, ge=10)  # a seeded subset of the training set
    test_size: int | None = Field(None, ge=10)
    downsample: int = Field(1, ge=1)  # average-pool factor (smoke runs on 14×14 glyphs)
    clean_fraction: float = Field(0.05, gt=0, le=1)  # the defender's clean subset


class TrainSection(_Section):
    arch: str = "resnet20"
    epochs: int = Field(200, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "onecycle", "step", "none"] = "cosine"
    augment: bool = True
    channels_last: bool = True


class AttackSection(_Section):
    attacks: list[Literal["badnets", "blend", "grid", "trojan"]] = Field(
        default_factory=lambda: ["badnets", "blend", "grid"], min_length=1)
    target: int = Field(5, ge=0)
    poison_rate: float = Field(0.1, gt=0, lt=1)
    blend_alpha: float = Field(0.2, gt=0, le=1)
    clean_control: bool = True


class NCSection(_Section):
    samples: int = Field(1000, ge=1)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    init_cost: float = Field(1e-3, gt=0)
    patience: int = Field(5, ge=1)
    cost_multiplier: float = Field(2.0, gt=1)
    early_stop_patience: int = Field(25, ge=1)
    threshold: float = Field(2.0, gt=0)


class DefenseSection(_Section):
    inversion_steps: int = Field(100, ge=1)
    inversion_batch_size: int = Field(64, ge=1)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr_steps: list[tuple[int, float]] = Field(
        default_factory=lambda: [(0, 0.1), (1, 0.01), (10, 0.001)])
    temperature: float = Field(0.5, gt=0)
    ce_weight: float = Field(0.0, ge=0)  # 0 = the reference MCL loss
    # poisonlab's two additions to MCL's stage 2 (defenses/mcl.py says why); 0 and false give the
    # reference's stage 2 exactly.
    distill_weight: float = Field(1.0, ge=0)
    recalibrate_bn: bool = True
    freeze_bn: bool = False
    # The reference fine-tunes on the clean subset without augmentation (its loader only converts
    # to tensors). Measured on the cpu models, crop + flip moves MCL's BA either way (docs/status.md).
    augment: bool = False
    unlearning_fraction: float = Field(0.2, ge=0, le=1)


class FigureSection(_Section):
    points: int = Field(500, ge=10)
    method: Literal["pca", "tsne"] = "pca"


class Config(BaseConfig):
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 keeps torch's default
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    nc: NCSection = Field(default_factory=NCSection)
    defense: DefenseSection = Field(default_factory=DefenseSection)
    figures: FigureSection = Field(default_factory=FigureSection)


PRESETS: dict[str, dict] = {
    "smoke": {
        "data": {"dataset": "glyphs", "downsample": 2},
        "train": {"arch": "small_cnn", "epochs": 4, "batch_size": 64, "lr": 0.05,
                  "schedule": "cosine", "augment": False, "channels_last": False},
        "attack": {"attacks": ["badnets", "blend"], "target": 3},
        "nc": {"samples": 64, "steps": 40, "batch_size": 16, "early_stop_patience": 10},
        "defense": {"inversion_steps": 30, "epochs": 10, "augment": False},
        "figures": {"points": 200},
    },
    "cpu": {  # 2 shared cores: one thread is ~4x faster than two under load (measured)
        "threads": 1,
        "train": {"epochs": 8, "schedule": "onecycle"},
        "nc": {"samples": 200, "steps": 40, "batch_size": 50, "early_stop_patience": 10},
    },
    "paper": {},
}


def load_data(cfg: Config, data_dir: Path | None) -> SupervisedData:
    """The supervised set named by cfg.data, subsampled and downsampled as configured."""
    name = cfg.data.dataset
    if name == "glyphs":
        from poisonlab.data.glyphs import load_glyph_supervised

        data = load_glyph_supervised(seed=cfg.seed)
    else:
        from poisonlab.data.registry import load_dataset

        data = load_dataset(name, data_dir)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, test = data.train, data.test
    if cfg.data.train_size is not None and cfg.data.train_size < len(train):
        train = train.subset(torch.randperm(len(train), generator=gen)[: cfg.data.train_size])
    if cfg.data.test_size is not None and cfg.data.test_size < len(test):
        test = test.subset(torch.randperm(len(test), generator=gen)[: cfg.data.test_size])
    if cfg.data.downsample > 1:
        pool = torch.nn.functional.avg_pool2d
        train = ImageSet(pool(train.x, cfg.data.downsample), train.y)
        test = ImageSet(pool(test.x, cfg.data.downsample), test.y)
    if cfg.attack.target >= data.num_classes:
        raise ConfigError(f"attack.target={cfg.attack.target} is not a label of {name} "
                          f"({data.num_classes} classes)")
    return SupervisedData(train, test, data.classes)


def build_trigger(cfg: Config, name: str, image_shape) -> Trigger:
    options = {"alpha": cfg.attack.blend_alpha, "seed": cfg.seed} if name == "blend" else {}
    return make_trigger(name, image_shape, **options)


def clean_subset(train: ImageSet, fraction: float, seed: int) -> ImageSet:
    """The defender's clean data: a seeded `fraction` of the (unpoisoned) training set."""
    n = max(1, round(fraction * len(train)))
    return train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7))[:n])


def models_source(cfg: Config, run: Run, model: str | None) -> list[Run]:
    """The earlier runs whose trained models `--model` names (run ids, comma-separated).

    Reusing a model is only sound when it was trained on the same poisoned data: the data and
    training settings, the seed and the attack settings other than which attacks run (and whether
    the clean control does) must be equal; the defence settings may differ. Each model is taken
    from the first listed run that has it; models none of them has are trained.
    """
    if model is None:
        return []
    sources = []
    for run_id in (part.strip() for part in model.split(",") if part.strip()):
        source = Run.open(run_id, root=run.root)
        if source.experiment != NAME:
            raise ConfigError(f"--model {run_id}: run {source.id} is a '{source.experiment}' run, "
                              f"not '{NAME}'")
        theirs = validate_config(Config, source.config)
        per_model = {"attacks", "clean_control"}  # which models a run holds, not how they were made
        for section in ("seed", "data", "train", "attack"):
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


def train_model(cfg: Config, run: Run, name: str, train: ImageSet, shape, classes: int,
                progress: bool, sources: list[Run] = ()) -> torch.nn.Module:
    """Train model `name` on `train`, or reload it from this run or from a `sources` run."""
    model = build_model(cfg.train.arch, num_classes=classes, in_channels=shape[0])
    for origin in (run, *sources):
        saved = origin.load_checkpoint(f"model-{name}")
        if saved is not None:
            model.load_state_dict(saved[0])
            if origin is not run:  # keep this run self-contained, and poolable in its turn
                run.save_checkpoint(f"model-{name}", *saved)
            run.log(f"{name}: model loaded from run {origin.id}")
            return place(model, default_device(), cfg.train.channels_last).eval()
    t = cfg.train
    tc = TrainConfig(epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                     weight_decay=t.weight_decay, schedule=t.schedule, augment=t.augment,
                     channels_last=t.channels_last)
    torch.manual_seed(cfg.seed)
    history = train_classifier(model, train, tc, progress=progress,
                               checkpoint=RunCheckpoint(run, f"train-{name}"), seed=cfg.seed)
    run.save_checkpoint(f"model-{name}", model.state_dict(), {"arch": t.arch, "model": name})
    secs = sum(history["epoch_seconds"])
    run.log(f"{name}: trained {t.epochs} epochs on {len(train)} images in {secs:.0f}s "
            f"({secs / max(1, len(history['epoch_seconds'])):.1f}s/epoch this session)")
    return model.eval()


def nc_config(cfg: Config) -> InversionConfig:
    n = cfg.nc
    return InversionConfig(steps=n.steps, batch_size=n.batch_size, init_cost=n.init_cost,
                           patience=n.patience, cost_multiplier=n.cost_multiplier,
                           early_stop_patience=n.early_stop_patience, seed=cfg.seed)


def defense_configs(cfg: Config) -> tuple[MCLConfig, FineTuneConfig]:
    d = cfg.defense
    ft = FineTuneConfig(epochs=d.epochs, batch_size=d.batch_size,
                        lr_steps=tuple(tuple(s) for s in d.lr_steps), augment=d.augment,
                        freeze_bn=d.freeze_bn, seed=cfg.seed)
    inv = reference_inversion()
    inv.steps, inv.batch_size, inv.seed = d.inversion_steps, d.inversion_batch_size, cfg.seed
    return MCLConfig(inversion=inv, finetune=ft, temperature=d.temperature,
                     ce_weight=d.ce_weight, distill_weight=d.distill_weight,
                     recalibrate_bn=d.recalibrate_bn), ft


def scan(cfg: Config, model, clean: ImageSet, classes: int, progress: bool) -> DetectionResult:
    from poisonlab.progress import progress_bar

    x = clean.x[: cfg.nc.samples]
    with progress_bar(classes, "neural cleanse", enabled=progress) as bar:
        return NeuralCleanse(nc_config(cfg), cfg.nc.threshold).detect(
            model, x, classes, progress=lambda label: bar.advance(status=f"label {label}"))


def defend(cfg: Config, model, trigger: Trigger, clean: ImageSet, test: ImageSet,
           detection: DetectionResult, progress: bool = False) -> tuple[dict, dict]:
    """MCL and the two baselines against one backdoored model: (metrics, artefacts)."""
    from poisonlab.progress import progress_bar

    target = cfg.attack.target
    mcl_cfg, ft_cfg = defense_configs(cfg)
    mcl = MCL(mcl_cfg)
    out, timing = {}, {}
    with progress_bar(mcl.steps() + 2 * ft_cfg.epochs, "defences", enabled=progress) as bar:
        def step(stage: str):
            return lambda status: bar.advance(status=f"{stage} {status}")

        t0 = time.perf_counter()
        purified = mcl.purify(model, clean, target, progress=step("MCL"))
        timing["mcl"] = time.perf_counter() - t0
        out["mcl"] = backdoor_metrics(purified.model, trigger, test, target)
        t0 = time.perf_counter()
        tuned = fine_tune(model, clean, ft_cfg, progress=step("fine-tuning"))
        out["fine_tuning"] = backdoor_metrics(tuned, trigger, test, target)
        timing["fine_tuning"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        nc_trigger = detection.results[target].trigger
        unlearned = nc_unlearning(model, clean, nc_trigger, cfg.defense.unlearning_fraction, ft_cfg,
                                  progress=step("NC unlearning"))
        out["nc_unlearning"] = backdoor_metrics(unlearned, trigger, test, target)
        timing["nc_unlearning"] = time.perf_counter() - t0
    out["mcl_inversion"] = {"norm": purified.inversion.norm,
                            "attack_success": purified.inversion.attack_success}
    out["seconds"] = timing
    return out, {"purified_model": purified.model, "mcl_trigger": purified.inversion.trigger,
                 "nc_trigger": nc_trigger}


def run_attack(cfg: Config, run: Run, name: str, data: SupervisedData, clean: ImageSet,
               progress: bool, sources: list[Run] = ()) -> tuple[dict, dict]:
    """Train (or reload) the model of one attack, scan it, defend it; (metrics, artefacts)."""
    shape = tuple(data.train.x.shape[1:])
    trigger = build_trigger(cfg, name, shape)
    injection = BackdoorInjection(trigger, cfg.attack.target, cfg.attack.poison_rate, cfg.seed)
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
            return saved["entry"], _restore_artefacts(cfg, saved, purified, model, trigger)
    entry = {"backdoored": backdoor_metrics(model, trigger, data.test, cfg.attack.target)}
    detection = scan(cfg, model, clean, data.num_classes, progress)
    t2 = time.perf_counter()
    target = cfg.attack.target
    entry |= {"nc_anomaly_index": float(detection.anomaly_index[target]),
              "nc_flagged": detection.flagged, "nc": detection.to_dict()}
    defended, artefacts = defend(cfg, model, trigger, clean, data.test, detection, progress)
    entry |= defended
    entry["seconds"] |= {"train": t1 - t0, "neural_cleanse": t2 - t1}
    _save_artefacts(run, name, entry, artefacts)
    run.log(f"{name}: BA {entry['backdoored']['benign_accuracy']:.4f} ASR "
            f"{entry['backdoored']['attack_success_rate']:.4f} -> MCL ASR "
            f"{entry['mcl']['attack_success_rate']:.4f}; NC index {entry['nc_anomaly_index']:.2f}")
    return entry, {"model": model, "trigger": trigger, **artefacts}


def _save_artefacts(run: Run, name: str, entry: dict, artefacts: dict) -> None:
    nc = artefacts["nc_trigger"]
    run.save_checkpoint(f"model-{name}-mcl", artefacts["purified_model"].state_dict(),
                        {"arch": "purified", "model": name})
    run.save_state(f"result-{name}", {"entry": entry, "nc_mask": nc.mask, "nc_pattern": nc.pattern,
                                      "mcl_delta": artefacts["mcl_trigger"].delta})


def same_defence(cfg: Config, source: Run) -> bool:
    """Whether `source` (already checked to hold the same models) detected and defended alike."""
    theirs = validate_config(Config, source.config)
    # A run recorded before a setting existed ran without it, whatever its default is now.
    recorded = all(set(source.config.get(name, {})) == set(type(getattr(cfg, name)).model_fields)
                   for name in ("nc", "defense"))
    return recorded and theirs.nc == cfg.nc and theirs.defense == cfg.defense


def _restore_artefacts(cfg: Config, saved: dict, weights: dict, model, trigger) -> dict:
    from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger

    purified = build_model(cfg.train.arch, num_classes=int(model.head.out_features),
                           in_channels=int(saved["mcl_delta"].shape[0]))
    purified.load_state_dict(weights)
    purified = place(purified, default_device(), cfg.train.channels_last).eval()
    return {"model": model, "trigger": trigger, "purified_model": purified,
            "mcl_trigger": AdditiveTrigger(saved["mcl_delta"]),
            "nc_trigger": MaskTrigger(saved["nc_mask"], saved["nc_pattern"])}


def run(cfg: Config, run: Run, data_dir: Path | None = None, model: str | None = None,
        progress: bool = True) -> dict:
    """One trial: train the models, detect, purify, compare; write metrics, figures and report.

    `model` names earlier backdoor-defense runs (comma-separated ids) whose trained models are
    reused (same data, training and attack settings), so only the missing models are trained;
    detection and the defences run again unless a source ran them with the same settings, whose
    results are then taken over (so attacks run in parallel processes can be pooled into one run).
    """
    sources = models_source(cfg, run, model)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg, data_dir)
    clean = clean_subset(data.train, cfg.data.clean_fraction, cfg.seed)
    run.log(f"data: {cfg.data.dataset}, train {len(data.train)}, test {len(data.test)}, "
            f"clean subset {len(clean)}, device {default_device()}")
    metrics: dict = {"dataset": cfg.data.dataset, "arch": cfg.train.arch,
                     "target": cfg.attack.target, "clean_samples": len(clean), "attacks": {}}
    if sources:
        metrics["models_from"] = [source.id for source in sources]
    artefacts = {}
    for name in cfg.attack.attacks:
        metrics["attacks"][name], artefacts[name] = run_attack(cfg, run, name, data, clean, progress,
                                                                sources)
    if cfg.attack.clean_control:
        shape = tuple(data.train.x.shape[1:])
        model = train_model(cfg, run, "clean", data.train, shape, data.num_classes, progress,
                            sources)
        detection = scan(cfg, model, clean, data.num_classes, progress)
        metrics["clean_model"] = {"benign_accuracy": _accuracy(model, data.test),
                                  "nc_flagged": detection.flagged, "nc": detection.to_dict()}
    run.write_metrics(metrics)
    write_report(run, cfg, metrics, artefacts, data, clean)
    return metrics


def _accuracy(model, test: ImageSet) -> float:
    from poisonlab.training.supervised import evaluate

    return evaluate(model, test)


def results_rows(metrics: dict) -> list[list]:
    """One row per attack and stage: BA and ASR in percent, NC index of the target."""
    rows = []
    for name, entry in metrics["attacks"].items():
        for stage in ("backdoored", *DEFENSES):
            nc = [entry["nc_anomaly_index"], ",".join(map(str, entry["nc_flagged"])) or "-"]
            rows.append([name if stage == "backdoored" else "", stage,
                         100 * entry[stage]["benign_accuracy"],
                         100 * entry[stage]["attack_success_rate"],
                         *(nc if stage == "backdoored" else [None, None])])
    return rows


def results_columns() -> list[str]:
    return ["attack", "model", "BA %", "ASR %", "NC index (target)", "NC flagged"]


def render(metrics: dict):
    """The headline table: BA / ASR before and after each defence, NC index of the target."""
    from poisonlab.report.html import Table, rich_table

    title = f"backdoor-defense ({metrics['dataset']}, {metrics['arch']}, target {metrics['target']})"
    if "clean_model" in metrics:
        flagged = metrics["clean_model"]["nc_flagged"]
        title += f"; clean model NC flagged: {', '.join(map(str, flagged)) or 'none'}"
    return rich_table(Table(columns=results_columns(), rows=results_rows(metrics)), title=title)


# --- figures and report -----------------------------------------------------------------------


def _show(ax, image: torch.Tensor, title: str) -> None:
    img = image.detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def trigger_figure(path: Path, artefacts: dict, example: torch.Tensor) -> Path:
    """Per attack: the real trigger, a triggered image, the NC and MCL inverted triggers."""
    from poisonlab.report.style import new_figure, save_figure

    names = list(artefacts)
    fig, axes = new_figure(7.0, 1.9 * len(names), nrows=len(names), ncols=4, squeeze=False)
    for row, name in enumerate(names):
        a = artefacts[name]
        _show(axes[row, 0], a["trigger"].visual(), f"{name}: real trigger")
        _show(axes[row, 1], a["trigger"].apply(example), "triggered input")
        _show(axes[row, 2], a["nc_trigger"].visual(), "NC inverted (mask·pattern)")
        _show(axes[row, 3], a["mcl_trigger"].visual(), "MCL inverted |δ|")
    return save_figure(fig, path)


def _embed(features: torch.Tensor, method: str, seed: int):
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
        return TSNE(2, perplexity=perplexity, random_state=seed).fit_transform(features.numpy())
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(features.numpy())


def feature_figure(path: Path, cfg: Config, artefacts: dict, test: ImageSet) -> Path:
    """Penultimate features of clean vs triggered test inputs, before and after MCL (2-D view)."""
    from poisonlab.report.style import new_figure, save_figure
    from poisonlab.training.supervised import predict_features

    names = list(artefacts)
    keep = test.y != cfg.attack.target
    x = test.x[keep][: cfg.figures.points // 2]
    fig, axes = new_figure(7.0, 3.0 * len(names), nrows=len(names), ncols=2, squeeze=False)
    for row, name in enumerate(names):
        a = artefacts[name]
        xt = a["trigger"].apply(x)
        for col, (label, model) in enumerate((("before MCL", a["model"]),
                                              ("after MCL", a["purified_model"]))):
            feats = predict_features(model, torch.cat([x, xt]))
            pts = _embed(feats, cfg.figures.method, cfg.seed)
            ax = axes[row, col]
            ax.scatter(pts[: len(x), 0], pts[: len(x), 1], s=4, alpha=0.6, label="clean")
            ax.scatter(pts[len(x):, 0], pts[len(x):, 1], s=4, alpha=0.6, label="triggered")
            ax.set_title(f"{name}: {label} ({cfg.figures.method.upper()})")
            ax.legend(loc="best", markerscale=3)
    return save_figure(fig, path)


def write_report(run: Run, cfg: Config, metrics: dict, artefacts: dict, data: SupervisedData,
                 clean: ImageSet) -> Path:
    from poisonlab.report.html import Section, Table, write_html_report

    figures = []
    if artefacts:
        example = data.test.x[data.test.y != cfg.attack.target][0]
        figures.append(trigger_figure(run.figure_path("triggers.png"), artefacts, example))
        figures.append(feature_figure(run.figure_path("features.png"), cfg, artefacts, data.test))
    nc_rows = [[name, e["nc_anomaly_index"], ", ".join(map(str, e["nc_flagged"])) or "none"]
               for name, e in metrics["attacks"].items()]
    if "clean_model" in metrics:
        flagged = metrics["clean_model"]["nc_flagged"]
        nc_rows.append(["clean model", None, ", ".join(map(str, flagged)) or "none"])
    settings = (f"{cfg.data.dataset}: {len(data.train)} training and {len(data.test)} test images; "
                f"{cfg.train.arch} trained {cfg.train.epochs} epochs ({cfg.train.schedule}); "
                f"all-to-one target {cfg.attack.target}, poison rate {cfg.attack.poison_rate}; "
                f"defences on {len(clean)} clean images ({cfg.data.clean_fraction:.0%}), "
                f"{cfg.defense.epochs} epochs, lr steps {cfg.defense.lr_steps}, "
                f"{'with' if cfg.defense.augment else 'without'} augmentation; "
                f"MCL τ = {cfg.defense.temperature}, CE weight {cfg.defense.ce_weight}, "
                f"clean self-distillation weight {cfg.defense.distill_weight}, batch-norm "
                f"statistics {'re-estimated on the clean images' if cfg.defense.recalibrate_bn else 'as trained'}"
                + (f"; models from run {', '.join(metrics['models_from'])}" if "models_from" in metrics
                   else "") + ".")
    sections = [
        Section("Settings", paragraphs=[settings]),
        Section("Benign accuracy and attack success rate",
                tables=[Table(results_columns(), results_rows(metrics))]),
        Section("Neural Cleanse", paragraphs=[
            f"Anomaly index of the true target; labels with index > {cfg.nc.threshold} below the "
            "median mask norm are flagged."],
                tables=[Table(["model", "anomaly index of target", "flagged labels"], nc_rows)]),
        Section("Figures", figures=figures),
    ]
    return write_html_report(run.path / "report.html", "backdoor-defense", sections)
