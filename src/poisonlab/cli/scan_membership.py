"""The membership-leakage check of `poisonlab scan`: how well can an attacker tell the model's
training records (members) from records it never saw (non-members)?

With only the model and two labelled record sets there are no shadow or reference models (nor
the training recipe to make them), so the shadow-model attack (Shokri et al., S&P 2017) and LiRA
(Carlini et al., S&P 2022) cannot run. The strongest attack left is a threshold on each record's
loss (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting",
CSF 2018). It is scored as the logit-scaled confidence z_y − logsumexp_{j≠y} z_j of Carlini et
al. 2022, a monotone function of the loss (so the same ROC) computed from the logits, so very
confident records do not tie at p_y = 1 in float32. On request the label-only attack
(Choquette-Choo et al., ICML 2021) also runs: it needs only predicted labels, so it shows what
leaks when a service hides its scores. Leakage is "detected" when a one-sided Mann–Whitney U test
(members score higher) rejects at 1% (Bonferroni over the attacks run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from poisonlab.cli.audit import AuditContext

SPLITS = ("train", "test")
SPLIT_RECORDS = 1000  # records drawn from a data-set split when --records is not given
ALPHA = 0.01

LOSS_REASON = (
    "only the model and the two record sets are given: without shadow or reference models "
    "trained like the target, the shadow-model attack and LiRA cannot run, so the strongest "
    "attack is a threshold on each record's loss (Yeom et al. 2018), scored as the logit-scaled "
    "confidence (Carlini et al. 2022), which ranks records as the loss does without float ties")
LABEL_REASON = ("asked for with --label-only: uses predicted labels only (Choquette-Choo et al. "
                "2021), i.e. what leaks if the model released no scores")


@dataclass
class RecordSets:
    """Members (training records of the model) and non-members, with where each came from."""

    members: ImageSet
    non_members: ImageSet
    members_source: str
    non_members_source: str


# --- loading -----------------------------------------------------------------------------------


def load_record_sets(members: Path | None, non_members: Path | None, members_split: str | None,
                     non_members_split: str | None, dataset: str | None, data_dir: Path | None,
                     records: int | None, seed: int) -> RecordSets | None:
    """Both record sets (files, folders or splits of --dataset), sampled to `records` each; None
    when neither is given."""
    given = [members, non_members, members_split, non_members_split]
    if all(g is None for g in given):
        return None
    if members is not None and members_split is not None:
        raise ConfigError("give --members or --members-split, not both")
    if non_members is not None and non_members_split is not None:
        raise ConfigError("give --non-members or --non-members-split, not both")
    if members is None and members_split is None:
        raise ConfigError("the membership check needs --members FILE (or --members-split)")
    if non_members is None and non_members_split is None:
        raise ConfigError("the membership check needs --non-members FILE (or --non-members-split)")
    if records is not None and records < 1:
        raise ConfigError(f"--records must be >= 1, got {records}")
    if members_split is not None and members_split == non_members_split:
        raise ConfigError(f"members and non-members are both the {members_split} split")
    mem, mem_src, mem_classes = _one_set(members, members_split, dataset, data_dir, records, seed)
    non, non_src, non_classes = _one_set(non_members, non_members_split, dataset, data_dir,
                                         records, seed + 1)
    if mem_classes and non_classes and mem_classes != non_classes:
        raise DataError(f"the class folders of {mem_src} and {non_src} differ, so their labels "
                        "would not match: name class folders by label (0, 1, ...)")
    return RecordSets(mem, non, mem_src, non_src)


def _one_set(path: Path | None, split: str | None, dataset: str | None, data_dir: Path | None,
             records: int | None, seed: int) -> tuple[ImageSet, str, list[str] | None]:
    classes = None
    if path is not None:
        from poisonlab.data.records import load_records

        images, classes = load_records(path)
        source = str(path)
        if classes is not None and all(c.isdigit() for c in classes):
            classes = None  # integer-named folders carry their labels
    else:
        images, source = _split(split, dataset, data_dir, seed), f"{dataset} {split} split"
        records = records or SPLIT_RECORDS
    if records is not None and records < len(images):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images.subset(order[:records])
    return images, source, classes


def _split(split: str | None, dataset: str | None, data_dir: Path | None, seed: int) -> ImageSet:
    from poisonlab.cli.audit import load_clean

    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' (choose {' or '.join(SPLITS)})")
    if dataset is None:
        raise ConfigError("--members-split / --non-members-split need --dataset")
    return load_clean(None, dataset, data_dir, split, seed)[0]


def check_record_sets(sets: RecordSets, model: torch.nn.Module, shape: tuple,
                      num_classes: int) -> None:
    """One-line DataError unless every record fits the model: shape, channels, labels."""
    from poisonlab.cli.audit import check_images
    from poisonlab.training.supervised import predict_logits

    for images, source in ((sets.members, sets.members_source),
                           (sets.non_members, sets.non_members_source)):
        check_images(images, shape, source)
        got = tuple(images.x.shape[1:])
        if shape[0] and got[0] != shape[0]:
            raise DataError(f"images in {source} have {got[0]} channels, but the model expects "
                            f"{shape[0]}")
        top = int(images.y.max())
        if top >= num_classes:
            raise DataError(f"labels in {source} must be in 0..{num_classes - 1} (the model has "
                            f"{num_classes} classes), found {top}")
        try:
            out = predict_logits(model, images.x[:2])
        except RuntimeError as exc:
            raise DataError(f"images in {source} ({got[0]}x{got[1]}x{got[2]}) do not fit the "
                            f"model: {str(exc).splitlines()[0]}") from None
        if out.dim() != 2 or out.shape[1] != num_classes:
            raise DataError(f"the model's output {tuple(out.shape)} on {source} is not "
                            f"[records, {num_classes}]")


# --- scoring -----------------------------------------------------------------------------------


def membership_scores(model: torch.nn.Module, sets: RecordSets, label_only: bool = False,
                      seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """attack name -> (scores [N + M], membership labels [N + M], 1 = member), members first."""
    from poisonlab.attacks.membership import LabelOnlyAttack, logit_confidence
    from poisonlab.attacks.membership.label_only import label_oracle
    from poisonlab.training.supervised import predict_logits

    x = torch.cat([sets.members.x, sets.non_members.x])
    y = torch.cat([sets.members.y, sets.non_members.y])
    truth = torch.cat([torch.ones(len(sets.members)), torch.zeros(len(sets.non_members))])
    out = {"loss_threshold": (logit_confidence(predict_logits(model, x), y), truth)}
    if label_only:
        out["label_only"] = (LabelOnlyAttack(seed=seed).infer(label_oracle(model), x, y), truth)
    return out


def attack_summary(scores: torch.Tensor, truth: torch.Tensor, attacks: int = 1) -> dict[str, Any]:
    """membership_metrics plus the Mann–Whitney p-value and whether leakage is detected."""
    from scipy.stats import mannwhitneyu

    from poisonlab.metrics import membership_metrics

    out: dict[str, Any] = membership_metrics(scores, truth)
    member = truth.bool()
    test = mannwhitneyu(scores[member].double().numpy(), scores[~member].double().numpy(),
                        alternative="greater")
    out["p_value"] = float(test.pvalue)
    out["leakage_detected"] = bool(test.pvalue < ALPHA / attacks)
    return out


def membership_check(ctx: AuditContext) -> tuple[dict, Any, str]:
    """Score both record sets with the attacks available; summary, report section, verdict."""
    from poisonlab.report.html import Section, Table

    sets: RecordSets = ctx.options["records"]
    scored = membership_scores(ctx.model, sets, ctx.options.get("label_only", False),
                               ctx.options.get("seed", 0))
    reasons = {"loss_threshold": LOSS_REASON, "label_only": LABEL_REASON}
    rows = []
    for name, (scores, truth) in scored.items():
        rows.append({"attack": name, "reason": reasons[name],
                     **attack_summary(scores, truth, len(scored))})
    summary = {**rows[0], "records": len(sets.members) + len(sets.non_members),
               "members": len(sets.members), "non_members": len(sets.non_members),
               "members_source": sets.members_source,
               "non_members_source": sets.non_members_source, "attacks": rows}
    figure = roc_figure(ctx.report_dir / "membership_roc.png", scored)
    metric_keys = ["auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "attack_accuracy", "p_value"]
    headers = ["AUC", "TPR at 0.1% FPR", "TPR at 1% FPR", "attack accuracy", "p-value"]
    table = Table(["attack", *headers], [[r["attack"], *(r[k] for k in metric_keys)]
                                         for r in rows])
    why = [f"{r['attack']} attack: {r['reason']}." for r in rows]
    paragraphs = [_verdict(summary), f"{len(sets.members)} members from {sets.members_source}, "
                  f"{len(sets.non_members)} non-members from {sets.non_members_source}.", *why,
                  _caveats(summary)]
    section = Section("Membership leakage", paragraphs, [table], [figure])
    return summary, section, "\n".join([_verdict(summary), *(f"  {w}" for w in why)])


def _verdict(summary: dict) -> str:
    state = "DETECTED" if any(r["leakage_detected"] for r in summary["attacks"]) else "not detected"
    best = summary["attacks"][0]
    return (f"membership leakage: {state} ({best['attack']} attack: AUC {best['auc']:.3f}, TPR "
            f"{100 * best['tpr_at_fpr_0.001']:.1f}% at 0.1% FPR, "
            f"{100 * best['tpr_at_fpr_0.01']:.1f}% at 1% FPR; {summary['members']} members, "
            f"{summary['non_members']} non-members)")


def _caveats(summary: dict) -> str:
    text = ("The attack accuracy uses the best threshold on these records (an upper bound for an "
            "attacker who fixes it in advance). Non-members must come from the same distribution "
            "as the members, otherwise the AUC measures the shift between them.")
    if summary["non_members"] < 1000:
        text += (f" With {summary['non_members']} non-members the smallest non-zero FPR is "
                 f"{1 / summary['non_members']:.2%}, so TPR at 0.1% FPR is the TPR at zero false "
                 "positives.")
    return text


def roc_figure(path: Path, scored: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    """ROC curves on log-log axes (the low-FPR regime that matters, Carlini et al. 2022); FPR or
    TPR of 0 is drawn at the axis' lower edge."""
    from poisonlab.metrics import roc_auc, roc_points
    from poisonlab.report.style import new_figure, save_figure

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
