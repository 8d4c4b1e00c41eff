"""The membership study's shared state: data parts, trained models (reused from the run), cached
logits, the reference models' outputs, and the attacks fitted on them.

A supervised training set is split into four disjoint parts (target-in, target-out, shadow-in,
shadow-out; Shokri et al. 2017). The target trains on target-in; the attacks are scored on
target-in (members) against target-out (non-members), the "evaluation records". Shokri shadow
models train on the shadow parts; LiRA's reference models on random halves of the evaluation
records (Carlini et al. 2022). Every trained model, query and score is kept in the run, so a
resumed run skips what is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from poisonlab.attacks.membership import (
    MembershipAttack,
    Queried,
    Reference,
    get_attack,
    random_halves,
)
from poisonlab.config import replace
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.defenses.dp_sgd import DPSGD, dp_compatible
from poisonlab.defenses.membership_outputs import OUTPUT_DEFENSES, OutputDefense
from poisonlab.device import default_device
from poisonlab.errors import ConfigError
from poisonlab.evaluation.membership_config import StudyConfig
from poisonlab.evaluation.membership_pieces import ModelPiece, train_pieces
from poisonlab.executors import Executor
from poisonlab.models import build_model, check_fits
from poisonlab.runs import Run
from poisonlab.training.supervised import RunCheckpoint, place, predict_logits, train_classifier

PARTS = ("target_in", "target_out", "shadow_in", "shadow_out")


@dataclass(frozen=True)
class AttackPlan:
    """How the study runs one attack name: the registered attack, the config section holding its
    settings (plus `changes`), the reference models it fits on ("shadow": the Shokri shadows of an
    architecture; "lira": the models on halves of the evaluation records; None), whether it scores
    the label-only subset of the records, and whether its scores are kept in the run."""

    attack: str
    section: str
    references: str | None = None
    changes: dict = field(default_factory=dict)
    subset: bool = False
    keep_scores: bool = False


PLANS = {
    "shadow": AttackPlan("shadow", "shadow", references="shadow"),
    "lira_online": AttackPlan("lira", "lira", references="lira", changes={"online": True}),
    "lira_offline": AttackPlan("lira", "lira", references="lira", changes={"online": False}),
    "label_only": AttackPlan("label_only", "label_only", subset=True, keep_scores=True),
    "threshold": AttackPlan("threshold", "threshold"),
}


def load_data(cfg: StudyConfig, data_dir: Path | None, seed: int) -> tuple[SupervisedData, str]:
    """The supervised set named by cfg.data (auto: MNIST from data_dir, else the glyph set)."""
    name = cfg.data.dataset
    if name == "auto":
        name = "mnist" if data_dir is not None else "glyphs"
    data = load_supervised(name, data_dir, seed=seed)
    test = data.test
    if cfg.data.test_size is not None and cfg.data.test_size < len(test):
        gen = torch.Generator().manual_seed(seed + 5)
        test = test.subset(torch.randperm(len(test), generator=gen)[: cfg.data.test_size])
    d = cfg.data.downsample
    return SupervisedData(data.train.downsampled(d), test.downsampled(d), data.classes), name


def split_parts(train: ImageSet, part_size: int, seed: int) -> dict[str, ImageSet]:
    """Four disjoint parts of `part_size` records drawn by a seeded permutation (see PARTS)."""
    if 4 * part_size > len(train):
        raise ConfigError(f"data.part_size={part_size} needs {4 * part_size} training records, "
                          f"the data set has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return {name: train.subset(order[i * part_size : (i + 1) * part_size])
            for i, name in enumerate(PARTS)}


def check_feasible(cfg: StudyConfig, data: SupervisedData) -> None:
    """Every size and architecture checked before any training (one-line ConfigError)."""
    n = cfg.data.part_size
    if 4 * n > len(data.train):
        raise ConfigError(f"data.part_size={n} needs 4 × {n} = {4 * n} training records, the "
                          f"data set has {len(data.train)}")
    if "label_only" in cfg.attacks and cfg.label_only.records > 2 * n:
        raise ConfigError(f"label_only.records={cfg.label_only.records} exceeds the {2 * n} "
                          "evaluation records")
    dropout = cfg.defense.dropout
    archs = {(a, 0.0) for a in [cfg.arch, *cfg.matrix.targets, *cfg.matrix.shadows]}
    archs |= {(a, dropout) for a in cfg.matrix.targets if cfg.matrix.dropout}
    archs |= {(cfg.arch, dropout)} if "dropout" in cfg.defense.defenses else set()
    for arch, p in sorted(archs):
        check_fits(build(arch, data, p), tuple(data.train.x.shape[1:]), arch)
    if "dp_sgd" in cfg.defense.defenses:
        dp_compatible(build(cfg.arch, data))
    k = cfg.defense.top_k.k
    if "top_k" in cfg.defense.defenses and k > data.num_classes:
        raise ConfigError(f"defense.top_k.k={k} exceeds the {data.num_classes} classes of the "
                          "data set")


def build(arch: str, data: SupervisedData, dropout: float = 0.0) -> torch.nn.Module:
    """Architecture `arch` for this data set, with dropout before its last layer when > 0."""
    options = {"dropout": dropout} if dropout > 0 else {}
    try:
        return build_model(arch, data.num_classes, int(data.train.x.shape[1]), **options)
    except TypeError:
        raise ConfigError(f"architecture '{arch}' has no dropout option") from None


def shadow_masks(count: int, part_size: int, seed: int) -> torch.Tensor:
    """Bool [count, 2·part_size] over shadow-in ∪ shadow-out: the first shadow trains on
    shadow-in (the seed's split), every further one on a random half."""
    first = torch.cat([torch.ones(part_size), torch.zeros(part_size)]).bool()
    gen = torch.Generator().manual_seed(seed)
    rest = [torch.randperm(2 * part_size, generator=gen) < part_size for _ in range(count - 1)]
    return torch.stack([first, *rest])


def accuracy(logits_or_probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits_or_probs.argmax(1) == y).float().mean())


