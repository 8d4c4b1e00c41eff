"""The anomaly index Neural Cleanse decides by: how far below the other labels' a label's
minimal trigger size lies, in robust standard deviations (median and MAD).

    index(l) = |l1_l − median(l1)| / (1.4826 · MAD(l1))

Labels below the median with an index above the threshold (2 in the paper) are flagged.
"""

from __future__ import annotations

import torch

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal standard deviation
MIN_LABELS = 3  # the fewest labels whose mask sizes the MAD anomaly index can tell apart


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """|norm − median| / (1.4826·MAD) along the last axis (0 where all norms are equal)."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    median = torch.quantile(norms, 0.5, dim=-1, keepdim=True)
    dev = (norms - median).abs()
    mad = MAD_CONSISTENCY * torch.quantile(dev, 0.5, dim=-1, keepdim=True)
    return torch.where(mad == 0, torch.zeros_like(dev), dev / mad.clamp_min(1e-300))


def below_median(norms: torch.Tensor) -> torch.Tensor:
    """Which labels' norms lie below the median (along the last axis)."""
    norms = torch.as_tensor(norms, dtype=torch.float64)
    return norms < torch.quantile(norms, 0.5, dim=-1, keepdim=True)


def flagged_labels(norms: torch.Tensor, threshold: float = 2.0) -> list[int]:
    """Labels whose trigger is smaller than the median with an anomaly index above `threshold`."""
    index = anomaly_index(norms)
    return [int(i) for i in torch.nonzero(below_median(norms) & (index > threshold)).flatten()]
