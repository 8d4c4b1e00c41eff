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
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import Trigger
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError
from poisonlab.progress import StatusFn
from poisonlab.training.supervised import augment_batch

# MCL's reference schedule: lr 0.1 in epoch 0, 0.01 in epochs 1-9, 0.001 from epoch 10.
REFERENCE_LR_STEPS: tuple[tuple[int, float], ...] = ((0, 0.1), (1, 0.01), (10, 0.001))


@dataclass
class FineTuneConfig:
    """One fine-tuning pass over a clean subset (defaults: MCL's reference schedule).

    freeze_bn: keep batch-norm layers in eval mode (running statistics fixed) while training.
    """

    epochs: int = 20
    batch_size: int = 64
    lr_steps: tuple[tuple[int, float], ...] = REFERENCE_LR_STEPS
    momentum: float = 0.9
    weight_decay: float = 1e-4
    augment: bool = False
    crop_padding: int = 4
    freeze_bn: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1:
            raise ConfigError(f"need epochs >= 0 and batch_size >= 1, got {self.epochs}, "
                              f"{self.batch_size}")
        if not self.lr_steps or self.lr_steps[0][0] != 0:
            raise ConfigError(f"lr_steps must start at epoch 0, got {self.lr_steps}")

    def lr(self, epoch: int) -> float:
        """Learning rate of `epoch`: the last step whose start epoch is <= epoch."""
        return [lr for start, lr in self.lr_steps if start <= epoch][-1]


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fine_tune_loop(model: nn.Module, clean: ImageSet, cfg: FineTuneConfig, loss_fn: LossFn,
                   progress: StatusFn | None = None) -> list[float]:
    """Train `model` in place on `clean` with `loss_fn(model, x, y)`; returns the mean loss per
    epoch; `progress(status)` is called after each epoch."""
    if len(clean) == 0:
        raise ConfigError("the clean set for fine-tuning is empty")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
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


def fine_tune(model: nn.Module, clean: ImageSet, cfg: FineTuneConfig | None = None,
              progress: StatusFn | None = None) -> nn.Module:
    """Plain fine-tuning: a copy of `model` trained with cross-entropy on `clean`."""
    tuned = copy.deepcopy(model)
    fine_tune_loop(tuned, clean, cfg or FineTuneConfig(), lambda m, x, y: F.cross_entropy(m(x), y),
                   progress)
    return tuned


def nc_unlearning(
    model: nn.Module,
    clean: ImageSet,
    trigger: Trigger,
    fraction: float = 0.2,
    cfg: FineTuneConfig | None = None,
    progress: StatusFn | None = None,
) -> nn.Module:
    """Neural Cleanse unlearning: a copy of `model` fine-tuned with `trigger` stamped on a random
    `fraction` of each clean batch, labels unchanged."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"unlearning fraction must be in [0, 1], got {fraction}")
    cfg = cfg or FineTuneConfig()
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        stamp = (torch.rand(len(x), generator=gen) < fraction).to(x.device)
        x = torch.where(stamp[:, None, None, None], trigger.apply(x), x)
        return F.cross_entropy(m(x), y)

    tuned = copy.deepcopy(model)
    fine_tune_loop(tuned, clean, cfg, loss, progress)
    return tuned
