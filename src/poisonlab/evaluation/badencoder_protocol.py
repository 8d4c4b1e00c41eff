"""The BadEncoder experiment's protocol: pre-train (or reuse) a clean encoder, inject a backdoor per
downstream task, measure every downstream classifier, run Neural Cleanse and the encoder scan.

Jia, Liu, Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning",
IEEE S&P 2022. The pieces are poisonlab.training.simclr (the clean encoder), poisonlab.attacks.
badencoder (the injection), poisonlab.evaluation.badencoder (CA / BA / ASR / ASR-B on a frozen
encoder), poisonlab.defenses.neural_cleanse (on the downstream classifier, encoder + MLP, as the
paper evaluates it) and poisonlab.defenses.encoder_scan (DECREE-style, no labels).

Protocol choices, and why:
- One injection per downstream task: the attacker picks a target class of one downstream task and
  its reference inputs are images of that class (the reference injects one encoder per target:
  STL10 truck, GTSRB priority road, SVHN one). Each task therefore gets its own backdoored encoder,
  its own downstream classifiers, Neural Cleanse runs and encoder scan; the clean encoder is shared.
- Reference inputs: `data.references` images of the target class drawn (seeded) from the
  downstream task's training split, or the image files given as `data.reference_images` (a file or
  a folder; used as they are, not resized: an image of another size is refused).
- Shadow set: a seeded subset of `data.shadow_size` pre-training images (the attacker's own
  unlabelled data), as the issue's CPU budget needs; the reference uses all 50,000.
- The encoder scan uses clean images of the pre-training test split (the reference draws 50 from the
  CIFAR-10 test split); Neural Cleanse uses clean test images of the downstream task.
- Without a data set (`data.pretrain=synthetic`) pre-training and the `synthetic` downstream task
  are seeded textures (class = stripe orientation / checkerboard / flat, in a random colour), so
  the smoke preset runs anywhere in seconds; it checks the wiring, not the published numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from poisonlab.attacks.badencoder import BadEncoder, InjectionResult
from poisonlab.attacks.triggers import Trigger, badencoder_patch
from poisonlab.config import BaseConfig, Distinct, Settings
from poisonlab.data.types import SupervisedData
from poisonlab.defenses.encoder_scan import EncoderScan, EncoderScanResult
from poisonlab.defenses.neural_cleanse import DetectionResult, NeuralCleanse
from poisonlab.errors import ShapeError
from poisonlab.evaluation.badencoder import (
    DownstreamConfig,
    DownstreamResult,
    DownstreamTask,
    EncoderFeatures,
    downstream_classifiers,
    encode,
    encoder_features,
)
from poisonlab.evaluation.badencoder_data import (
    load_pretraining,
    load_tasks,
    references,
    shadow_set,
)
from poisonlab.models import Arch
from poisonlab.models.encoders import build_encoder
from poisonlab.runs import Run
from poisonlab.runs.checkpoints import load_into, load_weights
from poisonlab.training.knn import knn_accuracy
from poisonlab.training.simclr import SimCLR
from poisonlab.training.supervised import RunCheckpoint

TASKS = ("cifar10", "mnist", "synthetic")


class DataConfig(Settings):
    """pretrain: "cifar10" (from --data-dir), "synthetic" (seeded textures, no files) or "auto"
    (cifar10 when a data dir is given). pretrain_size / test_size: images of the pre-training
    training / test split used (None: all). synthetic_size: training images of a synthetic set.
    shadow_size: the attacker's shadow subset of the pre-training images (None: all, as the paper).
    target: the attacker's target class of every downstream task. references: reference inputs
    drawn from the downstream training split's target class. reference_images: an image file or
    folder of target-class images used instead (not resized)."""

    pretrain: Literal["auto", "cifar10", "synthetic"] = "auto"
    pretrain_size: int | None = Field(None, ge=2)
    test_size: int | None = Field(None, ge=2)
    synthetic_size: int = Field(2048, ge=8)
    shadow_size: int | None = Field(None, ge=1)
    target: int = Field(9, ge=0)
    references: int = Field(1, ge=1)
    reference_images: Path | None = None


class EncoderConfig(Settings):
    """arch: a registered architecture with `features` (resnet18: the reference's CIFAR-stem
    ResNet-18; resnet20, ...). base_channels: resnet18's width (64 in the paper); width: the
    width multiplier of the other ResNets."""

    arch: Arch = "resnet18"
    base_channels: int = Field(64, ge=1)
    width: int = Field(1, ge=1)

    def build(self) -> nn.Module:
        options = ({"base_channels": self.base_channels} if self.arch == "resnet18"
                   else {"width": self.width})
        return build_encoder(self.arch, **options)


class TriggerConfig(Settings):
    """The reference's white patch: size×size pixels at rows/columns top/left (0-indexed)."""

    size: int = Field(10, ge=1)
    top: int = Field(21, ge=0)
    left: int = Field(21, ge=0)

    def build(self, shape: tuple[int, int, int] = (3, 32, 32)) -> Trigger:
        return badencoder_patch(shape, self.size, self.top, self.left)


