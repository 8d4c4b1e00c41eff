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
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import (
    MaskTrigger,
    Trigger,
    blend_trigger,
    random_patch,
    sig_trigger,
    warp_trigger,
)
from poisonlab.audit.checks import DETECTORS, ScanConfig
from poisonlab.audit.data import sample
from poisonlab.config import Seed, Settings
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mm_bd import MMBD
from poisonlab.defenses.neural_cleanse import NeuralCleanse
from poisonlab.errors import ConfigError
from poisonlab.metrics import roc_auc, roc_points
from poisonlab.models import Arch, build_model
from poisonlab.runs.checkpoints import load_weights, save_weights
from poisonlab.training.supervised import TrainConfig, evaluate, place, train_classifier

FAMILIES = ("patch", "blend", "sig", "warp")
ZOO_DATASETS = ("mnist", "cifar10", "glyphs")
NUM_CLASSES = 10  # every zoo data set has ten classes
STATISTICS = {"nc": "anomaly index of the candidate label", "mmbd": "-log p"}
Log = Callable[[str], None]


class Recipe(Settings):
    """How the models of one data set are trained: an architecture drawn from `archs`, a seeded
    subset of `train_size` training images (the same for every model of the zoo), `test_size`
    test images for BA, ASR and Neural Cleanse's clean sample, and a schedule (SGD with momentum
    0.9, weight decay 5e-4, cosine learning rate, no augmentation: a flip would move the
    patches)."""

    archs: tuple[Arch, ...] = ("small_cnn",)
    train_size: int = Field(10_000, ge=10)
    test_size: int = Field(2_000, ge=10)
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.05, gt=0, allow_inf_nan=False)

    @field_validator("archs")
    @classmethod
    def _some(cls, archs: tuple[str, ...]) -> tuple[str, ...]:
        if not archs:
            raise ValueError("give at least one architecture")
        return archs

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr)


class Recipes(Settings):
    """One training recipe per zoo data set: short schedules sized for 2 CPU cores
    (benchmarks/bench_detection_zoo.py --estimate measures and extrapolates them)."""

    mnist: Recipe = Field(default_factory=lambda: Recipe(train_size=10_000, test_size=2_000,
                                                         epochs=4))
    cifar10: Recipe = Field(default_factory=lambda: Recipe(train_size=15_000, test_size=2_000,
                                                           epochs=4))
    glyphs: Recipe = Field(default_factory=lambda: Recipe(archs=("tiny_cnn", "small_cnn"),
                                                          train_size=5_000, test_size=1_000,
                                                          epochs=4))


