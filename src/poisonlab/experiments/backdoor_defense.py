"""Experiment `backdoor-defense`: backdoored classifiers, Neural Cleanse detection, MCL purification.

Wires: supervised data (CIFAR-10 from --data-dir; MNIST; or the embedded glyph set) → a model per
attack trained on all-to-one poisoned data (BadNets patch, Blend, grid, Trojan square) plus a clean
control model → Neural Cleanse on each → MCL (Yue et al. 2023) and two baselines (plain
fine-tuning, Neural Cleanse unlearning) on the same clean subset (5% of the training set) →
benign accuracy / attack success rate before and after → figures and an HTML report. The protocol
is poisonlab.evaluation.backdoor; tables and figures are poisonlab.report.backdoor.

Keys: `arch`; `data.*`; `train.*` (TrainConfig); `attack.*`; `nc.samples` and Neural Cleanse's
`nc.threshold`, `nc.inversion.*` (InversionConfig); `defense.*` is MCL.Config (`defense.inversion.*`,
`defense.finetune.*` — the schedule of all three defences —, `defense.distill_weight`, ...) plus
`defense.unlearning_fraction`; `figures.*`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from poisonlab.config import Threads
from poisonlab.device import default_device, seed_everything
from poisonlab.evaluation.backdoor import (
    ProtocolConfig,
    clean_subset,
    evaluate_defences,
    load_data,
    models_source,
)
from poisonlab.evaluation.backdoor_results import BackdoorResults
from poisonlab.executors import Executor
from poisonlab.report import backdoor as report
from poisonlab.report.backdoor import FigureConfig
from poisonlab.runs import Run

NAME = "backdoor-defense"

class Config(ProtocolConfig):
    """The protocol's settings (ProtocolConfig; defaults: the papers'), plus `threads` (torch
    intra-op threads; 0 keeps torch's default) and the figure settings."""

    threads: Threads = 0
    figures: FigureConfig = Field(default_factory=FigureConfig)


PRESETS: dict[str, dict] = {
    "smoke": {
        "arch": "small_cnn",
        "data": {"dataset": "glyphs", "downsample": 2},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.05, "schedule": "cosine",
                  "augment": False, "channels_last": False},
        "attack": {"attacks": ["badnets", "blend"], "target": 3},
        "nc": {"samples": 64, "inversion": {"steps": 40, "batch_size": 16,
                                            "early_stop_patience": 10}},
        "defense": {"inversion": {"steps": 30}, "finetune": {"epochs": 10, "augment": False}},
        "figures": {"points": 200},
    },
    "cpu": {  # the CPU-sized run: one torch thread, fewer epochs, a smaller Neural Cleanse scan
        "threads": 1,
        "train": {"epochs": 8, "schedule": "onecycle"},
        "nc": {"samples": 200, "inversion": {"steps": 40, "batch_size": 50,
                                             "early_stop_patience": 10}},
    },
    "paper": {},
}

# The numbers of metrics.json, as `sweep --metric` names them (see poisonlab.experiments); `*`:
# an attack, or a defence's stage.
METRICS: tuple[str, ...] = (
    "target", "clean_samples", "attacks.*.benign_accuracy", "attacks.*.attack_success_rate",
    "attacks.*.nc_anomaly_index", "attacks.*.nc.*", "attacks.*.mcl_inversion.*",
    "attacks.*.seconds.*", "clean_model.benign_accuracy", "clean_model.nc.*",
)


def run(cfg: Config, run: Run, data_dir: Path | None = None, model: str | None = None,
        progress: bool = True, *, executor: Executor | None = None) -> dict:
    """One trial: train the models, detect, purify, compare; write metrics, figures and report.

    `model` names earlier backdoor-defense runs (comma-separated ids) whose trained models are
    reused (same data, training and attack settings), so only the missing models are trained;
    detection and the defences run again unless a source ran them with the same settings, whose
    results are then taken over (so attacks run in parallel processes can be pooled into one run).
    Each attack (and the clean control) is a piece run on `executor` (None: local), recorded in
    the run as it completes.
    """
    sources = models_source(cfg, run, model)
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg, data_dir)
    run.input_shape = tuple(data.train.x.shape[1:])
    clean = clean_subset(data.train, cfg.data.clean_fraction, cfg.seed)
    run.log(f"data: {cfg.data.dataset}, train {len(data.train)}, test {len(data.test)}, "
            f"clean subset {len(clean)}, device {default_device()}")
    results = evaluate_defences(cfg, run, data, clean, progress, sources, executor)
    metrics = results.to_metrics()
    run.write_metrics(metrics)
    models = {name: a.models for name, a in results.attacks.items()}
    figures = []
    if models:
        test, target = data.test, cfg.attack.target
        example = test.x[test.y != target][0]
        figures.append(report.trigger_figure(run.figure_path("triggers.png"), models, example))
        figures.append(report.feature_figure(run.figure_path("features.png"), models, test,
                                             target, cfg.figures, cfg.seed))
    report.write_report(run.path / "report.html", results, cfg, figures, len(data.train),
                        len(data.test))
    return metrics


def render(metrics: dict):
    """The headline table: BA / ASR before and after each defence, NC index of the target."""
    return report.render(BackdoorResults.from_metrics(metrics))
