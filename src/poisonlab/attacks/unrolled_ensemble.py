"""M surrogate networks of one architecture run together (one grouped computation, a vmap, or a
loop), and the unrolled adversarial loss MetaPoison differentiates through.

Huang, Geiping, Fowl, Taylor, Goldstein, "MetaPoison: Practical General-purpose Clean-label Data
Poisoning", NeurIPS 2020, Algorithm 1. For one surrogate with weights θ₀, the batches
X₀ (holding the poisons), X₁, ..., X_K (clean) and the target x_t with adversarial label y_adv:

    θ_{k+1} = θ_k − η ∇_θ CE(f([X_k; x_t]; θ_k)[:B], Y_k),           k = 0 .. K−1,
    L_adv   = (1/K) Σ_{k=1..K} CW(f([X_k; x_t]; θ_k)[B:], y_adv),
    CW(z, a) = max(max_j z'_j − z_a, −100),   z' = z with z'_a = 0 (not −∞: the reference's quirk),

where [X; x_t] is the batch with the target appended, so batch normalisation computes its batch
statistics over both (as the reference code does; the training loss excludes the target rows).
The meta-gradient ∂L_adv/∂(poisons) flows through every unrolled step (second order, no
first-order approximation), as in the reference's tf.gradients through its unrolled graph.

The M weight sets are stacked (params[name] is [M, ...]) and one of three backends computes
the M surrogates' forwards, inner gradients and unrolled losses:

- "grouped" (ConvNetBN only; models/convnet_bn.py `grouped_logits`): the M surrogates are one
  network whose convolutions have groups = M over the M inputs side by side in the channels
  ([N, M·C, H, W]), batch normalisation per channel (so per surrogate) with batch statistics, the
  M heads one batched matrix product. The training loss is the sum over surrogates of each one's
  mean cross-entropy, so its gradient in the stacked weights is, block by block, each surrogate's
  own gradient, and the unrolled SGD steps (each surrogate its own learning rate) and their
  second-order meta-gradient are exact, with plain autograd and no vmap.
- "vmap": torch.func.vmap over torch.func.functional_call of any architecture, the inner
  gradients from torch.func.grad inside the vmap. Every BatchNorm layer of the functional copy is
  replaced by `BatchStatsNorm`, the same normalisation written in elementary operations with the
  same parameters: running buffers cannot be updated inside vmap, and torch's fused batch-norm
  backward has a wrong batching rule for its input gradient (pytorch/functorch#534), which makes
  the second-order meta-gradient through it under vmap wrong.
- "loop": the same per-surrogate function as vmap, called surrogate after surrogate; the
  reference the others are tested against (tests/test_unrolled_ensemble.py) and benchmarked
  against (benchmarks/bench_metapoison.py). `adversarial_losses(..., batched=False)` is the loop
  whatever the backend.

The default is "grouped" for ConvNetBN and "loop" for any other architecture. On a CPU the
meta-gradient is bound by the convolutions and by memory-bound elementwise work on the first
blocks' large activations, not by Python overhead, so no backend does much less work than the
loop. The grouped form runs each layer of all M surrogates as one large operation, so it keeps
the intra-op threads busy and suffers far less than the loop's many small operations when other
processes compete for the cores; it is the fastest with torch's default thread count and the
most robust under load. vmap's batching rules for the double backward of convolution and of the
elementary batch normalisation add work the loop does not do, so where no grouped form exists
the loop is the default and vmap an option.
Batch normalisation always uses batch statistics here (running statistics play no part in
crafting, where every forward of the reference is in training mode). The functional copy is in
eval mode, so dropout, if the architecture has any, is off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from poisonlab.errors import ConfigError
from poisonlab.models.convnet_bn import ConvNetBN, grouped_logits

Params = dict[str, Tensor]
ModelFactory = Callable[[], nn.Module]
Backend = Literal["grouped", "vmap", "loop"]
BACKENDS: tuple[str, ...] = ("grouped", "vmap", "loop")


class BatchStatsNorm(nn.Module):
    """Batch normalisation with batch statistics only (biased variance, as torch's training mode
    and TensorFlow's moments), in elementary operations so vmap differentiates it twice right."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias

    def forward(self, x: Tensor) -> Tensor:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out


def functional_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` in eval mode with every BatchNorm layer a `BatchStatsNorm`."""
    out = copy.deepcopy(model)
    for module in list(out.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, BatchStatsNorm(child))
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def _cw_rows(logits: Tensor, adv_label: int, clamp: float = -100.0) -> Tensor:
    keep = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    keep[adv_label] = 0.0
    second = (logits * keep).max(-1).values  # the adversarial logit counts as 0, not −∞
    return (second - logits[..., adv_label]).clamp(min=clamp)


def cw_margin(logits: Tensor, adv_label: int, clamp: float = -100.0) -> Tensor:
    """The reference's Carlini–Wagner margin, averaged over the rows of `logits` [T, classes]."""
    return _cw_rows(logits, adv_label, clamp).mean()


def _logits(fmodel: nn.Module, params: Params, x: Tensor, target: Tensor) -> Tensor:
    return functional_call(fmodel, params, (torch.cat([x, target]),))


def unrolled_adversarial_loss(fmodel: nn.Module, params: Params, xs: Tensor, ys: Tensor,
                              target: Tensor, lr: Tensor, adv_label: int) -> Tensor:
    """L_adv of one surrogate: xs [K+1, B, C, H, W] (stage 0 already poisoned), ys [K+1, B]."""
    unroll = xs.shape[0] - 1
    b = ys.shape[1]
    total = xs.new_zeros(())
    for k in range(unroll + 1):
        if k < unroll:
            def train_loss(p: Params, k: int = k) -> tuple[Tensor, Tensor]:
                z = _logits(fmodel, p, xs[k], target)
                return F.cross_entropy(z[:b], ys[k]), z

            g, z = grad(train_loss, has_aux=True)(params)
            params = {n: params[n] - lr * g[n] for n in params}
        else:
            z = _logits(fmodel, params, xs[k], target)
        if k >= 1:
            total = total + cw_margin(z[b:], adv_label)
    return total / unroll


def _train_grad(fmodel: nn.Module, params: Params, x: Tensor, y: Tensor, target: Tensor) -> Params:
    def loss(p: Params) -> Tensor:
        return F.cross_entropy(_logits(fmodel, p, x, target)[: y.shape[0]], y)

    return grad(loss)(params)


def _lr_view(lrs: Tensor, p: Tensor) -> Tensor:
    return lrs.view(-1, *[1] * (p.dim() - 1)).to(p)


def _grouped_ce(model: ConvNetBN, params: Params, x: Tensor, y: Tensor,
                target: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_m CE_m (each the mean over surrogate m's batch x [M, B, ...], y [M, B], the target
    appended for the batch statistics) and the logits [M, B+T, classes]. Its gradient in the
    stacked weights is, block by block, each surrogate's own training gradient."""
    members, b = y.shape
    z = grouped_logits(model, params, torch.cat([x, target.expand(members, *target.shape)], 1))
    ce = F.cross_entropy(z[:, :b].flatten(0, 1), y.flatten(), reduction="none")
    return ce.view(members, b).mean(1).sum(), z


def grouped_adversarial_losses(model: ConvNetBN, params: Params, xs: Tensor, ys: Tensor,
                               target: Tensor, lrs: Tensor, adv_label: int) -> Tensor:
    """L_adv of M surrogates [M] as one grouped computation: xs [M, K+1, B, ...], ys [M, K+1, B],
    lrs [M]; the same unrolled steps as `unrolled_adversarial_loss`, member by member."""
    unroll, b = xs.shape[1] - 1, ys.shape[2]
    total = xs.new_zeros(xs.shape[0])
    for k in range(unroll + 1):
        if k < unroll:
            g, z = grad(lambda p, k=k: _grouped_ce(model, p, xs[:, k], ys[:, k], target),
                        has_aux=True)(params)
            params = {n: params[n] - _lr_view(lrs, params[n]) * g[n] for n in params}
        else:
            z = grouped_logits(model, params,
                               torch.cat([xs[:, k], target.expand(xs.shape[0], *target.shape)], 1))
        if k >= 1:
            total = total + _cw_rows(z[:, b:], adv_label).mean(1)
    return total / unroll


def default_backend(model: nn.Module) -> str:
    """The backend SurrogateEnsemble uses for `model` unless told: see the module docstring."""
    return "grouped" if isinstance(model, ConvNetBN) else "loop"


class SurrogateEnsemble:
    """M weight sets of the architecture `model_factory()` builds, stacked: params[name] [M, ...].
    `backend`: "grouped" (ConvNetBN only), "vmap" or "loop"; None picks `default_backend`.
    Every backend computes the same numbers (up to float rounding) from the same params."""

    def __init__(self, model_factory: ModelFactory, size: int,
                 device: torch.device | str = "cpu", backend: Backend | None = None) -> None:
        template = model_factory()
        if not isinstance(template, nn.Module):
            raise ConfigError(f"model_factory must return an nn.Module, got {type(template).__name__}")
        backend = backend or default_backend(template)
        if backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "grouped" and not isinstance(template, ConvNetBN):
            raise ConfigError("the grouped backend needs a ConvNetBN surrogate, got "
                              f"{type(template).__name__} (use backend='vmap')")
        self.factory, self.size, self.device = model_factory, size, torch.device(device)
        self.backend = backend
        self.fmodel = functional_copy(template).to(self.device)
        self.template = template.to(self.device).eval().requires_grad_(False)  # grouped's layout
        self.params: Params = {n: torch.stack([p.detach()] * size).to(self.device)
                               for n, p in self.fmodel.named_parameters()}

    def reinitialise(self, members: Sequence[int], seeds: Sequence[int]) -> None:
        """Fresh weights from the factory for each member, under torch.manual_seed(seed)."""
        for m, seed in zip(members, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fresh = dict(self.factory().named_parameters())
            for n in self.params:
                self.params[n][m] = fresh[n].detach().to(self.params[n])

    def member(self, m: int) -> Params:
        """Surrogate m's weights (views into the stack)."""
        return {n: p[m] for n, p in self.params.items()}

    def select(self, members: Tensor) -> Params:
        return {n: p[members] for n, p in self.params.items()}

    def logits(self, x: Tensor) -> Tensor:
        """Every member's logits on the same images x [N, ...]: [M, N, classes]."""
        if self.backend == "grouped":
            return grouped_logits(self.template, self.params, x.expand(self.size, *x.shape))
        if self.backend == "loop":
            return torch.stack([functional_call(self.fmodel, self.member(m), (x,))
                                for m in range(self.size)])
        return vmap(lambda p: functional_call(self.fmodel, p, (x,)))(self.params)

    def train_grads(self, members: Tensor, x: Tensor, y: Tensor, target: Tensor) -> Params:
        """Each member's training gradient on its batch x [M', B, ...], y [M', B]: [M', ...]."""
        params, fmodel = self.select(members), self.fmodel
        if self.backend == "grouped":
            return grad(lambda p: _grouped_ce(self.template, p, x, y, target)[0])(params)
        if self.backend == "loop":
            gs = [_train_grad(fmodel, {n: p[i] for n, p in params.items()}, x[i], y[i], target)
                  for i in range(len(members))]
            return {n: torch.stack([g[n] for g in gs]) for n in params}
        return vmap(lambda p, xb, yb: _train_grad(fmodel, p, xb, yb, target))(params, x, y)

    def train_step(self, members: Tensor, x: Tensor, y: Tensor, target: Tensor, lrs: Tensor) -> None:
        """One plain SGD step for each member on its batch x [M', B, ...], y [M', B]; the target
        joins every batch for the batch statistics only."""
        g = self.train_grads(members, x, y, target)
        for n, p in self.params.items():
            p[members] = p[members] - _lr_view(lrs, p) * g[n]

    def adversarial_losses(self, members: Tensor, xs: Tensor, ys: Tensor, target: Tensor,
                           lrs: Tensor, adv_label: int, batched: bool = True) -> Tensor:
        """L_adv of each member [M'] from its stages xs [M', K+1, B, ...], ys [M', K+1, B];
        differentiable in xs (the poisons). batched=False: the loop, whatever the backend."""
        lrs = lrs.to(xs)
        params = self.select(members)
        if batched and self.backend == "grouped":
            return grouped_adversarial_losses(self.template, params, xs, ys, target, lrs, adv_label)
        if batched and self.backend == "vmap":
            fmodel = self.fmodel
            return vmap(lambda p, xm, ym, lr: unrolled_adversarial_loss(
                fmodel, p, xm, ym, target, lr, adv_label))(params, xs, ys, lrs)
        return torch.stack([
            unrolled_adversarial_loss(self.fmodel, {n: p[i] for n, p in params.items()},
                                      xs[i], ys[i], target, lrs[i], adv_label)
            for i in range(len(members))
        ])
