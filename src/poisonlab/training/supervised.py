"""Supervised training of image classifiers on in-memory tensors, with checkpoints and resume.

Images stay float32 [N, C, H, W] in [0, 1] (poisonlab.data.types.ImageSet); batches are drawn by a
seeded permutation and augmented on the tensors themselves (random crop with zero padding 4 and
horizontal flip, the CIFAR recipe of He et al. 2016). The learning rate follows a schedule computed
from the global step, so a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, Protocol

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from poisonlab.config import Settings
from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.errors import ConfigError, ModelFileError
from poisonlab.progress import progress_bar


class TrainConfig(Settings):
    """Settings of one supervised training run (the seed and device are arguments of
    `train_classifier`, not settings).

    schedule: "cosine" (per step, from lr to 0), "onecycle" (linear warm-up over `warmup` of the
    run to lr, then cosine to 0), "step" (×gamma at each epoch in `milestones`), "none".
    augment: random crop (zero padding `crop_padding`) + horizontal flip, per batch on tensors.
    channels_last: NHWC memory layout (faster for ResNets on a CPU, slower for tiny CNNs).
    """

    epochs: int = Field(30, ge=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    schedule: Literal["cosine", "onecycle", "step", "none"] = "cosine"
    milestones: tuple[Annotated[int, Field(ge=1)], ...] = ()  # epoch 0 or below never fires

    @field_validator("milestones")
    @classmethod
    def _ascending(cls, milestones: tuple[int, ...]) -> tuple[int, ...]:
        """Strictly ascending, as every other schedule's steps (a repeat multiplies by gamma
        twice at one epoch, out of order reads as a typo)."""
        if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
            raise ValueError(f"milestones must ascend strictly, got {list(milestones)}")
        return milestones
    gamma: float = Field(0.1, gt=0)
    warmup: float = Field(0.15, ge=0, lt=1)
    augment: bool = False
    crop_padding: int = Field(4, ge=0)
    flip: bool = True
    channels_last: bool = False


class CheckpointStore(Protocol):
    """Where training state goes between epochs: `save(state)` and `load() -> state | None`."""

    def save(self, state: dict) -> None: ...

    def load(self) -> dict | None: ...


class FileCheckpoint:
    """Training state in one file (torch.save); loaded back with weights_only=True."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or foreign file
            raise ModelFileError(f"cannot load training checkpoint {self.path}: {exc}") from exc


class RunCheckpoint:
    """Training state kept in a run directory (poisonlab.runs.Run.save_state / load_state)."""

    def __init__(self, run, name: str) -> None:
        self.run = run
        self.name = name

    def save(self, state: dict) -> None:
        self.run.save_state(self.name, state)

    def load(self) -> dict | None:
        return self.run.load_state(self.name)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate at global step `step` under cfg.schedule."""
    total = max(1, cfg.epochs * steps_per_epoch)
    t = min(step / total, 1.0)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if cfg.schedule == "onecycle":
        w = max(cfg.warmup, 1e-8)
        if t < w:
            return cfg.lr * (0.1 + 0.9 * t / w)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - w) / (1.0 - w)))
    if cfg.schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return cfg.lr


def augment_batch(
    x: torch.Tensor, padding: int = 4, flip: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop (after zero padding) and random horizontal flip, independently per image."""
    n, c, h, w = x.shape
    if padding > 0:
        shifts = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
        xp = F.pad(x, (padding, padding, padding, padding))
        rows = (torch.arange(h, device=x.device)[None, :] + shifts[0][:, None])[:, None, :, None]
        cols = (torch.arange(w, device=x.device)[None, :] + shifts[1][:, None])[:, None, None, :]
        idx_n = torch.arange(n, device=x.device)[:, None, None, None]
        idx_c = torch.arange(c, device=x.device)[None, :, None, None]
        x = xp[idx_n, idx_c, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False
    )


def _restore(model, opt, store, gen, history) -> int:
    state = store.load() if store is not None else None
    if state is None:
        return 0
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    history.update(state["history"])
    return int(state["epoch"])


