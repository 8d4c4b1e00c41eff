"""Gradient matching: clean-label targeted poisoning by aligning the poisons' training gradient
with the target's adversarial gradient ("Witches' Brew").

Geiping, Fowl, Huang, Czaja, Taylor, Moeller, Goldstein, "Witches' Brew: Industrial Scale Data
Poisoning via Gradient Matching", ICLR 2021 (arXiv:2009.02276); reference code
github.com/JonasGeiping/poisoning-gradient-matching.

A victim trained on the poisoned set takes gradient steps along the poisons' training gradient.
If that gradient points the same way as the gradient that would make the target x_t look like the
adversarial class y_adv, training on the poisons (correctly labelled, imperceptibly perturbed)
also moves the victim towards misclassifying the target. On a surrogate with parameters θ:

    g_t = ∇θ CE(f_θ(x_t), y_adv)                                  (the target's adversarial gradient)
    g_p(δ) = ∇θ (1/n) Σ_i CE(f_θ(A(x_i + δ_i)), y_i)               (the poisons' training gradient)
    B(δ) = 1 − ⟨g_t, g_p(δ)⟩ / (‖g_t‖ ‖g_p(δ)‖)                      (over all parameters, flattened)
    min_δ B(δ)   s.t.  ‖δ_i‖∞ ≤ ε,  0 ≤ x_i + δ_i ≤ 1,

A a random differentiable augmentation (flip and crop), so the poisons keep working under the
victim's augmentation. ∇δ B is a second-order gradient (g_p is built with create_graph).
Optimisation as in the reference code: δ_0 = clip(ε·N(0, I), −ε, ε); every iteration sums ∇δ B
over the poison batches, takes its sign and makes one Adam step (lr τ·ε, τ = 0.1, ×0.1 at
iterations I/2.667, I/1.6 and I/1.142), then projects onto the ε-ball and the valid pixel range;
R restarts, the one with the lowest final B is kept. The authors' setting: ε = 16/255, R = 8,
I = 250, poisons of the adversarial class.

Deviations from the reference code, and why:
- Augmentation: integer crop (zero padding) and horizontal flip, the victim recipe's own
  augmentation (`training.supervised.augment_batch`), instead of the reference's bilinear
  grid-sample translation (up to a quarter of the image, 8 px on CIFAR-10) and flip: the poisons
  are meant to survive the victim's augmentation, and this is the one poisonlab's victims use.
- The restart is chosen by B at the final δ, computed once more without augmentation (the
  reference keeps the mean of the last iteration's augmented batch losses, i.e. the loss BEFORE
  the last step, and noisy): a deterministic comparison of what is actually returned.
- The reference scales the step by (poison batch / 512); the summed gradient is signed before the
  step, so the batch size cannot change its scale, and here it does not change the step either.
- The surrogate is used in eval mode (BatchNorm with running statistics, no dropout) for the
  target and the poison gradients alike, so a poison's gradient does not depend on which other
  poisons share its batch; the model's mode is restored afterwards.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from poisonlab.attacks.poisons import Poisons
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.progress import StatusFn
from poisonlab.training.supervised import augment_batch

# The reference's step schedule: ×0.1 at these fractions of the iterations (I // 2.667, ...).
_MILESTONE_DIVISORS = (2.667, 1.6, 1.142)


class GradientMatching:
    """Witches' Brew on a surrogate `model`: `craft(train, poison_idx, target_x, adv_label)`."""

    class Config(Settings):
        """Settings of gradient matching.

        epsilon: L∞ bound of each perturbation, in [0, 1] pixel units (the authors' 16/255).
        restarts: independent random starts; the one with the lowest final matching loss wins.
        iterations: signed-Adam steps per restart.
        lr: Adam's step size as a fraction of epsilon (the authors' τ = 0.1).
        schedule: "step" (×0.1 at iterations I/2.667, I/1.6, I/1.142, the reference's) or "none".
        augment: differentiable random crop + horizontal flip of the poisons at every step.
        crop_padding: zero padding of the random crop (pixels; 0 leaves only the flip).
        batch_size: poisons per gradient g_p (the reference's 512); the gradients of δ are summed
            over batches before the signed step.
        loss: "cosine", 1 − cos(g_t, g_p) over the flattened parameter gradients.
        """

        epsilon: float = Field(16 / 255, ge=0, le=1)
        restarts: int = Field(8, ge=1)
        iterations: int = Field(250, ge=1)
        lr: float = Field(0.1, gt=0)
        schedule: Literal["step", "none"] = "step"
        augment: bool = True
        crop_padding: int = Field(4, ge=0)
        batch_size: int = Field(512, ge=1)
        loss: Literal["cosine"] = "cosine"

    def __init__(self, model: nn.Module, *, config: Config | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **settings) -> None:
        self.model = model
        self.config = make_settings(self.Config, config, **settings)
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()

    def craft(self, train: ImageSet, poison_idx: Tensor, target_x: Tensor, adv_label: int,
              progress: StatusFn | None = None, *, target_label: int | None = None) -> Poisons:
        """Perturbations of train.x[poison_idx] that make a model trained on them classify
        `target_x` ([C, H, W], or [T, C, H, W] for several targets) as `adv_label`.

        `target_label` (optional): the target's true class, refused when it is the poison class
        or `adv_label`. `progress` is called with a status line after every iteration.
        Returns Poisons(indices, delta on the CPU, history={"loss": B per iteration of the chosen
        restart, "final": final B of every restart, "best": the chosen restart}).
        """
        idx, targets = self._check(train, poison_idx, target_x, adv_label, target_label)
        cfg, device, model = self.config, self.device, self.model
        was_training = model.training
        model.to(device).eval()
        try:
            x_p, y_p = train.x[idx].to(device), train.y[idx].to(device)
            params = [p for p in model.parameters() if p.requires_grad]
            adv = torch.full((len(targets),), int(adv_label), dtype=torch.long, device=device)
            g_t = [g.detach() for g in _grads(model, params, targets.to(device), adv, False)]
            gen = torch.Generator().manual_seed(self.seed)
            best: tuple[float, Tensor, list[float]] | None = None
            finals = []
            for r in range(cfg.restarts):
                delta, curve = self._restart(x_p, y_p, params, g_t, gen, progress, r)
                final = self._loss(x_p, delta, y_p, params, g_t, None, need_grad=False)[0]
                finals.append(final)
                if best is None or final < best[0]:
                    best = (final, delta, curve)
        finally:
            model.train(was_training)
        assert best is not None
        history = {"loss": best[2], "final": finals, "best": finals.index(best[0])}
        return Poisons(indices=idx, delta=best[1].detach().cpu(), history=history)

    def _restart(self, x_p, y_p, params, g_t, gen, progress, r) -> tuple[Tensor, list[float]]:
        """One random start: `iterations` signed-Adam steps on δ; returns δ and B per step."""
        cfg = self.config
        eps = cfg.epsilon
        init = (torch.randn(x_p.shape, generator=gen) * eps).clamp(-eps, eps)
        delta = _project(init.to(x_p.device), x_p, eps).requires_grad_()
        opt = torch.optim.Adam([delta], lr=cfg.lr * eps)
        milestones = [int(cfg.iterations // d) for d in _MILESTONE_DIVISORS]
        sched = (torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
                 if cfg.schedule == "step" else None)
        curve = []
        for it in range(cfg.iterations):
            loss, grad = self._loss(x_p, delta, y_p, params, g_t, gen, need_grad=True)
            curve.append(loss)
            opt.zero_grad(set_to_none=True)
            assert grad is not None
            delta.grad = grad.sign()
            opt.step()
            if sched is not None:
                sched.step()
            with torch.no_grad():
                delta.copy_(_project(delta, x_p, eps))
            if progress is not None:
                progress(f"restart {r + 1}/{cfg.restarts} iteration {it + 1}/{cfg.iterations} "
                         f"loss {loss:.4f}")
        return delta.detach(), curve

    def _loss(self, x_p, delta, y_p, params, g_t, gen,
              need_grad: bool) -> tuple[float, Tensor | None]:
        """Mean B over the poison batches, and ∇δ of the summed B (when `need_grad`);
        augmented with draws from `gen` when augmentation is on and `gen` is given."""
        cfg = self.config
        t_norm = torch.sqrt(sum((g * g).sum() for g in g_t))
        total, batches = 0.0, 0
        grad = torch.zeros_like(delta) if need_grad else None
        for start in range(0, len(x_p), cfg.batch_size):
            sl = slice(start, start + cfg.batch_size)
            d = delta[sl].detach().requires_grad_(need_grad)
            x = x_p[sl] + d
            if cfg.augment and gen is not None:
                x = augment_batch(x, cfg.crop_padding, True, gen)
            with torch.enable_grad():
                g_p = _grads(self.model, params, x, y_p[sl], create_graph=need_grad)
                b = matching_loss(g_t, g_p, t_norm)
                if grad is not None:
                    grad[sl] = torch.autograd.grad(b, d)[0]
            total += float(b.detach())
            batches += 1
        return total / batches, grad

    def _check(self, train: ImageSet, poison_idx, target_x, adv_label, target_label):
        """One-line errors for inputs that cannot be crafted on; the index and the targets."""
        if train.x.dim() != 4 or train.y.shape != train.x.shape[:1]:
            raise ShapeError(f"train must hold images [N, C, H, W] and labels [N], got "
                             f"{tuple(train.x.shape)} and {tuple(train.y.shape)}")
        idx = _check_poison_idx(train, poison_idx)
        targets = target_x.unsqueeze(0) if target_x.dim() == 3 else target_x
        if targets.dim() != 4 or len(targets) == 0 or targets.shape[1:] != train.x.shape[1:]:
            raise ShapeError(f"target_x must be an image {tuple(train.x.shape[1:])} like the "
                             f"training images (or a batch of them), got {tuple(target_x.shape)}")
        classes = self._num_classes(targets)
        if not 0 <= int(adv_label) < classes:
            raise ConfigError(f"adv_label {adv_label} is out of range: the surrogate has "
                              f"{classes} classes")
        if int(train.y.max()) >= classes or int(train.y.min()) < 0:
            raise ConfigError(f"training labels must lie in [0, {classes}), the surrogate's "
                              f"classes, got [{int(train.y.min())}, {int(train.y.max())}]")
        poison_class = int(train.y[idx[0]])
        if target_label is not None and int(target_label) in (poison_class, int(adv_label)):
            which = "the poison class" if int(target_label) == poison_class else "adv_label"
            raise ConfigError(f"the target's class {target_label} is {which}: pick a target of "
                              "another class")
        return idx, targets

    def _num_classes(self, targets: Tensor) -> int:
        """The surrogate's number of classes, from one forward pass; ShapeError when it cannot
        take images of this shape."""
        model, was_training = self.model.to(self.device), self.model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(targets[:1].to(self.device))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ShapeError(f"the surrogate cannot take images of shape "
                             f"{tuple(targets.shape[1:])}: {first}") from None
        finally:
            model.train(was_training)
        if out.dim() != 2:
            raise ShapeError(f"the surrogate must return logits [N, classes], got "
                             f"{tuple(out.shape)}")
        return int(out.shape[1])


def matching_loss(g_t: list[Tensor], g_p: list[Tensor], t_norm: Tensor | None = None) -> Tensor:
    """1 − cos(g_t, g_p) over the parameter gradients flattened into one vector."""
    dot = sum((a * b).sum() for a, b in zip(g_t, g_p, strict=True))
    p_sq = sum((b * b).sum() for b in g_p)
    if t_norm is None:
        t_norm = torch.sqrt(sum((a * a).sum() for a in g_t))
    return 1 - dot / (t_norm * torch.sqrt(p_sq).clamp_min(1e-12))


def _grads(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor,
           create_graph: bool) -> tuple[Tensor, ...]:
    """∇θ mean CE(model(x), y), kept differentiable w.r.t. x when `create_graph`."""
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        return torch.autograd.grad(loss, params, create_graph=create_graph)


def _project(delta: Tensor, x: Tensor, epsilon: float) -> Tensor:
    """δ clipped to [−ε, ε] and to [−x, 1 − x] (so x + δ stays a valid image)."""
    return torch.maximum(torch.minimum(delta.clamp(-epsilon, epsilon), 1 - x), -x)


def _check_poison_idx(train: ImageSet, poison_idx) -> Tensor:
    """The poison indices as int64 [n]: in range, of one class, no larger than that class."""
    idx = torch.as_tensor(poison_idx)
    if idx.dim() != 1 or idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ShapeError(f"poison_idx must be a non-empty 1-D tensor of indices, got "
                         f"{idx.dtype} {tuple(idx.shape)}")
    idx = idx.long()
    if int(idx.min()) < 0 or int(idx.max()) >= len(train):
        raise ShapeError(f"poison_idx must lie in [0, {len(train)}), got "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    labels = train.y[idx].unique()
    if labels.numel() != 1:
        raise ConfigError(f"the poisons must all be of one class, got classes {labels.tolist()}")
    poison_class = int(labels[0])
    members = int((train.y == poison_class).sum())
    if idx.numel() > members:
        raise ConfigError(f"budget {idx.numel()} is larger than the poison class {poison_class} "
                          f"({members} training images)")
    if idx.unique().numel() != idx.numel():
        raise ShapeError("poison_idx repeats an index")
    return idx
