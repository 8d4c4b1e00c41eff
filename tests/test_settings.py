"""Every setting of every experiment is validated once, when the config is built: an
out-of-range or non-finite value is refused with one line that names its dotted key."""

from __future__ import annotations

import math
from typing import Any

import annotated_types as at
import pytest
from pydantic import BaseModel

from poisonlab.config import Settings, replace, resolve_config
from poisonlab.errors import ConfigError
from poisonlab.experiments import EXPERIMENTS, get_experiment


def _bounded_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, annotation, constraint) of every numeric field with a bound, recursively."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _bounded_fields(ann, key + ".")
            continue
        for bound in field.metadata:
            if isinstance(bound, (at.Ge, at.Gt, at.Le, at.Lt)):
                yield key, ann, bound


def _outside(ann: Any, bound) -> Any:
    """A value just outside `bound` (of the field's type where that is an int)."""
    integral = ann is int or ann == (int | None)
    if isinstance(bound, at.Ge):
        return bound.ge - 1 if integral else bound.ge - 0.5
    if isinstance(bound, at.Gt):
        return bound.gt
    if isinstance(bound, at.Le):
        return bound.le + 1 if integral else bound.le + 0.5
    return bound.lt


CASES = [(name, key, _outside(ann, bound))
         for name in EXPERIMENTS
         for key, ann, bound in _bounded_fields(get_experiment(name).Config)]


def test_every_experiment_has_bounded_settings():
    for name in EXPERIMENTS:
        assert any(case[0] == name for case in CASES), name


@pytest.mark.parametrize("experiment, key, value", CASES,
                         ids=[f"{c[0]}:{c[1]}={c[2]}" for c in CASES])
def test_an_out_of_range_value_is_refused_once_naming_its_key(experiment, key, value):
    exp = get_experiment(experiment)
    with pytest.raises(ConfigError) as info:
        resolve_config(exp.Config, exp.PRESETS, "smoke", overrides=[f"{key}={value}"])
    message = str(info.value)
    assert "\n" not in message
    assert message.count(f"{key}:") == 1, message


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_refused(experiment, value):
    exp = get_experiment(experiment)
    key, ann, _ = next(c for c in _bounded_fields(exp.Config) if c[1] is float)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_config(exp.Config, exp.PRESETS, "smoke", overrides=[f"{key}={value}"])


class _Demo(Settings):
    rate: float = 0.5


def test_settings_are_frozen_and_replace_validates_again():
    demo = _Demo()
    with pytest.raises(Exception, match="frozen"):
        demo.rate = 2.0  # type: ignore[misc]
    assert replace(demo, rate=0.25).rate == 0.25 and demo.rate == 0.5
    with pytest.raises(ConfigError, match="rate"):
        replace(demo, rate=math.nan)
    with pytest.raises(ConfigError, match="invalid _Demo: rate"):
        _Demo(rate="fast")


def test_an_integer_past_64_bits_is_refused_for_every_number_setting():
    """10^23 epochs was accepted and ran until killed: no count, size or seed exceeds int64."""

    class Counts(Settings):
        epochs: int = 1
        rate: float = 0.1

    assert Counts(epochs=2**63 - 1).epochs == 2**63 - 1
    for key in ("epochs", "rate"):
        with pytest.raises(ConfigError, match=rf"{key}: expected a number that fits 64 bits"):
            Counts(**{key: 10**23})


@pytest.mark.parametrize("experiment, key, value, problem", [
    ("fewshot-backdoor", "attack.epsilons", "[0.3, true]", "not true or false"),
    ("fewshot-backdoor", "attack.epsilons", '["0.3"]', "not text"),
    ("fewshot-backdoor", "attack.epsilons", "[100000000000000000000000]", "fits 64 bits"),
    ("badencoder", "scan.lr_drops", "[[100000000000000000000000, 0.5]]", "fits 64 bits"),
    ("badencoder", "scan.lr_drops", '[[30, "0.5"]]', "not text"),
    ("badencoder", "scan.lr_drops", "[[true, 0.5]]", "not true or false"),
])
def test_numbers_inside_lists_of_constrained_numbers_are_checked_too(experiment, key, value,
                                                                       problem):
    """A list of Annotated[float, Field(...)] (ε values), or a list of (epoch, factor) pairs,
    took true as 1.0, "0.3" as 0.3 and 10^23 as a count: the check now unwraps constrained
    types and walks nested lists (found by the fifth re-sweep)."""
    exp = get_experiment(experiment)
    with pytest.raises(ConfigError, match=rf"{key}: expected a number.*{problem}"):
        resolve_config(exp.Config, exp.PRESETS, "smoke", overrides=[f"{key}={value}"])
    ok = "[0.3]" if key == "attack.epsilons" else "[[30, 0.5]]"
    resolve_config(exp.Config, exp.PRESETS, "smoke", overrides=[f"{key}={ok}"])


@pytest.mark.parametrize("experiment, key, value, words", [
    ("badencoder", "downstream.hidden", "[-3, 256]", "greater than or equal to 1"),
    ("badencoder", "downstream.hidden", "[0, 256]", "greater than or equal to 1"),
    ("backdoor-defense", "defense.finetune.lr_steps", "[[0, 0.1], [-5, 0.01]]", "ascending"),
    ("backdoor-defense", "defense.finetune.lr_steps", "[[0, 0.1], [3, 0.01], [3, 0.001]]",
     "ascending"),
    ("membership", "train.milestones", "[0, 5]", "greater than or equal to 1"),
])
def test_widths_schedules_and_milestones_that_cannot_work_are_refused(experiment, key, value,
                                                                     words):
    """A hidden width of -3 crashed after pre-training, 0 trained a zero-width MLP to chance,
    and an unsorted fine-tuning schedule silently dropped a step (sixth re-sweep)."""
    exp = get_experiment(experiment)
    with pytest.raises(ConfigError, match=rf"{key}.*{words}"):
        resolve_config(exp.Config, exp.PRESETS, "smoke", overrides=[f"{key}={value}"])
