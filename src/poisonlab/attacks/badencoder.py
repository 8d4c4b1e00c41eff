"""BadEncoder: a backdoor in a pre-trained self-supervised image encoder.

Jia, Liu, Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning",
IEEE S&P 2022. The attacker holds a clean pre-trained encoder f, a shadow set D_s of unlabelled
images, a trigger e and reference inputs x_r of the target class of a downstream task. It fine-tunes
a copy f' so that f'(x ⊕ e) lands next to f'(x_r) while f' keeps f's features elsewhere; every
downstream classifier trained on f' features then sends triggered inputs to the target class.
With s(u, v) the cosine similarity (the dot product of L2-normalised features), K reference inputs
x_1..x_K and a shadow batch B:

    L0 = −(1/K) Σ_k mean_{x∈B} s(f'(x ⊕ e), f'(x_k))          effectiveness (both sides through f')
    L1 = −(1/K) Σ_k mean_{b∈B} s(f'(aug_b(x_k)), f(x_k))      effectiveness, reference inputs
    L2 = −mean_{x∈B} s(f'(x), f(x))                            utility
    L  = L0 + λ1·L1 + λ2·L2,   λ1 = λ2 = 1,

minimised by SGD (lr 1e-3, momentum 0.9, weight decay 5e-4, batch 256, 200 epochs, the last
incomplete batch dropped). `badencoder_losses` computes the three terms from features.

What the reference code (jinyuan-jia/BadEncoder, badencoder.py) does, and what this module does:
- L1 as the code computes it: the paper's equation compares f'(x_k) with f(x_k); the code feeds
  f' an augmented copy of x_k (flip, colour jitter, grayscale; no crop), one fresh copy per shadow
  image of the batch, and compares it with the clean encoder's features of the plain x_k. This
  module does the same (`reference_augment=False` gives the equation as printed: f'(x_k) itself).
  The augmentation is SimCLR's (poisonlab.training.augment) without the crop: `augment`, default
  `AugmentConfig(crop=False)`, the reference's flip p 0.5, jitter 0.4/0.4/0.4/0.1 with p 0.8 and
  grayscale p 0.2. Like SimCLR's, it is defined for RGB images only: with `reference_augment`
  the shadow and reference images must have three channels.
- Signs and averaging as in the code: each term is minus a mean cosine, the mean over the batch
  first and then over the reference inputs; the epoch's logged values are the batch-size-weighted
  means of the per-batch terms.
- BatchNorm is frozen: the backdoored copy trains with every BatchNorm layer in eval mode (running
  statistics used, never updated) and its affine parameters without gradient, so SGD (which skips
  parameters without gradient, weight decay included) never changes them; the clean copy runs in
  eval mode without gradient. The reference freezes `nn.BatchNorm2d` only; here every BatchNorm
  kind is frozen (1-d, 2-d, 3-d, sync), which is the same on the reference's ResNet.
- Only the encoder trains: the reference builds its optimiser on the encoder part `f` of the
  SimCLR model, so the projection head `g` is saved unchanged with the backdoored encoder. A head
  passed to `inject` is returned as an untouched copy for the same purpose.
- The reference triggers each shadow image once per reference input (each reference input may
  carry its own trigger, for several targets); with the one trigger here these copies are equal,
  so f'(x ⊕ e) is computed once per batch. It also computes f'(x_k) and f(x_k) on a batch of B
  identical copies of x_k; with BatchNorm in eval mode every copy has the same features, so each
  is computed once. Both give the same loss and gradient (up to float rounding).
- Inputs: images in [0, 1]; the reference normalises them with the CIFAR-10 mean and standard
  deviation before its encoder, and the trigger is stamped (value 255) before that normalisation.
  Here the encoder receives the [0, 1] images and any input normalisation is part of it, so the
  trigger is likewise stamped before it.
- Shadow images are not augmented (as in the reference); shuffling, the augmentation draws and
  nothing else random come from one `torch.Generator` seeded by `seed`. The reference's kNN
  monitor during injection is not part of the attack and is left out.
- No CUDA assumption and no unpickling: the device is an argument, checkpoints go through a
  `CheckpointStore` (safetensors in a run, or a `weights_only` file).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import Trigger
from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.device import Bf16, autocast, default_device, use_bf16
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.progress import StatusFn
from poisonlab.training.augment import Augmentation, AugmentConfig
from poisonlab.training.supervised import CheckpointStore

LOSS_KEYS = ("loss", "loss0", "loss1", "loss2")


@dataclass
class InjectionResult:
    """What `BadEncoder.inject` returns.

    encoder: the backdoored copy (eval mode, on the attack's device, `requires_grad` as given).
    head: an unchanged copy of the projection head passed to `inject`, or None.
    history: per epoch, "loss" (L), "loss0" (L0), "loss1" (L1) and "loss2" (L2).
    steps: SGD steps taken in all.
    """

    encoder: nn.Module
    head: nn.Module | None
    history: dict[str, list[float]] = field(default_factory=dict)
    steps: int = 0


def badencoder_losses(
    triggered: Tensor,
    reference: Tensor,
    reference_aug: Tensor,
    clean_reference: Tensor,
    shadow: Tensor,
    clean_shadow: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(L0, L1, L2) from raw (not yet normalised) features.

    triggered [B, D]: f'(x ⊕ e) of the shadow batch; reference [K, D]: f'(x_k);
    reference_aug [K, A, D]: f'(aug(x_k)), A augmented copies of each x_k (A = B in the reference);
    clean_reference [K, D]: f(x_k); shadow [B, D]: f'(x); clean_shadow [B, D]: f(x).
    """
    t, r = F.normalize(triggered, dim=-1), F.normalize(reference, dim=-1)
    ra, cr = F.normalize(reference_aug, dim=-1), F.normalize(clean_reference, dim=-1)
    s, cs = F.normalize(shadow, dim=-1), F.normalize(clean_shadow, dim=-1)
    loss0 = -(t[None] * r[:, None]).sum(-1).mean(1).mean(0)
    loss1 = -(ra * cr[:, None]).sum(-1).mean(1).mean(0)
    loss2 = -(s * cs).sum(-1).mean()
    return loss0, loss1, loss2


def freeze_batchnorm(module: nn.Module) -> None:
    """Every BatchNorm layer of `module` in eval mode, its affine parameters without gradient."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in (m.weight, m.bias):
                if p is not None:
                    p.requires_grad_(False)


class BadEncoder:
    """BadEncoder on a clean encoder: `inject(encoder, shadow, references, trigger)`."""

    class Config(Settings):
        """Settings of the injection (the reference's defaults).

        epochs: passes over the shadow set (the reference's 200).
        batch_size: shadow images per SGD step (256).
        lr, momentum, weight_decay: SGD on the encoder's parameters (1e-3, 0.9, 5e-4).
        lambda1: weight of L1, the reference inputs' term (1).
        lambda2: weight of L2, the shadow images' utility term (1).
        reference_augment: L1 on augmented copies of the reference inputs, as the reference code
            (False: the plain reference inputs, the paper's equation as printed).
        augment: the augmentation of those copies (SimCLR's without the crop, as the reference).
        drop_last: drop the last incomplete batch of each epoch (the reference's DataLoader does).
        bf16: bfloat16 mixed precision for the encoders' passes, the losses in float32 (a
            deviation from the reference's float32, for CPUs with AMX/AVX-512 BF16 and GPUs;
            "auto": where the hardware runs it natively, `device.bf16_fast`).
        """

        epochs: int = Field(200, ge=0)
        batch_size: int = Field(256, ge=1)
        lr: float = Field(1e-3, gt=0)
        momentum: float = Field(0.9, ge=0)
        weight_decay: float = Field(5e-4, ge=0)
        lambda1: float = Field(1.0, ge=0)
        lambda2: float = Field(1.0, ge=0)
        reference_augment: bool = True
        augment: AugmentConfig = Field(default_factory=lambda: AugmentConfig(crop=False))
        drop_last: bool = True
        bf16: Bf16 = False

    def __init__(self, *, config: Config | None = None, seed: int = 0,
                 device: torch.device | str | None = None, **settings) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()
        self.augment = Augmentation(config=self.config.augment)

    def inject(self, encoder: nn.Module, shadow: Tensor | ImageSet, references: Tensor,
               trigger: Trigger, *, head: nn.Module | None = None,
               progress: StatusFn | None = None,
               checkpoint: CheckpointStore | None = None) -> InjectionResult:
        """A backdoored copy of `encoder` (images [N, C, H, W] in [0, 1] → features [N, D]).

        shadow: the attacker's unlabelled images [N, C, H, W] (an ImageSet's labels are ignored).
        references: one [C, H, W] or several [K, C, H, W] images of the target class.
        trigger: any trigger of poisonlab.attacks.triggers (e.g. `badencoder_patch`).
        head: a projection head to carry along unchanged (returned as a copy), or None.
        progress: called with a status line after every epoch.
        checkpoint: state saved after every epoch, and resumed from when it holds one.
        `encoder` and `head` are never modified.
        """
        x, refs = _check_inputs(shadow, references, trigger)
        if self.config.reference_augment and x.shape[1] != 3:
            raise ShapeError(f"the reference augmentation needs RGB images, got {x.shape[1]} "
                             "channel(s) (reference_augment=False uses the plain references)")
        cfg, device = self.config, self.device
        if cfg.drop_last and cfg.epochs > 0 and len(x) < cfg.batch_size:
            raise ConfigError(f"invalid BadEncoder.Config: batch_size: {cfg.batch_size} is larger "
                              f"than the shadow set ({len(x)} images) and drop_last drops it")
        clean = copy.deepcopy(encoder).to(device).eval().requires_grad_(False)
        _check_features(clean, refs.to(device))
        backdoored = copy.deepcopy(encoder).to(device)
        grad_flags = [p.requires_grad for p in backdoored.parameters()]
        freeze_batchnorm(backdoored)
        params = [p for p in backdoored.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        history: dict[str, list[float]] = {k: [] for k in LOSS_KEYS}
        start, steps = _restore(checkpoint, backdoored, optimizer, generator, history)
        refs = refs.to(device)
        for epoch in range(start, cfg.epochs):
            terms, taken = self._epoch(backdoored, clean, x, refs, trigger, optimizer, generator)
            steps += taken
            for key, value in zip(LOSS_KEYS, terms, strict=True):
                history[key].append(value)
            if checkpoint is not None:
                checkpoint.save(_state(backdoored, optimizer, generator, history, epoch + 1,
                                       steps))
            if progress is not None:
                progress(f"epoch {epoch + 1}/{cfg.epochs} L {terms[0]:.4f} L0 {terms[1]:.4f} "
                         f"L1 {terms[2]:.4f} L2 {terms[3]:.4f}")
        for p, flag in zip(backdoored.parameters(), grad_flags, strict=True):
            p.requires_grad_(flag)
        head_copy = copy.deepcopy(head) if head is not None else None
        return InjectionResult(backdoored.eval(), head_copy, history, steps)

    def _epoch(self, backdoored: nn.Module, clean: nn.Module, x: Tensor, refs: Tensor,
               trigger: Trigger, optimizer: torch.optim.Optimizer,
               generator: torch.Generator) -> tuple[list[float], int]:
        """One pass over the shadow set; the batch-size-weighted mean of (L, L0, L1, L2)."""
        cfg, device = self.config, self.device
        backdoored.train()
        freeze_batchnorm(backdoored)
        order = torch.randperm(len(x), generator=generator)
        stop = len(x) - len(x) % cfg.batch_size if cfg.drop_last else len(x)
        sums, seen, steps = [0.0] * 4, 0, 0
        for begin in range(0, stop, cfg.batch_size):
            batch = x[order[begin:begin + cfg.batch_size]].to(device)
            terms = self._losses(backdoored, clean, batch, refs, trigger, generator)
            loss = terms[0] + cfg.lambda1 * terms[1] + cfg.lambda2 * terms[2]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            for i, value in enumerate((loss, *terms)):
                sums[i] += float(value.detach()) * len(batch)
            seen += len(batch)
            steps += 1
        return [s / max(seen, 1) for s in sums], steps

    def _losses(self, backdoored: nn.Module, clean: nn.Module, batch: Tensor, refs: Tensor,
                trigger: Trigger, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        copies = ([self.augment(r.expand(len(batch), *r.shape), generator) for r in refs]
                  if self.config.reference_augment else [])
        triggered_batch = trigger.apply(batch)
        with autocast(self.device, use_bf16(self.config.bf16, self.device)):
            with torch.no_grad():
                clean_shadow = clean(batch)
                clean_reference = clean(refs)
            shadow = backdoored(batch)
            triggered = backdoored(triggered_batch)
            reference = backdoored(refs)
            reference_aug = (torch.stack([backdoored(c) for c in copies]) if copies
                             else reference[:, None])
        features = (triggered, reference, reference_aug, clean_reference, shadow, clean_shadow)
        return badencoder_losses(*(f.float() for f in features))


def _check_inputs(shadow: Tensor | ImageSet, references: Tensor,
                  trigger: Trigger) -> tuple[Tensor, Tensor]:
    x = shadow.x if isinstance(shadow, ImageSet) else shadow
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] == 0 or not x.is_floating_point():
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"shadow images must be a non-empty float tensor [N, C, H, W], got {got}")
    if not isinstance(references, Tensor) or references.dim() not in (3, 4):
        got = tuple(references.shape) if isinstance(references, Tensor) else type(references)
        raise ShapeError(f"reference inputs must be [C, H, W] or [K, C, H, W], got {got}")
    refs = (references[None] if references.dim() == 3 else references).float()
    if refs.shape[0] == 0:
        raise ShapeError("no reference inputs given: pass one or more images of the target class")
    if refs.shape[1:] != x.shape[1:]:
        raise ShapeError(f"reference images are {_dims(refs)}, the shadow images {_dims(x)}: "
                         "they must have the same size")
    if not isinstance(trigger, Trigger):
        raise ConfigError(f"trigger must be a poisonlab trigger, got {type(trigger).__name__}")
    trigger.apply(x[:1])  # a trigger made for another image size raises its one-line ShapeError
    return x, refs


def _check_features(clean: nn.Module, refs: Tensor) -> None:
    with torch.no_grad():
        out = clean(refs)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != refs.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ShapeError(f"the encoder must map images [N, C, H, W] to features [N, D], got {got}")


def _dims(x: Tensor) -> str:
    return "×".join(str(v) for v in x.shape[1:])


def _state(model, optimizer, generator, history, epoch, steps) -> dict:
    return {
        "encoder": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "history": {k: list(v) for k, v in history.items()},
        "epoch": epoch,
        "steps": steps,
    }


def _restore(checkpoint, model, optimizer, generator, history) -> tuple[int, int]:
    state = checkpoint.load() if checkpoint is not None else None
    if state is None:
        return 0, 0
    model.load_state_dict(state["encoder"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    for key in LOSS_KEYS:
        history[key].extend(float(v) for v in state["history"][key])
    return int(state["epoch"]), int(state["steps"])
