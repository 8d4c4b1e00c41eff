"""BadEncoder's downstream protocol: a classifier on frozen encoder features, CA / BA / ASR.

Jia, Liu, Gong, "BadEncoder: Backdoor Attacks to Pre-trained Encoders in Self-Supervised Learning",
IEEE S&P 2022, section 5. A downstream user trains a classifier on the features of a frozen
encoder; the attack succeeds when that classifier, trained on clean labelled data only, sends
triggered inputs to the attacker's target class. For one downstream task and one trigger:

- CA: accuracy on the clean test split of the classifier trained on the clean encoder's features.
- BA: the same with the backdoored encoder (its own classifier, trained the same way).
- ASR: with the backdoored encoder, the fraction of triggered test inputs whose true label is NOT
  the target that are classified as the target.
- ASR-B (`clean_encoder_attack_success_rate`): the same ASR with the clean encoder.
- The reference's ASR (`attack_success_rate_all_inputs`, and its clean-encoder form): the fraction
  of ALL triggered test inputs classified as the target, target-class images included (its
  BadEncoderTestBackdoor labels every triggered image with the target). It is reported beside the
  usual one: it counts images that are already of the target class, so even a clean encoder scores
  about the target's share of the test split on it.

What the reference (jinyuan-jia/BadEncoder, training_downstream_classifier.py,
evaluation/nn_classifier.py) does, and what this module does:
- Features: the encoder in eval mode, its output L2-normalised (F.normalize, dim 1), computed once
  per split (training, clean test, triggered test) for each encoder and cached; the classifier then
  trains on the cached tensors.
- Classifier: Linear(D, 512)–ReLU–Dropout(0.5)–Linear(512, 256)–ReLU–Linear(256, classes), Adam
  lr 1e-4, cross-entropy, batch 64, 500 epochs; the reported value is the last epoch's, measured
  in eval mode (no dropout). Both classifiers (clean and backdoored encoder) start from the same
  seeded initialisation and see the same batches.
- Deviation: the reference's feature loader does not shuffle (`shuffle=False`), so its classifier
  sees the training split in file order every epoch. Here the batches are a seeded permutation per
  epoch (`shuffle=True`, default): an image folder lists its images class by class, and training in
  that order would measure the order, not the encoder. `shuffle=False` gives the reference's order.
- Downstream data are [N, 3, 32, 32] in [0, 1] (the reference encoder's input). MNIST is made so by
  `to_rgb`: bilinear resize 28×28 → 32×32 (`F.interpolate`, align_corners=False, antialias off;
  `mode="pad"` instead pads 2 zero pixels on each side) and the gray channel repeated three times.
  An image folder (one sub-folder per class; `train/` and `test/` sub-folders if it has them, else a
  seeded per-class split) is converted the same way.
- The trigger is stamped on the [0, 1] test images before the encoder (the reference stamps the
  uint8 image before its normalisation: the same point of the pipeline).
Nothing here feeds the attack: the attack sees the downstream task only through its reference
inputs, which the caller chooses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn import functional as F

from poisonlab.attacks.triggers import Trigger
from poisonlab.config import Settings
from poisonlab.data.image_folder import load_image_folder
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet, SupervisedData
from poisonlab.device import default_device
from poisonlab.errors import DataError, ShapeError
from poisonlab.progress import StatusFn

IMAGE_SIZE = (32, 32)


class DownstreamConfig(Settings):
    """Settings of the downstream classifier (the reference's defaults).

    epochs: passes over the training features (500). batch_size: features per Adam step (64).
    lr: Adam's step size (1e-4). hidden: the two hidden widths (512, 256). dropout: after the first
    hidden layer (0.5). shuffle: a seeded permutation of the training features per epoch (the
    reference does not shuffle). feature_batch_size: images per encoder call when caching features.
    """

    epochs: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0)
    hidden: tuple[Annotated[int, Field(ge=1, le=65536)], Annotated[int, Field(ge=1, le=65536)]] = (
        512, 256)
    dropout: float = Field(0.5, ge=0, lt=1)
    shuffle: bool = True
    feature_batch_size: int = Field(256, ge=1)


class DownstreamMLP(nn.Module):
    """The reference's downstream classifier: D → h1 → ReLU → Dropout → h2 → ReLU → classes."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, int] = (512, 256),
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(self.dropout(F.relu(self.fc1(x))))))


