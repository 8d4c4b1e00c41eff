"""Encoder backdoor scan: invert a minimal trigger that collapses an encoder's embeddings.

After DECREE: Feng, Tao, Cheng, Shen, Xu, Liu, Zhang, Ma, Zhang, "Detecting Backdoors in
Pre-trained Encoders", CVPR 2023 (reference code: github.com/GiantSeaweed/DECREE).

An encoder f maps images [N, C, H, W] in [0, 1] to features [N, D]. A backdoored encoder (e.g.
BadEncoder, Jia et al. 2022) maps every input that carries its trigger close to one embedding,
whatever the image. So, with no labels and no knowledge of the trigger, search for the smallest
stamp that does that: a mask m ∈ [0, 1]^{H×W} (shared by the channels) and a pattern
p ∈ [0, 1]^{C×H×W}, both through tanh (m = tanh(μ)/(2 − ε) + ½, likewise p), stamped as
    x' = (1 − m)·x + m·p,
minimising over a batch B of clean images
    L(m, p) = −S(B) + λ·‖m‖₁,    S(B) = 1/(|B|(|B| − 1)) Σ_{i≠j} cos(f(x'_i), f(x'_j)),
the mean pairwise cosine similarity of the triggered embeddings. A clean encoder needs a mask
over most of the image to make unrelated images look alike; a backdoored one needs little more
than its trigger. The decision statistic is the normalised ("proportional") L1 norm
    PL1 = ‖m‖₁ / (H·W)
of the smallest mask whose triggered embeddings reached S ≥ τ (the reference's default
τ = 0.99); DECREE flags an encoder whose PL1 is below 0.1 (`threshold`).

λ follows the reference's schedule, updated after every mini-batch: it starts at `init_cost`
(10⁻³); after more than `patience` (5) consecutive batches with S ≥ τ it is multiplied by
`cost_multiplier` (5, at most up to `max_cost`), after more than `patience` batches below τ it is
divided by it (while it is not below `min_cost`, 10⁻⁵ for CIFAR-sized encoders); once it has sunk
below `min_cost` and S stayed ≥ τ for more than 2·`patience` batches it is reset to `init_cost`.
The smallest mask reaching τ is kept (the trigger the batch was evaluated with, before the step).
The inversion stops after a pass whose mean S is ≥ τ once the kept mask has not shrunk for more
than `early_stop_patience` (2·patience) batches. Adam with betas (0.5, 0.9), as the reference.

Deviations from the reference, and why:
- The Adam step size is constant (`lr`); the reference steps its command-line value up to 0.1
  at pass 30 and down to 0.05 at pass 50 for CIFAR-sized encoders. One value is easier to state
  and to tune for a smaller budget; the schedule of λ, which decides the mask's size, is kept.
- `restarts` independent inversions from different random starts (the reference runs one); the
  verdict uses the smallest mask among the restarts that reached τ, since a restart can settle
  in a poor optimum, and the spread of PL1 over the restarts is reported, so a verdict that
  hinges on one lucky start shows.
- The encoder takes images in [0, 1] and does its own normalisation; the reference stamps
  uint8 images and normalises them afterwards, which is the same map up to the scale of p.
- The reported similarity of each restart's trigger is recomputed over all the images (pairs
  across batches included), with the encoder in eval mode; the schedule uses the per-batch S.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import MaskTrigger
from poisonlab.config import Beta, Settings, make_settings
from poisonlab.defenses.neural_cleanse import frozen_eval
from poisonlab.errors import DataError, ShapeError
from poisonlab.progress import StatusFn

TANH_EPS = 1e-4  # keeps atanh of the initial values finite (tanh(·)/(2 − ε) + ½ never hits 0 or 1)


def mean_pairwise_cosine(features: torch.Tensor) -> torch.Tensor:
    """S = 1/(N(N − 1)) Σ_{i≠j} cos(f_i, f_j) over the rows of `features` [N, D], N ≥ 2.

    With unit rows u_i, Σ_{i≠j} u_i·u_j = ‖Σ_i u_i‖² − Σ_i ‖u_i‖², so no N×N matrix is formed.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise ShapeError(f"mean pairwise cosine needs features [N >= 2, D], got "
                         f"{tuple(features.shape)}")
    n = features.shape[0]
    unit = F.normalize(features, dim=1)
    total = unit.sum(0).square().sum() - unit.square().sum()
    return total / (n * (n - 1))


