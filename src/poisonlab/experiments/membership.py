"""Experiment `membership`: membership inference on an overfit classifier, attacks and defences.

Wires: a supervised training set split into four disjoint parts (target-in, target-out,
shadow-in, shadow-out; Shokri et al. 2017) → the target trained on target-in, shadow models
trained on the shadow parts, LiRA shadow models on random halves of target-in ∪ target-out
(Carlini et al. 2022) → the attacks shadow (attack MLP), lira_online, lira_offline, label_only
(Choquette-Choo et al. 2021) and threshold (Yeom et al. 2018), each scored on target-in (members)
against target-out (non-members) → the defences (dropout, early stopping, DP-SGD, labels only,
rounding, top-k), each as a pair of the stated attack's numbers and the target's test accuracy →
the target × shadow architecture matrix of the shadow attack's accuracy, with normal and
dropout-trained targets → figures and an HTML report. The study is
poisonlab.evaluation.membership; every trained model, query and score is kept in the run, so
`--resume` skips what is done.
"""

from __future__ import annotations

from pathlib import Path

import torch

from poisonlab.config import BaseConfig, Threads
from poisonlab.device import seed_everything
from poisonlab.evaluation.membership import MembershipResult, evaluate
from poisonlab.evaluation.membership_config import StudyConfig
from poisonlab.evaluation.membership_study import check_feasible, load_data
from poisonlab.executors import Executor
from poisonlab.report.membership import terminal, write_report
from poisonlab.runs import Run

NAME = "membership"


class Config(BaseConfig, StudyConfig):
    """The study's settings (poisonlab.evaluation.membership_config.StudyConfig), the seed, and
    threads: torch intra-op threads (0 keeps torch's default)."""

    threads: Threads = 0


PRESETS: dict[str, dict] = {
    "smoke": {
        "threads": 1,
        "data": {"dataset": "auto", "part_size": 200, "test_size": 500, "downsample": 2},
        "arch": "tiny_cnn",
        "train": {"epochs": 15, "batch_size": 32, "optimizer": "adam", "lr": 0.01,
                  "weight_decay": 0.0, "schedule": "none", "channels_last": False},
        "shadow": {"epochs": 100, "batch_size": 400},
        "lira": {"shadows": 4, "global_variance": True},
        "label_only": {"records": 200, "flip": False},
        "defense": {"early_stopping_epochs": 4,
                    "dp": {"epochs": 10, "batch_size": 100, "lr": 0.5}},
        "matrix": {"targets": ["tiny_cnn"], "shadows": ["tiny_cnn", "small_cnn"]},
    },
    # CIFAR-10 on one CPU core: an overfit ResNet-20 target on 12,500 images without
    # augmentation, trained briefly, one attack MLP per class, few LiRA shadows.
    "cpu": {
        "threads": 1,
        "data": {"dataset": "cifar10", "part_size": 12500, "test_size": 5000},
        "arch": "resnet20",
        "train": {"epochs": 16, "batch_size": 64, "lr": 0.05, "weight_decay": 0.0,
                  "schedule": "cosine", "augment": False},
        "shadow": {"per_class": True},
        "lira": {"shadows": 2, "global_variance": True},
        "label_only": {"records": 1000},
        "defense": {"early_stopping_epochs": 4,
                    "dp": {"epochs": 3, "batch_size": 256, "lr": 0.5, "noise_multiplier": 1.0}},
        "matrix": {"targets": ["resnet20"], "shadows": ["resnet20", "resnet32"]},
    },
    "paper": {},
}

# The numbers of metrics.json, as `sweep --metric` names them (see poisonlab.experiments); `*`:
# an attack, defence or shadow variant, or a TPR's false-positive rate.
_SUMMARY = ("attack_accuracy", "auc", "tpr_at_fpr_*")
METRICS: tuple[str, ...] = (
    "records", "target.train_accuracy", "target.test_accuracy",
    *(f"attacks.*.{k}" for k in (*_SUMMARY, "test_accuracy")),
    *(f"shadow_variants.*.{k}" for k in _SUMMARY),
    *(f"defenses.*.{k}" for k in (*_SUMMARY, "test_accuracy", "epochs", "epsilon")),
    "defenses.*.threshold_attack.*", "matrix.*", "dp_sgd.*", "seconds.*",
)


def run(cfg: Config, run: Run, data_dir: Path | None = None, progress: bool = True,
        executor: Executor | None = None) -> dict:
    """One trial: train target, shadows and defended targets; attack; write metrics and report.
    On a distributing `executor` the shadow and LiRA reference models train as its pieces first,
    each with `threads` cores (1 when 0)."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, dataset = load_data(cfg, data_dir, cfg.seed)
    run.input_shape = tuple(data.train.x.shape[1:])
    check_feasible(cfg, data)
    result = evaluate(cfg, run, data, dataset, seed=cfg.seed, progress=progress,
                      executor=executor, cpus=cfg.threads or 1)
    metrics = result.metrics()
    run.write_metrics(metrics)
    write_report(run, cfg, result)
    return metrics


def render(metrics: dict):
    """Attacks, defences and the architecture matrix (fractions) as rich tables."""
    return terminal(MembershipResult.from_metrics(metrics))
