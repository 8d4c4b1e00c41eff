"""The membership-leakage check of `scan`: how well can an attacker tell the model's training
records (members) from records it never saw (non-members)?

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

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poisonlab.attacks.membership import LabelOnlyAttack, logit_confidence
from poisonlab.attacks.membership.label_only import label_oracle
from poisonlab.audit.checks import CheckResult, RecordSets, ScanContext
from poisonlab.audit.data import check_images, load_clean
from poisonlab.data.records import load_records
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError, ModelFileError, ShapeError
from poisonlab.metrics import MEMBERSHIP_FPRS, membership_metrics, tpr_measurable
from poisonlab.report.audit import membership_section, roc_figure
from poisonlab.report.html import Section
from poisonlab.training.supervised import predict_logits

__all__ = ["AttackResult", "MembershipResult", "RecordSets", "check_record_sets",
           "load_record_sets", "membership_check", "membership_scores"]

SPLITS = ("train", "test")
SPLIT_RECORDS = 1000  # records drawn from a data-set split when `records` is not given
ALPHA = 0.01
ROC_FIGURE = "membership_roc.png"

LOSS_REASON = (
    "only the model and the two record sets are given: without shadow or reference models "
    "trained like the target, the shadow-model attack and LiRA cannot run, so the strongest "
    "attack is a threshold on each record's loss (Yeom et al. 2018), scored as the logit-scaled "
    "confidence (Carlini et al. 2022), which ranks records as the loss does without float ties")
LABEL_REASON = ("asked for with --label-only: uses predicted labels only (Choquette-Choo et al. "
                "2021), i.e. what leaks if the model released no scores")
REASONS = {"loss_threshold": LOSS_REASON, "label_only": LABEL_REASON}


# --- record sets -------------------------------------------------------------------------------


def load_record_sets(members: Path | None, non_members: Path | None, members_split: str | None,
                     non_members_split: str | None, dataset: str | None, data_dir: Path | None,
                     records: int | None, seed: int) -> RecordSets | None:
    """Both record sets (files, folders or splits of `dataset`), each sampled to at most
    `records` (>= 1) with the seed; None when neither is given."""
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
        images, classes = load_records(path)
        source = str(path)
        if classes is not None and all(c.isdecimal() for c in classes):
            classes = None  # integer-named folders carry their labels
    else:
        images, source = _split(split, dataset, data_dir, seed), f"{dataset} {split} split"
        records = records or SPLIT_RECORDS
    if records is not None and records < len(images):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images.subset(order[:records])
    return images, source, classes


def _split(split: str | None, dataset: str | None, data_dir: Path | None, seed: int) -> ImageSet:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' (choose {' or '.join(SPLITS)})")
    if dataset is None:
        raise ConfigError("--members-split / --non-members-split need --dataset")
    return load_clean(None, dataset, data_dir, split, seed)[0]


def check_record_sets(sets: RecordSets, model: nn.Module, shape: tuple,
                      num_classes: int) -> None:
    """ShapeError unless every record fits the model: shape, channels, labels, output; a
    DataError when the two sets share records (the same folder given twice, say)."""
    both = _record_overlap(sets)
    if both > 0.01 * min(len(sets.members), len(sets.non_members)):  # a stray duplicate is kept
        raise DataError(f"{both} of the records of {sets.members_source} are also in "
                        f"{sets.non_members_source}: the membership check compares two "
                        "disjoint sets")
    for images, source in ((sets.members, sets.members_source),
                           (sets.non_members, sets.non_members_source)):
        check_images(images, shape, source)
        got = tuple(images.x.shape[1:])
        if shape[0] and got[0] != shape[0]:
            raise ShapeError(f"images in {source} have {got[0]} channels, but the model "
                             f"expects {shape[0]}")
        top = int(images.y.max())
        if top >= num_classes:
            raise ShapeError(f"labels in {source} must be in 0..{num_classes - 1} (the model has "
                             f"{num_classes} classes), found {top}")
        check_output(model, images, source, num_classes)


def check_output(model: nn.Module, images: ImageSet, source: str, num_classes: int) -> None:
    """ShapeError unless the model maps two of `images` to logits [2, num_classes]."""
    got = tuple(images.x.shape[1:])
    try:
        out = predict_logits(model, images.x[:2])
    except RuntimeError as exc:
        raise ShapeError(f"images in {source} ({got[0]}x{got[1]}x{got[2]}) do not fit the "
                         f"model: {str(exc).splitlines()[0]}") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise ShapeError(f"the model's output {tuple(out.shape)} on {source} is not "
                         f"[records, {num_classes}]")


def check_responsive(model: nn.Module, images: ImageSet, source: str, n: int = 64) -> None:
    """ModelFileError when the model gives the same logits for every one of `n` images: its
    output does not depend on the input (all-zero weights, say), so every check would be a
    verdict about nothing (such a model used to come out INCONCLUSIVE, or "not detected")."""
    out = predict_logits(model, images.x[:n]).double()
    if not torch.isfinite(out).all():
        raise ModelFileError(f"the model's outputs on {source} are not finite (NaN or overflow: "
                             "damaged or extreme weights?): nothing can be measured on it")
    if len(out) > 1 and float((out.max(0).values - out.min(0).values).max()) \
            <= 1e-9 * (1.0 + float(out.abs().max())):
        raise ModelFileError(f"the model gives the same output for all {len(out)} images of "
                             f"{source} tried (constant or all-zero weights?): nothing can be "
                             "measured on it")


def _record_overlap(sets: RecordSets) -> int:
    """How many member records are, image and label, also among the non-members."""
    def keys(images: ImageSet) -> set[bytes]:
        x = images.x.contiguous().numpy()
        y = images.y.numpy()
        return {hashlib.sha256(x[i].tobytes() + int(y[i]).to_bytes(8, "little")).digest()
                for i in range(len(x))}

    return len(keys(sets.members) & keys(sets.non_members))


# --- scoring -----------------------------------------------------------------------------------


def membership_scores(model: nn.Module, sets: RecordSets, label_only: bool = False,
                      seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """attack name -> (scores [N + M], membership labels [N + M], 1 = member), members first."""
    x = torch.cat([sets.members.x, sets.non_members.x])
    y = torch.cat([sets.members.y, sets.non_members.y])
    truth = torch.cat([torch.ones(len(sets.members)), torch.zeros(len(sets.non_members))])
    out = {"loss_threshold": (logit_confidence(predict_logits(model, x), y), truth)}
    if label_only:
        out["label_only"] = (label_only_scores(model, x, y, seed), truth)
    return out


def label_only_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      seed: int) -> torch.Tensor:
    """The label-only attack's membership scores of the records (x, y) (higher = member)."""
    attack = LabelOnlyAttack(seed=seed)
    return attack.score(attack.query(label_oracle(model), x, y))


