"""Experiment `badencoder`: a backdoor in a SimCLR encoder that downstream classifiers inherit.

Jia, Liu, Gong, "BadEncoder", IEEE S&P 2022. Wires: pre-training data (CIFAR-10 from --data-dir,
or seeded synthetic textures without one) → SimCLR pre-training of the clean encoder (checkpointed
every epoch, `--resume` continues; or reused with `--model RUN_ID|FILE`, the `encoder` checkpoint
of an earlier run or a weights file) → per downstream task a BadEncoder injection with reference
inputs of its target class (checkpointed, resumable) → CA / BA / ASR / ASR-B of the reference's
downstream MLP → Neural Cleanse on each downstream classifier → the encoder scan of the clean and
each backdoored encoder → metrics.json and report.html. The protocol is
poisonlab.evaluation.badencoder_protocol; tables and figures are poisonlab.report.badencoder.

Sections: `data` (pre-training set, shadow subset, target, references), `encoder` (arch and
width), `simclr` (SimCLR.Config), `attack` (BadEncoder.Config), `trigger` (the patch),
`downstream` (DownstreamConfig plus `tasks`, `folder`, `mnist_dir`), `nc` (NeuralCleanse.Config
plus `samples`), `scan` (EncoderScan.Config plus `samples`), `threads`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from poisonlab.config import Threads
from poisonlab.device import bf16_fast, default_device, seed_everything, use_bf16
from poisonlab.evaluation.badencoder_protocol import ProtocolConfig, evaluate
from poisonlab.report import badencoder as report
from poisonlab.runs import Run

NAME = "badencoder"


class Config(ProtocolConfig):
    """The protocol's settings (defaults: the papers'), plus `threads` (torch intra-op threads;
    0 keeps torch's default)."""

    threads: Threads = 0


PRESETS: dict[str, dict] = {
    "smoke": {
        "data": {"pretrain": "synthetic", "synthetic_size": 128, "shadow_size": 128, "target": 0},
        "encoder": {"arch": "resnet18", "base_channels": 4},
        "simclr": {"epochs": 2, "batch_size": 32, "knn_k": 20, "knn_every": 0,
                   "eval_batch_size": 128},
        "attack": {"epochs": 3, "batch_size": 16, "lr": 0.01},
        "downstream": {"tasks": ["synthetic"], "epochs": 20, "batch_size": 32, "lr": 1e-3},
        "nc": {"samples": 16, "inversion": {"steps": 3, "batch_size": 16}},
        "scan": {"samples": 16, "steps": 3, "batch_size": 16, "restarts": 1},
    },
    # Sized for both cores of a 2-core machine within one session, SimCLR taking most of it: all
    # 50,000 images with a quarter-width ResNet-18 in bfloat16 mixed precision (half the step
    # time of float32 on CPUs with AMX; "auto" keeps float32 on CPUs without bfloat16 units,
    # where autocast emulates it at four times the cost, and there the preset takes about eight
    # hours, docs/results.md), a 10,000-image shadow set, two tasks. The injection runs
    # 70 x 39 = 2,730 steps where the paper runs 39,000, so it takes lr 1e-2 instead of the
    # paper's 1e-3 (docs/design.md, BadEncoder deviations), and three reference inputs instead
    # of one: MNIST digits all sit close together under a CIFAR-10 encoder, and one reference
    # digit with 1,560 steps left half the triggered digits on the wrong side of the classifier.
    "cpu": {
        "threads": 2,
        "data": {"shadow_size": 10000, "references": 3},
        "encoder": {"base_channels": 16},
        "simclr": {"epochs": 30, "knn_every": 10, "channels_last": True, "bf16": "auto"},
        "attack": {"epochs": 70, "lr": 0.01, "bf16": "auto"},
        "downstream": {"epochs": 100},
        "nc": {"samples": 100, "inversion": {"steps": 20, "batch_size": 50,
                                             "early_stop_patience": 10}},
        "scan": {"steps": 200, "restarts": 2},
    },
    "paper": {"scan": {"steps": 1000}},
}

# The numbers of metrics.json, as `sweep --metric` names them (see poisonlab.experiments); `*`:
# a downstream task (or, in the scan's keys, anything EncoderScanResult.to_dict() holds).
METRICS: tuple[str, ...] = (
    "encoder_knn_accuracy", "pretraining.*", "seconds.total", "encoder_scan.clean.*",
    "encoder_scan.backdoored.*",
    *(f"tasks.*.{k}" for k in (
        "clean_accuracy", "backdoor_accuracy", "attack_success_rate",
        "clean_encoder_attack_success_rate", "attack_success_rate_all_inputs",
        "clean_encoder_attack_success_rate_all_inputs", "target", "num_classes", "train_size",
        "test_size", "non_target_test_size", "injection.*", "trigger_reference_cosine.*",
        "neural_cleanse.*")),
)


def run(cfg: Config, run: Run, data_dir: Path | None = None, model: str | None = None,
        progress: bool = True) -> dict:
    """One trial: pre-train (or reuse) the clean encoder, inject per task, measure, detect, scan."""
    seed_everything(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    device = default_device()
    run.log(f"device {device}; bfloat16 {'native' if bf16_fast(device) else 'not native'}: "
            f"SimCLR bf16 {use_bf16(cfg.simclr.bf16, device)}, "
            f"injection bf16 {use_bf16(cfg.attack.bf16, device)}")
    result = evaluate(cfg, run, data_dir, model, progress)
    metrics = result.metrics()
    metrics["seconds"] = {"total": time.perf_counter() - t0}
    run.write_metrics(metrics)
    about = (f"Pre-training: {result.pretraining.get('dataset')} "
             f"({result.pretraining.get('source')}); encoder {cfg.encoder.arch}; "
             f"injection {cfg.attack.epochs} epochs on {cfg.data.shadow_size or 'all'} shadow "
             f"images; target class {cfg.data.target}.")
    report.write_report(run.path / "report.html", run.path / "figures", result, about)
    return metrics


def render(metrics: dict):
    """The headline table: CA, BA, ASR, ASR-B per task, Neural Cleanse and scan verdicts."""
    return report.render(metrics)
