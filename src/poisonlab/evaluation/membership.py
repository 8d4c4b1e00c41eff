"""The membership-inference study: attacks on an overfit target, defences, architecture matrix.

Shokri et al. 2017's protocol on four disjoint parts (see poisonlab.evaluation.membership_study):
the attacks shadow (attack MLP on shadow models), lira_online, lira_offline (Carlini et al.
2022), label_only (Choquette-Choo et al. 2021) and threshold (Yeom et al. 2018) are each scored
on target-in (members) against target-out (non-members) through the attack contract (fit on the
references, score the target). Each defence (dropout, early stopping, DP-SGD, labels only,
rounding, top-k) is a pair of the stated attack's numbers and the defended target's test
accuracy; output defences are applied to the shadow models' outputs too (the attacker adapts).
The target × shadow architecture matrix gives the shadow attack's accuracy, with normal and
dropout-trained targets. `evaluate` returns typed results; `MembershipResult.metrics()` is the
metrics.json layout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from poisonlab.data.types import SupervisedData
from poisonlab.defenses.membership_outputs import OUTPUT_DEFENSES
from poisonlab.device import default_device
from poisonlab.evaluation.membership_config import StudyConfig
from poisonlab.evaluation.membership_study import PLANS, Study, accuracy
from poisonlab.executors import Executor
from poisonlab.metrics import membership_metrics
from poisonlab.runs import Run

SUMMARY = ("attack_accuracy", "auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01")
# name: the shadow attack's settings that differ from its one-MLP form
SHADOW_VARIANTS: dict[str, dict[str, Any]] = {
    "default": {"per_class": False, "sort_probs": False, "model": "mlp"},
    "per_class": {"per_class": True, "sort_probs": False, "model": "mlp"},
    "sorted": {"per_class": False, "sort_probs": True, "model": "mlp"},
    "boosting": {"per_class": False, "sort_probs": False, "model": "boosting"}}


@dataclass(frozen=True)
class AttackScores:
    """One attack's scores [N] and the records' membership [N] (1 = member), for ROC curves."""

    scores: torch.Tensor
    member: torch.Tensor


@dataclass
class DefenseResult:
    """The stated attack's metrics and the defended target's test accuracy (`metrics`), the
    loss-threshold attack's accuracy and AUC beside (None when threshold is the stated attack),
    and what the defence adds (early stopping: epochs; DP-SGD: epsilon)."""

    metrics: dict[str, float]
    attack: str
    threshold_attack: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out: dict[str, Any] = {**self.metrics, "attack": self.attack}
        if self.threshold_attack is not None:
            out["threshold_attack"] = self.threshold_attack
        return out | self.extra


@dataclass
class MatrixBlock:
    """Shadow-attack accuracy and AUC [targets][shadows], and each target's test accuracy."""

    targets: list[str]
    shadows: list[str]
    attack_accuracy: list[list[float]]
    auc: list[list[float]]
    target_test_accuracy: list[float]
    rate: float | None = None  # the dropout rate of dropout-trained targets

    def as_dict(self) -> dict:
        out = {"targets": self.targets, "shadows": self.shadows,
               "attack_accuracy": self.attack_accuracy, "auc": self.auc,
               "target_test_accuracy": self.target_test_accuracy}
        return out | ({"rate": self.rate} if self.rate is not None else {})


