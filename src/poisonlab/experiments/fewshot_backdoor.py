"""Experiment `fewshot-backdoor`: Kato et al.'s support-set backdoor on MAML, with ASP beside it.

Wires: few-shot data (Omniglot from --data-dir, else the embedded glyph set) → CNN4 → MAML
meta-training (`training.meta_trainer`, or a given meta-trained model) → the evaluation protocol
(`evaluation.fewshot`: on T meta-test tasks, for each ε, the support-set backdoor and the ASP
baseline → CA / BA / ASR with 95% CIs) → figures and an HTML report (`report.fewshot`).

Sections: `data`, `model` (CNN4's width), `meta` (`MetaTrainConfig`) and `attack`
(`FewShotEvalConfig`: the attacker's `SupportBackdoor.Config` and the protocol's settings). The
victim's fine-tuning (`attack.finetune_steps`, `attack.finetune_lr`) is also what meta-training
validates with.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from poisonlab.config import BaseConfig, Seed, Settings
from poisonlab.data.glyphs import load_glyphs
from poisonlab.data.omniglot import load_omniglot, split_omniglot_classes
from poisonlab.data.registry import refuse_data_dir, resolve_data_dir
from poisonlab.data.types import FewShotData
from poisonlab.device import default_device, seed_everything
from poisonlab.errors import ConfigError, ModelFileError
from poisonlab.evaluation.fewshot import FewShotEvalConfig, FewShotResult, evaluate_attacks
from poisonlab.executors import Executor
from poisonlab.models import build_model
from poisonlab.models.cnn4 import cnn4_forward_tasks, cnn4_forward_tasks_matmul
from poisonlab.report.fewshot import terminal_table, write_report
from poisonlab.runs import Run
from poisonlab.runs.checkpoints import load_into, load_weights
from poisonlab.training.meta_trainer import MetaTrainConfig, MetaTrainState, meta_train

NAME = "fewshot-backdoor"


class DataConfig(Settings):
    """dataset: "omniglot", "glyphs" (embedded), or "auto" (omniglot if a data dir is given);
    glyph_classes: classes of the glyph set; split_seed: the train/val/test class split."""

    dataset: Literal["auto", "omniglot", "glyphs"] = "auto"
    glyph_classes: int = Field(1200, ge=30)
    split_seed: Seed = 0


class ModelConfig(Settings):
    """hidden: CNN4's filters per convolution (64 in the MAML reference)."""

    hidden: int = Field(64, ge=1)


