"""Triggers (BadNets patch and grid, Blend, Trojan square) and all-to-one backdoor injection."""

from __future__ import annotations

import pytest
import torch

from poisonlab.attacks.backdoor_injection import (
    BackdoorInjection,
    attack_success_rate,
    backdoor_metrics,
    triggered_set,
)
from poisonlab.attacks.triggers import (
    AdditiveTrigger,
    MaskTrigger,
    badnets_patch,
    blend_trigger,
    grid_trigger,
    make_trigger,
    trojan_square,
)
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, ShapeError


def test_badnets_patch_is_a_corner_checkerboard():
    x = torch.full((2, 3, 8, 8), 0.5)
    out = badnets_patch((3, 8, 8), size=3).apply(x)
    changed = (out != x).any(1)[0]
    assert changed.sum() == 9 and changed[4:7, 4:7].all()  # bottom-right, margin 1
    patch = out[0, 0, 4:7, 4:7]
    assert torch.equal(patch, torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    top_left = badnets_patch((3, 8, 8), corner="top-left", margin=0).apply(x)
    assert (top_left != x).any(1)[0, :3, :3].all()


def test_grid_blend_trojan_and_additive():
    x = torch.zeros(1, 1, 12, 12)
    grid = grid_trigger((1, 12, 12), cells=3).apply(x)
    assert int(grid.sum()) == 9 and grid[0, 0, 10, 10] == 1 and grid[0, 0, 9, 10] == 0
    pattern = torch.ones(1, 12, 12)
    blended = blend_trigger((1, 12, 12), alpha=0.2, pattern=pattern).apply(torch.full_like(x, 0.5))
    assert torch.allclose(blended, torch.full_like(x, 0.6))
    square = trojan_square((3, 12, 12), size=4).apply(torch.zeros(1, 3, 12, 12))
    assert (square[0, :, 7:11, 7:11] >= 0.5).all() and square[0, :, :7].sum() == 0
    add = AdditiveTrigger(torch.full((1, 12, 12), 0.7)).apply(torch.full((2, 3, 12, 12), 0.5))
    assert torch.allclose(add, torch.ones_like(add))  # clipped to [0, 1], channels broadcast
    single = make_trigger("badnets", (1, 12, 12)).apply(torch.zeros(1, 12, 12))
    assert single.shape == (1, 12, 12)


def test_bad_trigger_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown trigger 'wanet'"):
        make_trigger("wanet", (3, 32, 32))
    with pytest.raises(ConfigError, match="does not fit"):
        badnets_patch((1, 4, 4), size=5)
    with pytest.raises(ShapeError, match="for images"):
        badnets_patch((3, 32, 32)).apply(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ConfigError, match="alpha"):
        blend_trigger((3, 8, 8), alpha=1.5)
    with pytest.raises(ShapeError, match="does not fit pattern"):
        MaskTrigger(torch.ones(2, 8, 8), torch.ones(3, 8, 8))
    with pytest.raises(ConfigError, match="bad options"):
        make_trigger("grid", (3, 32, 32), alpha=0.3)


def test_injection_poisons_the_rate_of_non_target_images_deterministically():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.rand(200, 1, 10, 10, generator=g), torch.arange(200) % 4)
    inj = BackdoorInjection(badnets_patch((1, 10, 10)), target=2, poison_rate=0.1, seed=5)
    a, b = inj.poison(data), inj.poison(data)
    assert torch.equal(a.poisoned, b.poisoned) and len(a.poisoned) == 20
    assert (data.y[a.poisoned] != 2).all() and (a.data.y[a.poisoned] == 2).all()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[a.poisoned] = False
    assert torch.equal(a.data.x[untouched], data.x[untouched])
    assert torch.equal(a.data.y[untouched], data.y[untouched])
    test = triggered_set(inj.trigger, data, 2)
    assert len(test) == 150 and (test.y == 2).all()
    with pytest.raises(ConfigError, match="poison_rate"):
        BackdoorInjection(inj.trigger, target=2, poison_rate=1.5)
    with pytest.raises(ConfigError, match="target"):
        BackdoorInjection(inj.trigger, target=-1)
    with pytest.raises(ConfigError, match="not a label"):
        BackdoorInjection(inj.trigger, target=9).poison(data)


@pytest.mark.parametrize("attack", ["badnets", "blend", "grid", "trojan"])
def test_injection_gives_high_asr_on_a_tiny_model(attack):
    from poisonlab.data.glyphs import load_glyph_supervised
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    data = load_glyph_supervised(train_per_class=200, test_per_class=50)
    pool = torch.nn.functional.avg_pool2d
    train, test = ImageSet(pool(data.train.x, 2), data.train.y), ImageSet(pool(data.test.x, 2),
                                                                            data.test.y)
    trigger = make_trigger(attack, (1, 14, 14))
    torch.manual_seed(0)
    clean_model = build_model("tiny_cnn", 10, 1)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=0.05)
    train_classifier(model, BackdoorInjection(trigger, target=3, poison_rate=0.1).poison(train).data, cfg,
                     progress=False)
    train_classifier(clean_model, train, cfg, progress=False)
    got = backdoor_metrics(model, trigger, test, 3)
    assert got["attack_success_rate"] > 0.9 and got["benign_accuracy"] > 0.85
    assert attack_success_rate(clean_model, trigger, test, 3) < 0.2
