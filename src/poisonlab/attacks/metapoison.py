"""MetaPoison: clean-label poisons crafted through unrolled training of a staggered surrogate ensemble.

Huang, Geiping, Fowl, Taylor, Goldstein, "MetaPoison: Practical General-purpose Clean-label Data
Poisoning", NeurIPS 2020 (Algorithm 1). A few training images of one class (the poisons; their
labels never change) are perturbed so that a network trained from scratch on the poisoned set
classifies one target image of another class as the adversarial class. The bilevel problem

    min_{δ, g} L_adv(θ*(δ, g)),   θ*(δ, g) = argmin_θ Σ_i CE(f(x_i(δ, g); θ), y_i),
    x_p(δ, g) = clip(R(x_p; g_p) + δ_p, 0, 1),  ‖δ_p‖∞ ≤ ε,  ‖g_p‖∞ ≤ ε_c,

(R the smooth colour transform of attacks/recolor.py) is approximated by unrolling K SGD steps
from the weights of M surrogates spread over training (attacks/unrolled_ensemble.py has the
unrolled loss L_adv: the Carlini–Wagner margin averaged over the unrolled stages 1..K).

One craft step s, as the reference code (wronnyhuang/metapoison, main.py, meta.py, data.py) does:
- surrogate m is at epoch e_m = (m·stagger + s) mod (M·stagger); at e_m = 0 (for s > 0) it is
  re-initialised; at s = 0 surrogate m is first trained m·stagger clean epochs from scratch;
- each surrogate trains one clean epoch (its own shuffle, drop-last batches of `batch_size`,
  plain SGD at lr(e) = lr · min(1, (e+1)/warmup) · 0.1^(milestones passed), the target image in
  every batch for the batch-norm statistics only);
- before its training step on a batch that holds at least one poison, the surrogate takes the
  meta-gradient there: the poisons replace their clean originals in that batch (stage 0), the
  next K batches of its epoch (cyclically) are stages 1..K, clean;
- the meta-gradients of (L_adv + λ·S(g)) (S the colour smoothness, added once per poison batch)
  are summed over the poison batches and the surrogates and divided by M; one Adam step
  (β = 0.9, 0.999) at craft_lr · min(1, ((s+1)/5)²) · (1, 0.1, 0.01 from steps 20, 40); then
  δ is clipped to ±ε and the grid to ±ε_c and the colour range.
Step 0 starts from δ uniform in ±ε (clipped so that x + δ is a valid image) and the zero grid.

Where it runs: the surrogates live in `slices` SurrogateSlice actors (attacks/metapoison_slice.py;
an executor's actors, by default one object in this process) that each hold consecutive members;
the driver here keeps δ, the grid, Adam, the random generator (it draws every random number: the
random start, the re-initialisation seeds, each member's shuffle, in the order above), the step
schedule and the surrogates' ages. Every craft step it sends each slice its members' shuffles and
learning rates with δ and the grid, sums the meta-gradients the slices return, divides by M and
steps Adam: the reference's MPI all-reduce. One slice computes exactly the undivided ensemble;
more, the same up to float rounding. The checkpoint (`CraftState`) holds the weights of all M
members gathered in member order, so a crafting resumes with any number of slices.

Units: pixels are in [0, 1] here and in [0, 255] in the reference, so ε = 8/255 is the
reference's 8, and its craft rate 200 (pixel units) is 200/255 for δ. Adam's step does not depend
on the gradient's scale, so this gives the reference's trajectory of δ. The colour grid has the
same units in both (YUV of a [0, 1] image), so it gets the reference's rate, 200, unconverted:
with it every Adam step moves an offset far past ±ε_c, so the grid is in effect a signed step onto
the box, as in the reference.

Deviations from the reference code, and why:
- pixels are clipped to [0, 1] after the colour transform and δ, while crafting and in
  `Poisons.apply` (the reference leaves them unclipped): a poisoned set must be a set of valid
  images, and crafting should optimise the images the victim will see;
- the reference's graph appends the poisons of the stage-0 batch (their gradient stopped) to every
  later stage too, and drops from the later batches the rows the stage-0 poisons displaced; here
  stages 1..K are the plain clean batches, as the paper's algorithm and our specification say;
- surrogates train without running batch-norm statistics (crafting never uses them);
- the colour grid spans the whole gamut of its colour space (see attacks/recolor.py);
- Adam is torch's, whose ε sits outside the bias-corrected √v̂ (TensorFlow's inside): the same up
  to ε = 1e-8.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from poisonlab.attacks.metapoison_slice import (
    CraftTask,
    MetaGradient,
    SurrogateSlice,
    member_groups,
)
from poisonlab.attacks.poisons import Poisons, select_poisons
from poisonlab.attacks.recolor import Recolor
from poisonlab.attacks.unrolled_ensemble import ModelFactory
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.executors import Actors, Executor, LocalExecutor
from poisonlab.progress import StatusFn


@dataclass
class CraftState:
    """Everything needed to continue crafting after `step` craft steps (for `resume`)."""

    step: int
    delta: Tensor
    grid: Tensor
    adam: dict
    params: dict[str, Tensor]
    ages: list[int]
    generator: Tensor
    history: list[Tensor] = field(default_factory=list)


class MetaPoison:
    """`MetaPoison(model_factory).craft(train, poison_idx, target_x, adv_label) -> Poisons`."""

    class Config(Settings):
        """budget: poisons to choose (`choose_poisons`); poison_choice: the first `budget` images
        of the poison class in index order (the reference) or a seeded random choice.
        epsilon: ‖δ‖∞ bound in [0, 1] pixel units (8/255 = the reference's 8).
        color_epsilon: bound on each colour offset ε_c (0 disables the colour transform);
        grid_size: colour grid points per axis; color_space: "yuv" (reference code) or "luv";
        smoothness: weight λ of the colour smoothness penalty.
        unroll_steps: K; ensemble: M surrogates; stagger: epochs between successive surrogates.
        craft_steps: outer steps (the reference's 61); random_start: δ starts uniform in ±ε.
        lr, warmup_epochs, lr_milestones, batch_size: the surrogates' plain SGD (lr × 0.1 at
        each milestone epoch, linear warm-up over warmup_epochs).
        craft_lr: Adam's rate in [0, 255] pixel units (δ moves at craft_lr/255 in [0, 1] units,
        the colour grid at craft_lr); craft_warmup: quadratic warm-up steps; craft_milestones:
        steps where the rate drops ×0.1 (each).
        chunk: surrogates per batched meta-gradient computation (None: all at once; smaller
        saves memory, same result).
        slices: the ensemble split into this many slices of consecutive surrogates, each an
        actor of `craft`'s executor (a Ray actor with `--backend ray`; without an executor, in
        this process); 1 computes exactly the undivided ensemble, more the same up to float
        rounding (the meta-gradients are summed in another order)."""

        budget: int = Field(50, ge=1)
        poison_choice: Literal["first", "random"] = "first"
        epsilon: float = Field(8 / 255, ge=0.0, le=1.0)
        color_epsilon: float = Field(0.04, ge=0.0, le=1.0)
        grid_size: int = Field(10, ge=2, le=64)
        color_space: Literal["yuv", "luv"] = "yuv"
        smoothness: float = Field(1.0, ge=0.0)
        unroll_steps: int = Field(2, ge=1)
        ensemble: int = Field(24, ge=1)
        stagger: int = Field(1, ge=1)
        craft_steps: int = Field(61, ge=1)
        random_start: bool = True
        lr: float = Field(0.1, gt=0.0)
        warmup_epochs: int = Field(5, ge=0)
        lr_milestones: tuple[int, ...] = (100, 150, 200)
        batch_size: int = Field(125, ge=1)
        craft_lr: float = Field(200.0, gt=0.0)
        craft_warmup: int = Field(5, ge=0)
        craft_milestones: tuple[int, ...] = (20, 40)
        chunk: int | None = Field(None, ge=1)
        slices: int = Field(1, ge=1)

        @model_validator(mode="after")
        def _sorted_milestones(self) -> MetaPoison.Config:
            for key in ("lr_milestones", "craft_milestones"):
                values = getattr(self, key)
                if list(values) != sorted(values):
                    raise ValueError(f"{key} must be increasing, got {list(values)}")
            if self.slices > self.ensemble:
                raise ValueError(f"slices ({self.slices}) must be at most ensemble "
                                 f"({self.ensemble}): every slice holds a surrogate")
            return self

    def __init__(self, model_factory: ModelFactory, *, config: Config | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.model_factory = model_factory
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()
        c = self.config
        self.recolor = (Recolor(grid_size=c.grid_size, epsilon=c.color_epsilon, space=c.color_space)
                        if c.color_epsilon > 0 else None)

    # ---- schedules -------------------------------------------------------------------------
    def surrogate_epoch(self, member: int, step: int) -> int:
        """e_m(s) = (m·stagger + s) mod (M·stagger): the epoch surrogate m trains at step s."""
        c = self.config
        return (member * c.stagger + step) % (c.ensemble * c.stagger)

    def surrogate_lr(self, epoch: int) -> float:
        """The reference's lr_schedule: linear warm-up, ×0.1 at each milestone passed."""
        c = self.config
        warm = min(1.0, (epoch + 1) / c.warmup_epochs) if c.warmup_epochs > 0 else 1.0
        drops = sum(epoch >= m for m in c.lr_milestones)
        return c.lr * warm * 0.1 ** drops

    def craft_lr(self, step: int) -> float:
        """The reference's cr_schedule (pixel units): quadratic warm-up, ×0.1 per milestone."""
        c = self.config
        warm = min(1.0, ((step + 1) / c.craft_warmup) ** 2) if c.craft_warmup > 0 else 1.0
        drops = sum(step >= m for m in c.craft_milestones)
        return c.craft_lr * warm * 0.1 ** drops

    # ---- poisons ---------------------------------------------------------------------------
    def choose_poisons(self, train: ImageSet, poison_class: int) -> Tensor:
        """`budget` indices of training images of `poison_class` (first ones, or seeded random)."""
        if self.config.poison_choice == "first":
            return select_poisons(train, poison_class, self.config.budget)
        g = torch.Generator().manual_seed(self.seed)
        return select_poisons(train, poison_class, self.config.budget, g).sort().values

    def craft(self, train: ImageSet, poison_idx: Tensor, target_x: Tensor, adv_label: int, *,
              target_label: int | None = None, progress: StatusFn | None = None,
              checkpoint: Callable[[CraftState], None] | None = None,
              resume: CraftState | None = None, executor: Executor | None = None,
              cpus: int = 1) -> Poisons:
        """Craft δ and the colour grids of the training images `poison_idx` so that surrogates
        trained on the poisoned set classify `target_x` ([C, H, W] or [T, C, H, W]) as
        `adv_label`. `target_label` (the target's true class), if given, is checked against the
        poison class. `checkpoint` receives the state after every step; `resume` continues one
        (whatever the number of slices that saved it). The `slices` surrogate slices are actors
        of `executor` (None: objects in this process), each holding `cpus` CPU cores."""
        task = _validate(self, train, poison_idx, target_x, adv_label, target_label)
        groups = member_groups(self.config.ensemble, self.config.slices)
        shared = {"model_factory": self.model_factory, "config": self.config, "task": task,
                  "recolor": self.recolor}
        slices = (executor or LocalExecutor()).start_actors(
            SurrogateSlice, [{"members": g} for g in groups], shared=shared, cpus=cpus)
        try:
            crafter = _Crafter(self, task, slices, groups)
            return crafter.run(progress=progress, checkpoint=checkpoint, resume=resume)
        finally:
            slices.close()


