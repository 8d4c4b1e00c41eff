"""The few-shot evaluation's typed results (poisonlab.evaluation.fewshot) and their metrics.json
layout: one row per ε, the headline row, and traces for figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class EpsilonRow:
    """The measured numbers at one ε (fractions in [0, 1], each with its 95% CI half-width);
    the ASP fields are None where ASP did not run."""

    epsilon: float
    backdoor_accuracy: float
    backdoor_accuracy_ci95: float
    backdoor_accuracy_all_queries: float
    backdoor_accuracy_all_queries_ci95: float
    attack_success_rate: float
    attack_success_rate_ci95: float
    asp_accuracy: float | None
    asp_accuracy_ci95: float | None
    final_pgd_loss: float

    def metrics(self) -> dict[str, Any]:
        """The row as in metrics.json (no ASP keys where ASP did not run)."""
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in ("asp_accuracy", "asp_accuracy_ci95")}


@dataclass(frozen=True)
class EpsilonTrace:
    """For figures, at one ε: the backdoor's PGD loss per iteration and task [L, T] and the
    poisoned support sets of the first tasks [E, n, C, H, W]."""

    losses: Tensor
    examples: Tensor


@dataclass(frozen=True)
class FewShotResult:
    """What the evaluation measured: CA, how the clean model classifies the trigger, the rows per
    ε and the headline row (the ε closest to the configured headline budget). `traces` and
    `clean_examples` (the clean support sets of the first tasks) are for figures; a result read
    back from metrics.json has none."""

    tasks: int
    protocol: str
    attacker_trigger_batch: str
    attacker_keep_support: float
    clean_accuracy: float
    clean_accuracy_ci95: float
    clean_trigger_to_target_rate: float
    clean_trigger_to_target_rate_ci95: float
    clean_trigger_accuracy: float
    clean_trigger_accuracy_ci95: float
    per_epsilon: list[EpsilonRow]
    headline: EpsilonRow
    traces: dict[float, EpsilonTrace] | None = field(default=None, compare=False)
    clean_examples: Tensor | None = field(default=None, compare=False)

    def metrics(self) -> dict[str, Any]:
        """The run's metrics.json entries (the experiment adds data set and timing)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("per_epsilon", "headline", "traces",
                                                 "clean_examples")}
        h = self.headline
        out["per_epsilon"] = [r.metrics() for r in self.per_epsilon]
        out["headline"] = {"epsilon": h.epsilon, "clean_accuracy": self.clean_accuracy,
                           "backdoor_accuracy": h.backdoor_accuracy,
                           "attack_success_rate": h.attack_success_rate}
        if h.asp_accuracy is not None:
            out["asp_accuracy"] = h.asp_accuracy
            out["asp_accuracy_ci95"] = h.asp_accuracy_ci95
            out["headline"]["asp_accuracy"] = h.asp_accuracy
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any]) -> FewShotResult:
        """The result back from `metrics()` output (a run's metrics.json), without traces."""
        names = [f.name for f in fields(EpsilonRow)]
        rows = [EpsilonRow(**{k: r.get(k) for k in names}) for r in metrics["per_epsilon"]]
        headline = next(r for r in rows if r.epsilon == metrics["headline"]["epsilon"])
        scalars = {f.name: metrics[f.name] for f in fields(cls)
                   if f.name not in ("per_epsilon", "headline", "traces", "clean_examples")}
        return cls(**scalars, per_epsilon=rows, headline=headline)
