"""A sweep's plan: one experiment, a base config, grid axes and seeds, validated before any work.

The base config is resolved as `poisonlab run` resolves one (class defaults → preset → config
file → `--set` overrides). Each grid axis is a dotted config key with a list of values; the
points are the cartesian product of the axes times the seeds, and every point's config is
validated against the experiment's Config when the plan is built, so an unknown key, a bad value
or an impossible combination is one ConfigError naming it before anything runs. Values are kept
as the Config normalises them (`1` for a float field is `1.0`).

The identity of a sweep is a hash of (experiment, resolved base config without its seed, grid
axes in the order given, seeds): the same command finds the same sweep again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from poisonlab.config import (
    describe_validation_error,
    load_yaml_tree,
    parse_override,
    resolve_config,
    set_dotted,
    validate_config,
)
from poisonlab.errors import ConfigError
from poisonlab.experiments import get_experiment

MAX_POINTS = 10_000
_SEED_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


MAX_SEEDS = 10_000  # seeds of one sweep (each is a run per grid point)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-4` → (0, 1, 2, 3, 4); `0,2,5` → (0, 2, 5); both may mix (`0-2,7`)."""
    seeds: list[int] = []
    for item in str(text).split(","):
        match = _SEED_ITEM.match(item.strip())
        if match is None:
            raise ConfigError(f"bad --seeds '{text}': expected e.g. 0-4 or 0,2,5")
        low, high = int(match[1]), int(match[2] if match[2] is not None else match[1])
        if high < low:
            raise ConfigError(f"bad --seeds '{text}': range {item.strip()} runs backwards")
        if len(seeds) + high - low + 1 > MAX_SEEDS:  # one run each: checked before expanding
            raise ConfigError(f"bad --seeds '{text}': more than {MAX_SEEDS} seeds")
        seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"bad --seeds '{text}': a seed appears twice")
    return tuple(seeds)


