"""Tables, figures and the HTML report of the membership-inference experiment.

Figures: ROC curves of every attack on log-log axes (the low-FPR regime that Carlini et al. 2022
argue matters), the target × shadow architecture heatmaps of the shadow attack's accuracy (normal
and dropout-trained targets, as in the seed's table), and the defence trade-off (attack AUC and
accuracy against the target's test accuracy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Group

from poisonlab.evaluation.membership import (
    AttackScores,
    DefenseResult,
    MatrixBlock,
    MembershipResult,
)
from poisonlab.evaluation.membership_config import StudyConfig
from poisonlab.metrics import roc_points
from poisonlab.report.html import Section, Table, rich_table, write_html_report
from poisonlab.report.style import annotated_heatmap, new_figure, save_figure

METRIC_COLUMNS = ["attack acc", "AUC", "TPR@0.1%FPR", "TPR@1%FPR", "test acc"]


def _cells(entry: dict) -> list:
    return [entry["attack_accuracy"], entry["auc"], entry["tpr_at_fpr_0.001"],
            entry["tpr_at_fpr_0.01"], entry["test_accuracy"]]


def attack_table(result: MembershipResult) -> Table:
    return Table(["attack", *METRIC_COLUMNS],
                 [[name, *_cells(e)] for name, e in result.attacks.items()])


def shadow_variant_table(result: MembershipResult) -> Table | None:
    """The shadow attack's forms on the same shadows and target (None if not computed)."""
    if not result.shadow_variants:
        return None
    return Table(["shadow attack", *METRIC_COLUMNS[:4]],
                 [[name, e["attack_accuracy"], e["auc"], e["tpr_at_fpr_0.001"],
                   e["tpr_at_fpr_0.01"]] for name, e in result.shadow_variants.items()])


def defense_table(defenses: dict[str, DefenseResult]) -> Table:
    rows = [[name, e.attack, *_cells(e.metrics), (e.threshold_attack or {}).get("auc"),
             e.extra.get("epsilon")] for name, e in defenses.items()]
    return Table(["defence", "measured with", *METRIC_COLUMNS, "threshold AUC", "ε"], rows)


def matrix_table(block: MatrixBlock, label: str = "target") -> Table:
    rows = [[t, *vals, test] for t, vals, test in
            zip(block.targets, block.attack_accuracy, block.target_test_accuracy, strict=True)]
    return Table([f"{label} \\ shadow", *block.shadows, "target test acc"], rows)


def terminal(result: MembershipResult):
    """Attacks, defences and the architecture matrix (fractions) as rich tables."""
    head = (f"membership ({result.dataset}, target {result.arch}: train accuracy "
            f"{result.train_accuracy:.3f}, test {result.test_accuracy:.3f})")
    parts = [rich_table(attack_table(result), title=head),
             rich_table(defense_table(result.defenses), title="defences")]
    if result.matrix is not None:
        parts.append(rich_table(matrix_table(result.matrix),
                                title="shadow-attack accuracy, target × shadow architecture"))
    if result.matrix_dropout is not None:
        parts.append(rich_table(matrix_table(result.matrix_dropout, "dropout target"),
                                title="… with dropout-trained targets"))
    return Group(*parts)


def roc_figure(path: Path, scores: dict[str, AttackScores]) -> Path:
    """ROC curve of every attack on log-log axes, with the chance diagonal."""
    fig, ax = new_figure(5.5, 5.0)
    floor = 1.0
    for name, entry in scores.items():
        s, y = entry.scores, entry.member
        fpr, tpr, _ = roc_points(s, y)
        n_out = int((y == 0).sum())
        floor = min(floor, 1.0 / max(n_out, 1))
        ax.plot(fpr.clamp_min(0.5 / max(n_out, 1)).numpy(), tpr.clamp_min(1e-5).numpy(),
                label=name, lw=1.4)
    grid = np.logspace(np.log10(floor), 0, 50)
    ax.plot(grid, grid, ls="--", color="gray", lw=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor / 2, 1), ylim=(floor / 2, 1.02),
           xlabel="false-positive rate", ylabel="true-positive rate",
           title="Membership inference ROC (log-log)")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def matrix_figure(path: Path, block: MatrixBlock, title: str) -> Path:
    """Heatmap of attack accuracy, rows = target architectures, columns = shadow architectures."""
    values = np.asarray(block.attack_accuracy, dtype=float)
    fig, ax = new_figure(1.2 + 1.0 * values.shape[1], 1.0 + 0.6 * values.shape[0])
    annotated_heatmap(ax, values, block.shadows, block.targets, decimals=3, dark_below=0.65,
                      label="attack accuracy", cmap="viridis", vmin=0.5,
                      vmax=max(0.8, float(values.max())))
    ax.set(xlabel="shadow model", ylabel="target model", title=title)
    return save_figure(fig, path)