@dataclass
class MembershipResult:
    """Everything the study measured; `metrics()` is the metrics.json layout, `from_metrics`
    reads it back (without the scores)."""

    dataset: str
    arch: str
    records: int
    train_accuracy: float
    test_accuracy: float
    attacks: dict[str, dict[str, float]]
    shadow_variants: dict[str, dict[str, float]]
    defenses: dict[str, DefenseResult]
    matrix: MatrixBlock | None = None
    matrix_dropout: MatrixBlock | None = None
    privacy: dict[str, Any] | None = None  # DP-SGD's ε, δ, steps and settings
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, AttackScores] = field(default_factory=dict)

    def metrics(self) -> dict:
        matrix: dict[str, Any] = {}
        if self.matrix is not None:
            matrix = {"attack": "shadow"} | self.matrix.as_dict()
            if self.matrix_dropout is not None:
                matrix["dropout"] = self.matrix_dropout.as_dict()
        out = {"dataset": self.dataset, "arch": self.arch, "records": self.records,
               "target": {"train_accuracy": self.train_accuracy,
                          "test_accuracy": self.test_accuracy},
               "attacks": self.attacks, "shadow_variants": self.shadow_variants,
               "defenses": {k: v.as_dict() for k, v in self.defenses.items()},
               "matrix": matrix, "seconds": self.seconds}
        return out | ({"dp_sgd": self.privacy} if self.privacy is not None else {})

    @classmethod
    def from_metrics(cls, metrics: dict) -> MembershipResult:
        matrix = dict(metrics.get("matrix") or {})
        dropout = matrix.pop("dropout", None)
        matrix.pop("attack", None)
        defenses = {}
        for name, e in metrics["defenses"].items():
            e = dict(e)
            core = {k: e.pop(k) for k in (*SUMMARY, "test_accuracy")}
            defenses[name] = DefenseResult(core, e.pop("attack"), e.pop("threshold_attack", None),
                                           e)
        return cls(metrics["dataset"], metrics["arch"], metrics["records"],
                   metrics["target"]["train_accuracy"], metrics["target"]["test_accuracy"],
                   metrics["attacks"], metrics.get("shadow_variants") or {}, defenses,
                   MatrixBlock(**matrix) if matrix else None,
                   MatrixBlock(**dropout) if dropout else None, metrics.get("dp_sgd"),
                   metrics.get("seconds") or {})


def score(study: Study, name: str, key: str, model: torch.nn.Module, output: str = "none",
          arch: str | None = None) -> AttackScores:
    """Attack `name` fitted on its references, scoring `model` (kept as logits-<key>)."""
    plan = PLANS[name]
    subset = label_only_records(study) if plan.subset else None
    member = study.member if subset is None else study.member[subset]
    if plan.keep_scores:
        saved = study.run.load_checkpoint(f"scores-{name}")
        if saved is not None:
            return AttackScores(saved[0]["scores"], member)
    attack = study.attack(name, arch, output)
    scores = attack.score(study.query(attack, key, model, output, subset))
    if plan.keep_scores:
        study.run.save_checkpoint(f"scores-{name}", {"scores": scores})
    return AttackScores(scores, member)


def label_only_records(study: Study) -> torch.Tensor:
    """Indices into the evaluation records: half members, half not."""
    r, n = study.cfg.label_only.records, study.cfg.data.part_size
    half = r // 2
    return torch.cat([torch.arange(half), n + torch.arange(r - half)])


def run_attacks(study: Study, target: torch.nn.Module,
                test_accuracy: float) -> tuple[dict, dict[str, AttackScores]]:
    """Every attack of cfg.attacks on the target: (metrics by attack, scores by attack)."""
    key = f"target-{study.cfg.arch}"
    scores: dict[str, AttackScores] = {}
    for name in study.cfg.attacks:
        t0 = time.perf_counter()
        scores[name] = score(study, name, key, target)
        study.run.log(f"attack {name}: {time.perf_counter() - t0:.0f}s")
    metrics = {name: membership_metrics(s.scores, s.member) | {"test_accuracy": test_accuracy}
               for name, s in scores.items()}
    return metrics, scores


def shadow_variants(study: Study, target: torch.nn.Module) -> dict[str, dict]:
    """The shadow attack's forms (one MLP; one per class; sorted probabilities; gradient-boosted
    trees) on the same shadows and target, so the configured choice can be compared."""
    s, out = study.cfg.shadow, {}
    key = f"target-{study.cfg.arch}"
    for name, changes in SHADOW_VARIANTS.items():
        configured = all(getattr(s, k) == v for k, v in changes.items())
        attack = study.attack("shadow", **({} if configured else changes))
        scores = attack.score(study.query(attack, key, target))
        metrics = membership_metrics(scores, study.member)
        out[name] = {k: metrics[k] for k in SUMMARY}
    study.run.log("shadow attack variants: " + ", ".join(
        f"{k} acc {v['attack_accuracy']:.4f} AUC {v['auc']:.4f}" for k, v in out.items()))
    return out


def defended_model(study: Study, name: str) -> tuple[str, torch.nn.Module, dict]:
    """(key, model, extra metrics) of a training-side defence (or of the undefended target)."""
    arch = study.cfg.arch
    if name == "dropout":
        return f"target-{arch}-dropout", study.target(arch, study.cfg.defense.dropout), {}
    if name == "early_stopping":
        key, model = study.early_stopped_target()
        return key, model, {"epochs": study.cfg.defense.early_stopping_epochs}
    if name == "dp_sgd":
        key, model = study.dp_target()
        return key, model, {"epsilon": study.privacy["epsilon"]}
    return f"target-{arch}", study.target(arch), {}