def _validate(attack: MetaPoison, train: ImageSet, poison_idx: Tensor, target_x: Tensor,
              adv_label: int, target_label: int | None) -> CraftTask:
    """The inputs checked (one-line ShapeError/ConfigError naming the problem) and on the device."""
    c, dev = attack.config, attack.device
    if train.x.dim() != 4 or train.y.shape != (train.x.shape[0],):
        raise ShapeError(f"train must hold images [N, C, H, W] and labels [N], got "
                         f"{tuple(train.x.shape)} and {tuple(train.y.shape)}")
    n_train, shape = len(train), tuple(train.x.shape[1:])
    idx = torch.as_tensor(poison_idx).flatten().long().cpu()
    if len(idx) == 0 or int(idx.min()) < 0 or int(idx.max()) >= n_train:
        raise ShapeError(f"poison_idx must be non-empty indices into the {n_train} training images")
    if len(idx.unique()) != len(idx):
        raise ShapeError("poison_idx holds an index twice")
    target = target_x.unsqueeze(0) if target_x.dim() == 3 else target_x
    if target.dim() != 4 or tuple(target.shape[1:]) != shape:
        raise ShapeError(f"target images must be {list(shape)} like the training images, "
                         f"got {tuple(target_x.shape)}")
    poison_classes = sorted(set(train.y[idx].tolist()))
    if target_label is not None and int(target_label) in poison_classes:
        raise ConfigError(f"the target is of the poison class {int(target_label)}: pick a target "
                          "of another class")
    if c.batch_size > n_train:
        raise ConfigError(f"batch_size {c.batch_size} is larger than the training set ({n_train})")
    if attack.recolor is not None and shape[0] != 3:
        raise ConfigError(f"the colour transform needs RGB images, these have {shape[0]} "
                          "channels (set color_epsilon=0)")
    slot_of = torch.full((n_train,), -1, dtype=torch.long)
    slot_of[idx] = torch.arange(len(idx))
    x = train.x.to(dev)
    return CraftTask(x=x, y=train.y.to(dev), base=x[idx.to(dev)], slot_of=slot_of, idx=idx,
                 target=target.to(x), adv_label=int(adv_label))


