"""The MAML meta-training loop: sampling, Adam on the meta-loss, validation, best model, resume.

Settings are `MetaTrainConfig`; how the work is spread (`task_chunk` tasks per chunk, `workers`
threads over chunks) and the fine-tuning used for validation are arguments of `meta_train`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import Tensor

from poisonlab.config import Settings
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


class MetaTrainConfig(Settings):
    """MAML meta-training settings; the defaults are Kato et al.'s (Omniglot 5-way 5-shot).

    ways, shots, queries: N classes per task, K support and Q query images per class.
    meta_batch: tasks per meta-iteration.
    inner_lr, adaptation_steps: the inner loop α and its number of gradient steps.
    meta_lr: the Adam step β on the meta-loss.
    iterations: meta-iterations (0: only validate the initial θ).
    first_order: drop the second-order terms of the meta-gradient (FOMAML).
    rotate: augment classes by rotations of 90° multiples (Santoro et al.).
    eval_every: meta-iterations between validations (and checkpoints).
    val_tasks: validation tasks, fixed for the whole run.
    """

    ways: int = Field(5, ge=2)
    shots: int = Field(5, ge=1)
    queries: int = Field(5, ge=1)
    meta_batch: int = Field(32, ge=1)
    inner_lr: float = Field(0.5, gt=0, allow_inf_nan=False)
    meta_lr: float = Field(0.003, gt=0, allow_inf_nan=False)
    adaptation_steps: int = Field(1, ge=1)
    iterations: int = Field(60000, ge=0)
    first_order: bool = False
    rotate: bool = True
    eval_every: int = Field(500, ge=1)
    val_tasks: int = Field(200, ge=1)


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
    cfg: MetaTrainConfig,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    resume: MetaTrainState | None = None,
    checkpoint: Callable[[MetaTrainState], None] | None = None,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = True,
    finetune_steps: int | None = None,
    finetune_lr: float | None = None,
    task_chunk: int | None = 4,
    workers: int | None = None,
) -> MetaTrainState:
    """Meta-train θ with MAML; keeps the θ with the best validation accuracy.

    Validation fine-tunes on each validation task's support set with `finetune_steps` steps at
    `finetune_lr` (the meta-test recipe; default the inner loop's `adaptation_steps` and
    `inner_lr`). `task_chunk` tasks go through one call (None: all at once, best on a GPU), on
    `workers` threads (None: one per core on a CPU).
    `checkpoint(state)` is called after every validation, so an interrupted run can continue
    from the returned/stored `MetaTrainState` via `resume`.
    """
    s = cfg
    val_fit = (s.adaptation_steps if finetune_steps is None else finetune_steps,
               s.inner_lr if finetune_lr is None else finetune_lr)
    sampler = EpisodeSampler(train, s.ways, s.shots, s.queries, rotate=s.rotate, seed=seed)
    val_sampler = EpisodeSampler(val, s.ways, s.shots, s.queries, rotate=False, seed=seed)
    val_episodes = val_sampler.sample_fixed(s.val_tasks, seed=seed + 1).to(device)
    state, theta, optimizer = _start(theta, s, sampler, device, resume)
    workers = workers or default_workers(device)
    start = time.perf_counter()
    with progress_bar(s.iterations, "meta-training", enabled=progress) as bar:
        bar.advance(state.iteration)
        while state.iteration < s.iterations:
            ep = sampler.sample(s.meta_batch).to(device)
            loss, acc, grads = meta_gradient(
                forward, theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y,
                s.inner_lr, s.adaptation_steps, s.first_order, task_chunk, workers,
            )
            for p, g in zip(theta.values(), grads, strict=True):
                p.grad = g
            optimizer.step()
            state.iteration += 1
            done = state.iteration == s.iterations
            if state.iteration % s.eval_every == 0 or done:
                _validate(forward, theta, val_episodes, val_fit, task_chunk, workers, state, loss,
                          float(acc.mean()))
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


def _start(theta: Params, s: MetaTrainConfig, sampler: EpisodeSampler, device: torch.device | str,
           resume: MetaTrainState | None) -> tuple[MetaTrainState, Params, torch.optim.Adam]:
    """The state to continue (or a fresh one), θ as leaves on `device`, and Adam (restored)."""
    if resume is None:
        detached = {k: v.detach().clone() for k, v in theta.items()}
        resume = MetaTrainState(theta=detached, best_theta=copy.deepcopy(detached), optimizer={})
    state = resume
    theta = {k: v.detach().to(device).requires_grad_() for k, v in state.theta.items()}
    optimizer = torch.optim.Adam(list(theta.values()), lr=s.meta_lr)
    if state.optimizer:
        optimizer.load_state_dict(state.optimizer)
    if state.generator is not None:
        sampler.generator.set_state(state.generator)
    return state, theta, optimizer


def _validate(
    forward: TaskForward, theta: Params, val_episodes: Episodes, fit: tuple[int, float],
    chunk: int | None, workers: int, state: MetaTrainState, train_loss: float, train_acc: float,
) -> None:
    val_acc = float(evaluate_tasks(forward, theta, val_episodes, *fit, chunk, workers).mean())
    state.theta = {k: v.detach().clone() for k, v in theta.items()}
    if val_acc > state.best_val:
        state.best_val = val_acc
        state.best_theta = {k: v.detach().clone() for k, v in theta.items()}
    state.history.append({
        "iteration": state.iteration, "train_loss": train_loss, "train_accuracy": train_acc,
        "val_accuracy": val_acc,
    })
