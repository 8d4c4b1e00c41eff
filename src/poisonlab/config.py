"""Configuration: pydantic models layered from defaults, a preset, a file and `--set` overrides.

Settings are declared once, next to the code that uses them: every technique and training loop
has a frozen `Settings` model (`SupportBackdoor.Config`, `TrainConfig`, ...), validated once when
it is built and never changed afterwards (`replace` makes a re-validated copy). Every experiment
declares a `BaseConfig` subclass that nests those models.
`resolve_config` builds one in this order, each layer overriding the previous:

1. the class defaults,
2. a named preset (a partial dict),
3. a YAML file (TOML or JSON by extension),
4. `key=value` overrides; dotted keys reach nested sections (`attack.epsilon=0.3`) and values
   are parsed as YAML, so `0.3`, `[0.1, 0.3]`, `true` and `null` mean what they look like.

Any problem (unknown preset or key, wrong type, out-of-range value, unreadable file) becomes a
one-line `ConfigError` naming the key or file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from poisonlab.errors import ConfigError, require_regular_file
from poisonlab.yaml_tree import load_yaml_tree  # noqa: F401 (re-exported: config readers use it)

C = TypeVar("C", bound=BaseModel)


SEED_LIMIT = 2**63  # torch.manual_seed and torch.Generator take seeds below 2^63
INT_LIMIT = 2**63  # every integer setting: torch indexes and counts in int64
FLOAT32_MAX = 3.4028234663852886e38  # every float setting: the computations are float32


def _distinct(values: Any) -> Any:
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise ValueError(f"{value!r} appears twice: each entry names one piece of work")
        seen.append(value)
    return values


# A list whose entries each name a piece of work (attacks, architectures, ε values): a repeat is
# refused, as --grid and --seeds refuse one (the results are keyed by the entry: one would be
# wasted work or overwrite the other). Use as Annotated[list[X], Distinct].
Distinct = AfterValidator(_distinct)


class Settings(BaseModel):
    """Base of every settings model: unknown keys are errors, numbers are finite (no NaN or
    infinity: no check is ever true against NaN), the model is frozen once valid."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """A number setting takes a number: not true (which pydantic reads as 1) and not a
        string ('7' in quotes, which it reads as 7), so a typo cannot become a value."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _is_number_type(field.annotation):
            problem = _not_a_number(value)
            if problem:
                raise ValueError(problem)
        return value

    def __init__(self, **data: Any) -> None:
        _refuse_bad_text(data)
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(describe_validation_error(type(self), exc,
                                                        type(self).__qualname__)) from None

    # Tells pydantic this __init__ only wraps its own, so `model_validate` and nested sections
    # keep pydantic's validation (and its dotted error locations) instead of calling it.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]


def _is_number_type(annotation: Any) -> bool:
    """int or float (constrained ones too: Annotated[int, Field(...)]), optionally None, or
    lists and tuples of them, nested or not."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _is_number_type(get_args(annotation)[0])
    if origin in (list, tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return bool(args) and all(_is_number_type(a) for a in args)
    if origin in (Union, UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return bool(kinds) and all(_is_number_type(a) for a in kinds)
    return annotation in (int, float)


def _not_a_number(value: Any) -> str | None:
    """Why `value` (a number, or lists and tuples of them at any depth) is no number setting's
    value, or None: true/false and text are refused (pydantic reads them as 1 and 7), and so
    are integers past 64 bits."""
    if isinstance(value, (list, tuple)):
        return next((p for p in map(_not_a_number, value) if p), None)
    if isinstance(value, (bool, str)):
        return "expected a number, not " + ("true or false" if isinstance(value, bool)
                                            else "text")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
        return ("expected a number that fits 64 bits (below 2^63): no count, size or seed is "
                "larger")
    if isinstance(value, float) and math.isfinite(value) and abs(value) > FLOAT32_MAX:
        return ("expected a number that fits a float32 (at most 3.4e38 in size): the "
                "computations run in float32, where it would overflow")
    return None


def _bad_text(value: Any, where: str = "") -> str | None:
    """The dotted key of the first string in `value` (keys included) that is not valid text —
    a lone UTF-16 surrogate such as "\\ud800", which a JSON or YAML escape can write and no
    encoder can store — or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "a value"
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            found = _bad_text(key, name) or _bad_text(item, name)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _bad_text(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _refuse_bad_text(data: Any) -> None:
    key = _bad_text(data)
    if key is not None:
        raise ConfigError(f"{key} holds a character that is not valid text (a lone UTF-16 "
                          "surrogate, such as \\ud800)")


def check_seed(seed: int) -> int:
    """`seed` if it is a valid seed (0 <= seed < 2^63), else a one-line ConfigError (also a
    typer callback for --seed options)."""
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ConfigError(f"--seed {seed}: a seed must be in 0 .. 2^63 - 1")
    return int(seed)


Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # an Adam moment decay rate
# torch intra-op threads (0: torch's default). Bounded: each thread reserves memory, and a million
# of them failed in the allocator rather than in validation.
Threads = Annotated[int, Field(ge=0, le=1024)]


class BaseConfig(Settings):
    """Base of every experiment config. seed: the trial's seed (torch seeds are 64-bit)."""

    seed: Seed = 0


S = TypeVar("S", bound=BaseModel)


def replace(settings: S, **changes: Any) -> S:
    """A copy of `settings` with `changes` applied and validated again (pydantic's `model_copy`
    does not validate); a bad value is a one-line ConfigError naming the key."""
    data = settings.model_dump()
    data.update(changes)
    return validate_config(type(settings), data)


def make_settings(cls: type[S], config: S | None = None, **changes: Any) -> S:
    """The settings a technique's constructor was given: `config` (default `cls()`) with the
    keyword `changes` applied; validated, one-line ConfigError on a bad value."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__qualname__}, got {type(config).__name__}")
    if config is None:
        return validate_config(cls, changes)
    return replace(config, **changes) if changes else config


def resolve_config(
    cls: type[C],
    presets: Mapping[str, Mapping[str, Any]],
    preset: str | None = None,
    file: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> C:
    """Build a validated `cls` from defaults, then `preset`, then `file`, then `overrides`."""
    data = _nested_defaults(cls)
    if preset is not None:
        if preset not in presets:
            valid = ", ".join(sorted(presets)) or "none"
            raise ConfigError(f"unknown preset '{preset}' (valid presets: {valid})")
        _deep_merge(data, copy.deepcopy(dict(presets[preset])))
    if file is not None:
        _deep_merge(data, load_config_file(Path(file)))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return validate_config(cls, data)


def validate_config(cls: type[C], data: Mapping[str, Any]) -> C:
    """`cls.model_validate(data)`, with a failure turned into a one-line ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config must be a mapping of keys to values, not "
                          f"{type(data).__name__}")
    _refuse_bad_text(data)
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(cls, exc)) from None


