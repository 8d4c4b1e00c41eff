"""Clean-label poisons: which training images are perturbed, and by how much.

The result type shared by the targeted clean-label poisoning attacks (gradient matching,
`attacks.gradient_matching`; MetaPoison, `attacks.metapoison`): `budget` training images of one
class (the poison class) receive an additive perturbation δ with ‖δ‖∞ ≤ ε, optionally after a
colour transform (MetaPoison's colour grid); their labels never change.

    x̃_i = clip(recolour(x_i) + δ_i, 0, 1)   for i in indices,   x̃_j = x_j otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, ShapeError


@dataclass
class Poisons:
    """indices: int64 [n], positions in the training set; delta: float32 [n, C, H, W], the
    additive perturbation of each poison (pixel units, [0, 1] images); colour_grid: the colour
    transform's grid of offsets (MetaPoison) or None; history: the attack's loss curve(s)."""

    indices: Tensor
    delta: Tensor
    colour_grid: Tensor | None = None
    history: list[float] | dict = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.indices.numel())

    def apply(self, train: ImageSet) -> ImageSet:
        """A copy of `train` with x[indices] replaced by clip(recolour(x) + δ, 0, 1); labels
        unchanged. ShapeError when the indices or δ do not fit `train`."""
        idx = self._check(train)
        x = train.x.clone()
        base = self.recolour(x[idx])
        x[idx] = (base + self.delta.to(x.device, x.dtype)).clamp(0.0, 1.0)
        return ImageSet(x, train.y.clone())

    def recolour(self, x: Tensor) -> Tensor:
        """The colour transform applied before δ (hook for MetaPoison's colour grid): the
        identity when `colour_grid` is None."""
        if self.colour_grid is None:
            return x
        raise NotImplementedError("colour-grid poisons are applied by MetaPoison's recolour "
                                  "transform (attacks.recolor), not wired in here yet")

    def _check(self, train: ImageSet) -> Tensor:
        idx = torch.as_tensor(self.indices, dtype=torch.long).reshape(-1)
        if self.delta.shape[:1] != idx.shape:
            raise ShapeError(f"poisons: {idx.numel()} indices but {self.delta.shape[0]} "
                             "perturbations")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(train)):
            raise ShapeError(f"poisons: indices must lie in [0, {len(train)}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        if idx.unique().numel() != idx.numel():
            raise ShapeError("poisons: indices repeat")
        if tuple(self.delta.shape[1:]) != tuple(train.x.shape[1:]):
            raise ShapeError(f"poisons: perturbations of shape {tuple(self.delta.shape[1:])} do "
                             f"not fit images of shape {tuple(train.x.shape[1:])}")
        return idx


def select_poisons(train: ImageSet, poison_class: int, budget: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """Indices of `budget` training images of `poison_class`: the first ones in order (as the
    MetaPoison reference code does), or a random choice drawn with `generator`. ConfigError when
    the class holds fewer than `budget` images."""
    if budget < 1:
        raise ConfigError(f"budget must be at least 1, got {budget}")
    members = (train.y == poison_class).nonzero().reshape(-1)
    if budget > members.numel():
        raise ConfigError(f"budget {budget} is larger than the poison class {poison_class} "
                          f"({members.numel()} training images)")
    if generator is not None:
        members = members[torch.randperm(members.numel(), generator=generator)]
    return members[:budget].clone()
