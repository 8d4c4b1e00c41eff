"""Neural Cleanse: anomaly index, cost schedule, and detection of a BadNets target."""

from __future__ import annotations

import pytest
import torch

from poisonlab.attacks.backdoor_injection import BackdoorInjection
from poisonlab.attacks.triggers import badnets_patch
from poisonlab.data.types import ImageSet
from poisonlab.defenses.neural_cleanse import (
    InversionConfig,
    NeuralCleanse,
    _CostSchedule,
    anomaly_index,
    flagged_labels,
    reverse_engineer_trigger,
)
from poisonlab.errors import ConfigError

TARGET = 3



@pytest.fixture(scope="module")
def glyphs14():
    from poisonlab.data.glyphs import load_glyph_supervised

    data = load_glyph_supervised()
    pool = torch.nn.functional.avg_pool2d
    return ImageSet(pool(data.train.x, 2), data.train.y), ImageSet(pool(data.test.x, 2), data.test.y)


@pytest.fixture(scope="module")
def backdoored(glyphs14):
    train, _ = glyphs14
    return _train(BackdoorInjection(badnets_patch((1, 14, 14)), TARGET, 0.1).poison(train).data)


def _train(train: ImageSet):
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1)
    train_classifier(model, train, TrainConfig(epochs=4, batch_size=64, lr=0.05),
                     progress=False)
    return model


def test_anomaly_index_and_flags():
    norms = torch.tensor([50.0, 48, 52, 47, 5, 55, 49, 51, 53, 46])
    index = anomaly_index(norms)
    assert index.argmax() == 4 and index[4] > 2
    assert flagged_labels(norms) == [4]
    big = norms.clone()
    big[4] = 200.0  # an outlier above the median is never flagged
    assert anomaly_index(big)[4] > 2 and flagged_labels(big) == []
    assert anomaly_index(torch.full((5,), 3.0)).abs().sum() == 0


def test_cost_schedule_follows_the_original_rules():
    cfg = InversionConfig(patience=2, cost_multiplier=2.0, init_cost=1e-3)
    schedule = _CostSchedule(cfg)
    for _ in range(2):
        schedule.update(success=1.0, norm=10.0)
    assert schedule.cost == pytest.approx(2e-3)
    for _ in range(2):
        schedule.update(success=0.1, norm=5.0)
    assert schedule.cost == pytest.approx(2e-3 / 2**1.5)
    assert schedule.best == 10.0  # a smaller mask below the success threshold is not kept
    with pytest.raises(ConfigError, match="parametrization"):
        InversionConfig(parametrization="warp")


def test_neural_cleanse_flags_the_badnets_target(glyphs14, backdoored):
    _, test = glyphs14
    model = backdoored
    cfg = InversionConfig(steps=60, batch_size=16, early_stop_patience=20)
    result = NeuralCleanse(cfg).detect(model, test.x[:64], 10)
    assert result.flagged == [TARGET] and result.backdoored
    assert result.anomaly_index[TARGET] > 2 and result.norms.argmin() == TARGET
    recovered = result.results[TARGET].trigger.mask[0]
    assert recovered[9:14, 9:14].sum() > 0.5 * recovered.sum()  # the mask sits on the patch
    summary = result.to_dict()
    assert summary["labels"][TARGET]["flagged"] and len(summary["labels"]) == 10


def test_additive_inversion_reaches_the_target(glyphs14, backdoored):
    _, test = glyphs14
    model = backdoored
    x = test.x[test.y != TARGET][:64]
    cfg = InversionConfig(steps=30, batch_size=32, parametrization="additive",
                          success_threshold=0.9, patience=10, cost_multiplier=1.5)
    result = reverse_engineer_trigger(model, x, TARGET, cfg)
    assert result.reached and result.attack_success >= 0.9
    hits = model(result.trigger.apply(x)).argmax(1) == TARGET
    assert hits.float().mean() >= 0.85
