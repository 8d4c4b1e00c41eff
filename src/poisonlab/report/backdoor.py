"""Tables, figures and the HTML report of the backdoor-defence protocol (poisonlab.evaluation.backdoor).

The headline table: BA and ASR of each backdoored model and after each defence, with the Neural
Cleanse anomaly index of the true target; the trigger figure (real trigger, a triggered input,
the NC and MCL inverted triggers); the feature figure (penultimate features of clean vs
triggered inputs before and after MCL, in 2-D).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from poisonlab.config import Settings
from poisonlab.data.types import ImageSet
from poisonlab.evaluation.backdoor import ProtocolConfig
from poisonlab.evaluation.backdoor_results import DEFENSES, AttackModels, BackdoorResults
from poisonlab.report.html import Section, Table, rich_table, write_html_report
from poisonlab.report.style import new_figure, save_figure
from poisonlab.training.supervised import predict_features


class FigureConfig(Settings):
    """points: clean + triggered test inputs in the feature figure. method: its 2-D embedding."""

    points: int = Field(500, ge=10)
    method: Literal["pca", "tsne"] = "pca"


def results_columns() -> list[str]:
    return ["attack", "model", "BA %", "ASR %", "NC index (target)", "NC flagged"]


def results_rows(results: BackdoorResults) -> list[list]:
    """One row per attack and stage: BA and ASR in percent, NC index of the target."""
    rows = []
    for name, attack in results.attacks.items():
        for stage in ("backdoored", *DEFENSES):
            m = attack.stage(stage)
            nc = [attack.nc_anomaly_index, ",".join(map(str, attack.nc_flagged)) or "-"]
            rows.append([name if stage == "backdoored" else "", stage,
                         100 * m.benign_accuracy, 100 * m.attack_success_rate,
                         *(nc if stage == "backdoored" else [None, None])])
    return rows


def render(results: BackdoorResults):
    """The headline table for the terminal."""
    title = f"backdoor-defense ({results.dataset}, {results.arch}, target {results.target})"
    if results.clean_model is not None:
        flagged = results.clean_model.nc_flagged
        title += f"; clean model NC flagged: {', '.join(map(str, flagged)) or 'none'}"
    return rich_table(Table(columns=results_columns(), rows=results_rows(results)), title=title)


def _show(ax, image: torch.Tensor, title: str) -> None:
    img = image.detach().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def trigger_figure(path: Path, models: dict[str, AttackModels], example: torch.Tensor) -> Path:
    """Per attack: the real trigger, a triggered image, the NC and MCL inverted triggers."""
    names = list(models)
    fig, axes = new_figure(7.0, 1.9 * len(names), nrows=len(names), ncols=4, squeeze=False)
    for row, name in enumerate(names):
        a = models[name]
        _show(axes[row, 0], a.trigger.visual(), f"{name}: real trigger")
        _show(axes[row, 1], a.trigger.apply(example), "triggered input")
        _show(axes[row, 2], a.nc_trigger.visual(), "NC inverted (mask·pattern)")
        _show(axes[row, 3], a.mcl_trigger.visual(), "MCL inverted |δ|")
    return save_figure(fig, path)


def _embed(features: torch.Tensor, method: str, seed: int):
    seed %= 2**32  # scikit-learn takes 32-bit seeds; a run's seed may be any below 2^63
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (len(features) - 1) / 3))
        return TSNE(2, perplexity=perplexity, random_state=seed).fit_transform(features.numpy())
    from sklearn.decomposition import PCA

    return PCA(2, random_state=seed).fit_transform(features.numpy())


def feature_figure(path: Path, models: dict[str, AttackModels], test: ImageSet, target: int,
                   figures: FigureConfig, seed: int) -> Path:
    """Penultimate features of clean vs triggered test inputs, before and after MCL (2-D view)."""
    names = list(models)
    x = test.x[test.y != target][: figures.points // 2]
    fig, axes = new_figure(7.0, 3.0 * len(names), nrows=len(names), ncols=2, squeeze=False)
    for row, name in enumerate(names):
        a = models[name]
        xt = a.trigger.apply(x)
        for col, (label, model) in enumerate((("before MCL", a.model),
                                              ("after MCL", a.purified_model))):
            feats = predict_features(model, torch.cat([x, xt]))
            pts = _embed(feats, figures.method, seed)
            ax = axes[row, col]
            ax.scatter(pts[: len(x), 0], pts[: len(x), 1], s=4, alpha=0.6, label="clean")
            ax.scatter(pts[len(x):, 0], pts[len(x):, 1], s=4, alpha=0.6, label="triggered")
            ax.set_title(f"{name}: {label} ({figures.method.upper()})")
            ax.legend(loc="best", markerscale=3)
    return save_figure(fig, path)


def settings_paragraph(results: BackdoorResults, cfg: ProtocolConfig, train_images: int,
                       test_images: int) -> str:
    d, ft = cfg.defense, cfg.defense.finetune
    bn = "re-estimated on the clean images" if d.recalibrate_bn else "as trained"
    models_from = (f"; models from run {', '.join(results.models_from)}" if results.models_from
                   else "")
    return (f"{cfg.data.dataset}: {train_images} training and {test_images} test images; "
            f"{cfg.arch} trained {cfg.train.epochs} epochs ({cfg.train.schedule}); "
            f"all-to-one target {cfg.attack.target}, poison rate {cfg.attack.poison_rate}; "
            f"defences on {results.clean_samples} clean images ({cfg.data.clean_fraction:.0%}), "
            f"{ft.epochs} epochs, lr steps {list(ft.lr_steps)}, "
            f"{'with' if ft.augment else 'without'} augmentation; "
            f"MCL τ = {d.temperature}, CE weight {d.ce_weight}, "
            f"clean self-distillation weight {d.distill_weight}, batch-norm statistics {bn}"
            f"{models_from}.")


def write_report(path: Path, results: BackdoorResults, cfg: ProtocolConfig, figures: list[Path],
                 train_images: int, test_images: int) -> Path:
    """The HTML report: settings, the headline table, the Neural Cleanse verdicts, figures."""
    nc_rows = [[name, a.nc_anomaly_index, ", ".join(map(str, a.nc_flagged)) or "none"]
               for name, a in results.attacks.items()]
    if results.clean_model is not None:
        flagged = results.clean_model.nc_flagged
        nc_rows.append(["clean model", None, ", ".join(map(str, flagged)) or "none"])
    sections = [
        Section("Settings", paragraphs=[settings_paragraph(results, cfg, train_images,
                                                           test_images)]),
        Section("Benign accuracy and attack success rate",
                tables=[Table(results_columns(), results_rows(results))]),
        Section("Neural Cleanse", paragraphs=[
            f"Anomaly index of the true target; labels with index > {cfg.nc.threshold} below the "
            "median mask norm are flagged."],
                tables=[Table(["model", "anomaly index of target", "flagged labels"], nc_rows)]),
        Section("Figures", figures=figures),
    ]
    return write_html_report(path, "backdoor-defense", sections)