class TasksConfig(DownstreamConfig):
    """The downstream classifier's settings (DownstreamConfig), plus the tasks: `tasks` names
    (cifar10 from --data-dir, mnist as 32×32 RGB, synthetic), `folder` an image folder (one
    sub-folder per class) added as a task, `mnist_dir` where MNIST lives (default: the folder
    `mnist` beside --data-dir, else $POISONLAB_DATA/mnist)."""

    tasks: Annotated[list[Literal["cifar10", "mnist", "synthetic"]], Distinct] = Field(
        default_factory=lambda: ["cifar10", "mnist"])
    folder: Path | None = None
    mnist_dir: Path | None = None


class DetectionConfig(NeuralCleanse.Config):
    """Neural Cleanse on each downstream classifier, plus `samples`: its clean test images."""

    samples: int = Field(1000, ge=1)


class ScanConfig(EncoderScan.Config):
    """The encoder scan, plus `samples`: clean images of the pre-training test split (50)."""

    samples: int = Field(50, ge=2)


class ProtocolConfig(BaseConfig):
    """Every section of the experiment (defaults: the papers')."""

    data: DataConfig = Field(default_factory=DataConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    simclr: SimCLR.Config = Field(default_factory=SimCLR.Config)
    attack: BadEncoder.Config = Field(default_factory=BadEncoder.Config)
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)
    downstream: TasksConfig = Field(default_factory=TasksConfig)
    nc: DetectionConfig = Field(default_factory=DetectionConfig)
    scan: ScanConfig = Field(default_factory=ScanConfig)


# --- results ------------------------------------------------------------------------------------
@dataclass
class FeatureView:
    """Features (normalised) of a few clean test images, the same images triggered, and the
    reference inputs, under one encoder: what the report's 2-D view shows."""

    clean: Tensor
    triggered: Tensor
    reference: Tensor

    def trigger_reference_cosine(self) -> float:
        """Mean cosine of triggered features with the reference inputs' (what L0 raises)."""
        return float((self.triggered @ self.reference.T).mean())


@dataclass
class TaskOutcome:
    """One downstream task: its numbers, the injection's loss terms, Neural Cleanse on both
    classifiers, the scan of its backdoored encoder and the feature views of both encoders."""

    downstream: DownstreamResult
    injection: dict[str, list[float]]
    neural_cleanse: dict[str, DetectionResult]
    scan: EncoderScanResult
    views: dict[str, FeatureView]

    def metrics(self) -> dict:
        out = dict(self.downstream.metrics())
        out["injection"] = {k: v[-1] for k, v in self.injection.items() if v}
        out["trigger_reference_cosine"] = {name: v.trigger_reference_cosine()
                                           for name, v in self.views.items()}
        out["neural_cleanse"] = {name: _nc_summary(r, self.downstream.target)
                                 for name, r in self.neural_cleanse.items()}
        return out