def _subset(values: Sequence[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """`values` without repeats when each is one of `allowed` (and there is one), else a
    ValueError naming the first unknown."""
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"unknown {what} '{unknown[0] if unknown else ''}' (known: "
                         f"{', '.join(allowed)})")
    return tuple(dict.fromkeys(values))


class ZooConfig(Settings):
    """The zoo's generator (backdoored, clean, seed, datasets, families, poison_rate,
    blend_alpha, recipes: what the models are) and the evaluation (asr_threshold, seeds,
    detectors, scan: how they are judged). Changing the first part makes another zoo (refused
    on an existing folder); the second can change between runs on one zoo."""

    backdoored: int = Field(20, ge=0)
    clean: int = Field(20, ge=0)
    seed: Seed = 0
    datasets: tuple[str, ...] = ZOO_DATASETS
    families: tuple[str, ...] = FAMILIES
    poison_rate: tuple[float, float] = (0.05, 0.2)
    blend_alpha: tuple[float, float] = (0.1, 0.2)
    recipes: Recipes = Field(default_factory=Recipes)
    asr_threshold: float = Field(0.8, gt=0, le=1)
    seeds: tuple[Seed, ...] = (0, 1, 2)
    detectors: tuple[str, ...] = tuple(DETECTORS)
    scan: ScanConfig = Field(default_factory=ScanConfig)

    @field_validator("datasets")
    @classmethod
    def _datasets(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(values, ZOO_DATASETS, "data set")

    @field_validator("families")
    @classmethod
    def _families(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _subset(values, FAMILIES, "trigger family")

    @field_validator("detectors")
    @classmethod
    def _detectors(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d for d in DETECTORS if d in _subset(values, tuple(DETECTORS), "detector"))

    @field_validator("poison_rate", "blend_alpha")
    @classmethod
    def _interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low <= high < 1:
            raise ValueError(f"must be 0 < low <= high < 1, got {list(value)}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if not seeds:
            raise ValueError("give at least one seed")
        return tuple(dict.fromkeys(seeds))

    def generator_part(self) -> dict[str, Any]:
        """The settings that define the models (stored in zoo.json, compared on resume)."""
        keys = ("backdoored", "clean", "seed", "datasets", "families", "poison_rate",
                "blend_alpha")
        dumped = self.model_dump(mode="json")
        out = {k: dumped[k] for k in keys}
        out["recipes"] = {name: dumped["recipes"][name] for name in self.datasets}
        return out

    def recipe(self, dataset: str) -> Recipe:
        if dataset not in ZOO_DATASETS:
            raise ConfigError(f"no training recipe for data set '{dataset}' (recipes: "
                              f"{', '.join(ZOO_DATASETS)})")
        return getattr(self.recipes, dataset)


# --- specs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """One model of the zoo: what it is trained on, how, and with which backdoor (family None,
    trigger {}, target None and poison_rate None for a clean model)."""

    id: str
    dataset: str
    arch: str
    backdoored: bool
    family: str | None
    trigger: dict[str, Any]
    target: int | None
    poison_rate: float | None
    train_seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        return cls(**dict(data))


def _balanced(rng: np.random.Generator, values: Sequence[str], n: int) -> list[str]:
    """`n` values covering `values` as evenly as possible, in a shuffled order."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _crossed(rng: np.random.Generator, families: Sequence[str], datasets: Sequence[str],
             n: int) -> list[tuple[str, str]]:
    """`n` (family, data set) pairs: families as even as the count allows, each family spread
    over the data sets as evenly as it allows (model i: family i mod F, data set
    (i div F + i mod F) mod D, which also keeps the data sets' totals even), in a shuffled
    order with shuffled names."""
    fam = [families[i] for i in rng.permutation(len(families))]
    sets = [datasets[i] for i in rng.permutation(len(datasets))]
    f, d = len(fam), len(sets)
    pairs = [(fam[i % f], sets[(i // f + i % f) % d]) for i in range(n)]
    return [pairs[i] for i in rng.permutation(n)]


def generate_specs(cfg: ZooConfig) -> list[ModelSpec]:
    """The zoo's specs, all drawn from `cfg.seed`: the backdoored models first, then the clean
    ones; trigger families and data sets crossed and as balanced as the counts allow (20
    backdoored models: 5 per family, 7/7/6 per data set, every family on every data set)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(cfg.seed), 0x7A6F6F]))
    n_bd, n_clean = cfg.backdoored, cfg.clean
    crossed = _crossed(rng, cfg.families, cfg.datasets, n_bd)
    families = [f for f, _ in crossed]
    bd_sets = [d for _, d in crossed]
    clean_sets = _balanced(rng, cfg.datasets, n_clean)
    specs = []
    for i in range(n_bd + n_clean):
        backdoored = i < n_bd
        dataset = bd_sets[i] if backdoored else clean_sets[i - n_bd]
        arch = str(rng.choice(cfg.recipe(dataset).archs))
        train_seed = int(rng.integers(0, 2**31))
        trigger_seed = int(rng.integers(0, 2**31))
        target = int(rng.integers(0, NUM_CLASSES))
        rate = round(float(rng.uniform(*cfg.poison_rate)), 4)
        alpha = round(float(rng.uniform(*cfg.blend_alpha)), 4)
        if not backdoored:
            specs.append(ModelSpec(f"{i:03d}-{dataset}-clean", dataset, arch, False, None, {},
                                   None, None, train_seed))
            continue
        family = families[i]
        trigger: dict[str, Any] = {"family": family}
        if family in ("patch", "blend", "warp"):
            trigger["seed"] = trigger_seed
        if family == "blend":
            trigger["alpha"] = alpha
        specs.append(ModelSpec(f"{i:03d}-{dataset}-{family}", dataset, arch, True, family,
                               trigger, target, rate, train_seed))
    return specs


def build_trigger(spec: ModelSpec, image_shape: Sequence[int]) -> Trigger:
    """The trigger of a backdoored spec, for images of (C, H, W) `image_shape`."""
    if not spec.backdoored:
        raise ConfigError(f"model {spec.id} is clean: it has no trigger")
    t = spec.trigger
    family = t["family"]
    if family == "patch":
        return random_patch(image_shape, seed=t["seed"])
    if family == "blend":
        return blend_trigger(image_shape, alpha=t["alpha"], seed=t["seed"])
    if family == "sig":
        return sig_trigger(image_shape)
    if family == "warp":
        return warp_trigger(image_shape, seed=t["seed"])
    raise ConfigError(f"unknown trigger family '{family}' in spec {spec.id}")


# --- files -------------------------------------------------------------------------------------


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


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _sd(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else None


def _rates(rows: list[dict], positives: set[str], negatives: set[str]) -> dict[str, Any]:
    """TPR, FPR, AUC and target accuracy of one detector and seed; rows: id → verdict."""
    pos = [r for r in rows if r["model"] in positives]
    neg = [r for r in rows if r["model"] in negatives]
    hits = [r for r in pos if r["detected"]]
    out: dict[str, Any] = {
        "positives": len(pos), "negatives": len(neg),
        "tpr": len(hits) / len(pos) if pos else None,
        "fpr": sum(r["detected"] for r in neg) / len(neg) if neg else None,
        "target_accuracy": (sum(r["target"] == r["true_target"] for r in hits) / len(hits)
                            if hits else None),
        "detected_backdoored": len(hits),
        "inconclusive": sum(r.get("status") == "inconclusive" for r in pos + neg),
        "auc": None,
    }
    if pos and neg and all("statistic" in r for r in pos + neg):
        scores = [r["statistic"] for r in pos + neg]
        labels = [1] * len(pos) + [0] * len(neg)
        out["auc"] = roc_auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    return out


def load_results(folder: Path | str, cfg: ZooConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """The model records found in the zoo folder and, per detector, the detection records found
    (each with the model's true target added as "true_target")."""
    folder = Path(folder)
    specs = generate_specs(cfg)
    models = []
    for spec in specs:
        path = model_paths(folder, spec)[1]
        if path.exists():
            models.append(read_json(path))
    found: dict[str, list[dict]] = {d: [] for d in cfg.detectors}
    for spec in specs:
        for d in cfg.detectors:
            for s in cfg.seeds:
                path = detection_path(folder, cfg, d, spec, s)
                if path.exists():
                    rec = read_json(path)
                    rec["true_target"] = spec.target
                    found[d].append(rec)
    return models, found


def _either(found: Mapping[str, list[dict]]) -> list[dict]:
    """scan's combined verdict per (model, seed) where every detector has a result: detected
    when any fired; the target Neural Cleanse's when it fired, else MM-BD's."""
    by_key: dict[tuple[str, int], dict[str, dict]] = {}
    for d, rows in found.items():
        for r in rows:
            by_key.setdefault((r["model"], r["seed"]), {})[d] = r
    out = []
    for (model, seed), got in by_key.items():
        if len(got) < len(found):
            continue
        fired = [d for d in DETECTORS if d in got and got[d]["detected"]]
        target = got[fired[0]]["target"] if fired else None
        any_row = next(iter(got.values()))
        out.append({"model": model, "seed": seed, "detected": bool(fired), "target": target,
                    "true_target": any_row["true_target"], "fired": fired,
                    "status": "detected" if fired else "none",
                    "cpu_seconds": sum(r["cpu_seconds"] for r in got.values())})
    return out


def _judge(rows: list[dict], seeds: Sequence[int], positives: set[str], negatives: set[str],
           groups: Mapping[str, set[str]]) -> dict[str, Any]:
    """One detector's numbers over the seeds: per seed, their mean and sd, the agreement, the
    CPU seconds, and the same rates per group of positives (trigger family, data set)."""
    per_seed = {s: _rates([r for r in rows if r["seed"] == s], positives, negatives)
                for s in seeds}
    out: dict[str, Any] = {"per_seed": {str(s): v for s, v in per_seed.items()}}
    for key in ("tpr", "fpr", "auc", "target_accuracy"):
        values = [v[key] for v in per_seed.values()]
        out[key] = _mean(values)
        out[f"{key}_sd"] = _sd(values)
    verdicts: dict[str, dict[int, bool]] = {}
    for r in rows:
        verdicts.setdefault(r["model"], {})[r["seed"]] = r["detected"]
    complete = [v for v in verdicts.values() if len(v) == len(seeds)]
    out["agreement"] = (sum(len(set(v.values())) == 1 for v in complete) / len(complete)
                        if complete else None)
    out["agreement_models"] = len(complete)
    cpu = [r["cpu_seconds"] for r in rows]
    out["cpu_seconds_mean"] = _mean(cpu)
    out["cpu_seconds_max"] = max(cpu) if cpu else None
    out["groups"] = {}
    for name, members in groups.items():
        rates = [_rates([r for r in rows if r["seed"] == s], positives & members, negatives)
                 for s in seeds]
        out["groups"][name] = {"positives": rates[0]["positives"],
                               "tpr": _mean([r["tpr"] for r in rates]),
                               "auc": _mean([r["auc"] for r in rates]),
                               "target_accuracy": _mean([r["target_accuracy"] for r in rates])}
    return out


def summarize(folder: Path | str, cfg: ZooConfig) -> dict[str, Any]:
    """Every number of the zoo from the records found in `folder` (a partial zoo gives partial
    numbers, with its counts)."""
    models, found = load_results(folder, cfg)
    positives = {m["spec"]["id"] for m in models if m["backdoor_took"]}
    failed = [m for m in models if m["backdoor_took"] is False]
    negatives = {m["spec"]["id"] for m in models if not m["spec"]["backdoored"]}
    groups = {f"family {f}": {m["spec"]["id"] for m in models if m["spec"]["family"] == f}
              for f in cfg.families}
    groups.update({f"data {d}": {m["spec"]["id"] for m in models if m["spec"]["dataset"] == d}
                   for d in cfg.datasets})
    judged = {d: _judge(rows, cfg.seeds, positives, negatives, groups)
              for d, rows in found.items()}
    if len(found) > 1:
        judged["either"] = _judge(_either(found), cfg.seeds, positives, negatives, groups)
        judged["either"]["auc"] = None  # a combined verdict has no single statistic
    verdict_of = {(d, r["model"]): [] for d, rows in found.items() for r in rows}
    for d, rows in found.items():
        for r in rows:
            verdict_of[(d, r["model"])].append(r["status"])
    train_cpu = {d: _mean([m["train_cpu_seconds"] for m in models if m["spec"]["dataset"] == d])
                 for d in cfg.datasets}
    return {
        "models": {
            "specs": cfg.backdoored + cfg.clean, "trained": len(models),
            "backdoored": sum(m["spec"]["backdoored"] for m in models),
            "backdoor_took": len(positives), "clean": len(negatives),
            "asr_threshold": cfg.asr_threshold,
        },
        "benign_accuracy": {d: _mean([m["benign_accuracy"] for m in models
                                      if m["spec"]["dataset"] == d]) for d in cfg.datasets},
        "training": {"cpu_seconds_total": sum(m["train_cpu_seconds"] for m in models),
                     "cpu_seconds_mean_by_dataset": train_cpu},
        "excluded": [{"id": m["spec"]["id"], "family": m["spec"]["family"],
                      "dataset": m["spec"]["dataset"], "asr": m["attack_success_rate"],
                      "verdicts": {d: verdict_of.get((d, m["spec"]["id"]), [])
                                   for d in found}} for m in failed],
        "seeds": list(cfg.seeds),
        "statistics": {d: STATISTICS[d] for d in found},
        "detectors": judged,
    }


def _fmt(value: Any, sd: Any = None, pct: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.0f}%" if pct else f"{value:.2f}"
    if sd is not None:
        text += f" ± {100 * sd:.0f}" if pct else f" ± {sd:.2f}"
    return text


def summary_tables(summary: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the summary: the detectors, then per group."""
    names = {"nc": "NC", "mmbd": "MM-BD", "either": "either"}
    judged = summary["detectors"]
    rows = []
    for d, v in judged.items():
        rows.append([names[d], _fmt(v["tpr"], v["tpr_sd"], True), _fmt(v["fpr"], v["fpr_sd"], True),
                     _fmt(v["auc"], v["auc_sd"]), _fmt(v["target_accuracy"], None, True),
                     _fmt(v["agreement"], None, True),
                     "–" if v["cpu_seconds_mean"] is None else f"{v['cpu_seconds_mean']:.1f}"])
    head = ["detector", "TPR", "FPR", "ROC AUC", "target acc.", "agreement", "CPU-s / model"]
    m = summary["models"]
    title = (f"{m['backdoor_took']} backdoored models whose backdoor took (ASR ≥ "
             f"{m['asr_threshold']:g}) vs {m['clean']} clean; mean ± sd over seeds "
             f"{', '.join(map(str, summary['seeds']))}; NC: Neural Cleanse, either: scan's "
             "verdict (any detector fired)")
    tables = [(title, head, rows)]
    groups = next(iter(judged.values()))["groups"] if judged else {}
    grows = []
    for g in groups:
        row = [g, str(next(iter(judged.values()))["groups"][g]["positives"])]
        for v in judged.values():
            row += [_fmt(v["groups"][g]["tpr"], None, True), _fmt(v["groups"][g]["auc"])]
        grows.append(row)
    ghead = ["group", "positives"] + [c for d in judged for c in (f"{names[d]} TPR",
                                                                  f"{names[d]} AUC")]
    tables.append(("per trigger family and data set (AUC against all clean models)", ghead,
                   grows))
    if summary["excluded"]:
        tables.append(("backdoors that did not take (excluded from TPR and AUC)",
                       ["model", "ASR", *(names[d] for d in summary["statistics"])],
                       [[e["id"], f"{e['asr']:.2f}",
                         *(",".join(e["verdicts"].get(d, [])) or "–"
                           for d in summary["statistics"])] for e in summary["excluded"]]))
    return tables


def roc_figure(path: Path | str, folder: Path | str, cfg: ZooConfig) -> Path | None:
    """The ROC curves of every detector's statistic, one line per seed (None: nothing to draw)."""
    from poisonlab.report.style import COLORS, new_figure, save_figure

    models, found = load_results(folder, cfg)
    positives = {m["spec"]["id"] for m in models if m["backdoor_took"]}
    negatives = {m["spec"]["id"] for m in models if not m["spec"]["backdoored"]}
    fig, ax = new_figure(4.5, 4.2)
    drawn = False
    styles = ["-", "--", ":", "-."]
    for i, (d, rows) in enumerate(found.items()):
        for j, seed in enumerate(cfg.seeds):
            use = [r for r in rows if r["seed"] == seed and r["model"] in positives | negatives]
            labels = [int(r["model"] in positives) for r in use]
            if len(set(labels)) < 2:
                continue
            scores = torch.tensor([r["statistic"] for r in use], dtype=torch.float64)
            fpr, tpr, _ = roc_points(scores, torch.tensor(labels))
            auc = roc_auc(scores, torch.tensor(labels))
            ax.plot(fpr.numpy(), tpr.numpy(), color=COLORS[i % len(COLORS)],
                    linestyle=styles[j % len(styles)], drawstyle="steps-post",
                    label=f"{DETECTORS[d]} seed {seed} (AUC {auc:.2f})")
            drawn = True
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("false-positive rate (clean models)")
    ax.set_ylabel("true-positive rate (backdoored models)")
    ax.set_title("backdoor detectors on the zoo")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# --- cost estimate -----------------------------------------------------------------------------


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