def _epoch(model, train, cfg, opt, gen, device, step0, steps, on_batch) -> tuple[float, float, int]:
    model.train()
    perm = torch.randperm(len(train), generator=gen)
    total_loss, correct, seen, step = 0.0, 0, 0, step0
    for i in range(steps):
        idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        x, y = train.x[idx], train.y[idx]
        if cfg.augment:
            x = augment_batch(x, cfg.crop_padding, cfg.flip, gen)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, steps)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        total_loss += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        on_batch(float(loss.detach()))
    return total_loss / max(seen, 1), correct / max(seen, 1), step


def place(model: nn.Module, device, channels_last: bool) -> nn.Module:
    """Move `model` to `device` in the memory layout its recipe trains in. A model reloaded from
    weights must be placed the same way as a freshly trained one: the two layouts round
    differently, and a sensitive consumer (Neural Cleanse's short mask optimisation) then gives
    different numbers for the same weights."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def train_classifier(
    model: nn.Module,
    train: ImageSet,
    cfg: TrainConfig,
    val: ImageSet | None = None,
    progress: bool = True,
    checkpoint: CheckpointStore | str | Path | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict:
    """Train `model` in place with cross-entropy; return the history.

    history: {"loss", "train_acc", "val_acc" (if val), "lr", "epoch_seconds"}, one entry per epoch.
    checkpoint: a CheckpointStore or a file path; the state (model, optimizer, epoch, RNG, history)
    is saved after every epoch and, when present at start, training resumes from it.
    """
    if len(train) == 0:
        raise ConfigError("training set is empty")
    store = FileCheckpoint(checkpoint) if isinstance(checkpoint, str | Path) else checkpoint
    device = torch.device(device) if device is not None else default_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    place(model, device, cfg.channels_last)
    opt = _optimizer(model, cfg)
    history: dict = {"loss": [], "train_acc": [], "val_acc": [], "lr": [], "epoch_seconds": []}
    start = _restore(model, opt, store, gen, history)
    steps = math.ceil(len(train) / cfg.batch_size)
    total = (cfg.epochs - start) * steps
    with progress_bar(total, "training", enabled=progress and total > 0) as bar:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()

            def tick(loss: float, epoch: int = epoch) -> None:
                bar.advance(status=f"epoch {epoch + 1}/{cfg.epochs} loss {loss:.3f}")

            loss, acc, _ = _epoch(model, train, cfg, opt, gen, device, epoch * steps, steps, tick)
            if not math.isfinite(loss):  # every later number of this model would be NaN
                raise ConfigError(f"training diverged: the loss is {loss} in epoch {epoch + 1} "
                                  f"of {cfg.epochs} (lr {cfg.lr:g} with {cfg.optimizer}: too "
                                  "large?)")
            history["loss"].append(loss)
            history["train_acc"].append(acc)
            history["lr"].append(lr_at(cfg, epoch * steps, steps))
            if val is not None:
                history["val_acc"].append(evaluate(model, val, device=device))
            history["epoch_seconds"].append(time.perf_counter() - t0)
            if store is not None:
                store.save(_state(model, opt, gen, history, epoch + 1, cfg))
            if on_epoch_end is not None:
                on_epoch_end(epoch, history)
    model.eval()
    return history


def _state(model, opt, gen, history, epoch, cfg) -> dict:
    config = cfg.model_dump(mode="json")
    return {
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "history": history,
        "epoch": epoch,
        "config": config,
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Logits for `x` in eval mode, computed in batches; returned on the CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    if not out:
        return torch.empty(0)
    return torch.cat(out)


def predict_proba(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Softmax probabilities for `x` (eval mode, batched, on the CPU)."""
    return predict_logits(model, x, batch_size, device).softmax(-1)


@torch.no_grad()
def predict_features(
    model: nn.Module, x: torch.Tensor, batch_size: int = 512, device: torch.device | None = None
) -> torch.Tensor:
    """Penultimate features `model.features(x)` (eval mode, batched, on the CPU)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model.features(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(
    model: nn.Module, data: ImageSet, batch_size: int = 512, device: torch.device | None = None
) -> float:
    """Accuracy of `model` on `data` (fraction in [0, 1]); NaN for an empty set."""
    if len(data) == 0:
        return float("nan")
    pred = predict_logits(model, data.x, batch_size, device).argmax(1)
    return float((pred == data.y).float().mean())
