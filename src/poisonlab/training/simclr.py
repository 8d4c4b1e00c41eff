"""SimCLR: self-supervised pre-training of an image encoder by contrasting two augmented views.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020, with the settings of the clean encoders of Jia, Liu, Gong,
"BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning", IEEE S&P 2022
(reference code jinyuan-jia/BadEncoder, after leftthomas/SimCLR).

Each step draws a batch of B images, makes two views of each (poisonlab.training.augment: random
resized crop, flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2), runs both views
through the encoder f and the projection head g (Linear(D, 512, no bias)–BatchNorm–ReLU–
Linear(512, 128)), z = g(f(x)) / ‖g(f(x))‖, and minimises the NT-Xent loss over the 2B views:

    ℓ_i = −log( exp(z_i·z_j(i) / τ) / Σ_{k ≠ i} exp(z_i·z_k / τ) ),   L = (1 / 2B) Σ_i ℓ_i,

with j(i) the other view of the same image and τ = 0.5. As in the reference the two views go
through the network as two separate batches (so batch norm normalises each view's batch on its
own), the optimiser is Adam (lr 1e-3, weight decay 1e-6, no schedule) over the encoder and the
head, batches are a fresh permutation each epoch with the last incomplete batch dropped, and a
weighted kNN monitor (poisonlab.training.knn, k = 200, t = 0.5) on a labelled memory bank and a
test split follows the encoder's features. The encoder normalises its [0, 1] input itself
(poisonlab.models.encoders.Encoder), where the reference normalises in its transforms.

Deviations:
- The loss is computed as logsumexp over the similarity logits (the reference exponentiates and
  sums): the same value, without overflow at small τ.
- The kNN monitor can run every `knn_every` epochs instead of every epoch (it extracts features of
  the whole memory bank and test split, which costs a noticeable share of an epoch on a CPU); it
  always runs after the last epoch when a test split is given.
- All randomness (batch order, augmentation parameters) comes from one generator seeded by `seed`
  and saved in every checkpoint, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from poisonlab.config import Settings, make_settings
from poisonlab.data.types import ImageSet
from poisonlab.device import Bf16, autocast, default_device, use_bf16
from poisonlab.errors import DataError, ShapeError
from poisonlab.progress import progress_bar
from poisonlab.training.augment import Augmentation, AugmentConfig
from poisonlab.training.knn import knn_accuracy
from poisonlab.training.supervised import CheckpointStore, FileCheckpoint


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent loss of two views' projections [B, d] (L2-normalised here), averaged over 2B."""
    if z1.dim() != 2 or z1.shape != z2.shape or z1.shape[0] < 2:
        raise ShapeError(f"NT-Xent needs two views [B >= 2, d] of one shape, got "
                         f"{list(z1.shape)} and {list(z2.shape)}")
    z = F.normalize(torch.cat((z1, z2)), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat((torch.arange(n, 2 * n), torch.arange(n))).to(z.device)
    return F.cross_entropy(logits, positive)


class ProjectionHead(nn.Module):
    """g: Linear(D, hidden, no bias) – BatchNorm1d – ReLU – Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


@dataclass
class SimCLRResult:
    """The trained encoder and projection head (both in eval mode) and the per-epoch history:
    loss, lr, epoch_seconds; knn_epoch / knn_accuracy (fractions) where the monitor ran."""

    encoder: nn.Module
    head: nn.Module
    history: dict = field(default_factory=dict)

    @property
    def knn_accuracy(self) -> float | None:
        """The last kNN accuracy measured, or None."""
        acc = self.history.get("knn_accuracy", [])
        return acc[-1] if acc else None


class SimCLR:
    """SimCLR pre-training: `SimCLR(epochs=30).train(encoder, images, test=test_set)`."""

    class Config(Settings):
        """Settings of SimCLR pre-training (defaults: the BadEncoder reference on CIFAR-10).

        epochs: passes over the images; batch_size: images per step (2·batch_size views, ≥ 2);
        lr, weight_decay: Adam's; temperature: τ of NT-Xent; hidden_dim, projection_dim: widths
        of the projection head; knn_k, knn_temperature: the kNN monitor's k and t; knn_every:
        run the monitor every that many epochs (0: only after the last); eval_batch_size: batch
        of feature extraction; channels_last: NHWC memory layout for the views; bf16: bfloat16
        mixed precision for the training steps (not the kNN monitor; a deviation from the
        reference's float32, for CPUs with AMX/AVX-512 BF16 and GPUs; "auto": where the
        hardware runs it natively, `device.bf16_fast`); augment: the view
        augmentations' strengths.
        """

        epochs: int = Field(1000, ge=0)
        batch_size: int = Field(256, ge=2)
        lr: float = Field(1e-3, gt=0)
        weight_decay: float = Field(1e-6, ge=0)
        temperature: float = Field(0.5, gt=0)
        hidden_dim: int = Field(512, ge=1)
        projection_dim: int = Field(128, ge=1)
        knn_k: int = Field(200, ge=1)
        knn_temperature: float = Field(0.5, gt=0)
        knn_every: int = Field(1, ge=0)
        eval_batch_size: int = Field(512, ge=1)
        channels_last: bool = False
        bf16: Bf16 = False
        augment: AugmentConfig = Field(default_factory=AugmentConfig)

    def __init__(
        self,
        *,
        config: Config | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
        **settings,
    ) -> None:
        self.config = make_settings(self.Config, config, **settings)
        self.seed = seed
        self.device = torch.device(device) if device is not None else default_device()
        self.augment = Augmentation(config=self.config.augment)

    # --- the verb --------------------------------------------------------------------------
    def train(
        self,
        encoder: nn.Module,
        images: torch.Tensor | ImageSet,
        *,
        test: ImageSet | None = None,
        memory: ImageSet | None = None,
        head: nn.Module | None = None,
        progress: bool = True,
        checkpoint: CheckpointStore | str | Path | None = None,
        log: Callable[[str], None] | None = None,
    ) -> SimCLRResult:
        """Pre-train `encoder` (images [N, 3, H, W] in [0, 1] → features [N, feature_dim]) in
        place on `images` (labels, if any, are not used for training).

        test / memory: the kNN monitor's queries and labelled bank (memory defaults to `images`
        when it is an ImageSet). head: a projection head to continue (default a new one).
        checkpoint: a CheckpointStore or file; the state (encoder, head, optimiser, generator,
        history, epoch) is saved after every epoch and, when present at start, resumed.
        log: called with one line per epoch (loss, kNN accuracy when measured, seconds).
        """
        cfg = self.config
        x = self._check(encoder, images)
        if memory is None and isinstance(images, ImageSet):
            memory = images
        if test is not None and memory is None:
            raise DataError("the kNN monitor needs labels: pass memory=ImageSet or images as an ImageSet")
        head = head if head is not None else self._new_head(encoder.feature_dim)
        encoder.to(self.device)
        head.to(self.device)
        if cfg.channels_last:
            encoder.to(memory_format=torch.channels_last)
        params = [p for m in (encoder, head) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(self.seed)
        history: dict = {"loss": [], "lr": [], "epoch_seconds": [], "knn_epoch": [], "knn_accuracy": []}
        store = FileCheckpoint(checkpoint) if isinstance(checkpoint, str | Path) else checkpoint
        start = _restore(store, encoder, head, opt, gen, history)
        steps = len(x) // cfg.batch_size
        total = max(0, cfg.epochs - start) * steps
        with progress_bar(total, "SimCLR", enabled=progress and total > 0) as bar:
            for epoch in range(start, cfg.epochs):
                t0 = time.perf_counter()
                status = f"epoch {epoch + 1}/{cfg.epochs}"
                loss = self._epoch(encoder, head, x, opt, gen, steps,
                                   lambda v, s=status: bar.advance(status=f"{s} loss {v:.3f}"))
                history["loss"].append(loss)
                history["lr"].append(cfg.lr)
                if test is not None and self._knn_due(epoch):
                    acc = knn_accuracy(encoder, memory, test, cfg.knn_k, cfg.knn_temperature,
                                       cfg.eval_batch_size, self.device)
                    history["knn_epoch"].append(epoch + 1)
                    history["knn_accuracy"].append(acc)
                    bar.advance(0, status=f"{status} loss {loss:.3f} kNN {acc:.1%}")
                history["epoch_seconds"].append(time.perf_counter() - t0)
                if store is not None:
                    store.save(_state(encoder, head, opt, gen, history, epoch + 1, cfg))
                if log is not None:
                    knn = (f", kNN {history['knn_accuracy'][-1]:.4f}"
                           if history["knn_epoch"] and history["knn_epoch"][-1] == epoch + 1 else "")
                    log(f"SimCLR {status}: loss {loss:.4f}{knn} "
                        f"({history['epoch_seconds'][-1]:.0f} s)")
        encoder.eval()
        head.eval()
        return SimCLRResult(encoder, head, history)

    # --- pieces ----------------------------------------------------------------------------
    def _check(self, encoder: nn.Module, images: torch.Tensor | ImageSet) -> torch.Tensor:
        x = images.x if isinstance(images, ImageSet) else images
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"SimCLR needs RGB images [N, 3, H, W], got {shape}")
        if len(x) < self.config.batch_size:
            raise ShapeError(f"batch_size {self.config.batch_size} is larger than the "
                             f"{len(x)} training images (the last incomplete batch is dropped)")
        if not isinstance(getattr(encoder, "feature_dim", None), int):
            raise ShapeError(f"{type(encoder).__name__} has no feature_dim: wrap it in models.encoders.Encoder")
        return x

    def _new_head(self, feature_dim: int) -> ProjectionHead:
        # Its initial weights come from the seed, without touching the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return ProjectionHead(feature_dim, self.config.hidden_dim, self.config.projection_dim)

    def _knn_due(self, epoch: int) -> bool:
        every, last = self.config.knn_every, epoch + 1 == self.config.epochs
        return last or (every > 0 and (epoch + 1) % every == 0)

    def _views(self, batch: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v2 = self.augment(batch, gen), self.augment(batch, gen)
        if self.config.channels_last:
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
        return v1, v2

    def _epoch(self, encoder, head, x, opt, gen, steps, on_step) -> float:
        cfg = self.config
        encoder.train()
        head.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(steps):
            batch = x[perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]].to(self.device)
            v1, v2 = self._views(batch, gen)
            # Two separate passes, as the reference: batch norm sees each view's batch alone.
            with autocast(self.device, use_bf16(cfg.bf16, self.device)):
                z1, z2 = head(encoder(v1)), head(encoder(v2))
            loss = nt_xent(z1.float(), z2.float(), cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total += value
            on_step(value)
        return total / max(steps, 1)


def _state(encoder, head, opt, gen, history, epoch, cfg) -> dict:
    return {
        "encoder": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
        "head": {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "history": history,
        "epoch": epoch,
        "config": cfg.model_dump(mode="json"),
    }


def _restore(store, encoder, head, opt, gen, history) -> int:
    state = store.load() if store is not None else None
    if state is None:
        return 0
    try:
        encoder.load_state_dict(state["encoder"])
        head.load_state_dict(state["head"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ShapeError(f"the SimCLR checkpoint does not fit this encoder/head: {first}") from None
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    for key, values in state["history"].items():
        history[key] = list(values)
    return int(state["epoch"])
