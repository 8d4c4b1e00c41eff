"""Figures and report sections of `scan` and `purify` (poisonlab.audit).

The backdoor check renders Neural Cleanse's reverse-engineered triggers (mask and stamped
pattern per label) and a table of mask sizes and anomaly indices, and MM-BD's maximum-margin
input per class and a table of the margins; the membership check renders
its attacks' ROC curves on log-log axes and a table of AUC, TPR at low FPR and p-values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import torch

from poisonlab.defenses.mm_bd import MMBDResult
from poisonlab.defenses.neural_cleanse import DetectionResult
from poisonlab.metrics import roc_auc, roc_points, tpr_measurable
from poisonlab.report.html import Section, Table
from poisonlab.report.style import new_figure, save_figure

MEMBERSHIP_COLUMNS = {"auc": "AUC", "tpr_at_fpr_0.001": "TPR at 0.1% FPR",
                      "tpr_at_fpr_0.01": "TPR at 1% FPR", "attack_accuracy": "attack accuracy"}


class ScoredAttack(Protocol):
    """What the membership table shows of one attack."""

    attack: str
    reason: str
    metrics: Mapping[str, float]  # poisonlab.metrics.membership_metrics' keys
    p_value: float


def model_section(about: str) -> Section:
    """The report's first section: which model was scanned, with what."""
    return Section("Model", paragraphs=[about])


def trigger_grid(path: Path, detection: DetectionResult) -> Path:
    """Mask (top row) and masked pattern (bottom row) of every label's reversed trigger; flagged
    labels carry a '*'."""
    k = len(detection.results)
    fig, axes = new_figure(1.3 * k, 2.8, nrows=2, ncols=k, squeeze=False)
    for i, r in enumerate(detection.results):
        trig = r.trigger
        for row, (img, name) in enumerate(((trig.mask.expand_as(trig.pattern), "mask"),
                                           (trig.pattern * trig.mask, "pattern"))):
            ax = axes[row, i]
            img = img.clamp(0, 1)
            ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
                      cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{i}{'*' if i in detection.flagged else ''} {name}" if row == 0 else name,
                         fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    return save_figure(fig, path)


def margin_grid(path: Path, result: MMBDResult) -> Path:
    """MM-BD's input of largest margin for every class, in one row; the flagged class carries a
    '*' and every title its margin."""
    inputs = result.inputs
    k = result.num_classes
    fig, axes = new_figure(1.3 * k, 1.6, nrows=1, ncols=k, squeeze=False)
    for label in range(k):
        ax = axes[0, label]
        img = inputs[label].clamp(0, 1)
        ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
                  cmap="gray", vmin=0, vmax=1)
        star = "*" if label == result.target else ""
        ax.set_title(f"{label}{star} {float(result.margins[label]):.3g}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    return save_figure(fig, path)


def backdoor_section(verdict: str, detection: DetectionResult | None, classes: Sequence[str],
                     figure: Path | None, *, mm_bd: MMBDResult | None = None,
                     mm_bd_figure: Path | None = None, notes: Sequence[str] = ()) -> Section:
    """The verdict (and `notes`), Neural Cleanse's per-label table and trigger grid, MM-BD's
    per-class table and inputs (each when it ran)."""
    tables, figures, names = [], [], []
    if detection is not None:
        rows = [[r.label, classes[r.label], float(detection.norms[r.label]),
                 float(detection.anomaly_index[r.label]),
                 "FLAGGED" if r.label in detection.flagged else ""] for r in detection.results]
        caption = "Neural Cleanse" if mm_bd is not None else None
        tables.append(Table(["label", "class", "mask L1", "anomaly index", ""], rows, caption))
        figures += [figure] if figure is not None else []
        names.append("Neural Cleanse")
    if mm_bd is not None:
        rows = []
        for label in range(mm_bd.num_classes):
            low, high = mm_bd.spread(label)
            rows.append([label, classes[label], float(mm_bd.margins[label]), low, high,
                         "FLAGGED" if label == mm_bd.target else ""])
        tables.append(Table(["label", "class", "max margin", "lowest start", "highest start",
                             ""], rows, "MM-BD"))
        figures += [mm_bd_figure] if mm_bd_figure is not None else []
        names.append("MM-BD")
    return Section(f"Backdoor ({', '.join(names)})", paragraphs=[verdict, *notes],
                   tables=tables, figures=figures)


def membership_section(verdict: str, attacks: Sequence[ScoredAttack], members: int,
                       members_source: str, non_members: int, non_members_source: str,
                       figure: Path | None) -> Section:
    """The membership verdict, where the records came from, why each attack ran, the table of
    its metrics, the caveats and the ROC figure."""
    table = Table(["attack", *MEMBERSHIP_COLUMNS.values(), "p-value"],
                  [[a.attack, *(_membership_cell(a, k, non_members) for k in MEMBERSHIP_COLUMNS),
                    a.p_value] for a in attacks])
    paragraphs = [verdict, f"{members} members from {members_source}, {non_members} "
                  f"non-members from {non_members_source}.",
                  *(f"{a.attack} attack: {a.reason}." for a in attacks),
                  membership_caveats(non_members)]
    return Section("Membership leakage", paragraphs, [table],
                   [figure] if figure is not None else [])


def _membership_cell(attack: ScoredAttack, key: str, non_members: int) -> float | None:
    """The metric, or None (shown as "–") for a TPR at an FPR too small for the non-members
    to measure, as the verdict says."""
    if key.startswith("tpr_at_fpr_") and not tpr_measurable(float(key[11:]), non_members):
        return None
    return attack.metrics[key]


def membership_caveats(non_members: int) -> str:
    """What the attack accuracy and the low-FPR TPR do and do not say."""
    text = ("The attack accuracy uses the best threshold on these records (an upper bound for an "
            "attacker who fixes it in advance). Non-members must come from the same distribution "
            "as the members, otherwise the AUC measures the shift between them.")
    if non_members < 1000:
        text += (f" With {non_members} non-members the smallest non-zero FPR is "
                 f"{1 / non_members:.2%}, so a TPR at a smaller FPR cannot be measured (shown "
                 "as –).")
    return text


def roc_figure(path: Path, scored: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """ROC curves of attack name -> (scores, membership labels) on log-log axes (the low-FPR
    regime that matters, Carlini et al. 2022); FPR or TPR of 0 is drawn at the axis' lower edge."""
    truth = next(iter(scored.values()))[1]
    low_x = 0.5 / int((truth == 0).sum())
    low_y = 0.5 / int((truth == 1).sum())
    fig, ax = new_figure(5.0, 4.2)
    ax.plot([min(low_x, low_y), 1], [min(low_x, low_y), 1], "--", color="0.6", lw=1,
            label="chance")
    for name, (scores, labels) in scored.items():
        fpr, tpr, _ = roc_points(scores, labels)
        ax.step(fpr.clamp_min(low_x).numpy(), tpr.clamp_min(low_y).numpy(), where="post",
                label=f"{name} (AUC {roc_auc(scores, labels):.3f})")
    for fpr_mark in (1e-3, 1e-2):
        if fpr_mark > low_x:
            ax.axvline(fpr_mark, color="0.8", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlim=(low_x, 1), ylim=(low_y, 1.05),
           xlabel="false-positive rate", ylabel="true-positive rate",
           title="membership inference ROC (log-log)")
    ax.legend(loc="lower right")
    return save_figure(fig, path)