def run_defenses(study: Study) -> dict[str, DefenseResult]:
    """Each defence as a pair: the stated attack's numbers and the target's test accuracy; with
    the loss-threshold attack's accuracy and AUC beside, which does not depend on the shadows
    matching the defended recipe."""
    d = study.cfg.defense
    out = {}
    for name in d.defenses:
        output = name if name in OUTPUT_DEFENSES else "none"
        key, model, extra = defended_model(study, name)
        test = study.released(study.test_logits(key, model), output)
        stated = score(study, d.attack, key, model, output)
        entry = membership_metrics(stated.scores, stated.member)
        entry |= {"test_accuracy": accuracy(test, study.data.test.y)}
        check = None
        if d.attack != "threshold":  # a second opinion that assumes nothing about the recipe
            m = membership_metrics(*_pair(score(study, "threshold", key, model, output)))
            check = {k: m[k] for k in ("attack_accuracy", "auc")}
        out[name] = DefenseResult(entry, d.attack, check, extra)
        study.run.log(f"defence {name}: attack accuracy {entry['attack_accuracy']:.4f}, AUC "
                      f"{entry['auc']:.4f}, test accuracy {entry['test_accuracy']:.4f}")
    return out


def _pair(s: AttackScores) -> tuple[torch.Tensor, torch.Tensor]:
    return s.scores, s.member


def matrix_block(study: Study, targets: list[str], dropout: float) -> MatrixBlock:
    """Shadow-attack accuracy and AUC for every (target, shadow) architecture pair."""
    acc, auc, test_acc = [], [], []
    for t in targets:
        model = study.target(t, dropout)
        key = f"target-{t}" + ("-dropout" if dropout > 0 else "")
        test_acc.append(accuracy(study.test_logits(key, model), study.data.test.y))
        row = [membership_metrics(*_pair(score(study, "shadow", key, model, arch=s)))
               for s in study.cfg.matrix.shadows]
        acc.append([m["attack_accuracy"] for m in row])
        auc.append([m["auc"] for m in row])
    return MatrixBlock(list(targets), list(study.cfg.matrix.shadows), acc, auc, test_acc,
                       rate=dropout if dropout > 0 else None)


def run_matrix(study: Study) -> tuple[MatrixBlock | None, MatrixBlock | None]:
    """The matrix with normal targets, and with dropout-trained ones (matrix.dropout)."""
    m = study.cfg.matrix
    if not m.targets or not m.shadows:
        return None, None
    normal = matrix_block(study, m.targets, 0.0)
    return normal, matrix_block(study, m.targets, study.cfg.defense.dropout) if m.dropout else None


def evaluate(cfg: StudyConfig, run: Run, data: SupervisedData, dataset: str, *, seed: int = 0,
             progress: bool = True, executor: Executor | None = None,
             cpus: int = 1) -> MembershipResult:
    """The whole study on `data` (named `dataset`): target, attacks, shadow-attack forms,
    defences, matrix. Every model, query and label-only score is kept in `run`. With a
    distributing `executor` the shadow and LiRA reference models first train on it as pieces of
    `cpus` cores each (Study.train_pieces); the numbers are those of the sequential study."""
    study = Study(cfg, run, data, seed=seed, progress=progress)
    run.log(f"data: {dataset}, four parts of {cfg.data.part_size}, test {len(data.test)}, "
            f"device {default_device()}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if study.train_pieces(executor, cpus):
        seconds["pieces"] = time.perf_counter() - t0
    key = f"target-{cfg.arch}"
    target = study.target(cfg.arch)
    test_accuracy = accuracy(study.test_logits(key, target), data.test.y)
    train_accuracy = accuracy(study.logits(key, target, study.eval.x)[: cfg.data.part_size],
                              study.parts["target_in"].y)
    attacks, scores = run_attacks(study, target, test_accuracy)
    variants = shadow_variants(study, target) if "shadow" in cfg.attacks else {}
    seconds["attacks"] = time.perf_counter() - t0
    defenses = run_defenses(study)
    seconds["defenses"] = time.perf_counter() - t0 - seconds["attacks"]
    matrix, matrix_dropout = run_matrix(study)
    seconds["total"] = time.perf_counter() - t0
    return MembershipResult(dataset, cfg.arch, len(study.eval), train_accuracy, test_accuracy,
                            attacks, variants, defenses, matrix, matrix_dropout, study.privacy,
                            seconds, scores)
