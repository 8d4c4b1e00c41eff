"""Fine-tuning defences on a small clean set: plain fine-tuning and Neural Cleanse unlearning.

- Plain fine-tuning (Liu, Dolan-Gavitt, Garg, "Fine-Pruning: Defending Against Backdooring Attacks
  on Deep Neural Networks", RAID 2018, the fine-tuning part): continue training the suspect model
  with cross-entropy on the clean subset.
- Neural Cleanse unlearning (Wang et al., "Neural Cleanse", IEEE S&P 2019, section VI-C): fine-tune
  with the reverse-engineered trigger stamped on a fraction (20% in the paper) of the clean inputs,
  under their true labels, so the model learns to ignore the trigger.

Both share one loop with MCL (poisonlab.defenses.mcl): epochs over the clean subset in shuffled
batches, SGD with momentum, a per-epoch piecewise-constant learning rate.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from pydantic import Field, field_validator
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import Trigger
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.errors import ShapeError
from poisonlab.progress import StatusFn
from poisonlab.training.supervised import augment_batch

# MCL's reference schedule: lr 0.1 in epoch 0, 0.01 in epochs 1-9, 0.001 from epoch 10.
REFERENCE_LR_STEPS: tuple[tuple[int, float], ...] = ((0, 0.1), (1, 0.01), (10, 0.001))


class FineTuneConfig(Settings):
    """One fine-tuning pass over a clean subset (defaults: MCL's reference schedule).

    epochs, batch_size: passes over the clean subset and its shuffled mini-batches.
    lr_steps: (start epoch, learning rate) pairs, the first at epoch 0: a piecewise-constant
        per-epoch learning rate for SGD with `momentum` and `weight_decay`.
    augment: random crop (zero padding `crop_padding`) + horizontal flip of each batch.
    freeze_bn: keep batch-norm layers in eval mode (running statistics fixed) while training.
    """

    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr_steps: tuple[tuple[int, float], ...] = REFERENCE_LR_STEPS
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: bool = False
    crop_padding: int = Field(4, ge=0)
    freeze_bn: bool = False

    @field_validator("lr_steps")
    @classmethod
    def _schedule(cls, steps: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        if not steps or steps[0][0] != 0:
            raise ValueError("must be non-empty and start at epoch 0")
        starts = [start for start, _ in steps]
        if starts != sorted(set(starts)):  # a later step would hide an earlier one
            raise ValueError(f"the start epochs {starts} must be ascending, each once")
        if any(lr <= 0 for _, lr in steps):
            raise ValueError("learning rates must be > 0")
        return steps

    def lr(self, epoch: int) -> float:
        """Learning rate of `epoch`: the last step whose start epoch is <= epoch."""
        return [lr for start, lr in self.lr_steps if start <= epoch][-1]


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fine_tune_loop(model: nn.Module, clean: ImageSet, cfg: FineTuneConfig, loss_fn: LossFn,
                   progress: StatusFn | None = None, *, seed: int = 0) -> list[float]:
    """Train `model` in place on `clean` with `loss_fn(model, x, y)`, batches drawn from `seed`;
    returns the mean loss per epoch; `progress(status)` is called after each epoch."""
    if len(clean) == 0:
        raise ShapeError("the clean set for fine-tuning is empty")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr(0), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    losses = []
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr(epoch)
        _train_mode(model, cfg.freeze_bn)
        perm = torch.randperm(len(clean), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(clean), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x, y = clean.x[idx], clean.y[idx]
            if cfg.augment:
                x = augment_batch(x, cfg.crop_padding, True, gen)
            loss = loss_fn(model, x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        losses.append(total / seen)
        if progress is not None:
            progress(f"epoch {epoch + 1}: loss {losses[-1]:.3f}")
    model.eval()
    return losses


def _train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class FineTuning:
    """Plain fine-tuning: `purify(model, clean)` trains a copy with cross-entropy on `clean`."""

    Config = FineTuneConfig

    def __init__(self, *, config: FineTuneConfig | None = None, seed: int = 0, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = int(seed)

    def purify(self, model: nn.Module, clean: ImageSet,
               progress: StatusFn | None = None) -> nn.Module:
        """A fine-tuned copy of `model` (`model` is left untouched)."""
        tuned = copy.deepcopy(model)
        fine_tune_loop(tuned, clean, self.config, lambda m, x, y: F.cross_entropy(m(x), y),
                       progress, seed=self.seed)
        return tuned


class NCUnlearning:
    """Neural Cleanse unlearning: `purify(model, clean, trigger)` fine-tunes a copy with `trigger`
    stamped on a random `fraction` of each clean batch, labels unchanged."""

    class Config(Settings):
        """finetune: the fine-tuning pass. fraction: the share of each batch stamped with the
        reverse-engineered trigger (0.2 in the paper)."""

        finetune: FineTuneConfig = Field(default_factory=FineTuneConfig)
        fraction: float = Field(0.2, ge=0, le=1)

    def __init__(self, *, config: NCUnlearning.Config | None = None, seed: int = 0,
                 **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = int(seed)

    def purify(self, model: nn.Module, clean: ImageSet, trigger: Trigger,
               progress: StatusFn | None = None) -> nn.Module:
        """An unlearned copy of `model` (`model` is left untouched)."""
        fraction = self.config.fraction
        gen = torch.Generator().manual_seed(self.seed + 1)

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            stamp = (torch.rand(len(x), generator=gen) < fraction).to(x.device)
            x = torch.where(stamp[:, None, None, None], trigger.apply(x), x)
            return F.cross_entropy(m(x), y)

        tuned = copy.deepcopy(model)
        fine_tune_loop(tuned, clean, self.config.finetune, loss, progress, seed=self.seed)
        return tuned
