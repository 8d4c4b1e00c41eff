"""Metrics shared by every technique: accuracies, attack success, confidence intervals."""

from __future__ import annotations

import math

import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from poisonlab.errors import ConfigError, DataError


def mean_ci95(values: torch.Tensor | list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t over the values).

    With one value the half-width is 0.0 (no spread can be estimated).
    """
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = float(v.mean())
    if v.numel() == 1:
        return mean, 0.0
    sem = float(v.std(unbiased=True)) / math.sqrt(v.numel())
    half = float(stats.t.ppf(0.975, df=v.numel() - 1)) * sem
    return mean, half


def accuracy(logits_or_pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction correct along the last example dimension.

    Accepts logits [..., n, classes] or predicted labels [..., n]; returns a tensor of shape [...]
    (one accuracy per task for batched input).
    """
    pred = logits_or_pred.argmax(-1) if logits_or_pred.dim() == labels.dim() + 1 else logits_or_pred
    return (pred == labels).float().mean(-1)


# --- Membership inference: ROC metrics (scores: higher = more likely a member; labels: 1 = member)

MEMBERSHIP_FPRS = (0.001, 0.01)


def tpr_measurable(fpr: float, negatives: int) -> bool:
    """Whether the TPR at false-positive rate `fpr` can be read off `negatives` non-members:
    with fewer than 1/fpr, the smallest FPR above zero is 1/negatives, and "the TPR at 0.1%
    FPR" would be the TPR at zero false positives, mislabelled."""
    return negatives * fpr >= 1


def _roc_inputs(scores, labels) -> tuple:
    """Scores and 0/1 labels as flat NumPy arrays, checked (one-line DataError on bad input)."""
    s = torch.as_tensor(scores).detach().double().flatten().cpu()
    y = torch.as_tensor(labels).detach().flatten().cpu()
    if s.numel() != y.numel():
        raise DataError(f"scores and labels differ in length ({s.numel()} vs {y.numel()})")
    if not bool(torch.isfinite(s).all()):
        raise DataError("membership scores contain NaN or infinite values")
    if not bool(((y == 0) | (y == 1)).all()):
        raise DataError("membership labels must be 0 (non-member) or 1 (member)")
    if int(y.sum()) in (0, y.numel()):
        raise DataError("membership labels need at least one member and one non-member")
    return s.numpy(), y.long().numpy()


def roc_points(scores, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds) of every threshold, from sklearn.metrics.roc_curve."""
    s, y = _roc_inputs(scores, labels)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return torch.from_numpy(fpr), torch.from_numpy(tpr), torch.from_numpy(thr)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (ties count one half), sklearn.metrics.roc_auc_score."""
    s, y = _roc_inputs(scores, labels)
    return float(roc_auc_score(y, s))


def tpr_at_fpr(scores, labels, fpr: float) -> float:
    """TPR at the largest threshold whose false-positive rate is at most `fpr` (Carlini et al.
    2022 report this at 0.1%); 0.0 when every threshold exceeds it."""
    if not 0.0 <= fpr <= 1.0:
        raise ConfigError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc_points(scores, labels)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if bool(ok.any()) else 0.0


def attack_accuracy(scores, labels) -> float:
    """Balanced accuracy (TPR + TNR) / 2 at the best threshold. On a balanced evaluation set (the
    Shokri et al. set-up) this is the attack's accuracy; the threshold is chosen on the evaluated
    scores, so it is an upper bound for a threshold fixed in advance."""
    f, t, _ = roc_points(scores, labels)
    return float(((t + 1.0 - f) / 2.0).max())


def membership_metrics(scores, labels) -> dict[str, float]:
    """attack_accuracy, auc, tpr_at_fpr_0.001 and tpr_at_fpr_0.01 of one attack's scores."""
    out = {"attack_accuracy": attack_accuracy(scores, labels), "auc": roc_auc(scores, labels)}
    for fpr in MEMBERSHIP_FPRS:
        out[f"tpr_at_fpr_{fpr:g}"] = tpr_at_fpr(scores, labels, fpr)
    return out
