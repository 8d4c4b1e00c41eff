"""DP-SGD: differentially private training of a classifier, through Opacus.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential
Privacy", CCS 2016. Batches are drawn by Poisson sampling (each record independently with rate
q = batch_size / N); every record's gradient is clipped to L2 norm at most `max_grad_norm`, and
Gaussian noise of standard deviation noise_multiplier · max_grad_norm is added to their sum. A
privacy accountant turns (noise multiplier, q, steps, δ) into the ε actually spent, which bounds
what any membership inference attack can gain. Batch norm mixes the records of a batch (so a
record's gradient depends on the others), hence it is replaced by group norm
(opacus.validators.ModuleValidator.fix) before training. The noise multiplier is given, or solved
for a target ε over the planned epochs. Opacus (Yousefpour et al. 2021) is the `dp` extra.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.progress import progress_bar
from poisonlab.training.supervised import CheckpointStore


@dataclass
class DPSGDResult:
    """The trained model (group norm in place of batch norm, eval mode) and its privacy cost."""

    model: nn.Module
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    history: dict = field(default_factory=dict)


def _opacus():
    try:
        import opacus
    except ImportError as exc:
        raise ConfigError("DP-SGD needs opacus: pip install 'poisonlab[dp]'") from exc
    return opacus


def dp_compatible(model: nn.Module) -> nn.Module:
    """A copy of `model` that Opacus can train: batch norm replaced by group norm, in-place
    activations made out-of-place (Opacus' backward hooks forbid in-place ops on their outputs).
    The layer names stay, so `dp_compatible(build_model(...)).load_state_dict(...)` reloads a
    DP-trained model."""
    validator = _opacus().validators.ModuleValidator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = validator.fix(model)
    for module in fixed.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    errors = validator.validate(fixed, strict=False)
    if errors:
        raise ShapeError(f"model cannot be trained with DP-SGD: {errors[0]}")
    return fixed


def _lr(cfg: DPSGD.Config, step: int, total: int) -> float:
    if cfg.schedule == "none":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def _make_private(model: nn.Module, train: ImageSet, cfg: DPSGD.Config, delta: float, seed: int):
    """(engine, private model, DP optimizer, Poisson data loader), all seeded by `seed`."""
    opacus = _opacus()
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    common = {"module": model, "optimizer": opt, "data_loader": loader,
              "max_grad_norm": cfg.max_grad_norm, "poisson_sampling": True,
              "noise_generator": torch.Generator(device=next(model.parameters()).device)
              .manual_seed(seed + 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes about secure RNG and the accountant's defaults
        engine = opacus.PrivacyEngine(accountant=cfg.accountant)
        if cfg.target_epsilon is not None:
            private, dp_opt, dp_loader = engine.make_private_with_epsilon(
                **common, target_epsilon=cfg.target_epsilon, target_delta=delta, epochs=cfg.epochs)
        else:
            private, dp_opt, dp_loader = engine.make_private(
                **common, noise_multiplier=cfg.noise_multiplier)
    return engine, private, dp_opt, dp_loader


def _restore(store, model, dp_opt, engine, loader, history) -> tuple[int, int]:
    """(epoch, step) to continue from; the accountant's history is rebuilt from the step count."""
    state = store.load() if store is not None else None
    if state is None:
        return 0, 0
    model.load_state_dict(state["model"])
    dp_opt.original_optimizer.load_state_dict(state["optimizer"])
    loader.batch_sampler.generator.set_state(state["sampler_generator"])
    dp_opt.generator.set_state(state["noise_generator"])
    history.update(state["history"])
    steps = int(state["steps"])
    if steps:
        engine.accountant.history = [(dp_opt.noise_multiplier, loader.sample_rate, steps)]
    return int(state["epoch"]), steps


class DPSGD:
    """DP-SGD training of a classifier; `DPSGD(config=..., seed=...).train(model, data)`.

    The seed fixes the initial state of torch's generator, the Poisson sampler (seed) and the
    noise (seed + 1); the device defaults to poisonlab.device.default_device().
    """

    class Config(Settings):
        """Settings of one DP-SGD run. Give exactly one of noise_multiplier and target_epsilon.

        epochs: passes over the training set. batch_size: the expected (Poisson) batch size.
        lr, momentum: SGD's. noise_multiplier: noise standard deviation over max_grad_norm.
        target_epsilon: solve for the noise multiplier that spends this ε over `epochs`.
        max_grad_norm: the per-record clipping norm. delta: None means 1 / len(train).
        accountant: opacus accountant name ("rdp": the moments accountant of Abadi et al. in Rényi
        form). schedule: "cosine" (per step, from lr to 0) or "none".
        """

        epochs: int = Field(20, ge=1)
        batch_size: int = Field(256, ge=1)
        lr: float = Field(0.5, gt=0)
        momentum: float = Field(0.9, ge=0)
        noise_multiplier: float | None = Field(1.0, gt=0)
        target_epsilon: float | None = Field(None, gt=0)
        max_grad_norm: float = Field(1.0, gt=0)
        delta: float | None = Field(None, gt=0, lt=1)
        accountant: Literal["rdp", "prv", "gdp"] = "rdp"
        schedule: Literal["cosine", "none"] = "cosine"

        @model_validator(mode="after")
        def _one_noise_setting(self) -> DPSGD.Config:
            if (self.noise_multiplier is None) == (self.target_epsilon is None):
                raise ValueError("give exactly one of noise_multiplier and target_epsilon")
            return self

    def __init__(self, *, config: DPSGD.Config | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()

    def train(self, model: nn.Module, data: ImageSet, *, progress: bool = False,
              checkpoint: CheckpointStore | None = None) -> DPSGDResult:
        """Train a DP-compatible copy of `model` (see dp_compatible) with DP-SGD on `data`.

        checkpoint: a poisonlab.training.supervised.CheckpointStore; the state is saved after
        every epoch and training resumes from it (the accountant continues from the steps
        already taken).
        """
        cfg, device = self.config, self.device
        if len(data) == 0:
            raise ShapeError("training set is empty")
        delta = cfg.delta if cfg.delta is not None else 1.0 / len(data)
        torch.manual_seed(self.seed)
        net = dp_compatible(model).to(device)
        engine, private, dp_opt, loader = _make_private(net, data, cfg, delta, self.seed)
        history: dict = {"loss": [], "train_acc": [], "epsilon": [], "epoch_seconds": []}
        start, step = _restore(checkpoint, net, dp_opt, engine, loader, history)
        steps_per_epoch = len(loader)
        total = cfg.epochs * steps_per_epoch
        with (progress_bar(total - start * steps_per_epoch, "DP-SGD", enabled=progress) as bar,
              warnings.catch_warnings()):
            # Opacus' hooks on the first layer, whose input needs no gradient: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            # The RDP accountant's optimum at the edge of its orders: ε is still a valid upper
            # bound, only not the tightest. (With a huge noise multiplier it printed a line.)
            warnings.filterwarnings("ignore", message="Optimal order is the")
            for epoch in range(start, cfg.epochs):
                t0 = time.perf_counter()
                loss, acc, step = _epoch(private, dp_opt, loader, cfg, device, step, total, bar)
                _check_finite(net, loss, epoch, cfg, float(dp_opt.noise_multiplier))
                history["loss"].append(loss)
                history["train_acc"].append(acc)
                history["epsilon"].append(float(engine.get_epsilon(delta)))
                history["epoch_seconds"].append(time.perf_counter() - t0)
                if checkpoint is not None:
                    checkpoint.save(_state(net, dp_opt, loader, history, epoch + 1, step))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the")
            epsilon = float(engine.get_epsilon(delta)) if step else 0.0
        trained = dp_compatible(model)
        trained.load_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()})
        return DPSGDResult(trained.eval(), epsilon, delta, float(dp_opt.noise_multiplier),
                           float(loader.sample_rate), step, history)


