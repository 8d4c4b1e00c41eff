"""The backdoor check of `scan`: up to two detectors, each with its own verdict, and one line
saying which fired.

- Neural Cleanse (Wang et al., IEEE S&P 2019) reverse-engineers the smallest trigger sending the
  clean images to each label; a label whose trigger is anomalously small (anomaly index above
  the threshold, below the median) is a suspected target.
- MM-BD (Wang, Xiang, Miller, Kesidis, IEEE S&P 2024) finds each class's maximum achievable
  logit margin over all inputs; an outlying largest margin (order-statistic p-value under a
  Gamma null fitted to the other classes, p < 0.05) flags its class. It uses no clean data.

The two look for different things (a small mask; an unusually reachable class), so a backdoor one
misses the other may catch: the check is SUSPECTED when either fires and says which did. With
Neural Cleanse alone the verdict line is Neural Cleanse's, as before MM-BD was added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poisonlab.audit.checks import DETECTORS, CheckResult, ScanContext
from poisonlab.defenses.mm_bd import MMBD, MMBDResult
from poisonlab.defenses.neural_cleanse import MIN_LABELS, DetectionResult, NeuralCleanse
from poisonlab.errors import PoisonlabError
from poisonlab.progress import progress_bar
from poisonlab.report.audit import backdoor_section, margin_grid, trigger_grid
from poisonlab.report.html import Section

TRIGGER_FIGURE = "neural_cleanse_triggers.png"
MARGIN_FIGURE = "mm_bd_inputs.png"


def format_p(log_p: float) -> str:
    """A p-value from its natural log, readable also where the float itself underflows."""
    if log_p > -700:
        p = math.exp(log_p)
        return f"{p:.2g}" if p >= 1e-4 or p == 0 else f"{p:.1e}"
    if log_p == -math.inf:
        return "0"
    exponent = log_p / math.log(10)
    whole = math.floor(exponent)
    return f"{10 ** (exponent - whole):.1f}e{whole}"


@dataclass
class BackdoorResult(CheckResult):
    """The detectors' results on the model (None: that detector did not run), with the class
    names of its labels and the figures (None when no report folder was given).

    detection: Neural Cleanse's; mm_bd: MM-BD's; figure: Neural Cleanse's trigger grid;
    mm_bd_figure: each class's maximum-margin input; mm_bd_error: why MM-BD could not finish
    after Neural Cleanse had (its result is kept, the verdict says MM-BD is missing)."""

    detection: DetectionResult | None
    classes: list[str]
    figure: Path | None = None
    mm_bd: MMBDResult | None = None
    mm_bd_figure: Path | None = None
    mm_bd_error: str | None = None
    name = "backdoor"

    @property
    def detectors(self) -> list[str]:
        """The detectors that ran (keys of DETECTORS: "nc", "mmbd")."""
        ran = {"nc": self.detection, "mmbd": self.mm_bd}
        return [name for name in DETECTORS if ran[name] is not None]

    @property
    def detected_by(self) -> list[str]:
        """The detectors that flagged the model."""
        fired = {"nc": self.detection is not None and self.detection.backdoored,
                 "mmbd": self.mm_bd is not None and self.mm_bd.backdoored}
        return [name for name in DETECTORS if fired[name]]

    @property
    def detected(self) -> bool:
        return bool(self.detected_by)

    @property
    def status(self) -> str:
        """detected (some detector fired), inconclusive (none fired, Neural Cleanse's candidate
        lies in its band) or none."""
        if self.detected:
            return "detected"
        if self.detection is not None and self.detection.status == "inconclusive":
            return "inconclusive"
        return "none"

    @property
    def target(self) -> int | None:
        """Neural Cleanse's flagged label with the largest anomaly index, else MM-BD's flagged
        class (None when nothing is flagged)."""
        if self.detection is not None and self.detection.target is not None:
            return self.detection.target
        return self.mm_bd.target if self.mm_bd is not None else None

    @property
    def targets(self) -> dict[str, int]:
        """Each firing detector's target label."""
        found = {"nc": self.detection.target if self.detection is not None else None,
                 "mmbd": self.mm_bd.target if self.mm_bd is not None else None}
        return {name: found[name] for name in self.detected_by}  # type: ignore[misc]

    # --- lines -------------------------------------------------------------------------------

    @property
    def verdict(self) -> str:
        if self.mm_bd is None:
            missing = f"; {DETECTORS['mmbd']} could not run" if self.mm_bd_error else ""
            return self._nc_line("backdoor") + missing
        parts = {"nc": self._nc_short, "mmbd": self._mm_short}
        fired = self.detected_by
        quiet = [name for name in self.detectors if name not in fired]

        def unfired(name: str) -> str:
            word = ("inconclusive" if name == "nc" and self.detection.status == "inconclusive"
                    else "none")
            return f"{DETECTORS[name]}: {word} ({parts[name]()})"

        if fired:
            line = "backdoor: SUSPECTED by " + " and ".join(
                f"{DETECTORS[n]} ({parts[n]()})" for n in fired)
            return line + "".join(f"; {unfired(n)}" for n in quiet)
        if self.status == "inconclusive":
            rest = "".join(f"; {unfired(n)}" for n in quiet if n != "nc")
            return f"backdoor: INCONCLUSIVE, {DETECTORS['nc']}: {self._nc_short()}{rest}"
        return "backdoor: none detected by " + " or ".join(
            f"{DETECTORS[n]} ({parts[n]()})" for n in quiet)

    @property
    def notes(self) -> list[str]:
        lines = [f"{DETECTORS['mmbd']} could not run: {self.mm_bd_error}"] if self.mm_bd_error else []
        if self.mm_bd is not None:
            if self.detection is not None:
                lines.append(self._nc_line(DETECTORS["nc"]))
            lines.append(self._mm_line())
            targets = self.targets
            if len(set(targets.values())) > 1:
                lines.append("the detectors name different labels: " + ", ".join(
                    f"{DETECTORS[n]} {t}" for n, t in targets.items()))
        if self.detection is not None and not self.detection.judgeable:
            lines.append("a known trigger (--trigger) measures its attack success directly")
        elif self.detection is not None and self.detection.status == "inconclusive":
            lines.append("more --restarts, --steps or --samples narrow the index; a known "
                         "trigger (--trigger) measures label "
                         f"{self.detection.candidate} directly")
        return lines

    def _label(self, label: int) -> str:
        name = self.classes[label]
        return f"label {label}" + (f", {name}" if name != str(label) else "")

    def _nc_short(self) -> str:
        """Neural Cleanse's finding in a few words (its target, or what came closest)."""
        d = self.detection
        assert d is not None
        if not d.judgeable:
            return _too_few_labels(d)
        if d.status == "detected":
            return f"{self._label(d.target)}, index {float(d.anomaly_index[d.target]):.2f}"
        cand = d.candidate
        if cand is None:
            return "all labels' triggers are the same size"
        index = float(d.anomaly_index[cand])
        if d.status == "inconclusive":
            return (f"{self._label(cand)}, index {index:.2f} within threshold "
                    f"{d.threshold:g} ± {d.band:g}")
        return f"largest index {index:.2f} for label {cand}"

    def _mm_short(self) -> str:
        """MM-BD's finding in a few words."""
        m = self.mm_bd
        assert m is not None
        if m.backdoored:
            return f"{self._label(m.candidate)}, p = {format_p(m.log_p)}"
        return f"largest margin for label {m.candidate}, p = {format_p(m.log_p)}"

    def _nc_line(self, who: str) -> str:
        """Neural Cleanse's own verdict, starting with `who:`."""
        d = self.detection
        assert d is not None
        band = (f"threshold {d.threshold:g} ± {d.band:g}" if d.band else
                f"threshold {d.threshold:g}")
        if not d.judgeable:
            return f"{who}: INCONCLUSIVE, {_too_few_labels(d)}"
        if d.status == "detected":
            parts = [f"{label} ({self.classes[label]}, {self._index(label)})"
                     for label in sorted(d.flagged)]
            return f"{who}: SUSPECTED, target label " + ", ".join(parts) + f" ({band})"
        cand = d.candidate
        if d.status == "inconclusive":
            return (f"{who}: INCONCLUSIVE, label {cand} ({self.classes[cand]}, "
                    f"{self._index(cand)}) is within {band}")
        if cand is None:
            return f"{who}: none detected (all labels' triggers are the same size, {band})"
        return (f"{who}: none detected (largest {self._index(cand)} for label {cand}, "
                f"{band})")

    def _mm_line(self) -> str:
        m = self.mm_bd
        assert m is not None
        k = m.num_classes
        cand = m.candidate
        low, high = m.spread(cand)
        margin = (f"max margin {m.statistic:.3g}" + (
            f", {low:.3g}–{high:.3g} over {m.start_margins.shape[0]} starts"
            if m.start_margins.shape[0] > 1 else ""))
        test = (f"p = {format_p(m.log_p)} against a Gamma fitted to the other {k - 1} classes' "
                f"maxima, alpha {m.alpha:g}")
        if m.backdoored:
            return (f"MM-BD: SUSPECTED, target label {cand} ({self.classes[cand]}, {margin}; "
                    f"{test})")
        return f"MM-BD: none detected (largest: label {cand}, {margin}; {test})"

    def _index(self, label: int) -> str:
        d = self.detection
        assert d is not None
        text = f"index {float(d.anomaly_index[label]):.2f}"
        if d.restart_norms.shape[0] > 1:
            low, high = d.spread(label)
            text += f", {low:.2f}–{high:.2f} over {d.restart_norms.shape[0]} restarts"
        return text

    def section(self) -> Section:
        return backdoor_section(self.verdict, self.detection, self.classes, self.figure,
                                mm_bd=self.mm_bd, mm_bd_figure=self.mm_bd_figure,
                                notes=self.notes if self.mm_bd is not None or self.mm_bd_error else ())

    def to_dict(self) -> dict[str, Any]:
        """Neural Cleanse's summary at the top (its keys as before MM-BD was added, when it
        ran), then "detectors", "mm_bd" (when it ran) and "combined" (status, detected_by,
        targets: which detector fired on which label)."""
        summary: dict[str, Any] = {}
        if self.detection is not None:
            summary = self.detection.to_dict()
            for row in summary["labels"]:
                row["class"] = self.classes[row["label"]]
        summary["detectors"] = self.detectors
        if self.mm_bd is not None:
            mm = self.mm_bd.to_dict()
            for row in mm["margins"]:
                row["class"] = self.classes[row["label"]]
            summary["mm_bd"] = mm
        if self.mm_bd_error is not None:
            summary["mm_bd_error"] = self.mm_bd_error
        summary["combined"] = {"status": self.status, "detected_by": self.detected_by,
                               "targets": self.targets, "verdict": self.verdict}
        return summary


