"""ROC metrics of membership attacks against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from poisonlab.errors import ConfigError, DataError
from poisonlab.metrics import (
    attack_accuracy,
    membership_metrics,
    roc_auc,
    roc_points,
    tpr_at_fpr,
)

# Members (1) and non-members (0) in order of decreasing score.
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
LABELS = torch.tensor([1, 1, 0, 1, 0, 0])


def test_auc_counts_correctly_ordered_pairs():
    # 3 + 3 + 2 of the 9 member/non-member pairs are ordered correctly.
    assert roc_auc(SCORES, LABELS) == pytest.approx(8 / 9)


def test_auc_extremes_and_ties():
    assert roc_auc([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert roc_auc([3.0, 2.0, 1.0, 0.0], [0, 0, 1, 1]) == pytest.approx(0.0)
    assert roc_auc([1.0, 1.0, 1.0, 1.0], [1, 0, 1, 0]) == pytest.approx(0.5)


def test_tpr_at_fpr_uses_largest_threshold_within_fpr():
    # FPR 0 up to threshold 0.8 (TPR 2/3); threshold 0.6 gives FPR 1/3, TPR 1.
    assert tpr_at_fpr(SCORES, LABELS, 0.001) == pytest.approx(2 / 3)
    assert tpr_at_fpr(SCORES, LABELS, 0.3) == pytest.approx(2 / 3)
    assert tpr_at_fpr(SCORES, LABELS, 1 / 3) == pytest.approx(1.0)
    # The top-scored record is a non-member: no threshold has FPR 0 and TPR > 0.
    assert tpr_at_fpr([0.9, 0.8, 0.1], [0, 1, 0], 0.0) == pytest.approx(0.0)


def test_attack_accuracy_is_best_balanced_accuracy():
    # Threshold 0.6: TPR 1, TNR 2/3.
    assert attack_accuracy(SCORES, LABELS) == pytest.approx((1 + 2 / 3) / 2)
    # Imbalanced: 1 member, 3 non-members, perfectly separated -> 1.0.
    assert attack_accuracy([5.0, 1.0, 2.0, 3.0], [1, 0, 0, 0]) == pytest.approx(1.0)


def test_membership_metrics_keys_and_values():
    m = membership_metrics(SCORES, LABELS)
    assert set(m) == {"attack_accuracy", "auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01"}
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["tpr_at_fpr_0.01"] == pytest.approx(2 / 3)


def test_roc_points_are_monotone():
    fpr, tpr, _ = roc_points(SCORES, LABELS)
    assert bool((fpr.diff() >= 0).all()) and bool((tpr.diff() >= 0).all())
    assert float(fpr[-1]) == 1.0 and float(tpr[-1]) == 1.0


def test_bad_input_is_a_one_line_error():
    with pytest.raises(DataError, match="length"):
        roc_auc([0.1, 0.2], [1, 0, 1])
    with pytest.raises(DataError, match="one member and one non-member"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(DataError, match="NaN"):
        roc_auc([float("nan"), 0.2], [1, 0])
    with pytest.raises(DataError, match="0 .non-member. or 1"):
        roc_auc([0.1, 0.2], [2, 0])
    with pytest.raises(ConfigError, match="fpr"):
        tpr_at_fpr(SCORES, LABELS, 1.5)
