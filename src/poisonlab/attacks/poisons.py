"""Clean-label poisons: which training images are perturbed, and by how much.

The one result type of the targeted clean-label poisoning attacks (gradient matching,
`attacks.gradient_matching`; MetaPoison, `attacks.metapoison`): `budget` training images of one
class (the poison class) receive an additive perturbation δ with ‖δ‖∞ ≤ ε, optionally after a
smooth colour transform R (MetaPoison's colour grid, attacks/recolor.py); labels never change.

    x̃_i = clip(R(x_i; g_i) + δ_i, 0, 1)   for i in indices,   x̃_j = x_j otherwise.

`save(path)` / `load(path)` keep poisons as one safetensors file (indices, δ, the grid and the
history as tensors, the colour space and a JSON history in its metadata), never a pickle, so a
file from someone else can be read safely.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from poisonlab.attacks.recolor import Recolor
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError, ShapeError, require_regular_file
from poisonlab.runs.checkpoints import save_weights

FORMAT = "poisonlab-poisons-v1"


def poison_images(x: Tensor, delta: Tensor, grid: Tensor | None, recolor: Recolor | None) -> Tensor:
    """clip(R(x; grid) + δ, 0, 1), or clip(x + δ, 0, 1) without a colour transform."""
    base = recolor.apply(x, grid) if recolor is not None and grid is not None else x
    return (base + delta).clamp(0.0, 1.0)


@dataclass
class Poisons:
    """indices: int64 [n], positions in the training set; delta: float32 [n, C, H, W], the
    additive perturbation of each poison ([0, 1] pixel units); grid: the colour offsets
    [n, G, G, G, 3] in `color_space` (MetaPoison), or None (no colour transform); history: the
    attack's loss record (MetaPoison: the adversarial loss [steps, M] of every surrogate at every
    craft step, NaN where a surrogate met no poison; gradient matching: a dict of curves)."""

    indices: Tensor
    delta: Tensor
    grid: Tensor | None = None
    history: Tensor | list | dict = field(default_factory=list)
    color_space: Literal["yuv", "luv"] = "yuv"

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def colour_grid(self) -> Tensor | None:
        """The colour grid (alias of `grid`)."""
        return self.grid

    @property
    def use_color(self) -> bool:
        return self.grid is not None

    def recolor(self) -> Recolor | None:
        """The colour transform the grid belongs to (None without a grid)."""
        if self.grid is None:
            return None
        return Recolor(grid_size=int(self.grid.shape[1]), space=self.color_space)

    def images(self, x: Tensor) -> Tensor:
        """The poisoned versions of the clean originals x [n, C, H, W]."""
        if x.shape != self.delta.shape:
            raise ShapeError(f"poison originals must be {tuple(self.delta.shape)}, got "
                             f"{tuple(x.shape)}")
        grid = self.grid.to(x) if self.grid is not None else None
        return poison_images(x, self.delta.to(x), grid, self.recolor())

    def apply(self, train: ImageSet) -> ImageSet:
        """A copy of `train` with x[indices] replaced by clip(R(x) + δ, 0, 1); labels
        unchanged, other images untouched. ShapeError when the indices or δ do not fit."""
        idx = self._check(train).to(train.x.device)
        x = train.x.clone()
        with torch.no_grad():
            x[idx] = self.images(train.x[idx])
        return ImageSet(x, train.y.clone())

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

    # ---- files -----------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the poisons to one safetensors file (`meta`: extra JSON-able facts, e.g. the
        target and the adversarial class, kept in its header)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"indices": self.indices.detach().cpu().long().contiguous(),
                   "delta": self.delta.detach().cpu().contiguous()}
        if self.grid is not None:
            tensors["grid"] = self.grid.detach().cpu().contiguous()
        history: Any = None
        if isinstance(self.history, Tensor):
            tensors["history"] = self.history.detach().cpu().contiguous()
        else:
            history = self.history
        header = {"format": FORMAT, "color_space": self.color_space,
                  "history": json.dumps(history), "meta": json.dumps(meta or {})}
        return save_weights(path, tensors, header)  # atomic, with the usual file permissions

    @classmethod
    def load(cls, path: str | Path) -> Poisons:
        """Poisons written by `save` (DataError naming the file when it is not one)."""
        poisons, _ = cls.load_with_meta(path)
        return poisons

    @classmethod
    def load_with_meta(cls, path: str | Path) -> tuple[Poisons, dict[str, Any]]:
        """(poisons, the `meta` given to `save`)."""
        path = Path(path)
        try:
            require_regular_file(path)
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)).get("__metadata__") or {}
        except (OSError, SafetensorError, ValueError) as exc:
            raise DataError(f"cannot read poisons file {path}: {str(exc).splitlines()[0]}") from None
        if header.get("format") != FORMAT or not {"indices", "delta"} <= tensors.keys():
            raise DataError(f"{path} is not a poisonlab poisons file")
        history = tensors["history"] if "history" in tensors else json.loads(header["history"])
        if history is None:
            history = []
        poisons = cls(tensors["indices"].long(), tensors["delta"], tensors.get("grid"), history,
                      header.get("color_space", "yuv"))
        return poisons, json.loads(header.get("meta") or "{}")


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
        members = members[torch.randperm(members.numel(), generator=generator).to(members.device)]
    return members[:budget].clone()
