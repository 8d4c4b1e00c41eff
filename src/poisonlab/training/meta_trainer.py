"""The MAML meta-training loop: sampling, Adam on the meta-loss, validation, best model, resume."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from poisonlab.data.episodes import Episodes, EpisodeSampler
from poisonlab.data.types import FewShotData
from poisonlab.progress import progress_bar
from poisonlab.training.maml import (
    Params,
    TaskForward,
    default_workers,
    finetune_and_predict,
    map_task_chunks,
    meta_gradient,
)


@dataclass
class MetaTrainSettings:
    """MAML settings; defaults are Kato et al.'s (5-way 5-shot, α 0.5, β 0.003, 32 tasks, 1 step)."""

    ways: int = 5
    shots: int = 5
    queries: int = 5
    meta_batch: int = 32
    inner_lr: float = 0.5
    meta_lr: float = 0.003
    adaptation_steps: int = 1
    iterations: int = 60000
    first_order: bool = False
    rotate: bool = True
    eval_every: int = 100
    val_tasks: int = 200
    test_steps: int = 1
    test_lr: float = 0.5
    task_chunk: int | None = 4  # tasks per chunk; None = all at once (best on a GPU)
    workers: int | None = None  # threads over chunks; None = one per core on a CPU


@dataclass
class MetaTrainState:
    """Everything needed to continue training after an interruption."""

    theta: Params
    best_theta: Params
    optimizer: dict
    iteration: int = 0
    best_val: float = -1.0
    history: list[dict] = field(default_factory=list)
    generator: Tensor | None = None


def evaluate_tasks(
    forward: TaskForward, theta: Params, episodes: Episodes, steps: int, lr: float,
    chunk: int | None = 10, workers: int = 1,
) -> Tensor:
    """Query accuracy per task [T] after fine-tuning θ on each support set (in chunks of tasks)."""

    def one(sl: slice) -> Tensor:
        logits = finetune_and_predict(
            forward, theta, episodes.support_x[sl], episodes.support_y[sl],
            episodes.query_x[sl], steps, lr,
        )
        return (logits.argmax(-1) == episodes.query_y[sl]).float().mean(1)

    return torch.cat(map_task_chunks(one, episodes.batch, chunk, workers))


def meta_train(
    forward: TaskForward,
    theta: Params,
    train: FewShotData,
    val: FewShotData,
    settings: MetaTrainSettings,
    seed: int = 0,
    device: torch.device | str = "cpu",
    resume: MetaTrainState | None = None,
    checkpoint: Callable[[MetaTrainState], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = True,
) -> MetaTrainState:
    """Meta-train θ with MAML; keeps the θ with the best validation accuracy.

    `checkpoint(state)` is called after every validation, so an interrupted run can continue
    from the returned/stored `MetaTrainState` via `resume`.
    """
    s = settings
    sampler = EpisodeSampler(train, s.ways, s.shots, s.queries, rotate=s.rotate, seed=seed)
    val_sampler = EpisodeSampler(val, s.ways, s.shots, s.queries, rotate=False, seed=seed)
    val_episodes = val_sampler.sample_fixed(s.val_tasks, seed=seed + 1).to(device)
    state = resume or _fresh_state(theta, s)
    theta = {k: v.detach().to(device).requires_grad_() for k, v in state.theta.items()}
    optimizer = torch.optim.Adam(list(theta.values()), lr=s.meta_lr)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
    if state.generator is not None:
        sampler.generator.set_state(state.generator)
    workers = s.workers or default_workers(device)
    start = time.perf_counter()
    with progress_bar(s.iterations, "meta-training", enabled=progress) as bar:
        bar.advance(state.iteration)
        while state.iteration < s.iterations:
            ep = sampler.sample(s.meta_batch).to(device)
            loss, acc, grads = meta_gradient(
                forward, theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y,
                s.inner_lr, s.adaptation_steps, s.first_order, s.task_chunk, workers,
            )
            for p, g in zip(theta.values(), grads, strict=True):
                p.grad = g
            optimizer.step()
            state.iteration += 1
            done = state.iteration == s.iterations
            if state.iteration % s.eval_every == 0 or done:
                _validate(forward, theta, val_episodes, s, state, loss, float(acc.mean()), workers)
                state.optimizer = copy.deepcopy(optimizer.state_dict())
                state.generator = sampler.generator.get_state()
                entry = state.history[-1]
                log(f"iteration {state.iteration}: train loss {entry['train_loss']:.4f}, "
                    f"val accuracy {entry['val_accuracy']:.4f} ({time.perf_counter() - start:.0f} s)")
                if checkpoint is not None:
                    checkpoint(state)
                bar.advance(status=f"val {entry['val_accuracy']:.3f}")
            else:
                bar.advance()
    return state


def _fresh_state(theta: Params, s: MetaTrainSettings) -> MetaTrainState:
    detached = {k: v.detach().clone() for k, v in theta.items()}
    return MetaTrainState(theta=detached, best_theta=copy.deepcopy(detached), optimizer={})


def _validate(
    forward: TaskForward, theta: Params, val_episodes: Episodes, s: MetaTrainSettings,
    state: MetaTrainState, train_loss: float, train_acc: float, workers: int,
) -> None:
    val_acc = float(evaluate_tasks(forward, theta, val_episodes, s.test_steps, s.test_lr,
                                   s.task_chunk, workers).mean())
    state.theta = {k: v.detach().clone() for k, v in theta.items()}
    if val_acc > state.best_val:
        state.best_val = val_acc
        state.best_theta = {k: v.detach().clone() for k, v in theta.items()}
    state.history.append({
        "iteration": state.iteration, "train_loss": train_loss, "train_accuracy": train_acc,
        "val_accuracy": val_acc,
    })
