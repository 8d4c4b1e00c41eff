"""MAML meta-learning as pure functions over parameter dicts (Finn, Abbeel, Levine, ICML 2017).

A *task-batched forward* is `forward(params, x) -> logits` where every parameter carries a leading
task dimension B, x is [B, n, C, H, W] and the logits are [B, n, classes]
(`poisonlab.models.cnn4.cnn4_forward_tasks`, or `vmap_forward(module)` for any nn.Module).
Running all tasks of a meta-batch through one call is what makes meta-training fast on a CPU.

- `adapt` is the inner loop g(D_S, θ): `steps` plain gradient steps of size `lr` on the support
  loss, per task. With `create_graph=True` (second order) the result stays differentiable w.r.t.
  θ and w.r.t. the support images, which the support-set attacks need.
- `meta_loss` is the MAML outer objective: the query loss after adaptation, averaged over tasks.
- `finetune_and_predict` is meta-test: adapt on the support set, classify the queries.
- `meta_gradient` computes the meta-gradient of a meta-batch in chunks of tasks, on a pool of
  threads (`map_task_chunks`).

Speed on a CPU (benchmarks/bench_maml.py compares against a per-task loop): one call over all
tasks of a meta-batch is not the fast way, because BatchNorm's double backward then runs
elementwise passes over activations too large for the cache, while one task's activations fit.
What pays is chunks of a few tasks (cache-sized, fewer op calls) on one thread per core, each
thread with one intra-op thread. On a GPU one call over all tasks is best (chunk=None).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

TaskForward = Callable[[dict[str, Tensor], Tensor], Tensor]
Params = dict[str, Tensor]


def expand_params(params: Params, tasks: int) -> Params:
    """Give every parameter a leading task dimension (a view: gradients flow back summed)."""
    return {k: v.unsqueeze(0).expand(tasks, *v.shape) for k, v in params.items()}


def task_losses(forward: TaskForward, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per task: [B]."""
    logits = forward(params, x)
    per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    return per_example.view(y.shape).mean(dim=1)


def adapt(
    forward: TaskForward,
    params: Params,
    support_x: Tensor,
    support_y: Tensor,
    steps: int,
    lr: float,
    create_graph: bool = True,
) -> Params:
    """The inner loop: `steps` gradient steps of size `lr` on each task's support loss.

    `params` have a leading task dimension. Summing the per-task losses gives each task's slice
    the gradient of its own loss, so one autograd call adapts all tasks.
    """
    names = list(params)
    current = {
        k: v if v.requires_grad else v.detach().requires_grad_() for k, v in params.items()
    }
    for _ in range(steps):
        loss = task_losses(forward, current, support_x, support_y).sum()
        grads = torch.autograd.grad(loss, [current[k] for k in names], create_graph=create_graph)
        current = {k: current[k] - lr * g for k, g in zip(names, grads, strict=True)}
    return current


def meta_loss(
    forward: TaskForward,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    inner_lr: float,
    steps: int = 1,
    first_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """MAML's outer loss (mean query loss after adaptation) and the per-task query accuracy [B]."""
    batched = expand_params(theta, support_x.shape[0])
    adapted = adapt(forward, batched, support_x, support_y, steps, inner_lr, not first_order)
    return query_loss(forward, adapted, query_x, query_y)


def query_loss(forward: TaskForward, adapted: Params, query_x: Tensor,
               query_y: Tensor) -> tuple[Tensor, Tensor]:
    """The mean query loss under the adapted weights and the per-task query accuracy [B]."""
    logits = forward(adapted, query_x)
    loss = F.cross_entropy(logits.flatten(0, 1), query_y.flatten())
    return loss, (logits.argmax(-1) == query_y).float().mean(1).detach()


def default_workers(device: torch.device | str = "cpu") -> int:
    """Threads for task chunks: one per core on a CPU, 1 on a GPU."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), os.cpu_count() or 1))


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def map_task_chunks(fn: Callable[[slice], object], tasks: int, chunk: int | None,
                    workers: int = 1) -> list:
    """fn(slice) over consecutive chunks of `tasks` (None: one chunk), on `workers` threads.

    Results come back in task order. With several workers each thread computes with one
    intra-op thread, so chunks run side by side instead of fighting over the cores.
    """
    size = tasks if chunk is None else max(1, chunk)
    slices = [slice(s, min(s + size, tasks)) for s in range(0, tasks, size)]
    if workers <= 1 or len(slices) == 1:
        return [fn(sl) for sl in slices]
    with intra_op_threads(1), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, slices))


def meta_gradient(
    forward: TaskForward,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    inner_lr: float,
    steps: int = 1,
    first_order: bool = False,
    chunk: int | None = None,
    workers: int = 1,
) -> tuple[float, Tensor, list[Tensor]]:
    """Mean query loss, per-task query accuracy [B] and d(loss)/dθ for a meta-batch.

    Identical to differentiating `meta_loss` over the whole batch; computed chunk by chunk.
    """
    tasks = support_x.shape[0]
    leaves = [v if v.requires_grad else v.detach().requires_grad_() for v in theta.values()]
    params = dict(zip(theta, leaves, strict=True))

    def one(sl: slice):
        loss, acc = meta_loss(forward, params, support_x[sl], support_y[sl], query_x[sl],
                              query_y[sl], inner_lr, steps, first_order)
        weight = (sl.stop - sl.start) / tasks
        return float(loss.detach()) * weight, acc, torch.autograd.grad(loss * weight, leaves)

    parts = map_task_chunks(one, tasks, chunk, workers)
    grads = [torch.stack(g).sum(0) for g in zip(*(p[2] for p in parts), strict=True)]
    return sum(p[0] for p in parts), torch.cat([p[1] for p in parts]), grads


def finetune(
    forward: TaskForward, theta: Params, support_x: Tensor, support_y: Tensor, steps: int, lr: float,
) -> Params:
    """Meta-test fine-tuning g(D_S, θ): θ adapted on each task's support set (detached)."""
    with torch.enable_grad():
        theta = {k: v.detach() for k, v in theta.items()}
        adapted = adapt(
            forward, expand_params(theta, support_x.shape[0]), support_x, support_y, steps, lr,
            create_graph=False,
        )
    return {k: v.detach() for k, v in adapted.items()}


def finetune_and_predict(
    forward: TaskForward,
    theta: Params,
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    steps: int,
    lr: float,
) -> Tensor:
    """Meta-test: adapt θ on each task's support set and return the query logits [B, n, classes].

    The queries of a task are classified together, so BatchNorm uses the query batch's
    statistics (the transductive protocol of the MAML reference code).
    """
    adapted = finetune(forward, theta, support_x, support_y, steps, lr)
    with torch.no_grad():
        return forward(adapted, query_x)


def vmap_forward(module: nn.Module) -> TaskForward:
    """A task-batched forward for any nn.Module (torch.func.functional_call under vmap).

    General but slower than a hand-batched forward such as `cnn4_forward_tasks`.
    """

    def single(params: Params, x: Tensor) -> Tensor:
        return functional_call(module, params, (x,))

    batched = vmap(single, in_dims=(0, 0), randomness="different")

    def forward(params: Params, x: Tensor) -> Tensor:
        return batched(params, x)

    return forward