def backdoor_check(ctx: ScanContext) -> BackdoorResult:
    """The configured detectors over every label of the model: Neural Cleanse on the clean
    sample, MM-BD on the model alone (the input shape is the clean images')."""
    k = len(ctx.classes)
    detectors = ctx.config.detectors
    detection = mm_bd = error = None
    figure = mm_figure = None
    if "nc" in detectors:
        detector = NeuralCleanse(config=ctx.config.detection(), seed=ctx.seed)
        steps = detector.config.inversion.steps
        with progress_bar(steps, "neural cleanse", enabled=ctx.progress) as bar:
            detection = detector.detect(ctx.model, ctx.clean.x, k,
                                        progress=lambda status: bar.advance(status=status))
        if ctx.report_dir is not None:
            figure = trigger_grid(ctx.report_dir / TRIGGER_FIGURE, detection)
    if "mmbd" in detectors:
        mm = MMBD(config=ctx.config.mm_bd, seed=ctx.seed)
        try:
            with progress_bar(mm.config.steps, "mm-bd", enabled=ctx.progress) as bar:
                mm_bd = mm.detect(ctx.model, k, tuple(ctx.clean.x.shape[1:]),
                                  progress=lambda status: bar.advance(status=status))
        except PoisonlabError as exc:  # non-finite margins, say: keep what Neural Cleanse found
            if detection is None:
                raise
            error = str(exc)
        if ctx.report_dir is not None and mm_bd is not None and mm_bd.inputs is not None:
            mm_figure = margin_grid(ctx.report_dir / MARGIN_FIGURE, mm_bd)
    return BackdoorResult(detection, ctx.classes, figure, mm_bd, mm_figure, error)


def _too_few_labels(d: DetectionResult) -> str:
    k = int(d.norms.numel())
    return (f"cannot judge a model of {k} label{'s' if k != 1 else ''}: the anomaly index "
            f"needs at least {MIN_LABELS} (with {k} it is the same whatever the triggers' sizes)")