@dataclass
class DownstreamTask:
    """A downstream task: its name, its labelled splits and the attacker's target class."""

    name: str
    data: SupervisedData
    target: int


@dataclass
class EncoderFeatures:
    """Normalised features of one encoder on one task: training, clean test, triggered test."""

    train: Tensor
    test: Tensor
    triggered: Tensor


@dataclass
class DownstreamResult:
    """The measured numbers of one downstream task (fractions in [0, 1])."""

    task: str
    target: int
    num_classes: int
    train_size: int
    test_size: int
    non_target_test_size: int
    clean_accuracy: float
    backdoor_accuracy: float
    attack_success_rate: float
    clean_encoder_attack_success_rate: float
    attack_success_rate_all_inputs: float
    clean_encoder_attack_success_rate_all_inputs: float
    clean_train_loss: list[float]
    backdoor_train_loss: list[float]

    def metrics(self) -> dict[str, float | int]:
        """The headline numbers (no loss curves), for metrics.json."""
        out = asdict(self)
        for key in ("task", "clean_train_loss", "backdoor_train_loss"):
            out.pop(key)
        return out


@dataclass
class DownstreamResults:
    """One DownstreamResult per task."""

    tasks: list[DownstreamResult]

    def metrics(self) -> dict[str, dict[str, float | int]]:
        return {r.task: r.metrics() for r in self.tasks}


def attack_success_rates(pred: Tensor, labels: Tensor, target: int) -> tuple[float, float]:
    """(ASR over triggered inputs whose true label is not `target`, the reference's ASR over all
    triggered inputs): the fractions predicted as `target`."""
    if pred.shape != labels.shape or pred.numel() == 0:
        raise ShapeError(f"predictions {tuple(pred.shape)} and labels {tuple(labels.shape)} must "
                         "be equal, non-empty shapes")
    hit = pred == target
    others = labels != target
    asr = float(hit[others].float().mean()) if bool(others.any()) else float("nan")
    return asr, float(hit.float().mean())


