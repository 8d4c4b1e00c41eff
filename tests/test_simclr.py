"""SimCLR pre-training: encoders, augmentations, NT-Xent, the kNN monitor, checkpoints and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.config import BaseConfig
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError, ShapeError
from poisonlab.models import available_models
from poisonlab.models.encoders import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    Encoder,
    ResNet18Cifar,
    build_encoder,
)
from poisonlab.runs.record import Run
from poisonlab.training import augment as A
from poisonlab.training.knn import knn_accuracy, knn_predict
from poisonlab.training.simclr import SimCLR, nt_xent
from poisonlab.training.supervised import RunCheckpoint


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=_gen(seed))


# --- encoders ---------------------------------------------------------------------------------
def test_resnet18_cifar_stem_and_width():
    model = ResNet18Cifar(base_channels=8)
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.feature_dim == 64
    assert "resnet18" in available_models() and "resnet20" in available_models()


@pytest.mark.parametrize("name, kwargs, dim", [("resnet18", {"base_channels": 4}, 32),
                                                ("resnet20", {}, 64)])
def test_build_encoder_maps_images_to_features(name, kwargs, dim):
    enc = build_encoder(name, **kwargs).eval()
    x = _images(3)
    out = enc(x)
    assert enc.feature_dim == dim and out.shape == (3, dim)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, enc.backbone.features((x - mean) / std))
    assert not any("head" in k or k in ("mean", "std") for k in enc.state_dict())


def test_encoder_refuses_wrong_inputs():
    enc = build_encoder("resnet18", base_channels=2)
    with pytest.raises(ShapeError):
        enc(torch.rand(3, 16, 16))
    with pytest.raises(ShapeError, match="features"):
        Encoder(nn.Linear(3, 3))


# --- NT-Xent ----------------------------------------------------------------------------------
def test_nt_xent_closed_form():
    # Two images at opposite poles, each view equal to its image: for every anchor the positive
    # has similarity 1 and the two negatives −1, so ℓ = log(1 + 2·exp(−2/τ)).
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    for tau in (1.0, 0.5):
        assert nt_xent(z, z.clone(), tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-2 / tau)))


def test_nt_xent_matches_hand_computed_sum():
    z1, z2 = torch.randn(3, 4, generator=_gen(1)), torch.randn(3, 4, generator=_gen(2))
    z = [v / v.norm() for v in torch.cat((z1, z2))]
    tau, n, total = 0.5, 3, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / den)
    assert nt_xent(z1 * 3.0, z2, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_refuses_bad_shapes():
    with pytest.raises(ShapeError):
        nt_xent(torch.rand(4, 3), torch.rand(5, 3))
    with pytest.raises(ShapeError):
        nt_xent(torch.rand(1, 3), torch.rand(1, 3))


# --- augmentations ----------------------------------------------------------------------------
RANDOM_AUGMENTS = {
    "crop": lambda x, g: A.random_resized_crop(x, g),
    "flip": lambda x, g: A.random_flip(x, g),
    "jitter": lambda x, g: A.color_jitter(x, g),
    "grayscale": lambda x, g: A.random_grayscale(x, g, p=0.5),
    "all": lambda x, g: A.Augmentation()(x, g),
}


@pytest.mark.parametrize("name", sorted(RANDOM_AUGMENTS))
def test_augmentation_shape_range_and_seed(name):
    fn = RANDOM_AUGMENTS[name]
    x = _images(16)
    out = fn(x, _gen(3))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, fn(x, _gen(3)))
    assert not torch.equal(out, fn(x, _gen(4)))


def test_resized_crop_takes_the_box():
    x = torch.full((1, 3, 16, 16), 0.1)
    x[:, :, 4:12, 2:10] = 0.7
    out = A.resized_crop(x, torch.tensor([[4, 2, 8, 8]]))
    assert out.shape == (1, 3, 16, 16) and torch.allclose(out, torch.full_like(out, 0.7))
    whole = _images(2)
    assert torch.allclose(A.resized_crop(whole, torch.tensor([[0, 0, 16, 16]] * 2)), whole, atol=1e-6)
    # Scale and ratio fixed at 1: the box is the whole image.
    assert torch.allclose(A.random_resized_crop(whole, _gen(), (1.0, 1.0), (1.0, 1.0)), whole, atol=1e-6)


def test_crop_boxes_fit_and_follow_scale():
    boxes = A.sample_crop_boxes(2000, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), _gen())
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    frac = (h * w).float() / 1024
    assert frac.min() >= 0.05 and 0.45 < frac.mean() < 0.6


def test_flip_mirrors():
    x = _images(4)
    assert torch.equal(A.random_flip(x, _gen(), p=1.0), x.flip(3))
    assert torch.equal(A.random_flip(x, _gen(), p=0.0), x)


def test_grayscale_gives_equal_channels_of_luma():
    x = _images(4)
    out = A.random_grayscale(x, _gen(), p=1.0)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c], luma, atol=1e-6)
    assert torch.equal(A.random_grayscale(x, _gen(), p=0.0), x)


def test_color_jitter_components():
    x = _images(6) * 0.5  # no clipping at brightness factors up to 1.4
    bright = A.color_jitter(x, _gen(), brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0)
    factor = bright.sum((1, 2, 3)) / x.sum((1, 2, 3))  # one brightness factor per image
    assert torch.allclose(bright, x * factor.view(-1, 1, 1, 1), atol=1e-5)
    assert (factor >= 0.6 - 1e-6).all() and (factor <= 1.4 + 1e-6).all() and factor.std() > 0.05
    assert torch.equal(A.color_jitter(x, _gen(), p=0.0), x)
    gray = A.adjust_saturation(x, torch.zeros(6))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    flat = A.adjust_contrast(x, torch.zeros(6))
    assert torch.allclose(flat, A.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True).expand_as(x))
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    green = A.adjust_hue(red, torch.tensor([1 / 3]))
    assert torch.allclose(green[:, 1], torch.ones(1, 2, 2), atol=1e-6) and green[:, [0, 2]].abs().max() < 1e-6
    assert torch.allclose(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5)


def test_augmentations_refuse_wrong_rank():
    for fn in RANDOM_AUGMENTS.values():
        with pytest.raises(ShapeError):
            fn(torch.rand(3, 8, 8), _gen())


def test_augment_settings_name_the_key():
    with pytest.raises(ConfigError, match="hue"):
        A.Augmentation(hue=0.6)
    with pytest.raises(ConfigError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.5, 0.2))


# --- kNN monitor ------------------------------------------------------------------------------
def test_knn_separable_bank_is_perfect_and_random_labels_chance():
    g = _gen(5)
    centres = torch.eye(10, 16)
    labels = torch.arange(10).repeat_interleave(50)
    bank = centres[labels] + 0.05 * torch.randn(500, 16, generator=g)
    queries = centres[torch.arange(10).repeat(20)] + 0.05 * torch.randn(200, 16, generator=g)
    pred = knn_predict(queries, bank, labels, 10, k=200, temperature=0.5)
    assert torch.equal(pred, torch.arange(10).repeat(20))
    rand_bank = torch.randn(2000, 16, generator=g)
    rand_labels = torch.randint(0, 10, (2000,), generator=g)
    rand_queries, truth = torch.randn(3000, 16, generator=g), torch.randint(0, 10, (3000,), generator=g)
    acc = (knn_predict(rand_queries, rand_bank, rand_labels, 10) == truth).float().mean()
    assert 0.07 < acc < 0.13


def test_knn_accuracy_through_an_encoder():
    labels = torch.arange(4).repeat_interleave(10)
    x = torch.zeros(40, 3, 4, 4)
    x[torch.arange(40), labels % 3] = 1.0 + 0.1 * (labels == 3).float()[:, None, None]
    x[labels == 3] = 0.5
    data = ImageSet(x, labels)
    assert knn_accuracy(nn.Flatten(), data, data, k=5) == 1.0


# --- SimCLR -----------------------------------------------------------------------------------
def _structured(n: int = 32, size: int = 16, seed: int = 0) -> ImageSet:
    """Images of blocky random colour patterns (4×4 cells upsampled), labelled by pattern pair."""
    cells = torch.rand(n, 3, 4, 4, generator=_gen(seed))
    x = F.interpolate(cells, size=(size, size), mode="nearest")
    return ImageSet(x, torch.arange(n) % 4)


def _tiny_encoder(seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    return build_encoder("resnet18", base_channels=4)


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
def test_simclr_steps_lower_the_loss(bf16):
    # Binary shapes; views that differ by flip and grayscale only, so a few steps must learn,
    # in bfloat16 mixed precision too (the weights stay float32).
    masks = (torch.rand(32, 1, 4, 4, generator=_gen()) < 0.5).float()
    x = F.interpolate(masks, size=(16, 16), mode="nearest").expand(32, 3, 16, 16).clone()
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", base_channels=8)
    result = SimCLR(epochs=6, batch_size=32, knn_every=0, device="cpu", bf16=bf16,
                    augment={"crop": False, "jitter_p": 0.0}).train(encoder, x, progress=False)
    loss = result.history["loss"]
    assert len(loss) == 6 and loss[-1] < loss[0] - 0.5
    assert all(p.dtype == torch.float32 for p in result.encoder.parameters())
    assert not result.encoder.training and not result.head.training


@pytest.mark.parametrize("native", [False, True])
def test_bf16_auto_runs_bfloat16_only_where_the_hardware_has_it(monkeypatch, native):
    """On a CPU without bfloat16 units autocast emulates it at four times the cost of float32:
    "auto" must then train in float32, and in bfloat16 where it is native."""
    import poisonlab.device
    import poisonlab.training.simclr as simclr

    monkeypatch.setattr(poisonlab.device, "_bf16_fast", lambda kind: native)
    seen: list[bool] = []
    real = simclr.autocast
    monkeypatch.setattr(simclr, "autocast", lambda device, on: seen.append(on) or real(device, on))
    x = torch.rand(16, 3, 16, 16, generator=_gen())
    SimCLR(epochs=1, batch_size=8, knn_every=0, device="cpu", bf16="auto").train(
        build_encoder("resnet18", base_channels=4), x, progress=False)
    assert seen and set(seen) == {native}
    with pytest.raises(ConfigError, match="bf16"):
        SimCLR(bf16="sometimes")


def test_simclr_knn_history_and_head_shape():
    data = _structured(32)
    lines: list[str] = []
    result = SimCLR(epochs=3, batch_size=16, knn_every=2, knn_k=8, projection_dim=16, hidden_dim=32,
                    device="cpu").train(_tiny_encoder(), data, test=data.subset(torch.arange(8)),
                                        progress=False, log=lines.append)
    assert result.history["knn_epoch"] == [2, 3]
    assert len(lines) == 3 and "epoch 1/3" in lines[0] and "kNN" not in lines[0]
    assert f"kNN {result.history['knn_accuracy'][0]:.4f}" in lines[1]
    assert 0 <= result.knn_accuracy <= 1
    assert result.head(torch.rand(4, result.encoder.feature_dim)).shape == (4, 16)


def _weights(result) -> dict:
    return {**{f"e.{k}": v for k, v in result.encoder.state_dict().items()},
            **{f"h.{k}": v for k, v in result.head.state_dict().items()}}


def test_resume_equals_uninterrupted_run(tmp_path):
    data = _structured(48)
    settings = dict(batch_size=16, knn_every=1, knn_k=10, device="cpu", seed=3)
    straight = SimCLR(epochs=3, **settings).train(_tiny_encoder(), data, test=data, progress=False,
                                                  checkpoint=tmp_path / "a.pt")
    # "Interrupted" after epoch 1 (the checkpoint of epoch 1 is all that is left), then resumed
    # on a freshly initialised encoder.
    SimCLR(epochs=1, **settings).train(_tiny_encoder(), data, test=data, progress=False,
                                       checkpoint=tmp_path / "b.pt")
    resumed = SimCLR(epochs=3, **settings).train(_tiny_encoder(2), data, test=data, progress=False,
                                                 checkpoint=tmp_path / "b.pt")
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history["loss"] == resumed.history["loss"]
    assert straight.history["knn_accuracy"] == resumed.history["knn_accuracy"]


def test_resume_through_a_run_directory(tmp_path):
    data = _structured(32)
    settings = dict(batch_size=16, knn_every=0, device="cpu")
    straight = SimCLR(epochs=2, **settings).train(_tiny_encoder(), data, progress=False)
    run = Run.create("simclr-test", BaseConfig(), root=tmp_path)
    SimCLR(epochs=1, **settings).train(_tiny_encoder(), data, progress=False,
                                       checkpoint=RunCheckpoint(run, "simclr"))
    resumed = SimCLR(epochs=2, **settings).train(_tiny_encoder(5), data, progress=False,
                                                 checkpoint=RunCheckpoint(run, "simclr"))
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_encoder():
    data = _structured(32)
    runs = [SimCLR(epochs=1, batch_size=16, knn_every=0, device="cpu", seed=7).train(
        _tiny_encoder(), data.x, progress=False) for _ in range(2)]
    a, b = _weights(runs[0]), _weights(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key, value", [("temperature", 0), ("temperature", -0.5), ("batch_size", 1),
                                        ("lr", 0), ("knn_k", 0), ("knn_temperature", 0),
                                        ("epochs", -1), ("knn_every", -1), ("projection_dim", 0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        SimCLR(**{key: value})


def test_bad_inputs():
    trainer = SimCLR(epochs=1, batch_size=4, device="cpu")
    enc = _tiny_encoder()
    with pytest.raises(ShapeError):
        trainer.train(enc, torch.rand(8, 16, 16), progress=False)
    with pytest.raises(ShapeError):
        trainer.train(enc, torch.rand(8, 1, 16, 16), progress=False)
    with pytest.raises(ShapeError, match="batch_size"):
        trainer.train(enc, torch.rand(3, 3, 16, 16), progress=False)
    with pytest.raises(ShapeError, match="feature_dim"):
        trainer.train(nn.Flatten(), torch.rand(8, 3, 16, 16), progress=False)
    with pytest.raises(DataError, match="labels"):
        trainer.train(enc, torch.rand(8, 3, 16, 16), test=_structured(8), progress=False)
