"""MM-BD: margins, the Gamma null and its order-statistic p-value, batching, and the verdict on
a BadNets glyph model and on a clean one trained the same way."""

from __future__ import annotations

import math

import pytest
import torch

from poisonlab.defenses.mm_bd import (
    MMBD,
    fit_null,
    log_gamma_tail,
    margins_of,
    maximize_margins,
    mm_bd_verdict,
    order_statistic_log_p,
)
from poisonlab.errors import ConfigError

# Fixtures shared with the Neural Cleanse tests (tests/ is on sys.path under pytest).
from test_neural_cleanse import TARGET, _train, backdoored, glyphs14  # noqa: F401


@pytest.fixture(scope="module")
def clean14(glyphs14):  # noqa: F811
    train, _ = glyphs14
    return _train(train)


def test_margin_is_own_logit_minus_the_largest_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    assert margins_of(logits, torch.tensor([0, 2])).tolist() == [1.0, -6.0]


def test_order_statistic_p_value_against_the_fitted_gamma():
    from scipy import stats

    null = [20.0, 22.5, 19.0, 25.0, 21.0, 23.5, 18.0, 24.0, 20.5]
    fit = fit_null(null)
    a, _, scale = stats.gamma.fit(null, floc=0)
    assert fit.shape == pytest.approx(a) and fit.scale == pytest.approx(scale) and fit.loc == 0
    for r_max in (26.0, 40.0):
        expected = 1 - stats.gamma.cdf(r_max, a, scale=scale) ** 9
        got = math.exp(order_statistic_log_p(r_max, fit, null, 9))
        assert got == pytest.approx(expected, rel=1e-6)
    # A far outlier: p underflows, log p stays finite and ordered.
    far, farther = (order_statistic_log_p(r, fit, null, 9) for r in (400.0, 800.0))
    assert math.isfinite(far) and farther < far < -30
    for a, z in ((30.0, 200.0), (5.0, 300.0), (80.0, 700.0)):  # where scipy still has it
        assert log_gamma_tail(a, z) == pytest.approx(float(stats.gamma.logsf(z, a)), rel=1e-9)
    # The verdict on per-class maxima: an outlier is flagged, a level field is not.
    outlier = torch.tensor([*null[:3], 60.0, *null[3:]])
    null_fit, log_p = mm_bd_verdict(outlier)
    assert math.exp(log_p) < 0.05 and null_fit is not None
    _, level = mm_bd_verdict(torch.tensor([*null, 24.5]))
    assert math.exp(level) > 0.05


def test_degenerate_and_non_positive_nulls():
    # All null values equal: no spread to fit; p is 0 above them and 1 at or below.
    assert fit_null([5.0, 5.0, 5.0]) is None
    assert order_statistic_log_p(6.0, None, [5.0, 5.0], 2) == -math.inf
    assert order_statistic_log_p(5.0, None, [5.0, 5.0], 2) == 0.0
    # A class no input reaches (margin < 0): the Gamma is shifted below the smallest value.
    fit = fit_null([-2.0, 10.0, 11.0, 12.0, 9.0])
    assert fit.loc < -2.0 and fit.shape > 0 and fit.scale > 0
    with pytest.raises(ConfigError, match="at least 3 classes"):
        mm_bd_verdict(torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(("settings", "key"), [
    ({"starts": 0}, "starts"), ({"steps": 0}, "steps"), ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"), ({"alpha": 0}, "alpha"), ({"alpha": 1}, "alpha"),
    ({"betas": (1.0, 0.9)}, "betas"), ({"restarts": 2}, "restarts")])
def test_bad_settings_are_one_line_errors_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as info:
        MMBD(**settings)
    message = str(info.value)
    assert key in message and len(message.splitlines()) == 1


def test_each_class_follows_the_path_it_follows_alone(backdoored):  # noqa: F811
    """One batch for all (class, start) pairs: in eval mode each image's margin depends on that
    image alone, so a class optimised beside others ends where it ends alone (float64)."""
    import copy

    model = copy.deepcopy(backdoored).double()
    cfg = {"starts": 2, "steps": 15, "seed": 3}
    together, x_together = maximize_margins(model, [0, TARGET, 7], (1, 14, 14), **cfg)
    alone, x_alone = maximize_margins(model, [TARGET], (1, 14, 14), **cfg)
    assert x_together.dtype == torch.float64
    assert torch.allclose(together[:, 1], alone[:, 0], atol=1e-9)
    assert torch.allclose(x_together[:, 1].double(), x_alone[:, 0].double(), atol=1e-9)
    # The reported margin is the model's margin at the reported input, which lies in the box.
    assert x_together.min() >= 0 and x_together.max() <= 1
    logits = model(x_together.flatten(0, 1).double())
    labels = torch.tensor([0, TARGET, 7]).repeat(2)
    assert torch.allclose(margins_of(logits, labels).view(2, 3), together, atol=1e-6)
    # Another start, another path.
    assert not torch.allclose(together[0], together[1])


def test_mm_bd_flags_the_badnets_target_and_not_a_clean_model(backdoored, clean14):  # noqa: F811
    """The tiny CNN of test_neural_cleanse with a BadNets patch towards label 3, and the same
    network trained on the same images without the patch; no clean data is used. Measured
    (defaults): backdoored p = 3e-5 (seed 0), 2e-6 (seed 1), label 3's margin 81–84 against
    25–47 for the others; clean p = 0.55 and 0.46, largest margins 44–45."""
    found = MMBD(seed=0).detect(backdoored, 10, (1, 14, 14))
    assert found.status == "detected" and found.target == TARGET and found.p_value < 0.05
    assert found.candidate == TARGET and found.margins.argmax() == TARGET
    summary = found.to_dict()
    assert summary["target"] == TARGET and summary["p_value"] == found.p_value
    assert len(summary["margins"]) == 10 and summary["null"]["distribution"] == "gamma"
    assert found.inputs.shape == (10, 1, 14, 14)
    clean = MMBD(seed=0).detect(clean14, 10, (1, 14, 14))
    assert clean.status == "none" and clean.target is None and clean.p_value >= 0.05
    assert clean.statistic < found.statistic
    # The seed is the detector's: the same seed gives the same margins.
    again = MMBD(seed=0, steps=20).detect(backdoored, 10, (1, 14, 14))
    assert torch.equal(again.margins, MMBD(seed=0, steps=20).detect(backdoored, 10,
                                                                     (1, 14, 14)).margins)
