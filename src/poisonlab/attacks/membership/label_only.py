"""Label-only membership inference from the robustness of the predicted label.

Choquette-Choo, Tramèr, Carlini, Papernot, "Label-Only Membership Inference Attacks", ICML 2021.
The attacker sees only predicted labels. Training records tend to stay correctly classified under
small perturbations (the model is further from its decision boundary there), so the score is the
fraction of queries — the record under each augmentation (flips, shifts of a few pixels) and
under random Gaussian noise — whose predicted label equals the true label. This shows that hiding
the scores (labels-only output) does not stop membership inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.membership.common import as_index
from poisonlab.errors import ConfigError, DataError
from poisonlab.training.supervised import predict_logits

Transform = Callable[[torch.Tensor], torch.Tensor]
LabelOracle = Callable[[torch.Tensor], torch.Tensor]


def shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate images [N, C, H, W] by (dy, dx) pixels, filling with zeros."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    xp = F.pad(x, (p, p, p, p))
    return xp[..., p - dy : p - dy + h, p - dx : p - dx + w]


def default_augmentations(max_shift: int = 1, flip: bool = True) -> list[Transform]:
    """Identity, every shift by up to `max_shift` pixels on each axis, and each with a flip."""
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    out: list[Transform] = [lambda x, s=s: shift(x, *s) for s in shifts]
    if flip:
        out += [lambda x, s=s: shift(x.flip(-1), *s) for s in shifts]
    return out


def label_oracle(model: nn.Module) -> LabelOracle:
    """The model behind a labels-only interface: x -> predicted labels [N]."""
    return lambda x: predict_logits(model, x).argmax(1)


class LabelOnlyAttack:
    """Fraction of perturbed queries still labelled correctly; `infer(oracle, x, labels)`."""

    def __init__(
        self,
        augmentations: Sequence[Transform] | None = None,
        noise_std: float = 0.0,
        noise_samples: int = 0,
        seed: int = 0,
    ) -> None:
        if noise_std < 0 or noise_samples < 0 or (noise_samples > 0 and noise_std == 0):
            raise ConfigError(
                f"need noise_std > 0 with noise_samples > 0 (got {noise_std}, {noise_samples})"
            )
        self.augmentations = list(augmentations) if augmentations is not None else default_augmentations()
        self.noise_std, self.noise_samples, self.seed = noise_std, noise_samples, seed
        if not self.augmentations and noise_samples == 0:
            raise ConfigError("the label-only attack needs augmentations or noise samples")

    @torch.no_grad()
    def infer(self, oracle: LabelOracle, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scores [N] in [0, 1] from predicted labels only."""
        labels = as_index(labels)
        if x.shape[0] != labels.shape[0]:
            raise DataError(f"images and labels differ in length ({x.shape[0]} vs {labels.shape[0]})")
        gen = torch.Generator().manual_seed(self.seed)
        correct = torch.zeros(len(labels))
        for t in self.augmentations:
            correct += (oracle(t(x)).cpu() == labels).float()
        for _ in range(self.noise_samples):
            noise = torch.randn(x.shape, generator=gen) * self.noise_std
            correct += (oracle((x + noise.to(x.device)).clamp(0, 1)).cpu() == labels).float()
        return correct / (len(self.augmentations) + self.noise_samples)