@dataclass
class BadEncoderResult:
    """The whole experiment: pre-training summary, the clean encoder's scan, one outcome per task."""

    pretraining: dict
    knn_accuracy: float | None
    clean_scan: EncoderScanResult
    tasks: list[TaskOutcome] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "encoder_knn_accuracy": self.knn_accuracy,
            "tasks": {t.downstream.task: t.metrics() for t in self.tasks},
            "encoder_scan": {"clean": self.clean_scan.to_dict(),
                             "backdoored": {t.downstream.task: t.scan.to_dict()
                                            for t in self.tasks}},
            "pretraining": {k: v for k, v in self.pretraining.items() if k != "history"},
        }


def _nc_summary(r: DetectionResult, target: int) -> dict:
    return {"backdoored": r.backdoored, "flagged": r.flagged, "target_flagged": target in r.flagged,
            "target_anomaly_index": float(r.anomaly_index[target]),
            "max_anomaly_index": float(r.anomaly_index.max()),
            "mask_l1": [float(v) for v in r.norms]}


# --- the encoder --------------------------------------------------------------------------------
def load_clean_encoder(cfg: ProtocolConfig, source: str, root: Path | None) -> nn.Module:
    """The clean encoder from a run id (its `encoder` checkpoint) or a weights file."""
    path = Path(source)
    if not path.exists() and not path.is_symlink():  # a broken link is named as a file
        path = Run.open(source, root=root).checkpoint_path("encoder")
    encoder = cfg.encoder.build()
    state, _ = load_weights(path)
    load_into(encoder, state, name=f"encoder {cfg.encoder.arch}")
    return _layout(encoder, cfg).eval()


def _layout(encoder: nn.Module, cfg: ProtocolConfig) -> nn.Module:
    # The memory layout pre-training used changes the rounding: keep it for a reused encoder.
    return encoder.to(memory_format=torch.channels_last) if cfg.simclr.channels_last else encoder


def pretrain(cfg: ProtocolConfig, run: Run, data: SupervisedData, model: str | None,
             progress: bool) -> tuple[nn.Module, float | None, dict]:
    """The clean encoder, its kNN accuracy and a summary: reused from `model`, or SimCLR
    pre-training checkpointed every epoch (resumed when the run holds a checkpoint)."""
    s = cfg.simclr
    if model is not None:
        encoder = load_clean_encoder(cfg, model, run.root)
        acc = knn_accuracy(encoder, data.train, data.test, s.knn_k, s.knn_temperature,
                           s.eval_batch_size)
        return encoder, acc, {"source": str(model)}
    encoder = cfg.encoder.build()
    t0 = time.perf_counter()
    result = SimCLR(config=s, seed=cfg.seed).train(
        encoder, data.train, test=data.test, progress=progress,
        checkpoint=RunCheckpoint(run, "simclr"), log=run.log)
    run.save_checkpoint("encoder", encoder.state_dict(), {
        "arch": cfg.encoder.arch, "base_channels": cfg.encoder.base_channels,
        "width": cfg.encoder.width, "knn_accuracy": result.knn_accuracy})
    summary = {"source": "simclr", "epochs": s.epochs, "images": len(data.train),
               "seconds": time.perf_counter() - t0, "history": result.history}
    return encoder, result.knn_accuracy, summary


# --- one task -----------------------------------------------------------------------------------
def inject(cfg: ProtocolConfig, run: Run, clean: nn.Module, shadow: Tensor, refs: Tensor,
           trigger: Trigger, task: str) -> InjectionResult:
    """The backdoored encoder for `task`, checkpointed every epoch (resumable)."""
    attack = BadEncoder(config=cfg.attack, seed=cfg.seed)
    result = attack.inject(clean, shadow, refs, trigger, progress=run.log,
                           checkpoint=RunCheckpoint(run, f"inject_{task}"))
    run.save_checkpoint(f"backdoored_{task}", result.encoder.state_dict(),
                        {"arch": cfg.encoder.arch, "task": task, "target": cfg.data.target})
    return result


def _sample(x: Tensor, n: int, seed: int) -> Tensor:
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]]