def parse_override(item: str) -> tuple[str, Any]:
    """Split `key=value`; the value is parsed as YAML (`0.3` → float, `[1,2]` → list)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override '{item}': expected key=value, e.g. attack.epsilon=0.3")
    if any(not part for part in key.split(".")):
        raise ConfigError(f"bad override '{item}': empty part in key '{key}'")
    try:
        value = load_yaml_tree(raw) if raw.strip() else None
    except RecursionError:
        raise ConfigError(f"bad override '{item[:80]}': value nested too deeply") from None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(f"bad override '{item}': cannot parse value ({problem})") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        problem = str(exc).splitlines()[0][:120]
        raise ConfigError(f"bad override '{item[:80]}': cannot parse value ({problem})") from None
    return key, value


_CONFIG_SUFFIXES = (".yaml", ".yml", ".toml", ".json", "")
TEXT_FILE_LIMIT = 16 * 2**20  # bytes; no config or run record comes near it


def resolved(path: Path | str, what: str) -> Path:
    """`path` made absolute with its symlinks followed; a ConfigError naming `what` when the
    symlinks loop (Path.resolve raises RuntimeError for that)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        raise ConfigError(f"{what} {path} is a symlink loop") from None


def read_small_bytes(path: Path, limit: int, what: str = "a settings file") -> bytes:
    """The bytes of the regular file `path` (symlinks followed), at most `limit` bytes.

    OSError for anything else, with a reason to print: a FIFO would block the read forever,
    a device such as /dev/zero would fill memory, and neither is a settings, record or image
    file.
    """
    require_regular_file(path)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(f"larger than {limit // 2**20} MiB, too large for {what}")
    return data


def read_small_text(path: Path, limit: int = TEXT_FILE_LIMIT) -> str:
    """The UTF-8 text of the regular file `path`, at most `limit` bytes (read_small_bytes)."""
    return read_small_bytes(path, limit).decode("utf-8")


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a mapping from a .yaml/.yml, .toml or .json file (no extension: YAML)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix.lower() not in _CONFIG_SUFFIXES:
        raise ConfigError(f"config file {path}: {path.suffix} is not a config format (use "
                          f"{', '.join(s for s in _CONFIG_SUFFIXES if s)})")
    try:
        text = read_small_text(path)
        data = _parse_text(text, path.suffix.lower())
    except RecursionError:
        raise ConfigError(f"cannot parse config file {path}: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())[:200]
        raise ConfigError(f"cannot parse config file {path}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}"
        )
    return data


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused if a key repeats (json keeps the last value silently)."""
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise ValueError(f"the key '{key}' appears twice in one object")
    return dict(pairs)


def _parse_text(text: str, suffix: str) -> Any:
    if suffix == ".json":
        return json.loads(text, object_pairs_hook=_unique_keys)
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    return load_yaml_tree(text)


def config_hash(cfg: BaseModel) -> str:
    """A stable 12-hex-digit sha256 of the config's canonical JSON (sorted keys)."""
    canonical = json.dumps(
        cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def dump_yaml(cfg: BaseModel) -> str:
    """The config as YAML, fields in declaration order; `load_config_file` reads it back."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def describe_validation_error(cls: type[BaseModel], exc: ValidationError,
                              what: str = "config") -> str:
    """One line: 'invalid <what>: <key>: <problem> (got <value>)' for each error, '; '-joined."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(cls, err["loc"][:-1])
            hint = f" (valid keys: {', '.join(valid)})" if valid else ""
            parts.append(f"{loc}: unknown key{hint}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required value is missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            value = err.get("input")  # a whole section for a rule across its fields: not shown
            got = "" if isinstance(value, (Mapping, BaseModel)) else f" (got {_short(value)})"
            parts.append(f"{loc}: {message}{got}" if loc else f"{message}{got}")
    return f"invalid {what}: " + "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _valid_keys(cls: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, or [] if it cannot be followed."""
    model: Any = cls
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _nested_defaults(cls: type[BaseModel]) -> dict[str, Any]:
    """Defaults of nested-model fields as dicts, so a partial layer keeps the other sub-keys."""
    out: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out[name] = default.model_dump()
    return out


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (`attack.epsilon`) of nested dict `data` to `value`, creating
    sections on the way; a part that is a value, not a section, is a one-line ConfigError."""
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set {key}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value
