"""Experiment `metapoison`: clean-label targeted poisoning of networks trained from scratch.

Wires: a training subset (the reference's first images of each class) and target images of one
class (poisonlab.evaluation.metapoison_data) → the same `budget` poisons of the poison class
crafted per target by MetaPoison (Huang et al. 2020: unrolled, staggered surrogate ensemble,
additive δ plus a smooth colour transform) and by gradient matching (Geiping et al. 2021, on a
surrogate trained on the clean subset) → victims of every architecture trained from scratch on
each poisoned set, several trials, beside the unperturbed baseline on the same (target, trial)
pairs; the transfer matrix over surrogate × victim architectures → metrics, figures and an HTML
report. The study is poisonlab.evaluation.metapoison; crafting state, poisons and finished
victims are kept in the run, so `--resume` continues from the last saved craft step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from poisonlab.config import BaseConfig, Threads
from poisonlab.device import seed_everything
from poisonlab.evaluation.metapoison import check_feasible, evaluate
from poisonlab.evaluation.metapoison_config import StudyConfig
from poisonlab.evaluation.metapoison_data import load_data
from poisonlab.evaluation.metapoison_results import StudyResult
from poisonlab.executors import Executor
from poisonlab.report.metapoison import terminal, write_report
from poisonlab.runs import Run

NAME = "metapoison"


class Config(BaseConfig, StudyConfig):
    """The study's settings (poisonlab.evaluation.metapoison_config.StudyConfig: data, targets,
    victims with their TrainConfig, surrogates, metapoison = MetaPoison.Config,
    gradient_matching = GradientMatching.Config), the seed, and threads: torch intra-op threads
    (0 keeps torch's default)."""

    threads: Threads = 0


_SMOKE_VICTIM = {"epochs": 2, "batch_size": 20, "lr": 0.05, "schedule": "none"}

PRESETS: dict[str, dict] = {
    # Seconds, no data set needed: 100 glyph images (as RGB, padded to 32×32), 2 targets.
    "smoke": {
        "threads": 1,
        "data": {"dataset": "glyphs", "train_per_class": 10, "test_size": 200},
        "targets": {"poison_class": 5, "target_class": 2, "ids": [0, 1]},
        "surrogates": ["convnet_bn"],
        "metapoison": {"budget": 4, "ensemble": 2, "craft_steps": 2, "batch_size": 20,
                       "unroll_steps": 1, "warmup_epochs": 1},
        "gradient_matching": {"restarts": 1, "iterations": 4},
        "victims": {"archs": ["convnet_bn", "tiny_cnn"], "trials": 2, "train": _SMOKE_VICTIM},
    },
    # The reference quick start's data and threat model (5,000-image CIFAR-10 subset, 50 dog
    # poisons, bird targets, ε = 8/255 + colour 0.04) with M, craft steps and victim epochs cut to
    # fit about 2.2 hours on 2 idle CPU cores, sized from measured costs: one surrogate's craft
    # step (a clean epoch with the meta-gradient on its ~29 poison batches) 17.5 s, a victim epoch
    # 4.3 s (ConvNetBN) and 19.2 s (ResNet-20): crafting 5 × 4 × 12 × 17.5 s ≈ 70 min, 33 ConvNetBN
    # victims ≈ 24 min, 11 ResNet-20 transfer victims (one trial each) ≈ 35 min.
    "cpu": {
        "threads": 2,
        "data": {"dataset": "cifar10", "train_per_class": 500, "test_size": 2000},
        "targets": {"poison_class": 5, "target_class": 2, "ids": [0, 1, 2, 3, 4]},
        "surrogates": ["convnet_bn"],
        "metapoison": {"budget": 50, "ensemble": 4, "craft_steps": 12, "craft_milestones": [6, 9],
                       "warmup_epochs": 2},
        "gradient_matching": {"restarts": 2, "iterations": 100},
        "victims": {"archs": ["convnet_bn", "resnet20"], "trials": 3, "transfer_trials": 1,
                    "train": {"epochs": 10, "milestones": [6, 8]}},
    },
    # The reference quick start: M = 24, 61 craft steps, 8 trials of 200-epoch victims (a GPU job).
    "paper": {},
}

# The numbers of metrics.json, as `sweep --metric` names them (see poisonlab.experiments): the
# MetaPoison numbers at the top level, the other attacks' under their names (`*`).
_ATTACK = ("success_rate", "ci95", "baseline_success_rate", "baseline_ci95",
           "victim_clean_accuracy", "clean_victim_accuracy", "per_target.*.success_rate",
           "per_target.*.baseline_success_rate")
METRICS: tuple[str, ...] = (
    "train_images", "budget", "poison_class", "target_class", "adv_class", *_ATTACK,
    *(f"*.{k}" for k in _ATTACK), "seconds.*",
)


def run(cfg: Config, run: Run, data_dir: Path | None = None, progress: bool = True, *,
        executor: Executor | None = None) -> dict:
    """Craft, train the victims, measure; write metrics.json, figures and report.html.

    The craftings and the victims are pieces run on `executor` (None: local), each recorded in
    the run as it completes; with `metapoison.slices` > 1 MetaPoison's craftings run on the
    driver instead, one target after another, each on that many actors of `executor`."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_data(cfg.data, data_dir, cfg.seed)
    run.input_shape = tuple(data.train.x.shape[1:])
    check_feasible(cfg, data)
    result = evaluate(cfg, run, data, seed=cfg.seed, progress=progress, executor=executor)
    metrics = result.metrics()
    run.write_metrics(metrics)
    write_report(run, cfg, result)
    return metrics


def render(metrics: dict):
    """Success against the baseline and the transfer matrices as rich tables."""
    return terminal(StudyResult.from_metrics(metrics))
