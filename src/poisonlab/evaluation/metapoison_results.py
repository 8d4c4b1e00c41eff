"""Typed results of the poisoning study and their metrics.json layout.

An `Outcomes` holds what the victims of one (poisoned or clean) training recipe did: for every
target and trial, whether the unmodified target was classified as the adversarial class, and the
victim's clean test accuracy. Success rates and their 95% intervals are over the (target, trial)
pairs (poisonlab.metrics.mean_ci95).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from poisonlab.metrics import mean_ci95


@dataclass
class Outcomes:
    """success[target][trial] (bool) and accuracy[target][trial] (clean test accuracy)."""

    success: list[list[bool]]
    accuracy: list[list[float]]

    def rate(self) -> tuple[float, float]:
        return mean_ci95([float(s) for row in self.success for s in row])

    def mean_accuracy(self) -> float:
        return float(torch.tensor(self.accuracy, dtype=torch.float64).mean())

    def as_dict(self) -> dict:
        return {"success": self.success, "accuracy": self.accuracy}


@dataclass
class AttackResult:
    """One attack's victims: cells[surrogate][victim] for every surrogate and victim
    architecture, beside the unperturbed baseline's victims (baseline[victim]: the same poison
    images without perturbation, the same trials)."""

    name: str
    target_ids: list[int]
    cells: dict[str, dict[str, Outcomes]]
    baseline: dict[str, Outcomes]

    @property
    def surrogates(self) -> list[str]:
        return list(self.cells)

    @property
    def victims(self) -> list[str]:
        return list(self.baseline)

    def headline(self) -> Outcomes:
        return self.cells[self.surrogates[0]][self.victims[0]]

    def metrics(self) -> dict[str, Any]:
        main, base = self.headline(), self.baseline[self.victims[0]]
        rate, ci = main.rate()
        base_rate, base_ci = base.rate()
        per_target = {}
        for i, tid in enumerate(self.target_ids):
            per_target[str(tid)] = {
                "success_rate": sum(main.success[i]) / len(main.success[i]),
                "baseline_success_rate": sum(base.success[i]) / len(base.success[i])}
        transfer = {"surrogates": self.surrogates, "victims": self.victims,
                    "success_rate": [], "ci95": [], "victim_clean_accuracy": [],
                    "baseline_success_rate": [self.baseline[v].rate()[0] for v in self.victims]}
        for s in self.surrogates:
            rates = [self.cells[s][v].rate() for v in self.victims]
            transfer["success_rate"].append([r for r, _ in rates])
            transfer["ci95"].append([c for _, c in rates])
            transfer["victim_clean_accuracy"].append(
                [self.cells[s][v].mean_accuracy() for v in self.victims])
        return {"success_rate": rate, "ci95": ci, "baseline_success_rate": base_rate,
                "baseline_ci95": base_ci, "victim_clean_accuracy": main.mean_accuracy(),
                "clean_victim_accuracy": base.mean_accuracy(), "per_target": per_target,
                "transfer": transfer,
                "outcomes": {s: {v: o.as_dict() for v, o in row.items()}
                             for s, row in self.cells.items()}}

    @classmethod
    def from_metrics(cls, name: str, block: dict, baseline: dict[str, Outcomes]) -> AttackResult:
        cells = {s: {v: Outcomes(**o) for v, o in row.items()}
                 for s, row in block["outcomes"].items()}
        return cls(name, [int(t) for t in block["per_target"]], cells, baseline)


@dataclass
class CraftRecord:
    """What the figures need from crafting on the headline surrogate: the adversarial loss
    curves (MetaPoison: [steps, M] per target; gradient matching: [iterations] per target) and,
    for the first target, the clean originals and the poisoned images of a few poisons."""

    losses: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    originals: torch.Tensor | None = None
    poisoned: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StudyResult:
    """Everything the study measured; `metrics()` is the metrics.json layout: the MetaPoison
    numbers at the top level and each other attack under its name; `from_metrics` reads it
    back (without the craft record)."""

    dataset: str
    classes: list[str]
    train_images: int
    budget: int
    poison_class: int
    target_class: int
    adv_class: int
    attacks: dict[str, AttackResult]
    baseline: dict[str, Outcomes]
    seconds: dict[str, float] = field(default_factory=dict)
    craft: CraftRecord = field(default_factory=CraftRecord)

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset, "classes": self.classes, "train_images": self.train_images,
            "budget": self.budget, "poison_class": self.poison_class,
            "target_class": self.target_class, "adv_class": self.adv_class,
            "victims": list(self.baseline),
            "baseline_outcomes": {v: o.as_dict() for v, o in self.baseline.items()}}
        for name, result in self.attacks.items():
            block = result.metrics()
            if name == "metapoison":
                out.update(block)
            else:
                out[name] = block
        out["seconds"] = self.seconds
        return out

    @classmethod
    def from_metrics(cls, m: dict[str, Any]) -> StudyResult:
        baseline = {v: Outcomes(**o) for v, o in m["baseline_outcomes"].items()}
        attacks = {}
        if "outcomes" in m:
            attacks["metapoison"] = AttackResult.from_metrics("metapoison", m, baseline)
        if "gradient_matching" in m:
            attacks["gradient_matching"] = AttackResult.from_metrics(
                "gradient_matching", m["gradient_matching"], baseline)
        return cls(m["dataset"], m["classes"], m["train_images"], m["budget"], m["poison_class"],
                   m["target_class"], m["adv_class"], attacks, baseline, m.get("seconds") or {})