def tradeoff_figure(path: Path, defenses: dict[str, DefenseResult]) -> Path:
    """Attack AUC and accuracy against the target's test accuracy, one point per defence."""
    fig, ax = new_figure(6.0, 4.5)
    for key, marker in (("auc", "o"), ("attack_accuracy", "s")):
        xs = [e.metrics["test_accuracy"] for e in defenses.values()]
        ys = [e.metrics[key] for e in defenses.values()]
        ax.scatter(xs, ys, marker=marker, label=key.replace("_", " "))
        if key == "auc":
            for name, x, y in zip(defenses, xs, ys, strict=True):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0.5, ls="--", color="gray", lw=1)
    attack = next(iter(defenses.values())).attack
    ax.set(xlabel="target test accuracy", ylabel=f"{attack} attack",
           title="Defences: privacy against utility")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(run, cfg: StudyConfig, result: MembershipResult) -> Path:
    """Figures into the run's figures/ folder and report.html beside metrics.json."""
    figures = [roc_figure(run.figure_path("roc.png"), result.scores)] if result.scores else []
    tables = []
    if result.matrix is not None:
        figures.append(matrix_figure(run.figure_path("matrix.png"), result.matrix,
                                     "Shadow-attack accuracy"))
        tables.append(matrix_table(result.matrix))
    if result.matrix_dropout is not None:
        block = result.matrix_dropout
        figures.append(matrix_figure(run.figure_path("matrix_dropout.png"), block,
                                     f"… dropout-trained targets (p = {block.rate})"))
        tables.append(matrix_table(block, "dropout target"))
    if result.defenses:
        figures.append(tradeoff_figure(run.figure_path("defense_tradeoff.png"), result.defenses))
    sections = [
        Section("Settings", paragraphs=[_settings(cfg, result)]),
        Section("Attacks on the target",
                tables=[t for t in (attack_table(result), shadow_variant_table(result)) if t]),
        Section("Defences", paragraphs=[_defense_note(cfg, result)],
                tables=[defense_table(result.defenses)]),
        Section("Architecture matrix", tables=tables),
        Section("Figures", figures=figures),
    ]
    return write_html_report(run.path / "report.html", "membership inference", sections)


def _settings(cfg: StudyConfig, result: MembershipResult) -> str:
    t = cfg.train
    return (f"{result.dataset}: four disjoint parts of {cfg.data.part_size} records (target-in, "
            f"target-out, shadow-in, shadow-out). Target {cfg.arch} trained {t.epochs} epochs "
            f"({t.optimizer}, lr {t.lr}, schedule {t.schedule}, weight decay {t.weight_decay}, "
            f"augmentation {'on' if t.augment else 'off'}): train accuracy "
            f"{result.train_accuracy:.4f}, test accuracy {result.test_accuracy:.4f}. Attacks "
            f"scored on the {result.records} target-in (members) and target-out records; "
            f"label-only on {cfg.label_only.records}. "
            f"Shadow attack: MLP classes → {' → '.join(map(str, cfg.shadow.hidden))} → 1 on "
            f"{cfg.shadow.count} shadow model(s) per architecture"
            f"{', one attack model per class' if cfg.shadow.per_class else ''}"
            f"{', sorted probabilities' if cfg.shadow.sort_probs else ''} (the forms on "
            f"the same models are compared below the attack table). LiRA: {cfg.lira.shadows} shadow "
            f"models on random halves of the evaluation records"
            f"{' plus the shadow-attack models as OUT models' if cfg.lira.reuse_shadow else ''}, "
            f"{'global' if cfg.lira.global_variance else 'per-record'} variance"
            f"{', flipped queries' if cfg.lira.flip_query else ''}. Attack accuracy is the "
            "balanced accuracy at the best threshold.")


def _defense_note(cfg: StudyConfig, result: MembershipResult) -> str:
    d = cfg.defense
    text = (f"Every defence is measured with the {d.attack} attack. Dropout p = {d.dropout} before "
            f"the last layer; early stopping after {d.early_stopping_epochs} of the "
            f"{cfg.train.epochs} epochs; rounding to {d.rounding.decimals} decimal(s); "
            f"top-{d.top_k.k}. Output-side defences are applied to the shadow models' outputs "
            "too (the attacker adapts). The shadow models mimic the undefended recipe, so the "
            "loss-threshold attack, which needs no shadows, is given beside it (threshold AUC).")
    if result.privacy is not None:
        p = result.privacy
        text += (f" DP-SGD: noise multiplier {p['noise_multiplier']:.3f}, clipping norm "
                 f"{p['max_grad_norm']}, sampling rate {p['sample_rate']:.4f}, {p['steps']} steps: "
                 f"ε = {p['epsilon']:.3f} at δ = {p['delta']:.2e} ({p['accountant']} accountant).")
    return text
