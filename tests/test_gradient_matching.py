"""Gradient matching (Witches' Brew): the constraints after crafting, the matching loss, one-line
errors for settings and inputs, and Poisons.apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonlab.attacks.gradient_matching import GradientMatching, matching_loss
from poisonlab.attacks.poisons import Poisons, select_poisons
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.models import build_model
from poisonlab.training.supervised import TrainConfig, train_classifier

CLASSES, SIZE = 3, 16
VICTIM = TrainConfig(epochs=8, batch_size=32, lr=0.05, augment=True)


def synthetic(per_class: int, noise: float, seed: int) -> ImageSet:
    """Smooth class prototypes plus heavy pixel noise: a task a tiny CNN learns only partly."""
    protos = torch.rand(CLASSES, 3, 4, 4, generator=torch.Generator().manual_seed(123))
    protos = nn.functional.interpolate(protos, size=SIZE, mode="bilinear")
    y = torch.arange(CLASSES).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * protos[y] + 0.25 + noise * torch.randn(len(y), 3, SIZE, SIZE, generator=g)
    return ImageSet(x.clamp(0, 1), y)


def trained(data: ImageSet, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny_cnn", CLASSES, 3)
    train_classifier(model, data, VICTIM, progress=False, seed=seed, device="cpu")
    return model


@pytest.fixture(scope="module")
def task():
    train, test = synthetic(100, 0.6, 0), synthetic(100, 0.6, 1)
    return train, test, trained(train, 0)


def attack(model, **settings) -> GradientMatching:
    base = dict(restarts=1, iterations=10, epsilon=16 / 255)
    return GradientMatching(model, device="cpu", **(base | settings))


def test_constraints_hold_after_crafting(task):
    train, test, model = task
    idx = select_poisons(train, 1, 20)
    eps = 8 / 255
    poisons = attack(model, epsilon=eps, restarts=2).craft(train, idx, test.x[0], 1)
    assert torch.equal(poisons.indices, idx) and poisons.colour_grid is None
    assert poisons.delta.abs().max() <= eps + 1e-7
    poisoned = poisons.apply(train)
    assert poisoned.x.min() >= 0 and poisoned.x.max() <= 1
    assert torch.equal(poisoned.y, train.y)
    changed = (poisoned.x != train.x).flatten(1).any(1).nonzero().reshape(-1)
    assert set(changed.tolist()) <= set(idx.tolist()) and len(changed) > 0
    assert torch.allclose(poisoned.x[idx], (train.x[idx] + poisons.delta).clamp(0, 1))
    assert len(poisons.history["final"]) == 2
    assert poisons.history["final"][poisons.history["best"]] == min(poisons.history["final"])


def test_matching_loss_falls(task):
    train, test, model = task
    poisons = attack(model, iterations=30).craft(train, select_poisons(train, 1, 30),
                                                 test.x[1], 1)
    curve = poisons.history["loss"]
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    assert poisons.history["final"][0] < curve[0]


def test_matching_loss_is_one_minus_cosine():
    a, b = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    cos = nn.functional.cosine_similarity(torch.cat([t.flatten() for t in a]),
                                          torch.cat([t.flatten() for t in b]), dim=0)
    assert torch.allclose(matching_loss(a, b), 1 - cos, atol=1e-6)
    assert float(matching_loss(a, a)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("key,value", [("restarts", 0), ("epsilon", -0.01), ("epsilon", 1.5),
                                       ("epsilon", float("nan")), ("iterations", 0)])
def test_bad_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        GradientMatching(nn.Linear(2, 2), **{key: value})


def test_bad_inputs_are_one_line_errors(task):
    train, test, model = task
    gm = attack(model, iterations=1)
    idx = select_poisons(train, 1, 5)
    with pytest.raises(ConfigError, match="larger than the poison class"):
        select_poisons(train, 1, 101)
    with pytest.raises(ConfigError, match="larger than the poison class"):
        gm.craft(train, torch.cat([idx] * 21), test.x[0], 1)
    with pytest.raises(ConfigError, match="poison class"):
        gm.craft(train, idx, test.x[150], 1, target_label=1)
    with pytest.raises(ConfigError, match="adv_label 3 is out of range"):
        gm.craft(train, idx, test.x[0], 3)
    with pytest.raises(ConfigError, match="one class"):
        gm.craft(train, torch.tensor([0, 150]), test.x[0], 1)
    with pytest.raises(ShapeError, match="target_x"):
        gm.craft(train, idx, test.x[0, :, :8, :8], 1)
    small = ImageSet(nn.functional.avg_pool2d(train.x, 2), train.y)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, CLASSES))
    with pytest.raises(ShapeError, match="cannot take images of shape"):
        attack(flat).craft(small, idx, small.x[0], 1)
    grey = ImageSet(train.x[:, :1], train.y)
    with pytest.raises(ShapeError, match="cannot take images"):
        gm.craft(grey, idx, grey.x[0], 1)
    with pytest.raises(ConfigError) as exc:
        gm.craft(train, idx, test.x[0], 7)
    assert "\n" not in str(exc.value)


def test_poisons_apply_refuses_what_does_not_fit(task):
    train = task[0]
    with pytest.raises(ShapeError, match="do not fit"):
        Poisons(torch.tensor([0, 1]), torch.zeros(2, 1, SIZE, SIZE)).apply(train)
    with pytest.raises(ShapeError, match="2 indices but 3"):
        Poisons(torch.tensor([0, 1]), torch.zeros(3, 3, SIZE, SIZE)).apply(train)
    with pytest.raises(ShapeError, match="must lie in"):
        Poisons(torch.tensor([0, 300]), torch.zeros(2, 3, SIZE, SIZE)).apply(train)


def test_a_training_step_on_the_poisons_moves_the_target_towards_adv_label(task):
    """The first-order claim behind the method: a (normalised) gradient step of the surrogate on
    the crafted poisons lowers the target's adversarial loss more than the same step on the
    unperturbed poisons."""
    train, test, model = task
    idx, target, adv = select_poisons(train, 1, 30), test.x[2:3], torch.tensor([1])
    poisons = attack(model, iterations=30).craft(train, idx, target[0], 1)

    def adversarial_loss_after_step(x: torch.Tensor) -> float:
        step = build_model("tiny_cnn", CLASSES, 3)
        step.load_state_dict(model.state_dict())
        step.eval()
        params = list(step.parameters())
        grads = torch.autograd.grad(nn.functional.cross_entropy(step(x), train.y[idx]), params)
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 0.02 * g / norm
            return float(nn.functional.cross_entropy(step(target), adv))

    assert adversarial_loss_after_step(poisons.apply(train).x[idx]) < \
        adversarial_loss_after_step(train.x[idx])


def test_seeded_progress_reported_and_mode_restored(task):
    train, test, model = task
    idx = select_poisons(train, 1, 10)
    model.train()
    lines: list[str] = []
    a = attack(model, iterations=3).craft(train, idx, test.x[0], 1, progress=lines.append)
    b = attack(model, iterations=3).craft(train, idx, test.x[0], 1)
    assert model.training and len(lines) == 3 and "iteration 3/3" in lines[-1]
    assert torch.equal(a.delta, b.delta)
    model.eval()