def _concat(*sets: ImageSet) -> ImageSet:
    return ImageSet(torch.cat([s.x for s in sets]), torch.cat([s.y for s in sets]))


class Study:
    """What every stage shares: the parts, the evaluation records, trained models, cached
    logits, reference outputs and fitted attacks. `seed` is the experiment's seed; every model
    and draw derives its own from it."""

    def __init__(self, cfg: StudyConfig, run: Run, data: SupervisedData, *, seed: int = 0,
                 progress: bool = True) -> None:
        self.cfg, self.run, self.data, self.seed, self.progress = cfg, run, data, seed, progress
        self.parts = split_parts(data.train, cfg.data.part_size, seed)
        n = cfg.data.part_size
        self.eval = _concat(self.parts["target_in"], self.parts["target_out"])  # members first
        self.member = torch.cat([torch.ones(n), torch.zeros(n)])
        self.pool = _concat(self.parts["shadow_in"], self.parts["shadow_out"])
        self.pool_masks = shadow_masks(cfg.shadow.count, n, seed + 3)
        self._attacks: dict[tuple, MembershipAttack] = {}
        self._references: dict[tuple, list[Reference]] = {}
        self.shadows: dict[str, list[torch.nn.Module]] = {}
        self.privacy: dict | None = None  # DP-SGD's ε, δ and settings once trained

    # --- models -----------------------------------------------------------------------------

    def train_model(self, name: str, arch: str, train: ImageSet, seed: int, dropout: float = 0.0,
                    epochs: int | None = None) -> torch.nn.Module:
        """Train (or reload from the run) model `name` on `train` with the cfg.train recipe (cut
        to `epochs` when given). The initial weights come from `seed` alone, so they do not
        depend on which models a resumed run skipped."""
        torch.manual_seed(seed)
        model = build(arch, self.data, dropout)
        saved = self.run.load_checkpoint(f"model-{name}")
        if saved is not None:
            model.load_state_dict(saved[0])
            self.run.log(f"{name}: model loaded from the run")
            return place(model, default_device(), self.cfg.train.channels_last).eval()
        recipe = replace(self.cfg.train, epochs=epochs) if epochs else self.cfg.train
        history = train_classifier(model, train, recipe, progress=self.progress,
                                   checkpoint=RunCheckpoint(self.run, f"train-{name}"), seed=seed)
        self.run.save_checkpoint(f"model-{name}", model.state_dict(),
                                 {"arch": arch, "model": name, "dropout": dropout})
        secs = sum(history["epoch_seconds"])
        self.run.log(f"{name}: trained {recipe.epochs} epochs on {len(train)} records in "
                     f"{secs:.0f}s, train accuracy {history['train_acc'][-1]:.4f}")
        return model.eval()

    def target(self, arch: str, dropout: float = 0.0) -> torch.nn.Module:
        name = f"target-{arch}" + ("-dropout" if dropout > 0 else "")
        seed = self.seed + (1 if dropout > 0 else 0)
        return self.train_model(name, arch, self.parts["target_in"], seed, dropout)

    def early_stopped_target(self) -> tuple[str, torch.nn.Module]:
        """The target's architecture and recipe, stopped after defense.early_stopping_epochs."""
        arch, epochs = self.cfg.arch, self.cfg.defense.early_stopping_epochs
        name = f"target-{arch}-early{epochs}"
        return name, self.train_model(name, arch, self.parts["target_in"], self.seed,
                                      epochs=epochs)

    def dp_target(self) -> tuple[str, torch.nn.Module]:
        """The target architecture trained with DP-SGD (or reloaded); sets self.privacy."""
        model = dp_compatible(build(self.cfg.arch, self.data))
        saved = self.run.load_checkpoint("model-target-dpsgd")
        if saved is not None:
            model.load_state_dict(saved[0])
            self.run.log("target-dpsgd: model loaded from the run")
            self.privacy = saved[1]["privacy"]
            return "target-dpsgd", model.to(default_device()).eval()
        d = self.cfg.defense.dp
        torch.manual_seed(self.seed + 2)
        result = DPSGD(config=d, seed=self.seed + 2).train(
            build(self.cfg.arch, self.data), self.parts["target_in"], progress=self.progress,
            checkpoint=RunCheckpoint(self.run, "train-target-dpsgd"))
        self.privacy = {"epsilon": result.epsilon, "delta": result.delta, "steps": result.steps,
                        "noise_multiplier": result.noise_multiplier,
                        "sample_rate": result.sample_rate, "max_grad_norm": d.max_grad_norm,
                        "accountant": d.accountant}
        self.run.save_checkpoint("model-target-dpsgd", result.model.state_dict(),
                                 {"privacy": self.privacy})
        self.run.log(f"target-dpsgd: {d.epochs} epochs, ε = {result.epsilon:.3f} at δ = "
                     f"{result.delta:.2e}, train accuracy {result.history['train_acc'][-1]:.4f}")
        return "target-dpsgd", result.model.to(default_device()).eval()

    def shadow_models(self, arch: str) -> list[torch.nn.Module]:
        if arch not in self.shadows:
            self.shadows[arch] = [
                self.train_model(f"shadow-{arch}-{i}", arch, self.pool.subset(mask),
                                 self.model_seed("shadow", i))
                for i, mask in enumerate(self.pool_masks)]
        return self.shadows[arch]

    def model_seed(self, kind: str, i: int) -> int:
        """The seed of shadow model i or LiRA reference model i (init weights, batch order)."""
        return self.seed + (100 if kind == "shadow" else 1000) + i

    def pieces(self) -> dict[str, ModelPiece]:
        """The shadow and LiRA reference models the configured stages will train, as
        independent pieces (same names, seeds and records as shadow_models/_lira_references)."""
        cfg, lira = self.cfg, any(a.startswith("lira") for a in self.cfg.attacks)
        archs = [cfg.arch] if ("shadow" in cfg.attacks or cfg.defense.attack == "shadow"
                               or (lira and cfg.lira.reuse_shadow)) else []
        if cfg.matrix.targets and cfg.matrix.shadows:
            archs += cfg.matrix.shadows
        common = {"recipe": cfg.train, "num_classes": self.data.num_classes,
                  "channels": int(self.data.train.x.shape[1])}
        out = {f"shadow-{a}-{i}": ModelPiece(f"shadow-{a}-{i}", a, self.model_seed("shadow", i),
                                             "pool", mask, **common)
               for a in dict.fromkeys(archs) for i, mask in enumerate(self.pool_masks)}
        for k, mask in enumerate(self.lira_masks() if lira else []):
            out[f"lira-{k:02d}"] = ModelPiece(f"lira-{k:02d}", cfg.arch,
                                              self.model_seed("lira", k), "eval", mask, **common)
        return out

    def train_pieces(self, executor: Executor | None, cpus: int = 1) -> bool:
        """Train the missing shadow and reference models on `executor` and record them, so the
        stages load them; False (nothing done) without an executor or on `local`, where the
        stages train them one after the other as they come, with per-epoch checkpoints."""
        if executor is None or executor.name == "local":
            return False
        train_pieces(self.run, self.pieces(), {"pool": self.pool, "eval": self.eval}, executor,
                     cpus=cpus, progress=self.progress)
        return True

    # --- queries ----------------------------------------------------------------------------

    def logits(self, key: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of `model` on x, computed once per run (kept as checkpoint logits-<key>)."""
        saved = self.run.load_checkpoint(f"logits-{key}")
        if saved is not None and saved[0]["logits"].shape[0] == len(x):
            return saved[0]["logits"]
        logits = predict_logits(model, x)
        self.run.save_checkpoint(f"logits-{key}", {"logits": logits})
        return logits

    def test_logits(self, key: str, model: torch.nn.Module) -> torch.Tensor:
        return self.logits(f"{key}-test", model, self.data.test.x)

    def output(self, name: str) -> OutputDefense:
        """The output defence `name` with its settings from cfg.defense."""
        d = self.cfg.defense
        settings = {"rounding": d.rounding, "top_k": d.top_k}
        return OUTPUT_DEFENSES[name](config=settings.get(name))

    def released(self, logits: torch.Tensor, output: str = "none") -> torch.Tensor:
        """Probability vectors as the service behind the output defence `output` releases them."""
        return self.output(output).release(logits.softmax(1))

    def views(self, key: str, model: torch.nn.Module, records: ImageSet) -> Queried:
        """Logits [views, N, classes] on the records (and their flips when lira.flip_query); the
        logits are kept in the run as logits-<key> (and logits-<key>-flip)."""
        x = records.x
        queries = [("", x)] + ([("-flip", x.flip(-1))] if self.cfg.lira.flip_query else [])
        return Queried(records.y, logits=torch.stack(
            [self.logits(f"{key}{suffix}", model, q) for suffix, q in queries]))

    def query(self, attack: MembershipAttack, key: str, model: torch.nn.Module,
              output: str = "none", subset: torch.Tensor | None = None) -> Queried:
        """What `attack` needs from `model` on the evaluation records (or `subset` of them)."""
        records = self.eval if subset is None else self.eval.subset(subset)
        if attack.needs == "probs":
            return Queried(records.y, probs=self.released(self.logits(key, model, records.x),
                                                          output))
        if attack.needs == "logits":
            return self.views(key, model, records)
        return attack.query(model, records.x, records.y)

    # --- references and fitted attacks ------------------------------------------------------

    def references(self, kind: str | None, arch: str, output: str = "none") -> list[Reference]:
        """The reference models' outputs with their membership: the Shokri shadows of `arch` on
        shadow-in ∪ shadow-out behind `output` ("shadow"), or LiRA's models on halves of the
        evaluation records plus (lira.reuse_shadow) the shadows as OUT models ("lira")."""
        if kind is None:
            return []
        if (kind, arch, output) not in self._references:
            build_refs = self._shadow_references if kind == "shadow" else self._lira_references
            self._references[(kind, arch, output)] = build_refs(arch, output)
        return self._references[(kind, arch, output)]

    def _shadow_references(self, arch: str, output: str) -> list[Reference]:
        return [Reference(Queried(self.pool.y, probs=self.released(
                    self.logits(f"shadow-{arch}-{i}", m, self.pool.x), output)), mask)
                for (i, m), mask in zip(enumerate(self.shadow_models(arch)), self.pool_masks,
                                        strict=True)]

    def lira_masks(self) -> torch.Tensor:
        """Bool [lira.shadows, 2·part_size]: the evaluation records each LiRA model trains on."""
        return random_halves(self.cfg.lira.shadows, len(self.eval),
                             torch.Generator().manual_seed(self.seed + 11))

    def _lira_references(self, arch: str, output: str) -> list[Reference]:  # noqa: ARG002
        lira, n = self.cfg.lira, len(self.eval)
        refs = []
        for k, mask in enumerate(self.lira_masks()):
            model = self.train_model(f"lira-{k:02d}", arch, self.eval.subset(mask),
                                     self.model_seed("lira", k))
            refs.append(Reference(self.views(f"lira-{k:02d}", model, self.eval), mask))
        if lira.reuse_shadow:  # trained on disjoint data: OUT models for every record
            for i, model in enumerate(self.shadow_models(arch)):
                refs.append(Reference(self.views(f"shadow-{arch}-{i}-lira", model, self.eval),
                                      torch.zeros(n, dtype=torch.bool)))
        return refs

    def attack(self, name: str, arch: str | None = None, output: str = "none",
               **changes) -> MembershipAttack:
        """Attack `name` (a key of PLANS) with its settings from the config (and `changes`),
        fitted on its references for `arch` behind `output`; kept for reuse."""
        arch = arch or self.cfg.arch
        key = (name, arch, output, tuple(sorted(changes.items())))
        if key not in self._attacks:
            plan = PLANS[name]
            attack = get_attack(plan.attack, config=getattr(self.cfg, plan.section),
                                seed=self.seed, **plan.changes, **changes)
            self._attacks[key] = attack.fit(self.references(plan.references, arch, output))
        return self._attacks[key]
