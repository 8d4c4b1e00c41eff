"""Property test: any number in any numeric setting of any experiment is either accepted as a
finite value of the field's type or refused with one line naming that setting's dotted key."""

from __future__ import annotations

import math
import types
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from poisonlab.config import resolve_config
from poisonlab.errors import ConfigError
from poisonlab.experiments import EXPERIMENTS, get_experiment


def _numeric(ann) -> bool:
    args = typing.get_args(ann) if isinstance(ann, types.UnionType) or \
        typing.get_origin(ann) is typing.Union else (ann,)
    return any(a in (int, float) for a in args) and not any(a is bool for a in args)


def numeric_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted keys of every int/float field (optional ones included), recursively."""
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += numeric_fields(ann, f"{prefix}{name}.")
        elif _numeric(ann):
            keys.append(f"{prefix}{name}")
    return keys


FIELDS = [(name, key) for name in EXPERIMENTS for key in numeric_fields(get_experiment(name).Config)]
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 1, 2**63, -(2**63) - 1, 1e308, -1e-308, 0.5]),
)


def _value_at(cfg: BaseModel, key: str):
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _yaml_number(value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


def test_every_experiment_has_numeric_settings():
    assert {name for name, _ in FIELDS} == set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_number_is_accepted_finite_or_refused_naming_its_key(experiment, data):
    exp = get_experiment(experiment)
    keys = [key for name, key in FIELDS if name == experiment]
    key = data.draw(st.sampled_from(keys), label="key")
    value = data.draw(NUMBERS, label="value")
    try:
        cfg = resolve_config(exp.Config, exp.PRESETS, "smoke",
                             overrides=[f"{key}={_yaml_number(value)}"])
    except ConfigError as exc:
        message = str(exc)
        section, _, leaf = key.rpartition(".")
        # the key itself, or a cross-field check of its section naming the field
        names_it = key in message or (f"{section}:" in message and leaf in message)
        assert "\n" not in message and names_it, message
        return
    accepted = _value_at(cfg, key)
    assert isinstance(accepted, int | float) and math.isfinite(accepted), (key, accepted)
