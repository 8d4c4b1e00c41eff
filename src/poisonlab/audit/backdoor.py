"""The backdoor check of `scan`: Neural Cleanse (Wang et al., IEEE S&P 2019) reverse-engineers
the smallest trigger sending the clean images to each label; a label whose trigger is
anomalously small (anomaly index above the threshold, below the median) is a suspected target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poisonlab.audit.checks import CheckResult, ScanContext
from poisonlab.defenses.neural_cleanse import DetectionResult, NeuralCleanse
from poisonlab.progress import progress_bar
from poisonlab.report.audit import backdoor_section, trigger_grid
from poisonlab.report.html import Section

TRIGGER_FIGURE = "neural_cleanse_triggers.png"


@dataclass
class BackdoorResult(CheckResult):
    """Neural Cleanse's detection on the model, with the class names of its labels and the
    trigger figure (None when no report folder was given)."""

    detection: DetectionResult
    classes: list[str]
    figure: Path | None = None
    name = "backdoor"

    @property
    def detected(self) -> bool:
        return self.detection.backdoored

    @property
    def target(self) -> int | None:
        """The flagged label with the largest anomaly index (None when nothing is flagged)."""
        return self.detection.target

    @property
    def verdict(self) -> str:
        d = self.detection
        band = (f"threshold {d.threshold:g} ± {d.band:g}" if d.band else
                f"threshold {d.threshold:g}")
        if d.status == "detected":
            parts = [f"{label} ({self.classes[label]}, {self._index(label)})"
                     for label in sorted(d.flagged)]
            return "backdoor: SUSPECTED, target label " + ", ".join(parts) + f" ({band})"
        cand = d.candidate
        if d.status == "inconclusive":
            return (f"backdoor: INCONCLUSIVE, label {cand} ({self.classes[cand]}, "
                    f"{self._index(cand)}) is within {band}")
        if cand is None:
            return f"backdoor: none detected (all labels' triggers are the same size, {band})"
        return (f"backdoor: none detected (largest index {self._index(cand)} for label {cand}, "
                f"{band})")

    @property
    def notes(self) -> list[str]:
        if self.detection.status != "inconclusive":
            return []
        return ["more --restarts, --steps or --samples narrow the index; a known trigger "
                "(--trigger) measures label " f"{self.detection.candidate} directly"]

    def _index(self, label: int) -> str:
        d = self.detection
        text = f"index {float(d.anomaly_index[label]):.2f}"
        if d.restart_norms.shape[0] > 1:
            low, high = d.spread(label)
            text += f", {low:.2f}–{high:.2f} over {d.restart_norms.shape[0]} restarts"
        return text

    def section(self) -> Section:
        return backdoor_section(self.verdict, self.detection, self.classes, self.figure)

    def to_dict(self) -> dict[str, Any]:
        summary = self.detection.to_dict()
        for row in summary["labels"]:
            row["class"] = self.classes[row["label"]]
        return summary


def backdoor_check(ctx: ScanContext) -> BackdoorResult:
    """Neural Cleanse over every label of the model on the clean sample."""
    k = len(ctx.classes)
    detector = NeuralCleanse(config=ctx.config.detection(), seed=ctx.seed)
    steps = detector.config.inversion.steps
    with progress_bar(steps, "neural cleanse", enabled=ctx.progress) as bar:
        detection = detector.detect(ctx.model, ctx.clean.x, k,
                                    progress=lambda status: bar.advance(status=status))
    figure = (trigger_grid(ctx.report_dir / TRIGGER_FIGURE, detection)
              if ctx.report_dir is not None else None)
    return BackdoorResult(detection, ctx.classes, figure)
