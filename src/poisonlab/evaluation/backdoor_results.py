"""What the backdoor-defence protocol measures, as typed results: per attack the backdoored
model's BA/ASR and each defence's, the Neural Cleanse scan, and the clean control;
`BackdoorResults.to_metrics()` is the run's metrics.json and `from_metrics` reads it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger, Trigger

DEFENSES = ("mcl", "fine_tuning", "nc_unlearning")


@dataclass(frozen=True)
class BaAsr:
    """Benign accuracy and attack success rate of one model, as fractions."""

    benign_accuracy: float
    attack_success_rate: float

    def to_dict(self) -> dict[str, float]:
        return {"benign_accuracy": self.benign_accuracy,
                "attack_success_rate": self.attack_success_rate}


@dataclass
class AttackModels:
    """What the figures show of one attack: the models and the real and inverted triggers."""

    model: nn.Module
    trigger: Trigger
    purified_model: nn.Module
    mcl_trigger: AdditiveTrigger
    nc_trigger: MaskTrigger


@dataclass
class AttackResult:
    """One attack: BA/ASR of the backdoored model and after each defence (`defences`, in DEFENSES
    order), the Neural Cleanse scan (`nc`, DetectionResult.to_dict()) with the anomaly index of
    the true target, MCL's inverted trigger size and success, and wall times."""

    backdoored: BaAsr
    nc_anomaly_index: float
    nc: dict[str, Any]
    defences: dict[str, BaAsr]
    mcl_inversion: dict[str, float]
    seconds: dict[str, float]
    models: AttackModels | None = field(default=None, repr=False, compare=False)

    @property
    def nc_flagged(self) -> list[int]:
        return self.nc["flagged"]

    def stage(self, name: str) -> BaAsr:
        """"backdoored" or a defence name."""
        return self.backdoored if name == "backdoored" else self.defences[name]

    def to_dict(self) -> dict[str, Any]:
        return {"backdoored": self.backdoored.to_dict(), "nc_anomaly_index": self.nc_anomaly_index,
                "nc_flagged": self.nc_flagged, "nc": self.nc,
                **{name: m.to_dict() for name, m in self.defences.items()},
                "mcl_inversion": self.mcl_inversion, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> AttackResult:
        return cls(BaAsr(**entry["backdoored"]), entry["nc_anomaly_index"], entry["nc"],
                   {name: BaAsr(**entry[name]) for name in DEFENSES}, entry["mcl_inversion"],
                   entry["seconds"])


@dataclass
class CleanControl:
    """The model trained on unpoisoned data: its BA and its Neural Cleanse scan."""

    benign_accuracy: float
    nc: dict[str, Any]

    @property
    def nc_flagged(self) -> list[int]:
        return self.nc["flagged"]

    def to_dict(self) -> dict[str, Any]:
        return {"benign_accuracy": self.benign_accuracy, "nc_flagged": self.nc_flagged,
                "nc": self.nc}


@dataclass
class BackdoorResults:
    """Everything one protocol run measured; `to_metrics()` is metrics.json."""

    dataset: str
    arch: str
    target: int
    clean_samples: int
    attacks: dict[str, AttackResult]
    models_from: list[str] | None = None
    clean_model: CleanControl | None = None

    def to_metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset, "arch": self.arch, "target": self.target,
                               "clean_samples": self.clean_samples,
                               "attacks": {n: a.to_dict() for n, a in self.attacks.items()}}
        if self.models_from is not None:
            out["models_from"] = self.models_from
        if self.clean_model is not None:
            out["clean_model"] = self.clean_model.to_dict()
        return out

    @classmethod
    def from_metrics(cls, m: dict[str, Any]) -> BackdoorResults:
        clean = m.get("clean_model")
        return cls(m["dataset"], m["arch"], m["target"], m["clean_samples"],
                   {n: AttackResult.from_dict(e) for n, e in m["attacks"].items()},
                   m.get("models_from"),
                   CleanControl(clean["benign_accuracy"], clean["nc"]) if clean else None)


