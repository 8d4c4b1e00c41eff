"""Input checks and the scaled confidence shared by the membership attacks."""

from __future__ import annotations

import torch

from poisonlab.errors import ShapeError


def check_records(outputs: torch.Tensor, labels: torch.Tensor, what: str = "outputs") -> None:
    """One-line ShapeError unless `outputs` is [N, classes] and `labels` [N] class indices in range."""
    if outputs.dim() != 2:
        raise ShapeError(f"{what} must be [records, classes], got shape {tuple(outputs.shape)}")
    if labels.dim() != 1 or labels.shape[0] != outputs.shape[0]:
        raise ShapeError(
            f"{what} and labels differ in length ({outputs.shape[0]} vs {tuple(labels.shape)})"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= outputs.shape[1]):
        raise ShapeError(f"labels must lie in [0, {outputs.shape[1] - 1}]")


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log(p_y) − log(Σ_{j≠y} p_j) from logits, computed stably: z_y − logsumexp_{j≠y} z_j.

    The logit-scaled confidence of Carlini et al. 2022 (close to Gaussian across models).
    """
    check_records(logits, labels, "logits")
    z = logits.double()
    z_y = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf"))
    return (z_y - torch.logsumexp(others, dim=1)).float()


def as_index(labels: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(labels).long().flatten()
