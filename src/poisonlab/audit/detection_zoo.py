"""A zoo of backdoored and clean models, and how well each backdoor detector tells them apart.

A detector judged on the one model it was developed on says little about a model nobody has seen.
The zoo is a seeded population of small image classifiers, each trained here from a spec drawn by
`generate_specs`:

- data set: mnist (small_cnn, 28×28), cifar10 (small_cnn, 32×32 RGB), glyphs (tiny_cnn or
  small_cnn, 28×28), balanced over the zoo;
- backdoored or clean; a backdoored model gets a trigger family, balanced over the zoo:
  patch (poisonlab.attacks.triggers.random_patch: seeded size, position anywhere, binary or
  coloured pattern), blend (Chen et al. 2017; α drawn from `blend_alpha`, a seeded noise
  pattern), sig (Barni et al., ICIP 2019; Δ = 20/255, f = 6) or warp (WaNet, Nguyen & Tran,
  ICLR 2021; k = 4, s = 0.5, a seeded field); a target label (uniform) and a poison rate
  (uniform in `poison_rate`), all-to-one dirty-label poisoning
  (poisonlab.attacks.backdoor_injection);
- a short training schedule per data set (`Recipe`), so that the default zoo of 20 + 20 models
  trains in well under an hour on 2 CPU cores (see benchmarks/bench_detection_zoo.py
  --estimate for the measured extrapolation).

Each model is saved (safetensors, with its spec) with its benign accuracy (BA) and attack
success rate (ASR). A backdoor that did not take (ASR < `asr_threshold`, 0.8) is reported and
left out of the true-positive rate and the ROC: a model without a working backdoor is not a
positive. Then every detector runs on every model for every seed, each at `scan`'s default
settings (`ZooConfig.scan`, a ScanConfig: Neural Cleanse on `samples` clean test images drawn
with the seed, MM-BD on the model alone), and every result is written as JSON when it completes:
an interrupted run, started again on the same folder, recomputes nothing that exists.

`summarize` then gives, per detector: TPR and FPR at its default threshold (Neural Cleanse:
flagged, i.e. index > threshold + band, inconclusive counting as not detected; MM-BD:
p < alpha), the ROC AUC of its per-model statistic (Neural Cleanse: the anomaly index of its
candidate label, 0 without one; MM-BD: −log p), the target-label accuracy on the detected
backdoored models, the verdict agreement across seeds (the share of models with the same verdict
under every seed), CPU seconds per model and seed (time.process_time, all threads of the
process), and the same per trigger family and per data set. "either" is `scan`'s combined
verdict: suspected when any detector fires.

Layout of a zoo folder:
    zoo.json                          the generator's settings and every spec
    models/<id>.safetensors, .json    weights; spec, BA, ASR, training CPU seconds
    detections/<detector>-<hash>/<id>-seed<k>.json
                                      one detector result (hash: of the detector's settings,
                                      so changed settings never mix with old results)
    summary.json, roc.png             from `summarize` / `roc_figure`
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import (
    MaskTrigger,
)
from poisonlab.audit.checks import DETECTORS
from poisonlab.audit.data import sample
from poisonlab.audit.zoo_specs import (
    NUM_CLASSES,
    STATISTICS,
    ModelSpec,
    Recipe,
    ZooConfig,
    build_trigger,
    generate_specs,
)
from poisonlab.config import Settings
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mm_bd import MMBD
from poisonlab.defenses.neural_cleanse import NeuralCleanse
from poisonlab.errors import ConfigError
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import load_weights, save_weights
from poisonlab.training.supervised import evaluate, place, train_classifier

Log = Callable[[str], None]  # where progress lines go


def write_json(path: Path, data: Any) -> None:
    """`data` as JSON at `path`, atomically (a killed run leaves no half-written result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    Path(tmp).replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def prepare_zoo(folder: Path, cfg: ZooConfig) -> list[ModelSpec]:
    """The specs of the zoo in `folder`: written to zoo.json on the first run, checked against
    it on a later one (ConfigError when the folder holds another zoo)."""
    specs = generate_specs(cfg)
    record = {"generator": cfg.generator_part(), "specs": [s.to_dict() for s in specs]}
    path = Path(folder) / "zoo.json"
    if path.exists():
        held = read_json(path)
        if held != json.loads(json.dumps(record)):
            raise ConfigError(f"{folder} holds another zoo (its zoo.json was made with other "
                              "generator settings): use another folder or the same settings")
    else:
        write_json(path, record)
    return specs


def model_paths(folder: Path, spec: ModelSpec) -> tuple[Path, Path]:
    base = Path(folder) / "models" / spec.id
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def detector_settings(cfg: ZooConfig, detector: str) -> Settings:
    """The settings a detector runs with: scan's (Neural Cleanse's from ScanConfig.detection,
    MM-BD's ScanConfig.mm_bd)."""
    if detector == "nc":
        return cfg.scan.detection()
    return cfg.scan.mm_bd.model_copy(update={"keep_inputs": False})


def detection_path(folder: Path, cfg: ZooConfig, detector: str, spec: ModelSpec,
                   seed: int) -> Path:
    """Where one detector result goes: under a folder named by the detector and a hash of the
    settings it runs with (and, for Neural Cleanse, the clean sample's size)."""
    settings = {"settings": detector_settings(cfg, detector).model_dump(mode="json")}
    if detector == "nc":
        settings["samples"] = cfg.scan.samples
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    tag = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    return Path(folder) / "detections" / f"{detector}-{tag}" / f"{spec.id}-seed{seed}.json"


# --- data and training -------------------------------------------------------------------------


@lru_cache(maxsize=3)
def _subsets(dataset: str, train_size: int, test_size: int, seed: int,
             data_dir: str | None) -> tuple[ImageSet, ImageSet]:
    data = load_supervised(dataset, data_dir, seed=0)
    part = data.subsampled(train_size, test_size, torch.Generator().manual_seed(int(seed) + 1))
    return part.train, part.test  # only the subsets stay in memory, not all of CIFAR-10


def zoo_data(dataset: str, recipe: Recipe, seed: int,
             data_dirs: Mapping[str, Path | str] | None = None) -> tuple[ImageSet, ImageSet]:
    """The zoo's training and test subsets of `dataset` (drawn with the zoo's seed, the same for
    every model of that data set); `data_dirs` maps a data set to its folder (default: the
    registry's, $POISONLAB_DATA/NAME)."""
    where = (data_dirs or {}).get(dataset)
    return _subsets(dataset, recipe.train_size, recipe.test_size, int(seed),
                    str(where) if where is not None else None)


def build(spec: ModelSpec, channels: int) -> nn.Module:
    torch.manual_seed(spec.train_seed)
    return build_model(spec.arch, NUM_CLASSES, channels)


def load_zoo_model(folder: Path, spec: ModelSpec, channels: int) -> nn.Module:
    """The saved model of `spec`, on the CPU in eval mode."""
    weights, _ = load_weights(model_paths(folder, spec)[0])
    model = build(spec, channels)
    model.load_state_dict(weights)
    return place(model, "cpu", False).eval()


def train_model(folder: Path, cfg: ZooConfig, spec: ModelSpec,
                data_dirs: Mapping[str, Path | str] | None = None) -> dict[str, Any]:
    """Train `spec`'s model, save it with its record (BA, ASR, CPU seconds) and return the
    record. The JSON record is written last: it marks the model as done."""
    recipe = cfg.recipe(spec.dataset)
    train, test = zoo_data(spec.dataset, recipe, cfg.seed, data_dirs)
    shape = tuple(train.x.shape[1:])
    trigger = build_trigger(spec, shape) if spec.backdoored else None
    if trigger is not None:
        train = BackdoorInjection(trigger, target=spec.target, poison_rate=spec.poison_rate,
                                  seed=spec.train_seed).poison(train).data
    model = build(spec, shape[0])
    cpu, wall = time.process_time(), time.perf_counter()
    history = train_classifier(model, train, recipe.train_config(), progress=False,
                               seed=spec.train_seed, device="cpu")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if trigger is not None:
        metrics = backdoor_metrics(model, trigger, test, spec.target)
    else:
        metrics = {"benign_accuracy": evaluate(model, test), "attack_success_rate": None}
    asr = metrics["attack_success_rate"]
    weights, record_path = model_paths(folder, spec)
    save_weights(weights, model.state_dict(), {"arch": spec.arch,
                                               "input_shape": json.dumps(list(shape)),
                                               "spec": json.dumps(spec.to_dict())})
    record = {
        "spec": spec.to_dict(),
        "input_shape": list(shape),
        "benign_accuracy": metrics["benign_accuracy"],
        "attack_success_rate": asr,
        "backdoor_took": None if asr is None else bool(asr >= cfg.asr_threshold),
        "trigger": None if trigger is None else {
            "name": trigger.name,
            # the pixels a mask trigger touches (patch: its area; blend: the whole image)
            "pixels": int((trigger.mask.amax(0) > 0).sum()) if isinstance(trigger, MaskTrigger)
            else None},
        "train_images": len(train),
        "epochs": recipe.epochs,
        "train_cpu_seconds": cpu,
        "train_wall_seconds": wall,
        "final_train_loss": history["loss"][-1] if history["loss"] else None,
    }
    write_json(record_path, record)
    return record


# --- detection ---------------------------------------------------------------------------------


def run_detector(detector: str, model: nn.Module, test: ImageSet, cfg: ZooConfig,
                 seed: int) -> dict[str, Any]:
    """One detector on one model with one seed, at scan's settings; the record it leaves."""
    cpu, wall = time.process_time(), time.perf_counter()
    shape = tuple(test.x.shape[1:])
    if detector == "nc":
        clean = sample(test, cfg.scan.samples, seed)
        result = NeuralCleanse(config=detector_settings(cfg, "nc"), seed=seed).detect(
            model, clean.x, NUM_CLASSES)
        cand = result.candidate
        statistic = float(result.anomaly_index[cand]) if cand is not None else 0.0
        summary = result.to_dict()
        status, target = result.status, result.target
    else:
        result = MMBD(config=detector_settings(cfg, "mmbd"), seed=seed).detect(
            model, NUM_CLASSES, shape)
        statistic = result.score
        summary = result.to_dict()
        status, target = result.status, result.target
    return {
        "detector": detector,
        "seed": seed,
        "status": status,
        "detected": status == "detected",
        "target": target,
        # −log p is +inf only for a degenerate MM-BD null (all other classes' maxima equal):
        # stored as a large finite number, since JSON has no infinity.
        "statistic": statistic if math.isfinite(statistic) else 1e300,
        "statistic_name": STATISTICS[detector],
        "cpu_seconds": time.process_time() - cpu,
        "wall_seconds": time.perf_counter() - wall,
        "result": summary,
    }


@dataclass
class ZooRun:
    """What one call of `run_zoo` did: models trained / found done, detections run / found."""

    trained: int = 0
    reused_models: int = 0
    detected: int = 0
    reused_detections: int = 0


def run_zoo(folder: Path | str, cfg: ZooConfig, data_dirs: Mapping[str, Path | str] | None = None,
            log: Log | None = None) -> ZooRun:
    """Train every model of the zoo that is not saved yet, then run every detector × seed on
    every model whose result is not saved yet (each saved as it completes)."""
    folder = Path(folder)
    log = log or (lambda _msg: None)
    specs = prepare_zoo(folder, cfg)
    done = ZooRun()
    for n, spec in enumerate(specs, 1):
        weights, record = model_paths(folder, spec)
        if weights.exists() and record.exists():
            done.reused_models += 1
            continue
        rec = train_model(folder, cfg, spec, data_dirs)
        done.trained += 1
        asr = rec["attack_success_rate"]
        log(f"[{n}/{len(specs)}] trained {spec.id} ({spec.arch}): BA {rec['benign_accuracy']:.3f}"
            + (f", ASR {asr:.3f}" if asr is not None else "")
            + f", {rec['train_cpu_seconds']:.0f} CPU-s")
    for n, spec in enumerate(specs, 1):
        wanted = [(d, s) for d in cfg.detectors for s in cfg.seeds
                  if not detection_path(folder, cfg, d, spec, s).exists()]
        done.reused_detections += len(cfg.detectors) * len(cfg.seeds) - len(wanted)
        if not wanted:
            continue
        rec = read_json(model_paths(folder, spec)[1])
        _, test = zoo_data(spec.dataset, cfg.recipe(spec.dataset), cfg.seed, data_dirs)
        model = load_zoo_model(folder, spec, int(rec["input_shape"][0]))
        for detector, seed in wanted:
            out = run_detector(detector, model, test, cfg, seed)
            out["model"] = spec.id
            write_json(detection_path(folder, cfg, detector, spec, seed), out)
            done.detected += 1
            log(f"[{n}/{len(specs)}] {DETECTORS[detector]} seed {seed} on {spec.id}: "
                f"{out['status']}, target {out['target']}, statistic {out['statistic']:.3g}, "
                f"{out['cpu_seconds']:.0f} CPU-s")
    return done


# --- summary -----------------------------------------------------------------------------------


def estimate_costs(cfg: ZooConfig, data_dirs: Mapping[str, Path | str] | None = None,
                   log: Log | None = None, images: int = 1000, nc_steps: int = 2,
                   mm_steps: int = 20) -> dict[str, Any]:
    """CPU seconds of the zoo, measured at a tiny size and extrapolated linearly.

    Per data set and architecture: one epoch on `images` training images (→ CPU seconds per
    image-epoch × train_size × epochs), Neural Cleanse at scan's settings for `nc_steps` steps
    without early stopping (→ × scan.steps: an upper bound, early stopping only cuts it) and
    MM-BD for `mm_steps` steps (→ × mm_bd.steps). A backdoor's poisoning and the BA/ASR
    evaluation are not counted (both a few passes over the data)."""
    log = log or (lambda _msg: None)
    specs = generate_specs(cfg)
    per: dict[str, dict[str, Any]] = {}
    for dataset in cfg.datasets:
        recipe = cfg.recipe(dataset)
        train, test = zoo_data(dataset, recipe, cfg.seed, data_dirs)
        shape = tuple(train.x.shape[1:])
        tiny = train.subset(torch.arange(min(images, len(train))))
        for arch in recipe.archs:
            spec = ModelSpec("estimate", dataset, arch, False, None, {}, None, None, 0)
            short = recipe.train_config().model_copy(update={"epochs": 1})
            # Untimed warm-up: the first passes of a process pay for allocations and thread
            # pools (measured: 3 ms instead of 1.1 ms per image-epoch for the first model).
            train_classifier(build(spec, shape[0]), tiny.subset(torch.arange(min(128, len(
                tiny)))), short, progress=False, seed=0, device="cpu")
            model = build(spec, shape[0])
            cpu = time.process_time()
            train_classifier(model, tiny, short, progress=False, seed=0, device="cpu")
            per_image = (time.process_time() - cpu) / len(tiny)
            model.eval()
            nc_cfg = detector_settings(cfg, "nc")
            inv = nc_cfg.inversion.model_copy(update={"steps": nc_steps, "early_stop": False})
            cpu = time.process_time()
            NeuralCleanse(config=nc_cfg.model_copy(update={"inversion": inv})).detect(
                model, sample(test, cfg.scan.samples, 0).x, NUM_CLASSES)
            nc_step = (time.process_time() - cpu) / nc_steps
            mm_cfg = detector_settings(cfg, "mmbd").model_copy(update={"steps": mm_steps})
            cpu = time.process_time()
            MMBD(config=mm_cfg).detect(model, NUM_CLASSES, shape)
            mm_step = (time.process_time() - cpu) / mm_steps
            count = sum(s.dataset == dataset and s.arch == arch for s in specs)
            row = {
                "models": count,
                "train_cpu_seconds": per_image * recipe.train_size * recipe.epochs,
                "nc_cpu_seconds": nc_step * cfg.scan.steps,
                "mmbd_cpu_seconds": mm_step * cfg.scan.mm_bd.steps,
                "measured": {"images": len(tiny), "cpu_seconds_per_image_epoch": per_image,
                             "nc_cpu_seconds_per_step": nc_step,
                             "mmbd_cpu_seconds_per_step": mm_step},
            }
            per[f"{dataset}/{arch}"] = row
            log(f"{dataset}/{arch}: {1000 * per_image:.2f} ms per image-epoch → "
                f"{row['train_cpu_seconds']:.0f} CPU-s to train; Neural Cleanse ≤ "
                f"{row['nc_cpu_seconds']:.0f} CPU-s, MM-BD {row['mmbd_cpu_seconds']:.0f} "
                f"CPU-s per seed; {count} models")
    seeds = len(cfg.seeds)
    train_total = sum(r["models"] * r["train_cpu_seconds"] for r in per.values())
    detect = {d: seeds * sum(r["models"] * r[f"{d}_cpu_seconds"] for r in per.values())
              for d in cfg.detectors}
    return {"per_model": per, "train_cpu_seconds": train_total,
            "detect_cpu_seconds": detect, "seeds": seeds,
            "models": len(specs)}
