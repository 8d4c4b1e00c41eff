"""Config layering (defaults → preset → file → --set) and its one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from poisonlab.config import (
    BaseConfig,
    config_hash,
    dump_yaml,
    load_config_file,
    parse_override,
    resolve_config,
)
from poisonlab.errors import ConfigError


class AttackConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(0.1, ge=0)
    targets: list[int] = [0]


class DemoConfig(BaseConfig):
    ways: int = Field(5, ge=2)
    lr: float = 0.01
    augment: bool = False
    attack: AttackConfig = AttackConfig(epsilon=0.5)


PRESETS = {"fast": {"lr": 0.1, "ways": 3}, "wide": {"ways": 20, "attack": {"targets": [1, 2]}}}


def test_defaults_only():
    cfg = resolve_config(DemoConfig, PRESETS)
    assert cfg == DemoConfig()
    assert cfg.attack.epsilon == 0.5 and cfg.seed == 0


def test_layers_apply_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("ways: 7\nattack:\n  epsilon: 0.2\n")
    cfg = resolve_config(
        DemoConfig, PRESETS, preset="fast", file=file, overrides=["ways=9", "seed=4"]
    )
    assert cfg.lr == 0.1  # preset over default
    assert cfg.attack.epsilon == 0.2  # file over the nested default
    assert cfg.ways == 9  # --set over file and preset
    assert cfg.seed == 4


def test_partial_nested_layers_keep_other_keys():
    cfg = resolve_config(DemoConfig, PRESETS, preset="wide", overrides=["attack.epsilon=0.3"])
    assert cfg.attack.targets == [1, 2]
    assert cfg.attack.epsilon == 0.3
    cfg = resolve_config(DemoConfig, PRESETS, overrides=["attack.targets=[4]"])
    assert cfg.attack.epsilon == 0.5  # the class's nested default survives a partial override


def test_override_values_are_parsed_as_yaml():
    cfg = resolve_config(
        DemoConfig, {}, overrides=["attack.targets=[1, 2,3]", "augment=true", "lr=3e-4"]
    )
    assert cfg.attack.targets == [1, 2, 3] and cfg.augment is True and cfg.lr == 3e-4
    assert parse_override("a.b=0.3") == ("a.b", 0.3)
    assert parse_override("a=") == ("a", None)
    assert parse_override("name=x=y") == ("name", "x=y")


@pytest.mark.parametrize("suffix", [".toml", ".json", ".yml"])
def test_toml_json_and_yaml_files(tmp_path, suffix):
    text = {
        ".toml": "ways = 4\n[attack]\nepsilon = 0.25\n",
        ".json": json.dumps({"ways": 4, "attack": {"epsilon": 0.25}}),
        ".yml": "ways: 4\nattack: {epsilon: 0.25}\n",
    }[suffix]
    file = tmp_path / f"c{suffix}"
    file.write_text(text)
    cfg = resolve_config(DemoConfig, {}, file=file)
    assert (cfg.ways, cfg.attack.epsilon) == (4, 0.25)


def test_empty_file_is_no_change(tmp_path):
    file = tmp_path / "empty.yaml"
    file.write_text("")
    assert resolve_config(DemoConfig, {}, file=file) == DemoConfig()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'slow' \(valid presets: fast, wide\)"):
        resolve_config(DemoConfig, PRESETS, preset="slow")


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "attack.epsilon=-1",
            "invalid config: attack.epsilon: Input should be greater than or equal to 0 (got -1)",
        ),
        ("ways=1", "invalid config: ways: Input should be greater than or equal to 2 (got 1)"),
        ("lr=fast", "invalid config: lr: expected a number, not text (got 'fast')"),
        # pydantic alone reads true as 1 and '7' as 7: a typo became a value
        ("seed=true", "invalid config: seed: expected a number, not true or false (got true)"),
        ("ways='7'", "invalid config: ways: expected a number, not text (got '7')"),
        ("colour=red", "invalid config: colour: unknown key (valid keys: seed, ways, lr,"),
        ("attack.eps=1", "invalid config: attack.eps: unknown key (valid keys: epsilon, targets)"),
        ("attack=3", "invalid config: attack: Input should be a valid dictionary"),
        ("lr", "bad override 'lr': expected key=value"),
        ("=3", "bad override '=3': expected key=value"),
        ("attack..epsilon=1", "bad override 'attack..epsilon=1': empty part"),
        ("ways=[1", "bad override 'ways=[1': cannot parse value"),
    ],
)
def test_bad_values_give_one_line_errors(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(DemoConfig, PRESETS, overrides=[override])
    text = str(info.value)
    assert text.startswith(message)
    assert "\n" not in text


def test_override_into_a_value_is_refused():
    with pytest.raises(ConfigError, match=r"cannot set lr.x: lr is a value, not a section"):
        resolve_config(DemoConfig, PRESETS, preset="fast", overrides=["lr.x=1"])


def test_several_problems_are_joined_on_one_line():
    with pytest.raises(ConfigError) as info:
        resolve_config(DemoConfig, {}, overrides=["ways=0", "attack.epsilon=-2"])
    assert "ways:" in str(info.value) and "attack.epsilon:" in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        resolve_config(DemoConfig, {}, file=missing)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_config_that_is_no_regular_file_is_named_not_read(tmp_path, kind):
    """A FIFO would block the read for ever and /dev/zero fill memory: both exist, so neither
    is "not found"; each is refused before it is read."""
    import os

    file = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(file)
    else:
        file.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match=f"cannot read config file {file}: not a regular file"):
        resolve_config(DemoConfig, {}, file=file)


@pytest.mark.parametrize(
    "name, text",
    [("bad.yaml", "ways: [1, 2\n"), ("bad.json", "{ways: 1"), ("bad.toml", "ways = = 1\n")],
)
def test_unparseable_file_is_named(tmp_path, name, text):
    file = tmp_path / name
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_config(DemoConfig, {}, file=file)
    assert str(info.value).startswith(f"cannot parse config file {file}: ")
    assert "\n" not in str(info.value)


def test_file_that_is_not_a_mapping(tmp_path):
    file = tmp_path / "list.yaml"
    file.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of keys to values, not list"):
        load_config_file(file)


def test_file_with_unknown_key_names_it(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("attack:\n  epsilom: 0.2\n")
    with pytest.raises(ConfigError, match="attack.epsilom: unknown key"):
        resolve_config(DemoConfig, {}, file=file)


def test_assignment_is_validated():
    cfg = DemoConfig()
    with pytest.raises(ValidationError):
        cfg.ways = 1


def test_config_hash_is_stable_and_sensitive():
    assert config_hash(BaseConfig()) == hashlib.sha256(b'{"seed":0}').hexdigest()[:12]
    a = resolve_config(DemoConfig, PRESETS, preset="fast")
    b = DemoConfig(lr=0.1, ways=3)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(DemoConfig(lr=0.1, ways=3, seed=1))
    assert len(config_hash(a)) == 12


def test_dump_yaml_round_trips(tmp_path):
    cfg = resolve_config(DemoConfig, PRESETS, preset="wide", overrides=["attack.epsilon=0.3"])
    file = tmp_path / "resolved.yaml"
    file.write_text(dump_yaml(cfg))
    assert resolve_config(DemoConfig, {}, file=file) == cfg
    assert dump_yaml(cfg).splitlines()[0] == "seed: 0"  # declaration order, not sorted


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("-2E+2", -200.0), ("3.", 3.0), (".5", 0.5)])
def test_exponent_floats_are_numbers(text, value):
    """YAML 1.1 (PyYAML) reads 1e-3 as text; with numbers refused as text it must be a number."""
    assert resolve_config(DemoConfig, PRESETS, overrides=[f"lr={text}"]).lr == value

