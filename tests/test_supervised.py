"""Supervised training loop, CIFAR ResNets and the small CNN."""

from __future__ import annotations

import pytest
import torch

from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError
from poisonlab.models import build_model
from poisonlab.training.supervised import (
    FileCheckpoint,
    TrainConfig,
    augment_batch,
    evaluate,
    lr_at,
    predict_features,
    predict_proba,
    train_classifier,
)


def template_set(n: int, seed: int, classes: int = 4, size: int = 16) -> ImageSet:
    """Each class is a fixed random template plus noise: learnable in a few epochs."""
    g = torch.Generator().manual_seed(1234)
    templates = torch.rand(classes, 1, size, size, generator=g)
    g.manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = (0.6 * templates[y] + 0.4 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)
    return ImageSet(x, y)


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_resnet_depths_and_features(depth):
    model = build_model(f"resnet{depth}", num_classes=10, dropout=0.1)
    convs = sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert convs + 1 == depth  # 3x3 convolutions plus the linear head
    x = torch.rand(2, 3, 8, 8)
    model.eval()
    assert model.features(x).shape == (2, 64)
    assert torch.allclose(model(x), model.head(model.features(x)))


def test_small_cnn_shapes_and_bad_options():
    model = build_model("small_cnn", num_classes=10, in_channels=1, dropout=0.5)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert model.features(torch.rand(3, 1, 28, 28)).shape == (3, 128)
    with pytest.raises(ConfigError, match="dropout"):
        build_model("small_cnn", num_classes=10, dropout=1.5)
    with pytest.raises(ConfigError, match="unknown architecture 'resnet21'"):
        build_model("resnet21", num_classes=10)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")


def test_training_learns_and_is_deterministic():
    train, test = template_set(256, 0), template_set(128, 1)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05)
    accs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("tiny_cnn", num_classes=4, in_channels=1)
        before = evaluate(model, test)
        hist = train_classifier(model, train, cfg, val=test, progress=False, seed=3)
        accs.append(evaluate(model, test))
    assert before < 0.5 and accs[0] > 0.9
    assert accs[0] == accs[1]
    assert len(hist["loss"]) == 3 and hist["loss"][-1] < hist["loss"][0]
    probs = predict_proba(model, test.x[:5])
    assert torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    assert predict_features(model, test.x[:5]).shape == (5, 64)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path):
    train = template_set(128, 0)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=0.05, augment=True, crop_padding=2)
    torch.manual_seed(0)
    full = build_model("tiny_cnn", num_classes=4, in_channels=1)
    torch.manual_seed(0)
    part = build_model("tiny_cnn", num_classes=4, in_channels=1)
    train_classifier(full, train, cfg, progress=False)
    ckpt = FileCheckpoint(tmp_path / "train.pt")
    def interrupt(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_classifier(part, train, cfg, progress=False, checkpoint=ckpt, on_epoch_end=interrupt)
    torch.manual_seed(0)
    resumed = build_model("tiny_cnn", num_classes=4, in_channels=1)
    hist = train_classifier(resumed, train, cfg, progress=False, checkpoint=ckpt)
    assert len(hist["loss"]) == 3
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_augment_and_schedules():
    x = torch.rand(8, 3, 8, 8)
    out = augment_batch(x, padding=2, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    same = augment_batch(x, padding=0, flip=False)
    assert torch.equal(same, x)
    cfg = TrainConfig(epochs=10, lr=0.1, schedule="step", milestones=(5, 8))
    assert lr_at(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 60, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 95, 10) == pytest.approx(0.001)
    cos = TrainConfig(epochs=10, lr=0.1, schedule="onecycle")
    assert lr_at(cos, 15, 10) == pytest.approx(0.1) and lr_at(cos, 100, 10) < 1e-6


def test_place_gives_a_reloaded_model_the_layout_of_its_recipe():
    """A model trained channels-last and the same weights reloaded must compute identically, so
    reloading places the model in the recipe's layout (NC's anomaly index for one CIFAR model
    was 10.1 in one layout and 17.7 in the other)."""
    from poisonlab.training.supervised import place

    torch.manual_seed(0)
    trained = place(build_model("resnet20", num_classes=10, in_channels=3), "cpu", True).eval()
    reloaded = build_model("resnet20", num_classes=10, in_channels=3)
    reloaded.load_state_dict(trained.state_dict())
    place(reloaded, "cpu", True).eval()
    conv = next(m.weight for m in reloaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trained(x), reloaded(x))