def nested(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` set the same setting: equal, or one inside the other
    (`attack` holds `attack.epochs`)."""
    return a == b or a.startswith(f"{b}.") or b.startswith(f"{a}.")


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`["attack.epsilon=0.1,0.3", ...]` → {"attack.epsilon": [0.1, 0.3]}: the values are
    parsed as one YAML flow list, so each is read like a `--set` value (`[0.1,0.3],[0.5]` is two
    lists, `'a,b'` one string)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad --grid '{item}': expected key=v1,v2,..., "
                              "e.g. attack.epsilon=0.1,0.3")
        if key in grid:
            raise ConfigError(f"--grid {key} is given twice")
        for other in grid:  # attack and attack.epochs: one would overwrite the other's values
            if key != other and nested(key, other):
                raise ConfigError(f"--grid {key} and --grid {other} overlap (one is inside the "
                                  "other): sweep the inner keys, or only the section")
        try:
            values = load_yaml_tree(f"[{raw}]") if raw.strip() else []
        except RecursionError:
            raise ConfigError(f"bad --grid '{item[:80]}': values nested too deeply") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of too many digits
            problem = str(exc).splitlines()[0][:120]
            raise ConfigError(f"bad --grid '{item[:80]}': cannot parse values ({problem})"
                              ) from None
        grid[key] = values
    return grid


@dataclass(frozen=True)
class Point:
    """One grid point: the axes' values (in axis order) and the seed; `label` names it."""

    values: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        parts = [f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in self.values]
        return " ".join([*parts, f"seed={self.seed}"])

    @property
    def setting(self) -> tuple[tuple[str, Any], ...]:
        """The values without the seed, as a hashable key (points that differ only by seed)."""
        return tuple((k, _frozen(v)) for k, v in self.values)


class Sweep:
    """The plan of a sweep; building it validates everything (see the module docstring).

    Sweep("fewshot-backdoor", {"attack.keep_support": [0.0, 0.1]}, seeds=(0, 1), preset="smoke")
    """

    def __init__(self, experiment: str, grid: Mapping[str, Sequence[Any]],
                 seeds: Sequence[int] | str | None = None, *, preset: str | None = None,
                 config: Path | str | None = None, sets: Sequence[str] = ()):
        self.experiment = experiment
        self.module = get_experiment(experiment)
        for key in (parse_override(item)[0] for item in sets):
            clash = [axis for axis in grid if nested(key, axis)]
            if clash:  # the grid's value would silently replace the --set at every point
                raise ConfigError(f"--set {key} and --grid {clash[0]} set the same setting: "
                                  "give it on one of them")
        self.base: BaseModel = resolve_config(self.module.Config, self.module.PRESETS, preset,
                                              config, list(sets))
        if isinstance(seeds, str):
            seeds = parse_seeds(seeds)
        self.seeds: tuple[int, ...] = tuple(seeds) if seeds is not None else (self.base.seed,)
        self._check_seeds()
        self.grid: dict[str, list[Any]] = self._validate_axes(grid)
        self.points: list[Point] = [
            Point(tuple(zip(self.grid, combo, strict=True)), seed)
            for combo in itertools.product(*self.grid.values()) for seed in self.seeds]
        for point in self.points[:: len(self.seeds)]:
            self.point_config(point)  # cross-field rules on each combination, before any work

    @property
    def axes(self) -> list[str]:
        return list(self.grid)

    @property
    def id(self) -> str:
        base = {k: v for k, v in self.base.model_dump(mode="json").items() if k != "seed"}
        canonical = json.dumps({"experiment": self.experiment, "config": base,
                                "grid": [[k, v] for k, v in self.grid.items()],
                                "seeds": list(self.seeds)},
                               sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return f"{self.experiment}-sweep-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"

    def point_config(self, point: Point) -> BaseModel:
        """The validated config of one point; a failure names the point."""
        data = self.base.model_dump()
        for key, value in point.values:
            set_dotted(data, key, value)
        data["seed"] = point.seed
        try:
            return validate_config(self.module.Config, data)
        except ConfigError as exc:
            raise ConfigError(f"--grid point {point.label}: {exc}") from None

    def record(self) -> dict[str, Any]:
        """What sweep.json holds: the plan, enough to read the sweep's runs back."""
        return {"id": self.id, "experiment": self.experiment, "axes": self.axes,
                "grid": self.grid, "seeds": list(self.seeds),
                "base_config": self.base.model_dump(mode="json"),
                "points": [{"label": p.label, "values": dict(p.values), "seed": p.seed}
                           for p in self.points]}

    def _check_seeds(self) -> None:
        if not self.seeds:
            raise ConfigError("--seeds is empty: give at least one seed, e.g. 0-4")
        for seed in self.seeds:
            validate_config(type(self.base), {**self.base.model_dump(), "seed": seed})

    def _validate_axes(self, grid: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ConfigError("the grid is empty: give at least one --grid key=v1,v2,...")
        out: dict[str, list[Any]] = {}
        for key, values in grid.items():
            if key == "seed" or key.startswith("seed."):
                raise ConfigError("--grid seed: give seeds with --seeds, not as a grid axis")
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
                raise ConfigError(f"--grid {key} has no values: give key=v1,v2,...")
        size = math.prod(len(values) for values in grid.values()) * len(self.seeds)
        if size > MAX_POINTS:  # counted before any value is checked or the product is built
            raise ConfigError(f"the grid has {size} points (at most {MAX_POINTS})")
        for key, values in grid.items():
            out[key] = [self._normalised(key, value) for value in values]
            if len({json.dumps(v, sort_keys=True) for v in out[key]}) != len(out[key]):
                raise ConfigError(f"--grid {key}: a value appears twice ({values})")
        return out

    def _normalised(self, key: str, value: Any) -> Any:
        """`value` for `key` as the Config reads it back; a bad key or value is a ConfigError.
        A rule across fields that fails against the base config is left to the combinations
        (another axis may satisfy it): the value is then kept as given."""
        data = self.base.model_dump()
        shown = json.dumps(value, default=str)
        try:
            set_dotted(data, key, value)
            cfg = self.module.Config.model_validate(data)
        except ConfigError as exc:
            raise ConfigError(f"--grid {key}={shown}: {exc}") from None
        except ValidationError as exc:
            if all(_is_rule_above(err, key) for err in exc.errors()):
                return value
            raise ConfigError(f"--grid {key}={shown}: "
                              f"{describe_validation_error(self.module.Config, exc)}") from None
        node: Any = cfg.model_dump(mode="json")
        for part in key.split("."):
            node = node[part]
        return node


def _is_rule_above(err: Mapping[str, Any], key: str) -> bool:
    """A validation error of a rule on a section holding `key` (or on the whole config)."""
    loc, parts = tuple(str(p) for p in err["loc"]), tuple(key.split("."))
    return (err["type"] in ("value_error", "assertion_error") and len(loc) < len(parts)
            and parts[: len(loc)] == loc)


def _frozen(value: Any) -> Any:
    return json.dumps(value, sort_keys=True)
