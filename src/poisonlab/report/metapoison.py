"""Tables, figures and the HTML report of the targeted clean-label poisoning study.

Figures: MetaPoison's adversarial loss against the craft step (the ensemble mean with its spread
over surrogates and targets) with gradient matching's loss curves beside it, a few poisons beside
their clean originals with the perturbation amplified, success per target against the
unperturbed baseline, and the transfer matrix (surrogate × victim architecture).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.console import Group

from poisonlab.evaluation.metapoison_config import StudyConfig
from poisonlab.evaluation.metapoison_results import AttackResult, CraftRecord, StudyResult
from poisonlab.report.html import Section, Table, rich_table, write_html_report
from poisonlab.report.style import annotated_heatmap, new_figure, save_figure

TITLES = {"metapoison": "MetaPoison", "gradient_matching": "gradient matching"}


def summary_table(result: StudyResult) -> Table:
    rows = []
    for name, attack in result.attacks.items():
        m = attack.metrics()
        rows.append([TITLES.get(name, name), attack.surrogates[0], attack.victims[0],
                     m["success_rate"], m["ci95"], m["baseline_success_rate"],
                     m["victim_clean_accuracy"], m["clean_victim_accuracy"]])
    return Table(["attack", "surrogate", "victim", "success", "± 95% CI", "baseline success",
                  "victim clean acc", "clean-trained acc"], rows)


def per_target_table(attack: AttackResult) -> Table:
    m = attack.metrics()["per_target"]
    return Table(["target", "success", "baseline"],
                 [[t, e["success_rate"], e["baseline_success_rate"]] for t, e in m.items()],
                 caption=f"{TITLES.get(attack.name, attack.name)}: success per target")


def transfer_table(attack: AttackResult) -> Table:
    t = attack.metrics()["transfer"]
    rows = [[s, *rates] for s, rates in zip(t["surrogates"], t["success_rate"], strict=True)]
    rows.append(["(baseline)", *t["baseline_success_rate"]])
    return Table(["surrogate \\ victim", *t["victims"]], rows,
                 caption=f"{TITLES.get(attack.name, attack.name)}: success rate, transfer")


def terminal(result: StudyResult):
    """The headline numbers and the transfer matrices as rich tables."""
    head = (f"targeted poisoning ({result.dataset}, {result.train_images} training images, "
            f"{result.budget} poisons of class {result.poison_class}, targets of class "
            f"{result.target_class} → {result.adv_class})")
    parts = [rich_table(summary_table(result), title=head)]
    for attack in result.attacks.values():
        parts.append(rich_table(transfer_table(attack), title=transfer_table(attack).caption))
    return Group(*parts)


def loss_figure(path: Path, record: CraftRecord, target_ids: Sequence[int] | None = None) -> Path:
    """Adversarial loss per craft step: MetaPoison's ensemble mean ± spread; gradient matching's
    matching loss per iteration on a second axis, one line per target (named by `target_ids`,
    the test-set indices, else by position)."""
    panels = [k for k in ("metapoison", "gradient_matching") if record.losses.get(k)]
    fig, axes = new_figure(5.5 * len(panels), 4.0, 1, len(panels), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        curves = record.losses[name]
        if name == "metapoison":
            allv = torch.cat(curves, 1).double()  # [steps, M · targets]
            mean = allv.nanmean(1).numpy()
            lo = allv.nanquantile(0.1, 1).numpy()
            hi = allv.nanquantile(0.9, 1).numpy()
            steps = np.arange(len(mean))
            ax.fill_between(steps, lo, hi, alpha=0.25, label="10–90% over surrogates × targets")
            ax.plot(steps, mean, lw=1.6, label="ensemble mean")
            ax.set(xlabel="craft step", ylabel="adversarial loss (CW margin)",
                   title="MetaPoison crafting")
        else:
            names = list(target_ids) if target_ids is not None else list(range(len(curves)))
            for i, (c, tid) in enumerate(zip(curves, names, strict=True)):
                ax.plot(c.numpy(), lw=1.0, label=f"target {tid}" if i < 8 else None)
            ax.set(xlabel="iteration", ylabel="1 − cos(g_target, g_poisons)",
                   title="gradient matching (chosen restart)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def poisons_figure(path: Path, record: CraftRecord, amplify: float = 10.0) -> Path | None:
    """Rows: originals, then for each attack its poisons and the perturbation ×`amplify`."""
    if record.originals is None or not record.poisoned:
        return None
    x = record.originals
    rows = [("original", x)]
    for name, p in record.poisoned.items():
        rows += [(TITLES.get(name, name), p),
                 (f"difference ×{amplify:g}", (0.5 + amplify * (p - x)).clamp(0, 1))]
    fig, axes = new_figure(1.3 * len(x), 1.4 * len(rows), len(rows), len(x), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(len(x)):
            ax = axes[r][c]
            img = images[c].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray",
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    return save_figure(fig, path)


def per_target_figure(path: Path, result: StudyResult) -> Path:
    """Success per target for every attack, beside the unperturbed baseline."""
    attacks = list(result.attacks.values())
    ids = [str(t) for t in attacks[0].target_ids]
    fig, ax = new_figure(max(5.0, 0.7 * len(ids) * (len(attacks) + 1)), 3.8)
    width = 0.8 / (len(attacks) + 1)
    pos = np.arange(len(ids))
    base = attacks[0].metrics()["per_target"]
    ax.bar(pos, [base[t]["baseline_success_rate"] for t in ids], width, label="unperturbed",
           color="gray")
    for a, attack in enumerate(attacks, start=1):
        per = attack.metrics()["per_target"]
        ax.bar(pos + a * width, [per[t]["success_rate"] for t in ids], width,
               label=TITLES.get(attack.name, attack.name))
    ax.set_xticks(pos + width * len(attacks) / 2, ids)
    ax.set(xlabel="target id", ylabel="success rate over trials", ylim=(0, 1.05),
           title=f"Success per target (victim {attacks[0].victims[0]})")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def transfer_figure(path: Path, attack: AttackResult) -> Path:
    """Heatmap of success rate, rows = surrogate architectures, columns = victims."""
    t = attack.metrics()["transfer"]
    values = np.asarray(t["success_rate"], dtype=float)
    fig, ax = new_figure(1.5 + 1.1 * values.shape[1], 1.2 + 0.6 * values.shape[0])
    annotated_heatmap(ax, values, t["victims"], t["surrogates"], decimals=2, dark_below=0.5,
                      label="success rate", cmap="magma", vmin=0.0, vmax=1.0)
    ax.set(xlabel="victim", ylabel="surrogate", title=f"{TITLES.get(attack.name)}: transfer")
    return save_figure(fig, path)


def write_report(run, cfg: StudyConfig, result: StudyResult) -> Path:
    """Figures into the run's figures/ folder and report.html beside metrics.json."""
    figures = []
    if result.craft.losses:
        figures.append(loss_figure(run.figure_path("craft_loss.png"), result.craft,
                                   cfg.targets.ids))
    example = poisons_figure(run.figure_path("poisons.png"), result.craft)
    figures += [example] if example is not None else []
    if result.attacks:
        figures.append(per_target_figure(run.figure_path("per_target.png"), result))
    for name, attack in result.attacks.items():
        figures.append(transfer_figure(run.figure_path(f"transfer_{name}.png"), attack))
    sections = [
        Section("Settings", paragraphs=[_settings(cfg, result)]),
        Section("Success", tables=[summary_table(result)]
                + [per_target_table(a) for a in result.attacks.values()]),
        Section("Transfer", tables=[transfer_table(a) for a in result.attacks.values()]),
        Section("Figures", figures=figures),
    ]
    return write_html_report(run.path / "report.html", "targeted clean-label poisoning", sections)