def _check_finite(net: nn.Module, loss: float, epoch: int, cfg: DPSGD.Config,
                  noise: float) -> None:
    """ConfigError naming the settings when an epoch left the loss or the weights non-finite:
    every later number of this model would be NaN (it surfaced as "membership scores contain
    NaN" minutes later, naming nothing)."""
    if math.isfinite(loss) and all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        return
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the weights are not finite"
    raise ConfigError(f"DP-SGD diverged: {what} after epoch {epoch + 1} of {cfg.epochs} "
                      f"(noise multiplier {noise:g}, max grad norm {cfg.max_grad_norm:g}, lr "
                      f"{cfg.lr:g}: the noise or the step too large?)")


def _epoch(private, dp_opt, loader, cfg, device, step, total, bar) -> tuple[float, float, int]:
    private.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        for group in dp_opt.param_groups:
            group["lr"] = _lr(cfg, step, total)
        dp_opt.zero_grad(set_to_none=True)
        logits = private(x)
        loss = nn.functional.cross_entropy(logits, y, reduction="sum") / max(len(y), 1)
        loss.backward()
        dp_opt.step()  # an empty Poisson batch still takes a (noise-only) step
        loss_sum += float(loss.detach()) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        step += 1
        bar.advance(status=f"loss {loss_sum / max(seen, 1):.3f}")
    return loss_sum / max(seen, 1), correct / max(seen, 1), step


def _state(net, dp_opt, loader, history, epoch, steps) -> dict:
    return {
        "model": {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
        "optimizer": dp_opt.original_optimizer.state_dict(),
        "sampler_generator": loader.batch_sampler.generator.get_state(),
        "noise_generator": dp_opt.generator.get_state(),
        "history": history,
        "epoch": epoch,
        "steps": steps,
    }
