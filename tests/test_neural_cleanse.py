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
from poisonlab.errors import ConfigError, ShapeError

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
    return _train(BackdoorInjection(badnets_patch((1, 14, 14)), target=TARGET, poison_rate=0.1).poison(train).data)


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


@pytest.mark.parametrize(("make", "key"), [
    (lambda: InversionConfig(steps=0), "steps"),
    (lambda: InversionConfig(batch_size=0), "batch_size"),
    (lambda: InversionConfig(lr=0), "lr"),
    (lambda: InversionConfig(init_cost=-1e-3), "init_cost"),
    (lambda: InversionConfig(success_threshold=1.5), "success_threshold"),
    (lambda: InversionConfig(patience=0), "patience"),
    (lambda: InversionConfig(cost_multiplier=1.0), "cost_multiplier"),
    (lambda: InversionConfig(early_stop_threshold=0), "early_stop_threshold"),
    (lambda: InversionConfig(early_stop_patience=0), "early_stop_patience"),
    (lambda: NeuralCleanse.Config(threshold=0), "threshold"),
    (lambda: NeuralCleanse(threshold=-1), "threshold"),
    (lambda: NeuralCleanse(inversion={"steps": 0}), "inversion.steps"),
    (lambda: NeuralCleanse(inversion=InversionConfig(parametrization="additive")), "inversion"),
])
def test_out_of_range_settings_are_refused_once_with_the_key(make, key):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert f"{key}: " in message and len(message.splitlines()) == 1
    assert message.count(": ") <= 3  # one problem reported, once


def test_empty_clean_sample_is_a_shape_error(backdoored):
    with pytest.raises(ShapeError, match="at least one clean image"):
        NeuralCleanse().detect(backdoored, torch.empty(0, 1, 14, 14), 10)
    with pytest.raises(ShapeError, match="at least one clean image"):
        reverse_engineer_trigger(backdoored, torch.empty(0, 1, 14, 14), TARGET)


def test_neural_cleanse_flags_the_badnets_target(glyphs14, backdoored):
    _, test = glyphs14
    model = backdoored
    cfg = InversionConfig(steps=60, batch_size=16, early_stop_patience=20)
    result = NeuralCleanse(inversion=cfg).detect(model, test.x[:64], 10)
    assert result.flagged == [TARGET] and result.backdoored and result.target == TARGET
    assert result.anomaly_index[TARGET] > 2 and result.norms.argmin() == TARGET
    recovered = result.results[TARGET].trigger.mask[0]
    assert recovered[9:14, 9:14].sum() > 0.5 * recovered.sum()  # the mask sits on the patch
    summary = result.to_dict()
    assert summary["labels"][TARGET]["flagged"] and len(summary["labels"]) == 10
    # The seed is the detector's: the same seed gives the same scan, another seed another start.
    again = NeuralCleanse(config=NeuralCleanse.Config(inversion=cfg), seed=0).reverse(
        model, test.x[:64], TARGET)
    # Run alone, the job follows the path it followed in the batch (float32: up to float error).
    assert torch.allclose(again.trigger.mask, result.results[TARGET].trigger.mask, atol=1e-3)
    other = NeuralCleanse(inversion=cfg, seed=1).reverse(model, test.x[:64], TARGET)
    assert not torch.equal(other.trigger.mask, again.trigger.mask)


def _index_norms(index_of_4: float) -> torch.Tensor:
    """Ten sizes whose anomaly index is `index_of_4` for label 4, the smallest: the median and
    the MAD do not depend on the smallest size as long as it stays the farthest out."""
    norms = torch.tensor([50.0, 48, 52, 47, -1e3, 55, 49, 51, 53, 46], dtype=torch.float64)
    median = torch.quantile(norms, 0.5)
    mad = 1.4826 * torch.quantile((norms - median).abs(), 0.5)
    norms[4] = median - index_of_4 * mad
    return norms


@pytest.mark.parametrize(("index", "band", "status"), [
    (3.0, 0.5, "detected"), (2.2, 0.5, "inconclusive"), (1.7, 0.5, "inconclusive"),
    (1.2, 0.5, "none"), (2.2, 0.0, "detected"), (1.7, 0.0, "none")])
def test_verdict_band_around_the_threshold(index, band, status):
    from poisonlab.defenses.neural_cleanse import DetectionResult

    norms = _index_norms(index)
    result = DetectionResult([], norms[None], threshold=2.0, band=band)
    assert abs(float(result.anomaly_index[4]) - index) < 0.05
    assert result.status == status and result.candidate == 4
    assert result.backdoored == (status == "detected")
    assert result.target == (4 if status == "detected" else None)


def test_sizes_are_the_smallest_over_restarts_and_the_spread_is_each_restarts_index():
    from poisonlab.defenses.neural_cleanse import DetectionResult

    one, two = _index_norms(3.0), _index_norms(1.0)
    result = DetectionResult([], torch.stack([two, one]), threshold=2.0)
    assert torch.equal(result.norms, torch.minimum(one, two))
    low, high = result.spread(4)
    assert abs(low - 1.0) < 0.05 and abs(high - 3.0) < 0.05
    assert result.flagged == [4]


def test_batched_jobs_follow_the_path_each_follows_alone(glyphs14, backdoored):
    """The sum of the jobs' losses under an elementwise optimiser: every job of one batched
    inversion ends where it ends run alone (float64, so no float error hides a difference),
    also when the jobs are split into groups to bound memory."""
    import copy

    from poisonlab.defenses.neural_cleanse import reverse_engineer_triggers

    _, test = glyphs14
    model = copy.deepcopy(backdoored).double()
    x = test.x[:24].double()
    cfg = InversionConfig(steps=12, batch_size=8, patience=2, early_stop_patience=2)
    targets, starts = [TARGET, 5, TARGET, 0], [0, 0, 1, 0]
    together = reverse_engineer_triggers(model, x, targets, cfg, seed=4, restarts=starts)
    grouped = reverse_engineer_triggers(model, x, targets, cfg.model_copy(update={
        "max_images": 16}), seed=4, restarts=starts)
    for j, (t, r) in enumerate(zip(targets, starts, strict=True)):
        alone = reverse_engineer_triggers(model, x, [t], cfg, seed=4, restarts=[r])[0]
        for run in (together[j], grouped[j]):
            assert run.label == t and run.restart == r and run.steps_run == alone.steps_run
            assert torch.allclose(run.trigger.mask, alone.trigger.mask, atol=1e-10)
            assert torch.allclose(run.trigger.pattern, alone.trigger.pattern, atol=1e-10)
            assert run.cost_history == alone.cost_history
    # Restarts differ: another start, another trigger.
    assert not torch.allclose(together[0].trigger.mask, together[2].trigger.mask)


def test_restarts_keep_each_labels_smallest_trigger(glyphs14, backdoored):
    _, test = glyphs14
    cfg = InversionConfig(steps=20, batch_size=16, early_stop_patience=5)
    result = NeuralCleanse(inversion=cfg, restarts=2).detect(backdoored, test.x[:32], 10)
    assert result.restart_norms.shape == (2, 10)
    for k, r in enumerate(result.results):
        assert r.label == k and r.norm == float(result.restart_norms[r.restart, k])
        assert r.norm == float(result.restart_norms[:, k].min())
    assert result.to_dict()["restarts"] == 2


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