def _settings(cfg: StudyConfig, result: StudyResult) -> str:
    mp, gm, v = cfg.metapoison, cfg.gradient_matching, cfg.victims
    return (f"{result.dataset}: {result.train_images} training images, {result.budget} poisons "
            f"(the {mp.poison_choice} of class {result.poison_class}), targets "
            f"{list(cfg.targets.ids)} of class {result.target_class}, adversarial class "
            f"{result.adv_class}. MetaPoison: ε = {mp.epsilon * 255:.1f}/255, colour ε_c = "
            f"{mp.color_epsilon} ({mp.color_space}), K = {mp.unroll_steps}, M = {mp.ensemble}, "
            f"{mp.craft_steps} craft steps on {', '.join(cfg.surrogates)}. Gradient matching: "
            f"ε = {gm.epsilon * 255:.1f}/255, {gm.restarts} restart(s) × {gm.iterations} "
            f"iterations on a surrogate trained on the clean subset. Victims "
            f"{', '.join(f'{a} ({v.trials_of(a)} trial(s))' for a in v.archs)}, trained from scratch for "
            f"{v.train.epochs} epochs (lr {v.train.lr}, batch {v.train.batch_size}). Success = "
            "the unmodified target classified as the adversarial class; the baseline is the "
            "same poison images unperturbed (victims on the clean subset), same trials.")