def to_rgb(x: Tensor, size: tuple[int, int] = IMAGE_SIZE,
           mode: Literal["resize", "pad"] = "resize") -> Tensor:
    """Images [N, 1 or 3, H, W] in [0, 1] as RGB [N, 3, *size]: bilinear resize (or zero padding,
    centred) to `size`, a gray channel repeated three times."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ShapeError(f"images must be [N, 1 or 3, H, W], got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if (h, w) != tuple(size):
        if mode == "pad":
            dh, dw = size[0] - h, size[1] - w
            if dh < 0 or dw < 0:
                raise ShapeError(f"cannot pad {h}×{w} images to {size[0]}×{size[1]}")
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        else:
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
            x = x.clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x.contiguous()


def load_downstream(source: str | Path, data_dir: str | Path | None = None, *,
                    size: tuple[int, int] = IMAGE_SIZE, mnist_mode: Literal["resize", "pad"] =
                    "resize", test_fraction: float = 0.2, seed: int = 0) -> SupervisedData:
    """A downstream task as RGB images of `size`: "cifar10" or "mnist" (from `data_dir`), or the
    path of an image folder (one sub-folder per class; its `train/` and `test/` sub-folders if
    both exist, else a seeded split of `test_fraction` of each class)."""
    if str(source) in ("cifar10", "mnist"):
        data = load_supervised(str(source), data_dir)
        return _as_rgb(data.train, data.test, list(data.classes), size, mnist_mode)
    root = Path(source)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, classes = load_image_folder(root / "train", channels=3)
        test, test_classes = load_image_folder(root / "test", channels=3)
        if test_classes != classes:
            raise DataError(f"{root}: train/ and test/ have different class folders")
    else:
        full, classes = load_image_folder(root, channels=3)
        train, test = _split(full, test_fraction, seed)
    return _as_rgb(train, test, classes, size, "resize")


def _as_rgb(train: ImageSet, test: ImageSet, classes: list[str], size: tuple[int, int],
            mode: Literal["resize", "pad"]) -> SupervisedData:
    return SupervisedData(ImageSet(to_rgb(train.x, size, mode), train.y),
                          ImageSet(to_rgb(test.x, size, mode), test.y), classes)


def _split(data: ImageSet, test_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for label in torch.unique(data.y).tolist():
        idx = torch.nonzero(data.y == label).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(round(test_fraction * len(idx))) if len(idx) > 1 else 0
        test_idx.append(idx[:cut])
        train_idx.append(idx[cut:])
    return data.subset(torch.cat(train_idx).sort().values), data.subset(torch.cat(test_idx).sort().values)


def check_task(task: DownstreamTask) -> int:
    """The number of classes of `task`, after one-line DataErrors for an unusable task."""
    train, test = task.data.train, task.data.test
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"downstream set '{task.name}' has an empty training or test split")
    present = torch.unique(train.y).tolist()
    if len(present) < 2:
        raise DataError(f"downstream set '{task.name}' has one class ({present[0]}); a "
                        "classifier needs at least two")
    num_classes = max(len(task.data.classes), int(train.y.max()) + 1, int(test.y.max()) + 1)
    if task.target not in present:
        raise DataError(f"target class {task.target} is missing from downstream set "
                        f"'{task.name}' (its training labels: {', '.join(map(str, present))})")
    if not bool((test.y != task.target).any()):
        raise DataError(f"downstream set '{task.name}' has no test image outside the target "
                        f"class {task.target}, so its ASR is undefined")
    return num_classes


def encode(encoder: nn.Module, x: Tensor, batch_size: int = 256,
           device: torch.device | None = None) -> Tensor:
    """L2-normalised features of `x` through `encoder` in eval mode (its mode is restored),
    computed in batches, returned on the CPU."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = [F.normalize(encoder(x[i:i + batch_size].to(device)), dim=1).cpu()
                   for i in range(0, len(x), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def encoder_features(encoder: nn.Module, data: SupervisedData, trigger: Trigger,
                     batch_size: int = 256, device: torch.device | None = None) -> EncoderFeatures:
    """The three cached feature sets of one encoder on one task."""
    return EncoderFeatures(
        train=encode(encoder, data.train.x, batch_size, device),
        test=encode(encoder, data.test.x, batch_size, device),
        triggered=encode(encoder, trigger.apply(data.test.x), batch_size, device),
    )


def train_downstream(features: Tensor, labels: Tensor, num_classes: int, cfg: DownstreamConfig,
                     *, seed: int = 0, device: torch.device | None = None
                     ) -> tuple[DownstreamMLP, list[float]]:
    """The reference's MLP trained on cached features; returns it (eval mode) and the mean
    training loss of every epoch."""
    device = device or default_device()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initialisation and the dropout masks
        net = DownstreamMLP(features.shape[1], num_classes, cfg.hidden, cfg.dropout).to(device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        g = torch.Generator().manual_seed(seed)
        feats, ys = features.to(device), labels.to(device)
        losses = []
        for _ in range(cfg.epochs):
            net.train()
            order = (torch.randperm(len(ys), generator=g) if cfg.shuffle
                     else torch.arange(len(ys))).to(device)
            total = 0.0
            for i in range(0, len(ys), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                loss = F.cross_entropy(net(feats[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            losses.append(total / len(ys))
    return net.eval(), losses


def predict(net: nn.Module, features: Tensor) -> Tensor:
    """Predicted labels of `features` (on the CPU)."""
    device = next(net.parameters()).device
    with torch.no_grad():
        return net(features.to(device)).argmax(1).cpu()


class DownstreamClassifier(nn.Module):
    """The downstream user's whole classifier, image → logits: `features` the frozen encoder's
    L2-normalised output, `head` the MLP trained on it (what Neural Cleanse inspects)."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head

    def features(self, x: Tensor) -> Tensor:
        return F.normalize(self.encoder(x), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def evaluate_downstream(clean: nn.Module, backdoored: nn.Module, task: DownstreamTask,
                        trigger: Trigger, cfg: DownstreamConfig | None = None, *, seed: int = 0,
                        device: torch.device | str | None = None,
                        progress: StatusFn | None = None,
                        clean_features: EncoderFeatures | None = None,
                        backdoored_features: EncoderFeatures | None = None) -> DownstreamResult:
    """CA, BA, ASR and ASR-B of one task: features cached once per encoder and split (or given),
    one classifier per encoder on `device`, the same seed for both. The encoders are only read."""
    return downstream_classifiers(clean, backdoored, task, trigger, cfg, seed=seed, device=device,
                                  progress=progress, clean_features=clean_features,
                                  backdoored_features=backdoored_features)[0]


def downstream_classifiers(clean: nn.Module, backdoored: nn.Module, task: DownstreamTask,
                           trigger: Trigger, cfg: DownstreamConfig | None = None, *,
                           seed: int = 0, device: torch.device | str | None = None,
                           progress: StatusFn | None = None,
                           clean_features: EncoderFeatures | None = None,
                           backdoored_features: EncoderFeatures | None = None,
                           ) -> tuple[DownstreamResult, dict[str, DownstreamClassifier]]:
    """`evaluate_downstream`, plus both trained classifiers ("clean", "backdoored") as whole
    image → logits models on their encoders."""
    cfg = cfg or DownstreamConfig()
    num_classes = check_task(task)
    dev = torch.device(device) if device is not None else default_device()
    trigger.apply(task.data.test.x[:1])  # a trigger for another image size: one-line ShapeError
    feats = {}
    for name, encoder, given in (("clean", clean, clean_features),
                                 ("backdoored", backdoored, backdoored_features)):
        if given is None:  # on the encoder's own device: the encoder is not moved
            given = encoder_features(encoder, task.data, trigger, cfg.feature_batch_size)
        feats[name] = given
        if progress is not None:
            progress(f"{task.name}: {name} encoder features cached")
    y_train, y_test = task.data.train.y, task.data.test.y
    out: dict[str, tuple[float, float, float, list[float]]] = {}
    nets: dict[str, DownstreamClassifier] = {}
    for (name, f), encoder in zip(feats.items(), (clean, backdoored), strict=True):
        net, losses = train_downstream(f.train, y_train, num_classes, cfg, seed=seed, device=dev)
        nets[name] = DownstreamClassifier(encoder, net)
        acc = float((predict(net, f.test) == y_test).float().mean())
        asr, asr_all = attack_success_rates(predict(net, f.triggered), y_test, task.target)
        out[name] = (acc, asr, asr_all, losses)
        if progress is not None:
            progress(f"{task.name}: {name} encoder accuracy {acc:.4f} ASR {asr:.4f}")
    result = DownstreamResult(
        task=task.name, target=task.target, num_classes=num_classes,
        train_size=len(task.data.train), test_size=len(task.data.test),
        non_target_test_size=int((y_test != task.target).sum()),
        clean_accuracy=out["clean"][0], backdoor_accuracy=out["backdoored"][0],
        attack_success_rate=out["backdoored"][1],
        clean_encoder_attack_success_rate=out["clean"][1],
        attack_success_rate_all_inputs=out["backdoored"][2],
        clean_encoder_attack_success_rate_all_inputs=out["clean"][2],
        clean_train_loss=out["clean"][3], backdoor_train_loss=out["backdoored"][3],
    )
    return result, nets
