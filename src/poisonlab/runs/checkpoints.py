"""Safe model files: weights are written as safetensors and never read through plain pickle.

`.safetensors` files hold only tensors and a string header, so reading one cannot run code.
Legacy `.pt/.pth/.bin` files are read with `torch.load(weights_only=True)`, whose restricted
unpickler refuses anything but tensors and plain containers; a file that tries more is refused
with a `ModelFileError`.

`pack_state`/`unpack_state` turn a nested training state (model and optimizer state dicts,
counters, RNG states) into flat tensors plus a JSON skeleton, so it can be saved the same way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from poisonlab.errors import ModelFileError, RunError
from poisonlab.runs.layout import make_ordinary, temp_beside

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def save_weights(
    path: Path | str, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write `state_dict` (name → tensor) to a .safetensors file atomically; metadata → header."""
    path = Path(path)
    tensors = _storable(state_dict)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as exc:  # the write failed (disk full, I/O error), not the data
            reason = str(exc).removeprefix("Error while serializing: ")
            raise OSError(errno.EIO, f"cannot write {path}: {reason}") from None
        make_ordinary(tmp)  # safetensors writes a new file of its own
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


DIGEST_KEY = "poisonlab.sha256"


def tensor_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of `tensors` and of `metadata` (without a
    digest entry): what a checkpoint is checked against when it is read back."""
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != DIGEST_KEY:
            h.update(json.dumps([key, metadata[key]]).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checked(path: Path | str, tensors: Mapping[str, Tensor],
                 metadata: Mapping[str, str]) -> Path:
    """save_weights with the digest of the contents in the header (see load_checked)."""
    tensors = _storable(tensors)
    meta = {str(k): str(v) for k, v in metadata.items()}
    return save_weights(path, tensors, {**meta, DIGEST_KEY: tensor_digest(tensors, meta)})


def load_checked(path: Path | str, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """load_weights of a file written by save_checked: a RunError naming `source` when its
    contents no longer match the digest written with them (a file without one, from an older
    version, is read as it is)."""
    tensors, meta = load_weights(path)
    want = meta.get(DIGEST_KEY)
    if want is not None and tensor_digest(tensors, meta) != want:
        raise RunError(f"{source} is damaged (its contents do not match the checksum written "
                       "with it): delete it to recompute what it held")
    return tensors, meta


def _storable(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory (safetensors requires it)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ModelFileError(f"cannot save '{key}': {type(value).__name__} is not a tensor")
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[str(key)] = t
    return out


def load_weights(path: Path | str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a weights file: (name → tensor on CPU, header metadata). Never runs pickled code."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model file {path} is a folder, not a weights file")
    if not path.exists():
        if path.is_symlink():
            raise ModelFileError(f"model file {path} is a symlink that leads nowhere (dangling, "
                                 "or a loop)")
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():  # a FIFO would block the read, a device such as /dev/zero fill memory
        raise ModelFileError(f"model file {path} is not a regular file (a FIFO, socket or device?)")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _load_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _state_dict_from(path, _load_pickled(path)), {}
    raise ModelFileError(
        f"unsupported model file {path} (expected .safetensors, or {', '.join(PICKLE_SUFFIXES)})"
    )


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except Exception as exc:  # safetensors raises its own error types and OSError/ValueError
        raise ModelFileError(
            f"cannot read {path}: not a valid safetensors file ({_first_line(exc)})"
        ) from None


def _check_archive(path: Path) -> None:
    """A torch zip file stores its tensors uncompressed; one whose members inflate past its own
    size (a deflated gigabyte of zeros in a 2 MB file) is refused before torch inflates them."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format: torch reads it as a stream of the file's own length
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {path}: {_first_line(exc)}") from None
    size = path.stat().st_size
    if inflated > 2 * size + 2**20:
        raise ModelFileError(f"refusing to load {path}: its archive inflates to {inflated:,} "
                             f"bytes from {size:,} (torch writes tensors uncompressed: a "
                             "corrupt or hostile file)")


def _load_pickled(path: Path) -> Any:
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # a note about pickle protocols, not about the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"refusing to load {path}: it contains code, not just weights ({_unpickle_reason(exc)})"
        ) from None
    except Exception as exc:  # truncated zip, EOF, unknown format: all unreadable files
        raise ModelFileError(f"cannot read {path}: {_first_line(exc)}") from None


def _unpickle_reason(exc: Exception) -> str:
    """The part of torch's long weights-only message that names what was refused."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}, which no weights file needs"
    found = re.search(r"Unsupported operand (\d+)", text)
    return f"unsupported pickle instruction {found.group(1)}" if found else _first_line(exc)


def _state_dict_from(path: Path, obj: Any) -> dict[str, Tensor]:
    """The tensors of a loaded object: a flat state dict, or one under a usual wrapper key."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelFileError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ModelFileError(f"{path} does not hold a state dict: key {key!r} is "
                                 f"{type(key).__name__}, not a parameter name")
        if not isinstance(value, Tensor):
            raise ModelFileError(
                f"{path} does not hold a state dict: entry {key!r} is {type(value).__name__}, "
                "not a tensor"
            )
    return dict(obj)


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_into(
    model: nn.Module,
    path_or_state: Path | str | Mapping[str, Tensor],
    strict: bool = True,
    name: str | None = None,
    source: str | None = None,
) -> nn.Module:
    """Load weights into `model` after checking that every key and shape fits.

    With strict=False missing and unexpected keys are allowed, but shapes must still match.
    Wrapper prefixes (`module.` from DataParallel/DDP, `model.` from a training wrapper) are
    dropped when that makes the keys name the model's entries (`match_key_names`). A mismatch
    is one ModelFileError naming a few missing, unexpected and misshapen entries; `name` is
    how it names the model, `source` the weights (default: the file's name).
    """
    if isinstance(path_or_state, Mapping):
        state, where = dict(path_or_state), "the given state dict"
    else:
        state, _ = load_weights(path_or_state)
        where = Path(path_or_state).name
    expected = model.state_dict()
    state = match_key_names(state, expected)
    problems = _fit_problems(state, expected, strict)
    if problems:
        label = name or getattr(model, "name", None) or type(model).__name__
        shown = _interleave(problems, SHOWN_PROBLEMS)
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise ModelFileError(
            f"weights in {source or where} do not fit {label}: {'; '.join(shown)}{more}"
        )
    model.load_state_dict(state, strict=strict)
    return model