class _Crafter:
    """The driver of one `MetaPoison.craft` call: δ, the grid, Adam, the random numbers, the
    step schedule and the surrogates' ages; the surrogates themselves live in `slices`, slice i
    holding the members groups[i] (see poisonlab.attacks.metapoison_slice)."""

    def __init__(self, attack: MetaPoison, task: CraftTask, slices: Actors,
                 groups: list[list[int]]) -> None:
        self.attack, self.c, self.task = attack, attack.config, task
        self.slices, self.groups = slices, groups
        self.gen = torch.Generator().manual_seed(attack.seed)
        self.recolor = attack.recolor
        n = len(task.base)
        self.delta = torch.zeros_like(task.base, requires_grad=True)
        g = self.c.grid_size
        self.grid = torch.zeros(n, g, g, g, 3, dtype=task.base.dtype, device=task.base.device,
                                requires_grad=True)
        self.opt = torch.optim.Adam([{"params": [self.delta]}, {"params": [self.grid]}], lr=1.0,
                                    betas=(0.9, 0.999), eps=1e-8)
        self.ages = [0] * self.c.ensemble
        self.history: list[Tensor] = []
        self.step = 0

    def run(self, progress: StatusFn | None, checkpoint: Callable[[CraftState], None] | None,
            resume: CraftState | None) -> Poisons:
        if resume is not None:
            self._restore(resume)
        else:
            self._fresh()
        for s in range(self.step, self.c.craft_steps):
            self.history.append(self._craft_step(s))
            self.step = s + 1
            if progress is not None:
                progress(f"step {s + 1}/{self.c.craft_steps} "
                         f"adversarial loss {float(self.history[-1].nanmean()):.3f}")
            if checkpoint is not None:
                checkpoint(self.state())
        grid = self.grid.detach().cpu() if self.recolor is not None else None
        return Poisons(indices=self.task.idx.clone(), delta=self.delta.detach().cpu(), grid=grid,
                       history=torch.stack(self.history), color_space=self.c.color_space)

    def _fresh(self) -> None:
        c, base = self.c, self.task.base
        with torch.no_grad():
            if c.random_start:
                noise = (torch.rand(base.shape, generator=self.gen, dtype=base.dtype) * 2 - 1)
                d = (base + noise.to(base) * c.epsilon).clamp(0, 1) - base
                self.delta.copy_(d.clamp(-c.epsilon, c.epsilon))
        self._reinitialise(list(range(c.ensemble)))
        for epoch in range(max(m * c.stagger for m in range(c.ensemble))):
            members = [m for m in range(c.ensemble) if m * c.stagger > epoch]
            self._epoch(members, [self.attack.surrogate_lr(epoch)] * len(members), meta=False)

    def _split(self, members: list[int]) -> list[list[int]]:
        """For each slice, the positions in `members` of the members it holds."""
        where = {m: i for i, group in enumerate(self.groups) for m in group}
        out: list[list[int]] = [[] for _ in self.groups]
        for pos, m in enumerate(members):
            out[where[m]].append(pos)
        return out

    def _reinitialise(self, members: list[int]) -> None:
        seeds = torch.randint(0, 2**62, (len(members),), generator=self.gen).tolist()
        self.slices.call("reinitialise", [
            {"members": [members[i] for i in rows], "seeds": [seeds[i] for i in rows]}
            for rows in self._split(members)])
        for m in members:
            self.ages[m] = 0

    def _craft_step(self, s: int) -> Tensor:
        c, a = self.c, self.attack
        epochs = [a.surrogate_epoch(m, s) for m in range(c.ensemble)]
        if s > 0:
            wrapped = [m for m, e in enumerate(epochs) if e == 0]
            if wrapped:
                self._reinitialise(wrapped)
        parts = self._epoch(list(range(c.ensemble)), [a.surrogate_lr(e) for e in epochs],
                            meta=True)
        g_delta, g_grid = parts[0].g_delta, parts[0].g_grid  # the all-reduce: summed in order
        for part in parts[1:]:
            g_delta, g_grid = g_delta + part.g_delta, g_grid + part.g_grid
        self.delta.grad = g_delta.to(self.delta) / c.ensemble
        self.grid.grad = g_grid.to(self.grid) / c.ensemble
        self._adam_step(a.craft_lr(s))
        losses = torch.full((c.ensemble,), math.nan)
        for group, part in zip(self.groups, parts, strict=True):
            losses[group] = part.losses
        return losses

    def _adam_step(self, lr: float) -> None:
        """Adam on δ at lr/255 and on the grid at lr (see the module docstring), then project."""
        groups = self.opt.param_groups
        groups[0]["lr"], groups[1]["lr"] = lr / 255.0, lr  # δ: pixel units → [0, 1] units
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.delta.clamp_(-self.c.epsilon, self.c.epsilon)
            if self.recolor is not None:
                self.grid.copy_(self.recolor.project(self.grid))
            else:
                self.grid.zero_()

    def _epoch(self, members: list[int], lrs: list[float], meta: bool) -> list[MetaGradient]:
        """One clean epoch for each of `members` (own shuffle, drop-last batches; the shuffles
        drawn here, member by member, and handed to the slices holding them); with `meta`, each
        slice's summed meta-gradient at the current δ and grid."""
        c, n = self.c, len(self.task.y)
        n_batches = n // c.batch_size
        perms = torch.stack([torch.randperm(n, generator=self.gen)[: n_batches * c.batch_size]
                             for _ in members]).view(len(members), n_batches, c.batch_size)
        split = self._split(members)
        per_slice = [{"members": [members[i] for i in rows],
                      "perms": perms if len(rows) == len(members) else perms[rows],
                      "lrs": [lrs[i] for i in rows]} for rows in split]
        common = {"delta": self.delta.detach(), "grid": self.grid.detach()} if meta else {}
        parts = self.slices.call("epoch", per_slice, **common)
        for m in members:
            self.ages[m] += 1
        return parts

    def state(self) -> CraftState:
        """A detached copy of the crafting state after `self.step` steps (on the CPU); the
        weights gathered from the slices in member order."""
        parts = self.slices.call("params")
        params = parts[0] if len(parts) == 1 else {
            n: torch.cat([part[n] for part in parts]) for n in parts[0]}
        return CraftState(
            step=self.step, delta=self.delta.detach().cpu().clone(),
            grid=self.grid.detach().cpu().clone(), adam=copy.deepcopy(self.opt.state_dict()),
            params=params, ages=list(self.ages), generator=self.gen.get_state(),
            history=list(self.history))

    def _restore(self, state: CraftState) -> None:
        m = self.c.ensemble
        if state.delta.shape != self.delta.shape or state.grid.shape != self.grid.shape or \
                len(state.ages) != m or any(p.dim() == 0 or p.shape[0] != m
                                            for p in state.params.values()):
            raise ShapeError("resume state does not fit these poisons, settings or surrogate")
        with torch.no_grad():
            self.delta.copy_(state.delta)
            self.grid.copy_(state.grid)
        self.opt.load_state_dict(copy.deepcopy(state.adam))
        whole = len(self.groups) == 1
        self.slices.call("load", [  # each slice its members' rows (a copy, not a view)
            {"params": state.params if whole else
             {n: p[group[0]: group[-1] + 1].clone() for n, p in state.params.items()}}
            for group in self.groups])
        self.ages, self.step = list(state.ages), state.step
        self.gen.set_state(state.generator)
        self.history = list(state.history)
