"""EncoderScan (DECREE-style): the mean pairwise cosine, the λ schedule, the verdict on a
hand-built encoder with and without a planted 3×3-patch backdoor, and refusals of bad settings
and inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonlab.attacks.triggers import MaskTrigger
from poisonlab.defenses.encoder_scan import (
    EncoderScan,
    EncoderScanResult,
    _CostSchedule,
    mean_pairwise_cosine,
)
from poisonlab.errors import ConfigError, DataError, ShapeError

SIZE = 16
PATCH = (2, 11)  # top-left corner of the planted 3×3 patch
FAST = {"steps": 120, "batch_size": 64, "restarts": 2}


class PlantedEncoder(nn.Module):
    """Random linear features of the centred image, plus (when planted) a fixed unit direction v
    scaled by how white the 3×3 patch at PATCH is: 25·(σ(16·(mean patch − 0.65)) − σ(−2.4)),
    about 23 for a white patch and near 0 (of either sign) on noise images, whose clean
    features have norm ≈ 1.6. So a white patch sends every image near v."""

    def __init__(self, planted: bool = True, dim: int = 32, num_classes: int = 2,
                 in_channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        n = in_channels * SIZE * SIZE
        self.weight = nn.Parameter(torch.randn(dim, n, generator=g) / n**0.5)
        self.direction = nn.Parameter(nn.functional.normalize(torch.randn(dim, generator=g), dim=0))
        self.register_buffer("planted", torch.tensor(float(planted)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = (x - 0.5).flatten(1) @ self.weight.T
        r, c = PATCH
        whiteness = x[:, :, r : r + 3, c : c + 3].mean((1, 2, 3))
        offset = torch.sigmoid(torch.tensor(16 * (0.5 - 0.65)))
        branch = 25 * (torch.sigmoid(16 * (whiteness - 0.65)) - offset)
        return features + self.planted * branch[:, None] * self.direction


def noise_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def planted_result() -> EncoderScanResult:
    torch.set_num_threads(1)
    return EncoderScan(seed=0, **FAST).scan(PlantedEncoder(True), noise_images())


@pytest.fixture(scope="module")
def clean_result() -> EncoderScanResult:
    torch.set_num_threads(1)
    return EncoderScan(seed=0, **FAST).scan(PlantedEncoder(False), noise_images())


def test_mean_pairwise_cosine_equals_a_hand_computation():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # cos(f0, f1) = 0, cos(f0, f2) = cos(f1, f2) = 1/√2; each unordered pair counted twice
    expected = (0 + 2 ** -0.5 + 2 ** -0.5) * 2 / (3 * 2)
    assert float(mean_pairwise_cosine(f)) == pytest.approx(expected, abs=1e-6)
    g = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    u = nn.functional.normalize(g, dim=1)
    sims = u @ u.T
    off = (sims.sum() - sims.diagonal().sum()) / (7 * 6)
    assert float(mean_pairwise_cosine(g)) == pytest.approx(float(off), abs=1e-6)
    assert float(mean_pairwise_cosine(torch.ones(4, 3))) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ShapeError):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_the_planted_backdoor_gives_a_small_mask_on_the_patch(planted_result):
    r = planted_result
    assert r.backdoored and r.reached
    assert r.similarity >= 0.98 and r.clean_similarity < 0.2
    h = w = SIZE
    assert r.normalised_l1 == pytest.approx(r.l1 / (h * w))
    assert r.normalised_l1 < 0.05 < r.threshold
    mask = r.trigger.mask[0]
    rows, cols = PATCH
    near = mask[max(rows - 1, 0) : rows + 4, max(cols - 1, 0) : cols + 4].sum()
    assert near >= 0.8 * mask.sum()  # the mask sits on the patch (within one pixel)
    assert len(r.restarts) == 2 and r.best in (0, 1)
    assert r.spread == pytest.approx(max(r.normalised_l1s) - min(r.normalised_l1s))


def test_without_the_planted_branch_the_mask_is_large_and_not_flagged(clean_result,
                                                                       planted_result):
    r = clean_result
    assert not r.backdoored
    assert r.normalised_l1 > 0.3 and r.normalised_l1 > 10 * planted_result.normalised_l1
    assert abs(r.clean_similarity) < 0.2


def test_constraints_and_the_summary(planted_result):
    for run in planted_result.restarts:
        t = run.trigger
        assert isinstance(t, MaskTrigger) and t.mask.shape == (1, SIZE, SIZE)
        assert t.pattern.shape == (3, SIZE, SIZE)
        assert float(t.mask.min()) >= 0 and float(t.mask.max()) <= 1
        assert float(t.pattern.min()) >= 0 and float(t.pattern.max()) <= 1
        assert 1 <= run.steps_run <= FAST["steps"] and len(run.cost_history) == run.steps_run
    summary = planted_result.to_dict()
    assert summary["backdoored"] is True and len(summary["restarts"]) == 2
    assert set(summary) >= {"l1", "normalised_l1", "similarity", "threshold",
                            "normalised_l1_spread", "clean_similarity"}


def test_same_seed_same_result_and_the_encoder_is_left_as_it_was():
    enc = PlantedEncoder(True).train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    cfg = EncoderScan.Config(steps=5, batch_size=16)
    a = EncoderScan(config=cfg, seed=3).scan(enc, noise_images(20))
    b = EncoderScan(config=cfg, seed=3).scan(enc, noise_images(20))
    assert torch.equal(a.trigger.mask, b.trigger.mask) and a.l1 == b.l1
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_cost_schedule_follows_the_reference_rules():
    cfg = EncoderScan.Config(patience=2, cost_multiplier=5.0, init_cost=1e-3, min_cost=1e-4)
    s = _CostSchedule(cfg)
    for _ in range(3):  # more than `patience` batches at or above τ: λ × 5
        s.update(similarity=0.995, l1=10.0)
    assert s.cost == pytest.approx(5e-3) and s.best == 10.0
    for _ in range(3):  # more than `patience` below τ: λ / 5; a smaller mask below τ is not kept
        assert not s.update(similarity=0.5, l1=1.0)
    assert s.cost == pytest.approx(1e-3) and s.best == 10.0
    for _ in range(6):
        s.update(similarity=0.5, l1=1.0)
    assert s.cost == pytest.approx(4e-5)  # lowered while ≥ min_cost, then no further
    for _ in range(3 * 2 + 1):  # below min_cost and succeeding for > 2·patience: reset
        s.update(similarity=0.995, l1=20.0)
    assert s.cost == pytest.approx(1e-3)


def test_the_step_size_drops_at_the_given_passes():
    """The reference's schedule: 0.5 for passes 0-29, 0.1 for 30-49, 0.05 from 50."""
    from poisonlab.defenses.encoder_scan import _step_size

    cfg = EncoderScan.Config(lr=0.5, lr_drops=[(30, 0.1), (50, 0.05)])
    assert [_step_size(cfg, p) for p in (0, 29, 30, 49, 50, 999)] == [0.5, 0.5, 0.1, 0.1,
                                                                      0.05, 0.05]
    assert _step_size(EncoderScan.Config(lr=0.2), 500) == 0.2