def scan(cfg: ProtocolConfig, encoder: nn.Module, images: Tensor) -> EncoderScanResult:
    """The DECREE-style scan of one encoder on `scan.samples` clean images."""
    x = _sample(images, cfg.scan.samples, cfg.seed)
    return EncoderScan(config=cfg.scan, seed=cfg.seed).scan(encoder, x, progress=None)


def evaluate_task(cfg: ProtocolConfig, run: Run, clean: nn.Module, clean_feats: EncoderFeatures,
                  shadow: Tensor, task: DownstreamTask, trigger: Trigger,
                  scan_images: Tensor) -> TaskOutcome:
    """Inject, measure the downstream classifiers, Neural Cleanse on both, scan the backdoor."""
    refs = references(cfg, task)
    injected = inject(cfg, run, clean, shadow, refs, trigger, task.name)
    backdoored = injected.encoder
    feats = encoder_features(backdoored, task.data, trigger, cfg.downstream.feature_batch_size)
    result, nets = downstream_classifiers(clean, backdoored, task, trigger, cfg.downstream,
                                          seed=cfg.seed, progress=run.log,
                                          clean_features=clean_feats, backdoored_features=feats)
    x_nc = _sample(task.data.test.x, cfg.nc.samples, cfg.seed + 3)
    detector = NeuralCleanse(config=cfg.nc, seed=cfg.seed)
    nc = {name: detector.detect(net, x_nc, result.num_classes) for name, net in nets.items()}
    run.log(f"{task.name}: Neural Cleanse flagged clean {nc['clean'].flagged}, "
            f"backdoored {nc['backdoored'].flagged}")
    verdict = scan(cfg, backdoored, scan_images)
    views = {name: _view(enc, f, trigger, refs, cfg)
             for name, enc, f in (("clean", clean, clean_feats), ("backdoored", backdoored, feats))}
    return TaskOutcome(result, injected.history, nc, verdict, views)


def _view(encoder: nn.Module, feats: EncoderFeatures, trigger: Trigger, refs: Tensor,
          cfg: ProtocolConfig, n: int = 300) -> FeatureView:
    idx = torch.randperm(len(feats.test), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return FeatureView(feats.test[idx], feats.triggered[idx], encode(encoder, refs))


def evaluate(cfg: ProtocolConfig, run: Run, data_dir: Path | None, model: str | None,
             progress: bool) -> BadEncoderResult:
    """The whole protocol; every input is loaded and checked before any training."""
    trigger = cfg.trigger.build()
    tasks = load_tasks(cfg, data_dir)
    pre, dataset = load_pretraining(cfg, data_dir)
    for task in tasks:
        trigger.apply(task.data.test.x[:1])
    shadow = shadow_set(pre.train, cfg.data.shadow_size, cfg.seed)
    if cfg.data.reference_images is not None:  # read and checked before any training
        refs = references(cfg, tasks[0])
        if refs.shape[1:] != pre.train.x.shape[1:]:
            size = "×".join(map(str, refs.shape[1:]))
            want = "×".join(map(str, pre.train.x.shape[1:]))
            raise ShapeError(f"data.reference_images: the reference images are {size}, the "
                             f"encoder's images {want}: they must have the same size")
    run.log(f"pre-training data: {dataset}, train {len(pre.train)}, test {len(pre.test)}, "
            f"shadow {len(shadow)}; tasks: {', '.join(t.name for t in tasks)}")
    clean, acc, summary = pretrain(cfg, run, pre, model, progress)
    summary["dataset"] = dataset
    run.log(f"clean encoder: kNN accuracy {acc}")
    clean_scan = scan(cfg, clean, pre.test.x)
    outcomes = []
    for task in tasks:
        feats = encoder_features(clean, task.data, trigger, cfg.downstream.feature_batch_size)
        outcomes.append(evaluate_task(cfg, run, clean, feats, shadow, task, trigger, pre.test.x))
    return BadEncoderResult(summary, acc, clean_scan, outcomes)