# Prefixes that wrap every key of a state dict saved from a wrapper: DataParallel and
# DistributedDataParallel (`module.`), a training module holding the network as `self.model`.
WRAPPER_PREFIXES = ("module.", "model.")
SHOWN_PROBLEMS = 4  # problems a mismatch error lists before "and N more"


def match_key_names(state: Mapping[str, Tensor], expected: Iterable[str]) -> dict[str, Tensor]:
    """`state` with the wrapper prefixes that all its keys carry (WRAPPER_PREFIXES, in any order
    and repeated, e.g. `module.model.`) removed as far as that makes more of its keys name
    `expected` entries; unchanged when no removal does (a model whose own keys start with
    `model.` keeps them)."""
    wanted = set(expected)
    stages = [dict(state)]
    while stages[-1]:
        keys = list(stages[-1])
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if prefix is None:
            break
        stages.append({k[len(prefix):]: v for k, v in stages[-1].items()})
    return max(stages, key=lambda stage: len(wanted.intersection(stage)))  # first of the best


def _interleave(problems: list[tuple[str, str]], count: int) -> list[str]:
    """Up to `count` problem texts, taking each kind (missing, unexpected, shape) in turn so a
    long list of one kind does not hide the others."""
    kinds: dict[str, list[str]] = {}
    for kind, text in problems:
        kinds.setdefault(kind, []).append(text)
    shown: list[str] = []
    while len(shown) < count and any(kinds.values()):
        for texts in kinds.values():
            if texts and len(shown) < count:
                shown.append(texts.pop(0))
    return shown


def _fit_problems(
    state: Mapping[str, Tensor], expected: Mapping[str, Tensor], strict: bool
) -> list[tuple[str, str]]:
    """(kind, text) of every way `state` does not fit `expected`: kind is "missing",
    "unexpected" or "value" (shape, dtype, non-finite values, negative variances)."""
    problems = []
    for key, want in expected.items():
        if key not in state:
            if strict:
                problems.append(("missing", f"{key} is missing (expected shape {_shape(want)})"))
            continue
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            problem = f"{key} has shape {_shape(got)}, expected {_shape(want)}"
        elif (want.is_floating_point() or got.is_floating_point()) and \
                got.dtype not in WEIGHT_DTYPES:
            # load_state_dict would cast int8 or bool weights silently into a broken model;
            # float8 has too few bits for weights (and no kernels to check them with)
            problem = (f"{key} has dtype {str(got.dtype).removeprefix('torch.')}, "
                       "expected floating-point weights (float16, bfloat16, float32, float64)")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            # a NaN or inf weight makes every output NaN: every check of it passes vacuously
            problem = f"{key} holds NaN or infinite values"
        elif key.endswith("running_var") and bool((got < 0).any()):
            problem = f"{key} holds negative variances"
        else:
            continue
        problems.append(("value", problem))
    if strict:
        problems += [("unexpected", f"{key} is not part of the model")
                     for key in state if key not in expected]
    return problems


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def pack_state(obj: Any) -> tuple[dict[str, Tensor], str]:
    """Split a nested state into (flat tensors, JSON skeleton); `unpack_state` inverts it.

    Supports dicts (any str/int/float/bool keys), lists, tuples, tensors, numbers, strings and
    None — enough for model and optimizer state dicts, counters and RNG states.
    """
    tensors: dict[str, Tensor] = {}
    skeleton = _pack(obj, tensors, "")
    return tensors, json.dumps(skeleton, separators=(",", ":"))


def _pack(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    if isinstance(obj, Tensor):
        key = path.rstrip(".") or "tensor"
        while key in tensors:  # keys such as "a.b" and a nested a -> b give the same path
            key += "_"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        items = [[_pack_key(k, path), _pack(v, tensors, f"{path}{k}.")] for k, v in obj.items()]
        return {"__dict__": items}
    if isinstance(obj, (list, tuple)):
        items = [_pack(v, tensors, f"{path}{i}.") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise ModelFileError(
        f"cannot save state at '{path.rstrip('.')}': unsupported {type(obj).__name__}"
    )


def _pack_key(key: Any, path: str) -> Any:
    if isinstance(key, (str, int, float, bool)):
        return key
    raise ModelFileError(f"cannot save state at '{path}{key}': unsupported key type")


def unpack_state(tensors: Mapping[str, Tensor], skeleton: str, source: str = "a checkpoint"
                 ) -> Any:
    """Rebuild the object `pack_state` split; a damaged skeleton is a RunError naming `source`."""
    try:
        return _unpack(json.loads(skeleton), tensors)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise RunError(f"{source} is damaged ({type(exc).__name__}: {exc}): delete it to "
                       "recompute what it held") from None


def _unpack(node: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(node, dict):
        if "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if "__tuple__" in node:
            return tuple(_unpack(v, tensors) for v in node["__tuple__"])
        return {k: _unpack(v, tensors) for k, v in node["__dict__"]}
    if isinstance(node, list):
        return [_unpack(v, tensors) for v in node]
    return node