@dataclass
class AttackResult:
    """One attack's membership metrics on the two record sets and the Mann–Whitney test."""

    attack: str
    reason: str
    metrics: dict[str, float]  # poisonlab.metrics.membership_metrics
    p_value: float
    leakage_detected: bool

    def to_dict(self) -> dict[str, Any]:
        return {"attack": self.attack, "reason": self.reason, **self.metrics,
                "p_value": self.p_value, "leakage_detected": self.leakage_detected}


def score_attack(name: str, scores: torch.Tensor, truth: torch.Tensor,
                 attacks: int = 1) -> AttackResult:
    """Metrics of one attack's scores, with leakage detected when the one-sided Mann–Whitney U
    test rejects at ALPHA / `attacks` (Bonferroni)."""
    from scipy.stats import mannwhitneyu

    member = truth.bool()
    test = mannwhitneyu(scores[member].double().numpy(), scores[~member].double().numpy(),
                        alternative="greater")
    return AttackResult(name, REASONS[name], membership_metrics(scores, truth),
                        float(test.pvalue), bool(test.pvalue < ALPHA / attacks))


@dataclass
class MembershipResult(CheckResult):
    """The attacks run (the loss threshold first), the record sets and the ROC figure (None when
    no report folder was given)."""

    attacks: list[AttackResult]
    sets: RecordSets
    figure: Path | None = None
    name = "membership"

    @property
    def detected(self) -> bool:
        return any(a.leakage_detected for a in self.attacks)

    @property
    def testable(self) -> bool:
        """False when even the most separated scores could not reach the test's level: the
        one-sided Mann–Whitney U p-value of m members and n non-members is at least
        1 / C(m + n, m) (every member above every non-member), so with too few records
        "not detected" would say nothing."""
        m, n = len(self.sets.members), len(self.sets.non_members)
        return math.comb(m + n, m) * ALPHA / len(self.attacks) > 1

    @property
    def verdict(self) -> str:
        state = ("DETECTED" if self.detected else "not detected" if self.testable else
                 "INCONCLUSIVE, too few records for the test to reach its level")
        best, negatives = self.attacks[0], len(self.sets.non_members)
        rates = [f"TPR {100 * best.metrics[f'tpr_at_fpr_{fpr:g}']:.1f}% at {100 * fpr:g}% FPR"
                 if tpr_measurable(fpr, negatives) else f"TPR at {100 * fpr:g}% FPR not measurable with "
                 f"{negatives} non-members" for fpr in MEMBERSHIP_FPRS]
        return (f"membership leakage: {state} ({best.attack} attack: AUC "
                f"{best.metrics['auc']:.3f}, {', '.join(rates)}; "
                f"{len(self.sets.members)} members, {negatives} non-members)")

    @property
    def notes(self) -> list[str]:
        return [f"{a.attack} attack: {a.reason}." for a in self.attacks]

    def section(self) -> Section:
        s = self.sets
        return membership_section(self.verdict, self.attacks, len(s.members), s.members_source,
                                  len(s.non_members), s.non_members_source, self.figure)

    def to_dict(self) -> dict[str, Any]:
        """The first attack's numbers, then every attack's; a TPR at an FPR the non-members
        cannot measure is null (as the verdict says "not measurable")."""
        s = self.sets

        def measured(attack: AttackResult) -> dict[str, Any]:
            out = attack.to_dict()
            for fpr in MEMBERSHIP_FPRS:
                if not tpr_measurable(fpr, len(s.non_members)):
                    out[f"tpr_at_fpr_{fpr:g}"] = None
            return out

        return {**measured(self.attacks[0]), "records": len(s.members) + len(s.non_members),
                "members": len(s.members), "non_members": len(s.non_members),
                "testable": self.testable, "members_source": s.members_source,
                "non_members_source": s.non_members_source,
                "attacks": [measured(a) for a in self.attacks]}


def membership_check(ctx: ScanContext) -> MembershipResult:
    """Score both record sets with the attacks available."""
    scored = membership_scores(ctx.model, ctx.records, ctx.config.label_only, ctx.seed)
    attacks = [score_attack(name, scores, truth, len(scored))
               for name, (scores, truth) in scored.items()]
    figure = (roc_figure(ctx.report_dir / ROC_FIGURE, scored)
              if ctx.report_dir is not None else None)
    return MembershipResult(attacks, ctx.records, figure)