@dataclass
class RestartResult:
    """One inversion: the kept trigger, its L1 and PL1, the mean pairwise cosine of its
    triggered embeddings over all images, whether it reached the similarity threshold during
    the optimisation, and the passes and λ values it ran with."""

    trigger: MaskTrigger
    l1: float
    normalised_l1: float
    similarity: float
    reached: bool
    steps_run: int
    cost_history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"l1": self.l1, "normalised_l1": self.normalised_l1,
                "similarity": self.similarity, "reached": self.reached, "steps": self.steps_run}


@dataclass
class EncoderScanResult:
    """The verdict and the inverted trigger it rests on (the smallest over the restarts that
    reached the similarity threshold; without any, the most similar one), every restart, the
    thresholds, and the mean pairwise cosine of the clean images' embeddings for comparison."""

    trigger: MaskTrigger
    l1: float
    normalised_l1: float
    similarity: float
    reached: bool
    backdoored: bool
    threshold: float
    similarity_threshold: float
    clean_similarity: float
    restarts: list[RestartResult]
    best: int

    @property
    def normalised_l1s(self) -> list[float]:
        return [r.normalised_l1 for r in self.restarts]

    @property
    def spread(self) -> float:
        """max − min of PL1 over the restarts (0 with one restart)."""
        return max(self.normalised_l1s) - min(self.normalised_l1s)

    @property
    def normalised_l1_std(self) -> float:
        """Sample standard deviation of PL1 over the restarts (0 with one restart)."""
        values = self.normalised_l1s
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backdoored": self.backdoored, "l1": self.l1, "normalised_l1": self.normalised_l1,
            "similarity": self.similarity, "reached_similarity": self.reached,
            "threshold": self.threshold, "similarity_threshold": self.similarity_threshold,
            "clean_similarity": self.clean_similarity, "best_restart": self.best,
            "normalised_l1_spread": self.spread, "normalised_l1_std": self.normalised_l1_std,
            "restarts": [r.to_dict() for r in self.restarts],
        }


class _CostSchedule:
    """The reference's λ schedule and early stopping, updated once per mini-batch."""

    def __init__(self, cfg: EncoderScan.Config) -> None:
        self.cfg = cfg
        self.cost = cfg.init_cost
        self.up = self.down = self.low = 0
        self.best = math.inf
        self.early_best = math.inf
        self.early_count = 0

    def update(self, similarity: float, l1: float) -> bool:
        """Record one batch; return True when its trigger is the new smallest reaching τ."""
        cfg = self.cfg
        ok = similarity >= cfg.similarity_threshold
        improved = ok and l1 < self.best
        if improved:
            self.best = l1
        if self.best < math.inf:
            self.early_count = self.early_count + 1 if self.best >= self.early_best else 0
        self.early_best = min(self.best, self.early_best)
        self.low = self.low + 1 if ok and self.cost < cfg.min_cost else 0
        if self.low > 2 * cfg.patience:
            self.cost, self.up, self.down, self.low = cfg.init_cost, 0, 0, 0
        self.up, self.down = (self.up + 1, 0) if ok else (0, self.down + 1)
        if self.up > cfg.patience:
            self.up = 0
            if self.cost < cfg.max_cost:
                self.cost *= cfg.cost_multiplier
        elif self.down > cfg.patience:
            self.down = 0
            if self.cost >= cfg.min_cost:
                self.cost /= cfg.cost_multiplier
        return improved

    def stop(self, pass_similarity: float) -> bool:
        """After a pass: stop once it reached τ and the kept mask stopped shrinking."""
        cfg = self.cfg
        return (cfg.early_stop and pass_similarity >= cfg.similarity_threshold
                and self.early_count > cfg.early_stop_patience)


class _MaskPattern:
    """Unconstrained μ [1, H, W] and ν [C, H, W]; m = tanh(μ)/(2 − ε) + ½, likewise p."""

    def __init__(self, shape: tuple[int, int, int], gen: torch.Generator, device) -> None:
        c, h, w = shape
        init = [torch.rand(1, h, w, generator=gen), torch.rand(c, h, w, generator=gen)]
        self.params = [torch.atanh((v - 0.5) * (2 - TANH_EPS)).to(device).requires_grad_(True)
                       for v in init]

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        mask, pattern = (torch.tanh(p) / (2 - TANH_EPS) + 0.5 for p in self.params)
        return mask, pattern


