"""Tables and figures of the BadEncoder experiment (poisonlab.evaluation.badencoder_protocol).

- Our CA / BA / ASR / ASR-B per downstream task, beside the published table of Jia, Liu, Gong
  (IEEE S&P 2022, Table 2: a CIFAR-10 SimCLR encoder with GTSRB, SVHN and STL10 downstream; our
  tasks differ, so the published rows are shown as published, not matched by task).
- The injection's loss terms L, L0, L1, L2 per epoch, one panel per task.
- A 2-D PCA view of clean test features, the same images triggered, and the reference inputs,
  under the clean and the backdoored encoder (PCA fitted per panel on the points shown).
- Neural Cleanse on every downstream classifier and the encoder scan of every encoder, with the
  inverted triggers (poisonlab.report.encoder_scan).
"""

from __future__ import annotations

from pathlib import Path

import torch

from poisonlab.evaluation.badencoder_protocol import BadEncoderResult, FeatureView
from poisonlab.report.encoder_scan import encoder_scan_section, encoder_trigger_figure
from poisonlab.report.html import Section, Table, rich_table, write_html_report
from poisonlab.report.style import new_figure, save_figure

# (encoder → downstream task, CA %, BA %, ASR %) as published (Table 2 / techniques.md §4).
PUBLISHED = [
    ("CIFAR-10 → GTSRB", 81.84, 82.27, 98.64),
    ("CIFAR-10 → SVHN", 58.50, 69.32, 99.14),
    ("CIFAR-10 → STL10", 76.14, 76.18, 99.73),
    ("ImageNet SimCLR → STL10", 95.66, 95.68, 99.99),
    ("CLIP → STL10", 97.09, 96.69, 99.81),
]


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def results_table(result: BadEncoderResult) -> Table:
    """Ours: CA, BA, ASR (non-target inputs), ASR-B, the reference's all-inputs ASR, in %."""
    rows = []
    for t in result.tasks:
        d = t.downstream
        rows.append([d.task, d.target, _pct(d.clean_accuracy), _pct(d.backdoor_accuracy),
                     _pct(d.attack_success_rate), _pct(d.clean_encoder_attack_success_rate),
                     _pct(d.attack_success_rate_all_inputs)])
    return Table(["task", "target", "CA %", "BA %", "ASR %", "ASR-B %", "ASR all inputs %"], rows,
                 "this run (ASR over triggered non-target test images; ASR-B: clean encoder)")


def published_table() -> Table:
    return Table(["encoder → task", "CA %", "BA %", "ASR %"], [list(r) for r in PUBLISHED],
                 "published (Jia et al. 2022; ASR over all triggered inputs)")


def detection_table(result: BadEncoderResult) -> Table:
    """Neural Cleanse per downstream classifier and the encoder scan per encoder."""
    rows = [["clean encoder", "—", "—", "—", result.clean_scan.normalised_l1,
             result.clean_scan.backdoored]]
    for t in result.tasks:
        target = t.downstream.target
        for name in ("clean", "backdoored"):
            nc = t.neural_cleanse[name]
            scan = t.scan if name == "backdoored" else None
            rows.append([f"{t.downstream.task}: {name}", nc.flagged,
                         float(nc.anomaly_index[target]), target in nc.flagged,
                         scan.normalised_l1 if scan else None, scan.backdoored if scan else None])
    return Table(["encoder / classifier", "NC flagged", "NC index of target", "NC finds target",
                  "scan PL1", "scan flags"], rows,
                 "Neural Cleanse on the downstream classifiers; encoder scan (no labels)")


