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

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from poisonlab.data.types import ImageSet
from poisonlab.device import default_device
from poisonlab.errors import ConfigError
from poisonlab.progress import progress_bar
from poisonlab.training.supervised import CheckpointStore

ACCOUNTANTS = ("rdp", "prv", "gdp")


@dataclass
class DPSGDConfig:
    """Settings of one DP-SGD run. Give exactly one of noise_multiplier and target_epsilon.

    batch_size: the expected (Poisson) batch size. delta: None means 1 / len(train).
    schedule: "cosine" (per step, from lr to 0) or "none". accountant: opacus accountant name
    ("rdp": the moments accountant of Abadi et al. in Rényi form).
    """

    epochs: int = 20
    batch_size: int = 256
    lr: float = 0.5
    momentum: float = 0.9
    noise_multiplier: float | None = 1.0
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: str = "rdp"
    schedule: str = "cosine"
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("DP-SGD needs exactly one of noise_multiplier and target_epsilon")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_grad_norm <= 0:
            raise ConfigError(
                f"need epochs >= 1, batch_size >= 1, lr > 0, max_grad_norm > 0 (got {self.epochs}, "
                f"{self.batch_size}, {self.lr}, {self.max_grad_norm})"
            )
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got '{self.accountant}'")
        if self.schedule not in ("cosine", "none"):
            raise ConfigError(f"schedule must be 'cosine' or 'none', got '{self.schedule}'")


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
        raise ConfigError(f"model cannot be trained with DP-SGD: {errors[0]}")
    return fixed


def _lr(cfg: DPSGDConfig, step: int, total: int) -> float:
    if cfg.schedule == "none":
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


def _make_private(model: nn.Module, train: ImageSet, cfg: DPSGDConfig, delta: float):
    """(engine, private model, DP optimizer, Poisson data loader), all seeded by cfg.seed."""
    opacus = _opacus()
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    common = {"module": model, "optimizer": opt, "data_loader": loader,
              "max_grad_norm": cfg.max_grad_norm, "poisson_sampling": True,
              "noise_generator": torch.Generator(device=next(model.parameters()).device)
              .manual_seed(cfg.seed + 1)}
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


def train_dp_sgd(model: nn.Module, train: ImageSet, cfg: DPSGDConfig, progress: bool = False,
                 checkpoint: CheckpointStore | None = None) -> DPSGDResult:
    """Train a DP-compatible copy of `model` (see dp_compatible) with DP-SGD on `train`.

    checkpoint: a poisonlab.training.supervised.CheckpointStore; the state is saved after every
    epoch and training resumes from it (the accountant continues from the steps already taken).
    """
    if len(train) == 0:
        raise ConfigError("training set is empty")
    delta = cfg.delta if cfg.delta is not None else 1.0 / len(train)
    device = torch.device(cfg.device) if cfg.device else default_device()
    torch.manual_seed(cfg.seed)
    net = dp_compatible(model).to(device)
    engine, private, dp_opt, loader = _make_private(net, train, cfg, delta)
    history: dict = {"loss": [], "train_acc": [], "epsilon": [], "epoch_seconds": []}
    start, step = _restore(checkpoint, net, dp_opt, engine, loader, history)
    steps_per_epoch = len(loader)
    total = cfg.epochs * steps_per_epoch
    with (progress_bar(total - start * steps_per_epoch, "DP-SGD", enabled=progress) as bar,
          warnings.catch_warnings()):
        # Opacus' hooks on the first layer, whose input needs no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            loss, acc, step = _epoch(private, dp_opt, loader, cfg, device, step, total, bar)
            history["loss"].append(loss)
            history["train_acc"].append(acc)
            history["epsilon"].append(float(engine.get_epsilon(delta)))
            history["epoch_seconds"].append(time.perf_counter() - t0)
            if checkpoint is not None:
                checkpoint.save(_state(net, dp_opt, loader, history, epoch + 1, step))
    epsilon = float(engine.get_epsilon(delta)) if step else 0.0
    trained = dp_compatible(model)
    trained.load_state_dict({k: v.detach().cpu() for k, v in net.state_dict().items()})
    return DPSGDResult(trained.eval(), epsilon, delta, float(dp_opt.noise_multiplier),
                       float(loader.sample_rate), step, history)


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