class EncoderScan:
    """`scan(encoder, images)` inverts a minimal collapsing trigger and flags a small one."""

    class Config(Settings):
        """Settings of the scan (defaults: the DECREE reference's, except `lr`, see the module).

        steps: passes over the images (each a round of mini-batches of `batch_size`).
        batch_size: images per mini-batch (S is computed within a batch, so at least 2; a last
            batch of one image joins the one before).
        lr, betas: Adam's step size and moment decay rates for μ and ν.
        lr_drops: (pass, step size) pairs, passes ascending: from that pass (0-indexed) on,
            Adam's step size is the given one (the reference: lr 0.5, then [(30, 0.1),
            (50, 0.05)]); empty keeps `lr` throughout.
        similarity_threshold: τ, the mean pairwise cosine a trigger must reach to count.
        init_cost: the starting λ of the mask's L1 term; min_cost, max_cost: its floor (below
            which it is not lowered further, and reset to init_cost after 2·patience successful
            batches) and ceiling.
        cost_multiplier: the factor λ is raised or lowered by.
        patience: consecutive batches above (below) τ before λ is raised (lowered).
        early_stop: stop after a pass with mean S ≥ τ once the kept mask has not shrunk for
            more than `early_stop_patience` batches.
        threshold: PL1 = ‖m‖₁/(H·W) below which the encoder is flagged (DECREE: 0.1).
        restarts: independent inversions from different random starts; the smallest reaching
            τ decides.
        """

        steps: int = Field(1000, ge=1)
        batch_size: int = Field(256, ge=2)
        lr: float = Field(0.1, gt=0)
        lr_drops: list[tuple[Annotated[int, Field(ge=1)], Annotated[float, Field(gt=0)]]] = []
        betas: tuple[Beta, Beta] = (0.5, 0.9)
        similarity_threshold: float = Field(0.99, gt=0, le=1)
        init_cost: float = Field(1e-3, gt=0)
        min_cost: float = Field(1e-5, gt=0)
        max_cost: float = Field(1e5, gt=0)
        cost_multiplier: float = Field(5.0, gt=1)
        patience: int = Field(5, ge=1)
        early_stop: bool = True
        early_stop_patience: int = Field(10, ge=1)
        threshold: float = Field(0.1, gt=0, le=1)
        restarts: int = Field(1, ge=1)

        @model_validator(mode="after")
        def _cost_bounds(self) -> EncoderScan.Config:
            passes = [p for p, _ in self.lr_drops]
            if passes != sorted(set(passes)):
                raise ValueError(f"lr_drops {self.lr_drops}: the passes must be ascending and "
                                 "distinct")
            if not self.min_cost <= self.init_cost <= self.max_cost:
                raise ValueError(f"init_cost {self.init_cost} must lie between min_cost "
                                 f"{self.min_cost} and max_cost {self.max_cost}")
            return self

    def __init__(self, *, config: EncoderScan.Config | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = int(seed)
        self.device = torch.device(device) if device is not None else None

    def scan(self, encoder: nn.Module, images: torch.Tensor,
             progress: StatusFn | None = None) -> EncoderScanResult:
        """Invert `restarts` triggers on the clean `images` [N ≥ 2, C, H, W] in [0, 1] and give
        the verdict; `progress(status)` is called after each pass. The encoder is used in eval
        mode without parameter gradients and is left as it was."""
        device = self.device or _device_of(encoder)
        with _on_device(encoder, device), frozen_eval(encoder):
            _check_inputs(encoder, images, device)
            clean = _similarity(encoder, images, self.config.batch_size, device)
            if clean >= self.config.similarity_threshold:  # any mask, even none, would pass
                raise DataError(
                    f"the clean images' embeddings already have mean pairwise cosine {clean:.3f} "
                    f">= the similarity threshold {self.config.similarity_threshold:g} without a "
                    "trigger, so the scan cannot tell: give more varied images (several "
                    "classes) or raise the similarity threshold")
            runs = [self._invert(encoder, images, r, device, progress)
                    for r in range(self.config.restarts)]
        reached = [i for i, r in enumerate(runs) if r.reached]
        best = (min(reached, key=lambda i: runs[i].l1) if reached
                else max(range(len(runs)), key=lambda i: runs[i].similarity))
        chosen, cfg = runs[best], self.config
        return EncoderScanResult(
            chosen.trigger, chosen.l1, chosen.normalised_l1, chosen.similarity, chosen.reached,
            chosen.reached and chosen.normalised_l1 < cfg.threshold, cfg.threshold,
            cfg.similarity_threshold, clean, runs, best)

    def _invert(self, encoder: nn.Module, images: torch.Tensor, restart: int, device,
                progress: StatusFn | None) -> RestartResult:
        """One inversion from the random start of (seed, restart)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(self.seed * 1000 + restart)
        param = _MaskPattern(tuple(images.shape[1:]), gen, device)
        opt = torch.optim.Adam(param.params, lr=cfg.lr, betas=cfg.betas)
        schedule = _CostSchedule(cfg)
        best, costs = None, []
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = _step_size(cfg, step)
            sims = []
            for index in _batches(len(images), cfg.batch_size, gen):
                mask, pattern = param.parts()
                xb = images[index].to(device)
                sim = mean_pairwise_cosine(encoder((1 - mask) * xb + mask * pattern))
                l1 = mask.sum()
                loss = -sim + schedule.cost * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sims.append(float(sim.detach()))
                if schedule.update(sims[-1], float(l1.detach())):
                    best = (mask.detach().clone(), pattern.detach().clone())
            costs.append(schedule.cost)
            pass_sim = sum(sims) / len(sims)
            if progress is not None:
                progress(f"restart {restart + 1}: similarity {pass_sim:.3f}, "
                         f"mask L1 {float(param.parts()[0].detach().sum()):.1f}")
            if schedule.stop(pass_sim):
                break
        reached = best is not None
        mask, pattern = best if reached else (p.detach().clone() for p in param.parts())
        trigger = MaskTrigger(mask.cpu(), pattern.cpu(), name="inverted")
        l1 = trigger.mask_l1()
        h, w = images.shape[-2:]
        sim = _similarity(encoder, trigger.apply(images), cfg.batch_size, device)
        return RestartResult(trigger, l1, l1 / (h * w), sim, reached, len(costs), costs)


def _step_size(cfg: EncoderScan.Config, step: int) -> float:
    """Adam's step size in pass `step`: `lr`, then the last of `lr_drops` reached."""
    return next((lr for start, lr in reversed(cfg.lr_drops) if step >= start), cfg.lr)


def _batches(n: int, size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(n) into batches of `size`; a last batch of one joins the one
    before (S needs two images)."""
    order = torch.randperm(n, generator=gen)
    chunks = list(order.split(size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


@torch.no_grad()
def _similarity(encoder: nn.Module, images: torch.Tensor, batch_size: int, device) -> float:
    """S over all `images` (features computed in batches)."""
    feats = [encoder(images[i : i + batch_size].to(device)).float()
             for i in range(0, len(images), batch_size)]
    return float(mean_pairwise_cosine(torch.cat(feats)))


def _check_inputs(encoder: nn.Module, images: torch.Tensor, device) -> None:
    """ShapeError unless `images` is [N ≥ 2, C, H, W] with the channels the encoder takes and
    the encoder maps them to features [N, D]."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ShapeError(f"the encoder scan needs images [N, C, H, W], got {shape}")
    if images.shape[0] < 2:
        raise ShapeError(f"the encoder scan needs at least 2 images, got {images.shape[0]}")
    conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and conv.in_channels != images.shape[1]:
        raise ShapeError(f"the encoder takes {conv.in_channels}-channel images, got "
                         f"{images.shape[1]} channels")
    probe = images[:8]
    try:
        with torch.no_grad():
            out = encoder(probe.to(device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ShapeError(f"the encoder cannot take images {tuple(images.shape[1:])}: "
                         f"{first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(probe):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ShapeError(f"the encoder must map images [N, C, H, W] to features [N, D], got "
                         f"{got} for {len(probe)} images")
    if not torch.isfinite(out).all():
        raise DataError("the encoder's features are not finite (NaN or inf): nothing to scan")
    if torch.equal(out, out[:1].expand_as(out)):
        raise DataError(f"the encoder maps {len(probe)} different images to the same features "
                        "(a constant or dead encoder): nothing to scan")


def _device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU without either)."""
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@contextlib.contextmanager
def _on_device(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """The module on `device` for the duration, back where it was afterwards."""
    home = _device_of(module)
    if home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