def loss_figure(path: Path, result: BadEncoderResult) -> Path:
    """L, L0, L1, L2 of the injection per epoch, one panel per task."""
    k = max(1, len(result.tasks))
    fig, axes = new_figure(4.0 * k, 3.0, ncols=k, squeeze=False)
    for ax, t in zip(axes[0], result.tasks, strict=False):
        for key, label in (("loss", "L"), ("loss0", "L0"), ("loss1", "L1"), ("loss2", "L2")):
            values = t.injection.get(key, [])
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set_title(f"injection, {t.downstream.task}")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _pca(view: FeatureView) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.cat([view.clean, view.triggered, view.reference]).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    z = (x @ v[:2].T).float()
    n = len(view.clean)
    return z[:n], z[n:2 * n], z[2 * n:]


def pca_figure(path: Path, result: BadEncoderResult) -> Path:
    """Clean, triggered and reference features under both encoders (rows: tasks)."""
    k = max(1, len(result.tasks))
    fig, axes = new_figure(7.0, 3.2 * k, nrows=k, ncols=2, squeeze=False)
    for row, t in zip(axes, result.tasks, strict=False):
        for ax, name in zip(row, ("clean", "backdoored"), strict=True):
            clean, trig, ref = _pca(t.views[name])
            ax.scatter(clean[:, 0], clean[:, 1], s=4, alpha=0.5, label="clean")
            ax.scatter(trig[:, 0], trig[:, 1], s=4, alpha=0.5, label="triggered")
            ax.scatter(ref[:, 0], ref[:, 1], s=60, marker="*", color="black", label="reference")
            ax.set_title(f"{t.downstream.task}: {name} encoder (PCA)")
            ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_report(path: Path, figures_dir: Path, result: BadEncoderResult,
                 about: str) -> Path:
    """report.html with the tables, the loss curves, the PCA view and the inverted triggers."""
    loss = loss_figure(figures_dir / "injection_loss.png", result)
    view = pca_figure(figures_dir / "features_pca.png", result)
    sections = [
        Section("BadEncoder: downstream classifiers on a backdoored encoder",
                [about, f"Clean encoder kNN accuracy: {_pct(result.knn_accuracy)}%."],
                [results_table(result), published_table()]),
        Section("Injection", ["Loss terms per epoch (L = L0 + λ1·L1 + λ2·L2)."], [], [loss]),
        Section("Features", ["Clean test images, the same images triggered, and the reference "
                             "inputs, under the clean and the backdoored encoder."], [], [view]),
        Section("Detection", [], [detection_table(result)]),
    ]
    scans = [("clean", result.clean_scan)] + [(t.downstream.task, t.scan) for t in result.tasks]
    for name, scan in scans:
        fig = encoder_trigger_figure(figures_dir / f"scan_{name}.png", scan)
        verdict = f"{'SUSPECTED' if scan.backdoored else 'not flagged'} (PL1 {scan.normalised_l1:.3f})"
        label = "clean encoder" if name == "clean" else f"backdoored encoder ({name})"
        section = encoder_scan_section(f"{label}: {verdict}", scan, fig)
        section.heading = f"Encoder scan: {label}"
        sections.append(section)
    return write_html_report(path, "BadEncoder", sections)


def render(metrics: dict):
    """The headline table for the terminal, from metrics.json."""
    rows = []
    scans = metrics.get("encoder_scan", {})
    for name, m in metrics.get("tasks", {}).items():
        scan = scans.get("backdoored", {}).get(name, {})
        rows.append([name, _pct(m["clean_accuracy"]), _pct(m["backdoor_accuracy"]),
                     _pct(m["attack_success_rate"]),
                     _pct(m["clean_encoder_attack_success_rate"]),
                     m["neural_cleanse"]["backdoored"]["target_flagged"],
                     scan.get("backdoored")])
    knn = _pct(metrics.get("encoder_knn_accuracy"))
    clean_flag = scans.get("clean", {}).get("backdoored")
    table = Table(["task", "CA %", "BA %", "ASR %", "ASR-B %", "NC finds target", "scan flags"],
                  rows)
    return rich_table(table, f"badencoder (clean encoder kNN {knn}%, scan flags it: {clean_flag})")
