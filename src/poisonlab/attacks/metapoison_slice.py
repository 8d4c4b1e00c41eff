"""A slice of MetaPoison's surrogate ensemble: the surrogates' training and meta-gradients.

MetaPoison (Huang et al., NeurIPS 2020; poisonlab.attacks.metapoison) trains M surrogates one
clean epoch per craft step and takes the meta-gradient of the unrolled adversarial loss on every
batch that holds poisons. The surrogates only meet through the sum of their meta-gradients, so
the ensemble splits into slices: `SurrogateSlice` holds some of the surrogates (by their global
member ids) with the crafting problem (`CraftTask`: the training set, the poisons' originals, the
target), and the crafting driver (`metapoison._Crafter`) keeps δ, the colour grid, Adam, the
random numbers and the step schedule. Each step the driver hands every slice its members' shuffles
and learning rates and the current δ and grid; each slice returns its `MetaGradient` (the sum over
its members and poison batches, and each member's mean adversarial loss); the driver adds them up.
The reference code does this with an MPI all-reduce over GPUs; here a slice is an actor of an
executor (poisonlab.executors: objects in this process, or Ray actors), and the driver's sum is
the all-reduce.

A slice draws no random numbers: the driver draws every one (the shuffles, the re-initialisation
seeds), so the slices' results depend only on their inputs, and one slice holding all M members
computes exactly what the undivided ensemble did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import functional_call

from poisonlab.attacks.poisons import poison_images
from poisonlab.attacks.recolor import Recolor
from poisonlab.attacks.unrolled_ensemble import ModelFactory, SurrogateEnsemble
from poisonlab.config import Settings
from poisonlab.errors import ConfigError, ShapeError


@dataclass
class CraftTask:
    """One crafting problem, validated and on the device: the training set x, y; the poisons'
    clean originals `base` at their indices `idx`; `slot_of[i]` the poison slot of training image
    i (-1: not a poison); the target images and the adversarial class."""

    x: Tensor
    y: Tensor
    base: Tensor
    slot_of: Tensor
    idx: Tensor
    target: Tensor
    adv_label: int


@dataclass
class MetaGradient:
    """What a slice returns from a meta-epoch (on the CPU): the meta-gradients in δ and the grid
    summed over its members and their poison batches, and each member's mean adversarial loss
    [members] (NaN for a member whose epoch had no poison batch)."""

    g_delta: Tensor
    g_grid: Tensor
    losses: Tensor


def member_groups(members: int, slices: int) -> list[list[int]]:
    """The members 0..members-1 split into `slices` runs of consecutive ids, sizes within one."""
    return [list(range(members * i // slices, members * (i + 1) // slices))
            for i in range(slices)]


def check_fit(ens: SurrogateEnsemble, task: CraftTask) -> None:
    """Images the surrogate cannot take, or an adversarial class it does not have: one line."""
    one = {n: p[0] for n, p in ens.params.items()}
    try:
        z = functional_call(ens.fmodel, one, (task.x[:2],))
    except RuntimeError as exc:
        raise ShapeError(f"images of size {list(task.x.shape[1:])} do not fit the surrogate: "
                         f"{str(exc).splitlines()[0]}") from None
    if z.dim() != 2:
        raise ShapeError(f"the surrogate must return logits [N, classes], got {tuple(z.shape)}")
    if not 0 <= task.adv_label < z.shape[1]:
        raise ConfigError(f"adversarial class {task.adv_label} is out of range: the surrogate "
                          f"has {z.shape[1]} classes")


class SurrogateSlice:
    """The surrogates `members` (global ids) of the ensemble and the crafting problem; see the
    module docstring. Built once per crafting, as an actor: `SurrogateSlice(members=...,
    model_factory=..., config=..., task=..., recolor=...)`, `config` a MetaPoison.Config (typed
    as its base here: this module sits below metapoison.py, which imports it)."""

    def __init__(self, members: Sequence[int], *, model_factory: ModelFactory,
                 config: Settings, task: CraftTask, recolor: Recolor | None) -> None:
        self.members = list(members)
        self.local = {m: i for i, m in enumerate(self.members)}
        self.c, self.task, self.recolor = config, task, recolor
        self.ens = SurrogateEnsemble(model_factory, len(self.members), task.x.device)
        check_fit(self.ens, task)

    def _local(self, members: Sequence[int]) -> list[int]:
        return [self.local[m] for m in members]

    def reinitialise(self, members: Sequence[int], seeds: Sequence[int]) -> None:
        """Fresh weights for `members` (global ids), member m from torch.manual_seed(seed)."""
        self.ens.reinitialise(self._local(members), seeds)

    def epoch(self, members: Sequence[int], perms: Tensor, lrs: Sequence[float],
              delta: Tensor | None = None, grid: Tensor | None = None) -> MetaGradient | None:
        """One clean epoch for each of `members` (global ids; none: nothing to do) on its drop-last
        batches perms [members, batches, batch_size] at its learning rate. With δ and the grid:
        the meta-gradient taken before the training step on every batch holding poisons, summed."""
        if not members:
            return None
        t = self.task
        who = torch.tensor(self._local(members), device=t.x.device)
        lr_t = torch.tensor(list(lrs), dtype=t.x.dtype, device=t.x.device)
        acc = None
        if delta is not None and grid is not None:
            acc = _Accumulator(delta.to(t.base).detach().requires_grad_(True),
                               grid.to(t.base).detach().requires_grad_(True), len(members))
        for b in range(perms.shape[1]):
            if acc is not None:
                self._meta_batch(who, perms, b, lr_t, acc)
            ids = perms[:, b].to(t.x.device)
            self.ens.train_step(who, t.x[ids], t.y[ids], t.target, lr_t)
        return None if acc is None else acc.result()

    def _meta_batch(self, who: Tensor, perms: Tensor, b: int, lrs: Tensor,
                    acc: _Accumulator) -> None:
        c, t = self.c, self.task
        n_batches = perms.shape[1]
        slots = t.slot_of[perms[:, b]]
        rows = torch.nonzero((slots >= 0).any(1)).flatten()
        if len(rows) == 0:
            return
        delta, grid = acc.delta, acc.grid
        for chunk in rows.split(c.chunk or len(rows)):
            stage = torch.stack([perms[chunk, (b + k) % n_batches]
                                 for k in range(c.unroll_steps + 1)], 1).to(t.x.device)
            xs, ys = t.x[stage], t.y[stage]
            slot = slots[chunk].to(t.x.device)
            poisons = poison_images(t.base, delta, grid, self.recolor)
            x0 = torch.where((slot >= 0).view(*slot.shape, 1, 1, 1),
                             poisons[slot.clamp(min=0)], xs[:, 0])
            xs = torch.cat([x0.unsqueeze(1), xs[:, 1:]], 1)
            losses = self.ens.adversarial_losses(who[chunk], xs, ys, t.target, lrs[chunk],
                                                 t.adv_label)
            objective = losses.sum()
            if self.recolor is not None and c.smoothness > 0:
                objective = objective + len(chunk) * c.smoothness * self.recolor.smoothness(grid)
            acc.add(objective, chunk, losses.detach().cpu(), self.recolor is not None)

    def params(self) -> dict[str, Tensor]:
        """A detached CPU copy of this slice's weights, params[name] [members, ...]."""
        return {n: p.detach().cpu().clone() for n, p in self.ens.params.items()}

    def load(self, params: dict[str, Tensor]) -> None:
        """Weights from `params()` of a slice with the same members (a checkpoint)."""
        mine = self.ens.params
        if set(params) != set(mine) or any(params[n].shape != mine[n].shape for n in mine):
            raise ShapeError("resume state does not fit these poisons, settings or surrogate")
        for n, p in params.items():
            mine[n] = p.to(mine[n]).clone()


class _Accumulator:
    """Meta-gradients in the leaves `delta` and `grid` summed over poison batches and members;
    the adversarial loss per member (positions 0..members-1 of the epoch's member list)."""

    def __init__(self, delta: Tensor, grid: Tensor, members: int) -> None:
        self.delta, self.grid = delta, grid
        self.g_delta, self.g_grid = torch.zeros_like(delta), torch.zeros_like(grid)
        self.total, self.count = torch.zeros(members, dtype=torch.float64), torch.zeros(members)

    def add(self, objective: Tensor, who: Tensor, losses: Tensor, color: bool) -> None:
        if color:
            g_delta, g_grid = torch.autograd.grad(objective, [self.delta, self.grid])
            self.g_grid += g_grid
        else:
            (g_delta,) = torch.autograd.grad(objective, [self.delta])
        self.g_delta += g_delta
        self.total.index_add_(0, who, losses.double())
        self.count.index_add_(0, who, torch.ones(len(who)))

    def result(self) -> MetaGradient:
        losses = (self.total / self.count.clamp(min=1)).float()
        losses[self.count == 0] = math.nan
        return MetaGradient(self.g_delta.cpu(), self.g_grid.cpu(), losses)
