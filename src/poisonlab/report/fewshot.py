"""Tables, figures and the HTML report of the few-shot support-set backdoor evaluation.

Everything here takes a `FewShotResult` (poisonlab.evaluation.fewshot). The results table (CA, BA,
ASR and ASP accuracy per ε) for the terminal and the report; the paper's three figures: (1) PGD
loss vs iteration, (2) BA and ASR vs ε with their crossing, (3) an original support image beside
its poisoned versions at three ε values; plus the meta-training curve when the run trained the
model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table as RichTable

from poisonlab.evaluation.fewshot import FewShotEvalConfig, FewShotResult
from poisonlab.report.html import Section, Table, rich_table, write_html_report
from poisonlab.report.style import new_figure, save_figure
from poisonlab.runs import Run
from poisonlab.training.meta_trainer import MetaTrainConfig


def results_table(result: FewShotResult) -> Table:
    """CA, BA, ASR (and ASP accuracy) per ε, in percent with 95% CIs."""

    def pct(v: float, ci: float) -> str:
        return f"{100 * v:.2f} ± {100 * ci:.2f}"

    has_asp = any(r.asp_accuracy is not None for r in result.per_epsilon)
    columns = ["ε", "CA %", "BA %", "ASR %"] + (["ASP acc %"] if has_asp else [])
    rows = []
    for r in result.per_epsilon:
        row = [r.epsilon, pct(result.clean_accuracy, result.clean_accuracy_ci95),
               pct(r.backdoor_accuracy, r.backdoor_accuracy_ci95),
               pct(r.attack_success_rate, r.attack_success_rate_ci95)]
        if has_asp:
            row.append("–" if r.asp_accuracy is None else pct(r.asp_accuracy, r.asp_accuracy_ci95))
        rows.append(row)
    return Table(columns=columns, rows=rows)


def terminal_table(result: FewShotResult, title: str) -> RichTable:
    """The results table for the terminal, captioned with the protocol and the clean trigger."""
    table = rich_table(results_table(result), title=title)
    table.caption = (f"protocol {result.protocol}. {keep_support_text(result)}"
                     f"{clean_trigger_text(result)}")
    return table


def crossing_point(eps: list[float], ba: list[float], asr: list[float]) -> tuple[float, float] | None:
    """Where ASR − BA changes sign, by linear interpolation between neighbouring ε; else None."""
    diff = np.asarray(asr) - np.asarray(ba)
    for i in range(len(eps) - 1):
        if diff[i] == 0:
            return eps[i], ba[i]
        if diff[i] * diff[i + 1] < 0:
            t = diff[i] / (diff[i] - diff[i + 1])
            return eps[i] + t * (eps[i + 1] - eps[i]), ba[i] + t * (ba[i + 1] - ba[i])
    return None


def plot_loss(path: Path, result: FewShotResult) -> None:
    fig, ax = new_figure(6, 4)
    for eps, trace in (result.traces or {}).items():
        losses = trace.losses.numpy()  # [L, T]
        it = np.arange(1, losses.shape[0] + 1)
        mean = losses.mean(1)
        lo, hi = np.percentile(losses, [25, 75], axis=1)
        ax.plot(it, mean, marker="o", ms=3, label=f"ε = {eps:g}")
        ax.fill_between(it, lo, hi, alpha=0.15)
    ax.set(xlabel="PGD iteration", ylabel="trigger loss CE(F(X'_tr), Y'_adv)", yscale="log",
           title="Backdoor PGD loss (mean, 25–75% band over tasks)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_ba_asr(path: Path, result: FewShotResult) -> None:
    rows = result.per_epsilon
    eps = [r.epsilon for r in rows]
    ba = [r.backdoor_accuracy for r in rows]
    asr = [r.attack_success_rate for r in rows]
    fig, ax = new_figure(6, 4)
    ax.errorbar(eps, ba, yerr=[r.backdoor_accuracy_ci95 for r in rows], marker="o", label="BA")
    ax.errorbar(eps, asr, yerr=[r.attack_success_rate_ci95 for r in rows], marker="s", label="ASR")
    asp = [(r.epsilon, r.asp_accuracy) for r in rows if r.asp_accuracy is not None]
    if asp:
        ax.plot(*zip(*asp, strict=True), marker="^", ls="--", label="ASP accuracy")
    ax.axhline(result.clean_accuracy, color="grey", ls=":", label="CA (clean)")
    cross = crossing_point(eps, ba, asr)
    if cross is not None:
        ax.plot(*cross, marker="X", ms=12, color="black", ls="none",
                label=f"BA = ASR at ε ≈ {cross[0]:.3f}")
    ax.set(xlabel="ε (L∞ budget)", ylabel="fraction", ylim=(0, 1.02),
           title="Backdoor accuracy and attack success vs ε")
    positive = [e for e in eps if e > 0]
    if len(positive) == len(eps):
        ax.set_xscale("log")
    else:  # ε = 0 (the unattacked baseline) has no place on a log axis: linear up to the least ε
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_examples(path: Path, result: FewShotResult, chosen: list[float]) -> None:
    """Support image 0 of task 0, clean and poisoned at the chosen ε."""
    assert result.clean_examples is not None and result.traces is not None
    original = result.clean_examples[0, 0, 0].numpy()
    fig, axes = new_figure(2.0 * (len(chosen) + 1), 2.4, 1, len(chosen) + 1)
    axes = np.atleast_1d(axes)
    axes[0].imshow(original, cmap="gray_r", vmin=0, vmax=1)
    axes[0].set_title("original")
    for ax, eps in zip(axes[1:], chosen, strict=True):
        poisoned = result.traces[eps].examples[0, 0, 0].numpy()
        ax.imshow(poisoned, cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(f"ε = {eps:g}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    save_figure(fig, path)


def plot_meta_training(path: Path, history: list[dict]) -> None:
    fig, ax = new_figure(6, 3.5)
    it = [h["iteration"] for h in history]
    ax.plot(it, [h["val_accuracy"] for h in history], marker="o", ms=3, label="validation accuracy")
    ax.plot(it, [h["train_accuracy"] for h in history], alpha=0.6, label="meta-batch query accuracy")
    ax.set(xlabel="meta-iteration", ylabel="accuracy", title="MAML meta-training")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def pick_three(eps: list[float]) -> list[float]:
    """ε values for the example figure: the paper's 0.07, 0.3, 0.5 when swept, else spread out."""
    wanted = [e for e in (0.07, 0.3, 0.5) if e in eps]
    if len(wanted) == 3 or len(eps) <= 3:
        return wanted if len(wanted) == 3 else sorted(eps)
    ordered = sorted(eps)
    return [ordered[0], ordered[len(ordered) // 2], ordered[-1]]


def write_report(run: Run, result: FewShotResult, attack: FewShotEvalConfig,
                 meta: MetaTrainConfig, dataset: str, history: list[dict]) -> None:
    """All figures into the run's figures/ folder and report.html beside them."""
    figures = {
        "pgd_loss": plot_loss, "ba_asr_vs_epsilon": plot_ba_asr,
        "poisoned_examples": lambda p, r: plot_examples(p, r, pick_three(attack.epsilons)),
    }
    paths = {}
    for name, draw in figures.items():
        paths[name] = run.figure_path(f"{name}.png")
        draw(paths[name], result)
    sections = [Section("Results", [setting_text(result, attack, meta, dataset)],
                        [results_table(result)], [paths["ba_asr_vs_epsilon"]]),
                Section("PGD loss", ["Algorithm 1's loss on the trigger at every iteration."],
                        figures=[paths["pgd_loss"]]),
                Section("Poisoned support images", figures=[paths["poisoned_examples"]])]
    if history:
        path = run.figure_path("meta_training.png")
        plot_meta_training(path, history)
        sections.append(Section("Meta-training", figures=[path], tables=[Table(
            ["iteration", "val accuracy"], [[h["iteration"], h["val_accuracy"]] for h in history])]))
    write_html_report(run.path / "report.html", "poisonlab: few-shot support-set backdoor", sections)


def setting_text(result: FewShotResult, attack: FewShotEvalConfig, meta: MetaTrainConfig,
                 dataset: str) -> str:
    """The report's description of the run's setting, protocol and clean-trigger rates."""
    a = attack
    return (f"{dataset}, {meta.ways}-way {meta.shots}-shot, {result.tasks} meta-test tasks, "
            f"PGD L = {a.iterations}, γ = {a.step_size}, fine-tuning {a.finetune_steps} step(s) "
            f"at lr {a.finetune_lr}, clamp to [0, 1]: {a.clamp}. {_protocol_text(result)} "
            f"{keep_support_text(result)}{clean_trigger_text(result)} (chance level of ASR).")


def clean_trigger_text(result: FewShotResult) -> str:
    """How the clean model classifies the trigger under the run's protocol."""
    return (f"On the clean support set the trigger is classified correctly "
            f"{100 * result.clean_trigger_accuracy:.1f}%, as the attacker's label "
            f"{100 * result.clean_trigger_to_target_rate:.1f}%")


def keep_support_text(result: FewShotResult) -> str:
    """Names the keep_support extension of the attack objective when the run used it."""
    keep = result.attacker_keep_support
    if not keep:
        return ""
    return (f"Attack objective extended beyond Algorithm 1: + {keep:g} × the clean support "
            "images' loss after poisoned fine-tuning (keep_support). ")


def _protocol_text(result: FewShotResult) -> str:
    if result.protocol == "paper":
        return ("Protocol 'paper': the victim classifies the trigger by itself (eq. 12 as written; "
                "BatchNorm then normalises the lone image with its own statistics), the attacker "
                f"with stand-in batch '{result.attacker_trigger_batch}'.")
    return ("Protocol 'transductive': the victim classifies the trigger inside its query batch, "
            f"the attacker with stand-in batch '{result.attacker_trigger_batch}'.")
