"""MAML's meta-gradient as one compiled graph over the whole task batch (torch.compile).

The eager path (`poisonlab.training.maml.meta_gradient`) differentiates the meta-loss with
autograd, chunk by chunk; it stays the reference implementation. Here the same math is written
with torch.func transforms only, so the compiler traces the inner gradient, the adapted forward
and the outer gradient into one graph of plain tensor operations:

    θ_B      = θ expanded to B tasks (a view: the outer gradient sums over tasks)
    θ'_b     = θ_B − α ∇_θ CE(f(S_b; θ_B), y_S)        (`steps` times; detached if first order)
    L(θ)     = mean_b CE(f(Q_b; θ'_b), y_Q)
    returns  L, the per-task query accuracy and ∇_θ L

`forward` must be a task-batched forward made of operations the compiler can fuse
(`poisonlab.models.cnn4.cnn4_forward_tasks_matmul`: convolutions as patches × weights, BatchNorm
as F.batch_norm, whose decomposition keeps its careful backward).

The compiled code is kept on disk under poisonlab's cache folder (`compile_cache_dir`), so a new
process with the same shapes loads it instead of compiling again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from torch.func import grad

from poisonlab.data.cache import cache_dir
from poisonlab.training.maml import Params, TaskForward, expand_params, query_loss, task_losses

INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def compile_cache_dir() -> Path:
    """Where compiled graphs are kept: `$TORCHINDUCTOR_CACHE_DIR` if set, else
    `<poisonlab cache>/compiled`."""
    given = os.environ.get(INDUCTOR_CACHE_ENV)
    return Path(given) if given else cache_dir() / "compiled"


def functional_meta_gradient(
    forward: TaskForward,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    inner_lr: float,
    steps: int = 1,
    first_order: bool = False,
) -> tuple[Tensor, Tensor, Params]:
    """Mean query loss, per-task query accuracy [B] and {name: dL/dθ} of a meta-batch, with
    torch.func transforms only (no autograd.grad), so `torch.compile` can trace all of it."""
    tasks = support_x.shape[0]

    def outer(theta: Params) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        params = expand_params(theta, tasks)
        for _ in range(steps):
            g = grad(lambda p: task_losses(forward, p, support_x, support_y).sum())(params)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            params = {k: params[k] - inner_lr * g[k] for k in params}
        loss, acc = query_loss(forward, params, query_x, query_y)
        return loss, (loss.detach(), acc)

    grads, (loss, acc) = grad(outer, has_aux=True)(theta)
    return loss, acc, grads


def compiled_meta_gradient(forward: TaskForward) -> Callable[..., tuple[Tensor, Tensor, Params]]:
    """`functional_meta_gradient` for `forward`, compiled (one graph, static shapes); the
    compiler's caches go to `compile_cache_dir()`. The first call with new shapes compiles
    (minutes on a CPU); later calls, in this process or a new one, reuse the result."""
    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(compile_cache_dir()))

    def meta_grad(theta: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor,
                  query_y: Tensor, inner_lr: float, steps: int = 1, first_order: bool = False):
        return functional_meta_gradient(forward, theta, support_x, support_y, query_x, query_y,
                                        inner_lr, steps, first_order)

    return torch.compile(meta_grad, fullgraph=True, dynamic=False)
