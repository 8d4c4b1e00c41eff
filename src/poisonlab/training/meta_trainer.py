"""The MAML meta-training loop: sampling, Adam on the meta-loss, validation, best model, resume.

Settings are `MetaTrainConfig`; how the work is spread (`task_chunk` tasks per chunk, `workers`
threads over chunks) and the fine-tuning used for validation are arguments of `meta_train`.

The meta-gradient is computed eagerly (`training.maml.meta_gradient`, the reference) or as one
compiled graph over the meta-batch (`training.compiled_maml`, same math): `compile` chooses
(default eager), and `auto` compiles only where it pays back, on a CPU when at least
`COMPILE_BREAK_EVEN` meta-iterations remain (the compile's first call costs minutes; `benchmarks/bench_maml.py --compiled` measures the
break-even). Validation always runs eagerly.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from poisonlab.config import Settings
from poisonlab.data.episodes import Episodes, EpisodeSampler
from poisonlab.data.types import FewShotData
from poisonlab.errors import ConfigError
from poisonlab.progress import progress_bar
from poisonlab.training.maml import (
    Params,
    TaskForward,
    default_workers,
    finetune_and_predict,
    map_task_chunks,
    meta_gradient,
)

# Meta-iterations from which `compile: auto` compiles: the first call's compile time over the
# per-iteration saving against the eager batched path (bench_maml.py --compiled, docs/results.md),
# from the idle measurements of the issue (about 2 min to compile, 0.2 s saved per iteration).
COMPILE_BREAK_EVEN = 600


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
    compile: the meta-gradient as one compiled graph (on), eager (off, the default), or compiled
      on a CPU when at least COMPILE_BREAK_EVEN meta-iterations remain (auto).
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
    compile: Literal["auto", "on", "off"] = "off"


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
    compiled_forward: TaskForward | None = None,
) -> MetaTrainState:
    """Meta-train θ with MAML; keeps the θ with the best validation accuracy.

    Validation fine-tunes on each validation task's support set with `finetune_steps` steps at
    `finetune_lr` (the meta-test recipe; default the inner loop's `adaptation_steps` and
    `inner_lr`). `task_chunk` tasks go through one call (None: all at once, best on a GPU), on
    `workers` threads (None: one per core on a CPU). `compiled_forward` is `forward` written for
    the compiler (e.g. `cnn4_forward_tasks_matmul`); without it the meta-gradient stays eager.
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
    step = _meta_step(forward, compiled_forward, s, s.iterations - state.iteration, device,
                      task_chunk, workers, log)
    start = time.perf_counter()
    with progress_bar(s.iterations, "meta-training", enabled=progress) as bar:
        bar.advance(state.iteration)
        while state.iteration < s.iterations:
            ep = sampler.sample(s.meta_batch).to(device)
            loss, acc, grads = step(theta, ep)
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


MetaStep = Callable[[Params, Episodes], tuple[float, Tensor, list[Tensor]]]


def use_compiled(s: MetaTrainConfig, remaining: int, device: torch.device | str,
                 compilable: bool) -> bool:
    """Whether `meta_train` compiles the meta-gradient (`compile`, see MetaTrainConfig)."""
    if s.compile == "on" and not compilable:
        raise ConfigError("meta.compile=on: this model has no compiled form (use auto or off)")
    if s.compile == "auto":
        return compilable and torch.device(device).type == "cpu" and remaining >= COMPILE_BREAK_EVEN
    return s.compile == "on"


def _meta_step(forward: TaskForward, compiled_forward: TaskForward | None, s: MetaTrainConfig,
               remaining: int, device: torch.device | str, chunk: int | None, workers: int,
               log: Callable[[str], None]) -> MetaStep:
    """(loss, per-task accuracy, gradients in θ's order) of one meta-batch: eager or compiled.
    Under `auto` a compile that fails (no C++ compiler, an unsupported backend) falls back to
    eager with one log line; under `on` it raises."""

    def eager(theta: Params, ep: Episodes):
        return meta_gradient(forward, theta, ep.support_x, ep.support_y, ep.query_x, ep.query_y,
                             s.inner_lr, s.adaptation_steps, s.first_order, chunk, workers)

    if not use_compiled(s, remaining, device, compiled_forward is not None):
        return eager
    from poisonlab.training.compiled_maml import compiled_meta_gradient

    log("meta-gradient: one compiled graph per meta-batch (the first iteration compiles, or "
        "loads the compiled code from the cache)")
    graph = compiled_meta_gradient(compiled_forward)
    fallen_back = False

    def compiled(theta: Params, ep: Episodes):
        nonlocal fallen_back
        if fallen_back:
            return eager(theta, ep)
        try:
            loss, acc, grads = graph({k: v.detach() for k, v in theta.items()}, ep.support_x,
                                     ep.support_y, ep.query_x, ep.query_y, s.inner_lr,
                                     s.adaptation_steps, s.first_order)
        except Exception as exc:  # the compiler's failures have no common base class
            if s.compile == "on":
                raise
            fallen_back = True
            log(f"meta-gradient: compiling failed ({type(exc).__name__}), continuing eagerly")
            return eager(theta, ep)
        return float(loss), acc, [grads[k] for k in theta]
    return compiled


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
