"""Weighted k-nearest-neighbour monitor of an encoder's features (no training).

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(InstDisc), CVPR 2018, section 3.4, as the BadEncoder reference (jinyuan-jia/BadEncoder, after the
MoCo CIFAR-10 demo and leftthomas/SimCLR) uses it to follow SimCLR pre-training: features are
L2-normalised; a test image's k nearest memory-bank features by cosine similarity s_i vote for
their labels with weight exp(s_i / t); the class with the largest total weight is the prediction.
The reference uses k = 200 and t = 0.5, with the labelled training set as the memory bank and
the test split as the queries.

Deviation: when the memory bank holds fewer than k images, all of them vote (the reference would
fail); ties between classes go to the smaller label.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.data.types import ImageSet
from poisonlab.errors import ShapeError


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.5,
) -> torch.Tensor:
    """Predicted labels [N] of `features` [N, D] by weighted vote of their k nearest (cosine)
    neighbours in `bank` [M, D] with labels `bank_labels` [M]; weights exp(similarity / t)."""
    if features.dim() != 2 or bank.dim() != 2 or features.shape[1] != bank.shape[1]:
        raise ShapeError(
            f"kNN needs features [N, D] and a bank [M, D], got {list(features.shape)} and {list(bank.shape)}"
        )
    if bank_labels.shape != (bank.shape[0],) or bank.shape[0] == 0:
        raise ShapeError(f"kNN needs one label per bank feature, got {list(bank_labels.shape)} "
                         f"for {bank.shape[0]} features")
    sim = F.normalize(features, dim=1) @ F.normalize(bank, dim=1).T
    weight, index = sim.topk(k=min(k, bank.shape[0]), dim=1)
    labels = bank_labels.to(sim.device)[index]
    scores = torch.zeros(features.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
    scores.scatter_add_(1, labels, (weight / temperature).exp())
    return scores.argmax(1)


@torch.no_grad()
def encode(
    encoder: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Encoder features of `x` (eval mode, batched), on the CPU; the encoder's mode is restored."""
    if device is None:
        first = next(iter(encoder.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    was_training = encoder.training
    encoder.eval()
    out = [encoder(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return torch.cat(out) if out else torch.empty(0, getattr(encoder, "feature_dim", 0))


def knn_accuracy(
    encoder: nn.Module,
    memory: ImageSet,
    test: ImageSet,
    k: int = 200,
    temperature: float = 0.5,
    batch_size: int = 512,
    device: torch.device | None = None,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy (fraction) of the weighted kNN classifier over the encoder's features, with
    `memory` as the labelled bank and `test` as the queries."""
    if len(memory) == 0 or len(test) == 0:
        raise ShapeError(f"kNN needs a non-empty memory bank and test set, got {len(memory)} and {len(test)}")
    classes = num_classes or int(max(memory.y.max(), test.y.max())) + 1
    bank = encode(encoder, memory.x, batch_size, device)
    queries = encode(encoder, test.x, batch_size, device)
    correct = 0
    for i in range(0, len(test), batch_size):
        pred = knn_predict(queries[i : i + batch_size], bank, memory.y, classes, k, temperature)
        correct += int((pred == test.y[i : i + batch_size]).sum())
    return correct / len(test)