class Config(BaseConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    meta: MetaTrainConfig = Field(default_factory=MetaTrainConfig)
    attack: FewShotEvalConfig = Field(default_factory=FewShotEvalConfig)


PRESETS: dict[str, dict] = {
    "smoke": {
        "data": {"dataset": "glyphs", "glyph_classes": 120},
        "model": {"hidden": 32},
        "meta": {"iterations": 30, "meta_batch": 8, "eval_every": 15, "val_tasks": 20},
        "attack": {"epsilons": [0.1, 0.3], "tasks": 24, "task_batch": 24, "iterations": 5},
    },
    "demo": {
        "data": {"dataset": "glyphs"},
        "meta": {"iterations": 150, "eval_every": 50, "val_tasks": 50},
        "attack": {"epsilons": [0.03, 0.1, 0.3], "asp_epsilons": [0.3], "tasks": 50,
                   "task_batch": 4},
    },
    "cpu": {
        "meta": {"iterations": 1500, "eval_every": 250, "val_tasks": 200},
        "attack": {"epsilons": [0.07, 0.3, 0.5], "asp_epsilons": [0.3], "tasks": 500,
                   "task_batch": 4},
    },
    "paper": {},
}

# The numbers of metrics.json, as `sweep --metric` names them (see poisonlab.experiments).
METRICS: tuple[str, ...] = (
    "tasks", "attacker_keep_support", "clean_accuracy", "clean_accuracy_ci95",
    "clean_trigger_to_target_rate", "clean_trigger_to_target_rate_ci95",
    "clean_trigger_accuracy", "clean_trigger_accuracy_ci95", "asp_accuracy", "asp_accuracy_ci95",
    "epsilon", "backdoor_accuracy", "attack_success_rate",
    *(f"headline.{k}" for k in ("epsilon", "clean_accuracy", "backdoor_accuracy",
                                "attack_success_rate", "asp_accuracy")),
    "meta_training.*", "seconds.meta_training", "seconds.attack",
)


def load_bank(cfg: Config, data_dir: Path | None) -> tuple[FewShotData, str]:
    """The class bank and its name: Omniglot when asked for (or a data dir is given), else glyphs."""
    dataset = cfg.data.dataset
    if dataset == "auto":
        dataset = "omniglot" if data_dir is not None else "glyphs"
    refuse_data_dir(dataset, data_dir)
    if dataset == "glyphs":
        return load_glyphs(num_classes=cfg.data.glyph_classes, seed=cfg.data.split_seed), dataset
    return load_omniglot(resolve_data_dir("omniglot", data_dir)), dataset


def split_bank(bank: FewShotData, seed: int) -> tuple[FewShotData, FewShotData, FewShotData]:
    train, val, test = split_omniglot_classes(bank.num_classes, seed=seed)
    return bank.subset(train), bank.subset(val), bank.subset(test)


def check_feasible(cfg: Config, test: FewShotData) -> None:
    m = cfg.meta
    if m.ways > test.num_classes:
        raise ConfigError(f"meta.ways={m.ways} exceeds the {test.num_classes} test classes")
    if m.shots + m.queries > test.samples_per_class:
        raise ConfigError(
            f"meta.shots + meta.queries = {m.shots + m.queries} exceeds the "
            f"{test.samples_per_class} samples per class")


def obtain_model(cfg: Config, run: Run, train: FewShotData, val: FewShotData, device,
                 model: str | None, progress: bool) -> tuple[dict, dict]:
    """θ* and a summary of meta-training: loaded from `model`, or meta-trained (resuming)."""
    if model is not None:
        return load_meta_model(model, cfg, device, run.root), {"source": str(model)}
    net = build_model("cnn4", cfg.meta.ways, train.images.shape[2], hidden=cfg.model.hidden)
    theta = {k: v.to(device) for k, v in net.state_dict().items()}
    resume = _load_resume(run)
    if resume is not None:
        run.log(f"resuming meta-training at iteration {resume.iteration}")

    def checkpoint(state: MetaTrainState) -> None:
        run.save_state("meta_state", state.__dict__)
        run.save_checkpoint("model", state.best_theta, _model_meta(cfg, train))

    start = time.perf_counter()
    state = meta_train(cnn4_forward_tasks, theta, train, val, cfg.meta, seed=cfg.seed,
                       device=device, resume=resume, checkpoint=checkpoint, log=run.log,
                       progress=progress, finetune_steps=cfg.attack.finetune_steps,
                       finetune_lr=cfg.attack.finetune_lr,
                       compiled_forward=cnn4_forward_tasks_matmul)
    if cfg.meta.iterations == 0:
        checkpoint(state)
    summary = {"iterations": state.iteration, "best_val_accuracy": state.best_val,
               "seconds": time.perf_counter() - start, "history": state.history}
    return state.best_theta, summary


def _model_meta(cfg: Config, train: FewShotData) -> dict:
    return {"arch": "cnn4", "ways": cfg.meta.ways, "hidden": cfg.model.hidden,
            "in_channels": int(train.images.shape[2])}


def _load_resume(run: Run) -> MetaTrainState | None:
    if not run.resumed:
        return None
    state = run.load_state("meta_state")
    return None if state is None else MetaTrainState(**state)


def load_meta_model(model: str, cfg: Config, device, root: Path | None = None) -> dict:
    """θ* from a run id (its best checkpoint) or a weights file; checked against CNN4's shapes."""
    path = Path(model)
    if not path.exists() and not path.is_symlink():  # a broken link is named as a file
        path = Run.open(model, root=root).checkpoint_path("model")
    state, _ = load_weights(path)
    hidden = cfg.model.hidden
    first = state.get("body.0.weight", torch.empty(hidden, 1, 3, 3))
    if first.dim() != 4:  # the channels are read from it: a conv weight [out, in, kh, kw]
        raise ModelFileError(f"{path}: body.0.weight has shape {list(first.shape)}, not the "
                             "[out, in, 3, 3] of CNN4's first convolution")
    net = build_model("cnn4", cfg.meta.ways, first.shape[1], hidden=hidden)
    load_into(net, state, name=f"cnn4 ({cfg.meta.ways}-way, hidden {hidden})")
    return {k: v.to(device) for k, v in net.state_dict().items()}


def run(cfg: Config, run: Run, data_dir: Path | None = None, model: str | None = None,
        progress: bool = True, *, executor: Executor | None = None) -> dict:
    """One trial: meta-train (or load) CNN4, attack T tasks at every ε, write figures and report.

    The attack chunks (per chunk of tasks and ε) run on `executor` (None: local threads) and are
    kept in the run as they complete, so a resumed run skips those it has."""
    seed_everything(cfg.seed)
    device = default_device()
    t0 = time.perf_counter()
    bank, dataset = load_bank(cfg, data_dir)
    train, val, test = split_bank(bank, cfg.data.split_seed)
    check_feasible(cfg, test)
    run.log(f"data: {dataset}, {bank.num_classes} classes ({train.num_classes}/"
            f"{val.num_classes}/{test.num_classes}), device {device}")
    theta, meta_summary = obtain_model(cfg, run, train, val, device, model, progress)
    t1 = time.perf_counter()
    result = evaluate_attacks(cnn4_forward_tasks, theta, test, cfg.meta, cfg.attack,
                              seed=cfg.seed, device=device, progress=progress, run=run,
                              executor=executor)
    metrics = result.metrics()
    metrics |= {"dataset": dataset, "meta_training": {k: v for k, v in meta_summary.items()
                                                    if k != "history"},
                "seconds": {"meta_training": t1 - t0, "attack": time.perf_counter() - t1}}
    run.write_metrics(metrics)
    write_report(run, result, cfg.attack, cfg.meta, dataset, meta_summary.get("history", []))
    return metrics


def render(metrics: dict):
    """The headline table: CA, BA, ASR (and ASP accuracy) per ε, in percent with 95% CIs."""
    result = FewShotResult.from_metrics(metrics)
    return terminal_table(result, title=f"{NAME} ({result.tasks} tasks)")