@pytest.mark.parametrize(("settings", "key"), [
    ({"steps": 0}, "steps"),
    ({"restarts": 0}, "restarts"),
    ({"threshold": 0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"similarity_threshold": 0}, "similarity_threshold"),
    ({"similarity_threshold": 1.01}, "similarity_threshold"),
    ({"batch_size": 1}, "batch_size"),
    ({"lr": 0}, "lr"),
    ({"init_cost": 1e-7}, "init_cost"),
    ({"lr_drops": [(50, 0.1), (30, 0.05)]}, "lr_drops"),
    ({"lr_drops": [(0, 0.1)]}, "lr_drops"),
    ({"lr_drops": [(30, 0)]}, "lr_drops"),
])
def test_bad_settings_are_config_errors_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        EncoderScan(**settings)
    with pytest.raises(ConfigError, match=key):
        EncoderScan.Config(**settings)


@pytest.mark.parametrize("images", [
    torch.rand(3, SIZE, SIZE),  # one image without the batch dimension
    torch.rand(4, 1, SIZE, SIZE),  # wrong channel count for the encoder
    torch.rand(1, 3, SIZE, SIZE),  # one image: no pairs
    torch.rand(4, 3, 8, 8),  # a size the encoder cannot take
])
def test_images_that_do_not_fit_are_shape_errors(images):
    with pytest.raises(ShapeError):
        EncoderScan(steps=1).scan(PlantedEncoder(True), images)


def test_channel_count_is_checked_against_a_convolutional_encoder():
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ShapeError, match="3-channel"):
        EncoderScan(steps=1).scan(conv, torch.rand(4, 1, 8, 8))
    not_features = nn.Conv2d(3, 4, 3)  # maps images to images, not to [N, D]
    with pytest.raises(ShapeError, match=r"features \[N, D\]"):
        EncoderScan(steps=1).scan(not_features, torch.rand(4, 3, 8, 8))


class _Collapsed(nn.Module):
    """Maps every image to nearly the same feature (a collapsed or untrained encoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + 1e-3 * x.flatten(1)[:, :8]


def test_images_whose_embeddings_already_cluster_cannot_be_scanned():
    """If the clean embeddings already reach τ, every mask (even an empty one) passes and the
    verdict would follow the step budget: refused in one line instead of a verdict."""
    with pytest.raises(DataError, match=r"already have mean pairwise cosine 1\.000 >= the "
                                        r"similarity threshold 0\.99") as info:
        EncoderScan(steps=3, restarts=1).scan(_Collapsed(), noise_images(8))
    assert "\n" not in str(info.value)


def test_a_scan_whose_inversion_never_reaches_the_threshold_is_inconclusive():
    from poisonlab.audit.encoder import EncoderScanReport

    result = EncoderScan(seed=0, steps=1, restarts=1, batch_size=64).scan(
        PlantedEncoder(False), noise_images())
    assert not result.reached and not result.backdoored
    verdict = EncoderScanReport(result, samples=64).verdict
    assert verdict.startswith("encoder backdoor: inconclusive") and "none detected" not in verdict


class _Constant(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 8), self.value) + 0 * self.weight


@pytest.mark.parametrize(("value", "message"), [(0.0, "same features"),
                                                (float("nan"), "not finite")])
def test_a_dead_or_broken_encoder_is_refused_not_called_inconclusive(value, message):
    with pytest.raises(DataError, match=message):
        EncoderScan(steps=2, restarts=1).scan(_Constant(value), noise_images(8))
