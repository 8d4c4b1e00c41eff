"""Train k models of one architecture at once: their parameters stacked, one vmap per step.

Shadow models (Shokri et al. 2017; Carlini et al. 2022) are independent networks of the same
architecture trained on different subsets of one pool. Instead of k training loops, the k parameter
sets are stacked (torch.func.stack_module_state) and the per-model gradients of one step come from a
single vmapped call of torch.func.grad over functional_call, so every layer runs as one batched
kernel over the k models. The optimiser (SGD or Adam from TrainConfig, elementwise) updates the
stacked tensors directly, which equals k separate optimisers. Each model draws its own mini-batches
from its own subset (a fresh permutation per pass). Models with batch norm are not supported
(running statistics cannot be updated inside vmap); use models without it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.nn import functional as F

from poisonlab.errors import ConfigError, DataError
from poisonlab.training.supervised import TrainConfig, lr_at


def batch_indices(masks: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Record indices [k, steps, batch] of every model's mini-batches: per model, consecutive
    random permutations of its subset (mask row), cut into batches of cfg.batch_size. Every model
    makes ceil(largest subset / batch) steps per epoch; smaller subsets wrap into the next pass."""
    sizes = masks.sum(1)
    if int(sizes.min()) == 0:
        raise DataError("every model needs at least one training record (a mask row is empty)")
    steps = cfg.epochs * math.ceil(int(sizes.max()) / cfg.batch_size)
    need = steps * cfg.batch_size
    rows = []
    for mask in masks:
        own = mask.nonzero().squeeze(1)
        passes = math.ceil(need / len(own))
        seq = torch.cat([own[torch.randperm(len(own), generator=generator)] for _ in range(passes)])
        rows.append(seq[:need].view(steps, cfg.batch_size))
    return torch.stack(rows)


def _check_models(models: list[nn.Module]) -> None:
    for m in models[0].modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ConfigError("batched training does not support batch norm; use a model without it")


def _optimizer(params: list[torch.Tensor], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def train_batched(
    build: Callable[[], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    cfg: TrainConfig,
    *,
    seed: int = 0,
) -> list[nn.Module]:
    """Train one model per row of `masks` (bool [k, N]) on x[mask], y[mask] with cross-entropy;
    return the k trained models (eval mode). `build()` makes one fresh model; model i is built
    after torch.manual_seed(seed + i). No augmentation; the cfg schedule applies per step."""
    if masks.dim() != 2 or masks.shape[1] != len(y) or len(x) != len(y):
        raise DataError(f"masks must be [models, {len(y)}] and x, y of equal length")
    models = []
    for i in range(masks.shape[0]):
        torch.manual_seed(seed + i)
        models.append(build())
    _check_models(models)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    step_grads = vmap(grad(loss), in_dims=(0, 0, 0, 0))
    opt = _optimizer(list(params.values()), cfg)
    idx = batch_indices(masks.bool(), cfg, torch.Generator().manual_seed(seed))
    steps_per_epoch = idx.shape[1] // max(cfg.epochs, 1)
    for step in range(idx.shape[1]):
        batch = idx[:, step]
        grads = step_grads(params, buffers, x[batch], y[batch])
        for name, p in params.items():
            p.grad = grads[name]
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, steps_per_epoch)
        opt.step()
    return _unstack(models, params, buffers)


@torch.no_grad()
def _unstack(models: list[nn.Module], params: dict, buffers: dict) -> list[nn.Module]:
    for i, model in enumerate(models):
        state = {k: v[i] for k, v in {**params, **buffers}.items()}
        model.load_state_dict(state)
        model.eval()
    return models
