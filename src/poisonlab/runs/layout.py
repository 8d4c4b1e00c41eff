"""Run directories on disk: where they live, how they are read and found, atomic writes.

The lowest layer of poisonlab.runs: the index (a mirror of the directories) and the run
record both build on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from torch import Tensor

from poisonlab.config import load_yaml_tree, read_small_text
from poisonlab.errors import ConfigError, RunError, printable


def runs_root(root: Path | str | None = None) -> Path:
    """`root`, else $POISONLAB_RUNS, else ./runs; a RunError when its name is not valid
    UTF-8 (a Latin-1 byte in a folder name): the run index, SQLite, stores only UTF-8 text."""
    path = Path(root) if root is not None else Path(os.environ.get("POISONLAB_RUNS") or "runs")
    if os.path.lexists(path) and not path.is_dir():
        where = ("--out" if root is not None else "$POISONLAB_RUNS"
                 if os.environ.get("POISONLAB_RUNS") else "the default folder of runs")
        raise RunError(f"{where} {printable(str(path))} is not a folder of runs (a file, or a "
                       "symlink that leads nowhere)")
    try:
        str(path.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        raise RunError(f"folder of runs {printable(str(path))}: its name is not valid UTF-8, "
                       "which the run index cannot store (rename it)") from None
    return path


def to_jsonable(value: Any) -> Any:
    """Tensors and NumPy values become numbers or lists; paths become strings."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return value.tolist()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder, to be os.replace'd onto `path`,
    with the permissions of an ordinary new file (mkstemp's are 0600, whatever the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    make_ordinary(tmp)
    return fd, tmp


def make_ordinary(path: Path | str) -> None:
    """Give `path` the permissions a new file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and os.replace: never half-written. A
    character UTF-8 cannot encode (a surrogate from a file name in another encoding) is
    written as its escape, not an error after the work."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path) -> Any:
    try:
        return json.loads(read_small_text(path))
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise RunError(f"cannot read {path}: {exc}") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise RunError(f"cannot read {path}: nested too deeply") from None


# run.json fields the index and the commands read, and the types they must have
_RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "id": (str,), "experiment": (str,), "status": (str,), "config_hash": (str, type(None)),
    "started": (str, type(None)), "ended": (str, type(None)), "sweep": (dict, type(None)),
    "seed": (int,), "data_dir": (str, type(None)), "resumed_at": (list,),
    "pid": (int, type(None)),
}


def read_yaml(path: Path) -> dict[str, Any]:
    """A run's config.yaml, read as a config is (no aliases: a cycle or a "billion laughs"
    expansion; no repeated keys)."""
    try:
        data = load_yaml_tree(read_small_text(path))
    except OSError as exc:
        raise RunError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, yaml.YAMLError) as exc:
        raise RunError(f"cannot read {path}: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise RunError(f"cannot read {path}: nested too deeply") from None
    if data is not None and not isinstance(data, dict):
        raise RunError(f"{path} is damaged: a {type(data).__name__}, not a mapping of settings")
    return data or {}


def read_run_dir(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run.json, metrics.json or {}) of a run directory."""
    info = read_run_info(path)
    metrics_file = path / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.exists() else {}
    return info, metrics if isinstance(metrics, dict) else {}


def read_run_info(path: Path) -> dict[str, Any]:
    """The run.json of a run directory, its fields type-checked."""
    info = read_json(path / "run.json")
    if not isinstance(info, dict) or "id" not in info or "experiment" not in info:
        raise RunError(f"{path / 'run.json'} is not a run record")
    for key, kinds in _RUN_FIELDS.items():
        if key in info and not isinstance(info[key], kinds):
            raise RunError(f"{path / 'run.json'} is damaged: '{key}' is a "
                           f"{type(info[key]).__name__}")
    return info


def resolve_run_dir(run_id_or_path: str | Path, root: Path | str | None = None) -> Path:
    """The directory of a run given as a path, an id or a unique id prefix under `root`."""
    given = Path(run_id_or_path)
    if (given / "run.json").is_file():
        return given
    base = runs_root(root)
    key = str(run_id_or_path)
    if "/" not in key and (base / key / "run.json").is_file():
        return base / key
    matches = sorted(p.parent for p in base.glob("*/run.json") if p.parent.name.startswith(key))
    if len(matches) == 1 and key:
        return matches[0]
    if len(matches) > 1 and key:
        names = ", ".join(p.name for p in matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise RunError(f"run id prefix '{key}' is ambiguous under {base}: {names}")
    raise RunError(f"no run '{key}' under {base}")


# The folders prepare_output created for the command running now, outermost first: a command
# that then fails removes those still empty (`remove_unused_outputs`), so a refused command
# leaves no empty --out or --report folder behind.
_MADE: list[Path] = []


def remove_unused_outputs(*, failed: bool) -> None:
    """After a command: if it `failed`, remove the folders prepare_output created for it that
    are still empty (innermost first; one holding anything stays); forget them either way."""
    if failed:
        for folder in reversed(_MADE):
            with contextlib.suppress(OSError):
                folder.rmdir()
    _MADE.clear()


def prepare_output(path: Path | str, *, directory: bool, what: str = "--out") -> Path:
    """Check an output path before any work starts, so nothing computed is lost at the end: not
    a dangling or looping symlink, of the right kind (a folder, or a file that is not a folder),
    and its folder creatable and writable (a probe file is written and removed). Returns the
    path; a problem is a one-line ConfigError naming `what`."""
    path = Path(path).expanduser()
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ConfigError(f"{what} {path} is a symlink to nothing (dangling or looping)") from None
    if directory and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a folder")
    if not directory and path.is_dir():
        raise ConfigError(f"{what} {path} is a folder, not a file name")
    folder = path if directory else path.parent
    try:
        made = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
        folder.mkdir(parents=True, exist_ok=True)
        _MADE.extend(reversed(made))
        fd, probe = tempfile.mkstemp(prefix=".poisonlab-write-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what} {path}: cannot write there ({reason})") from None
    return path


REPORT_FILES = ("report.html", "scan.json", "encoder_scan.json")


def refuse_replacing(folder: Path, names: Sequence[str], *, what: str, overwrite: bool) -> None:
    """A one-line ConfigError when `folder` already holds a file of `names` (an earlier report,
    or the user's own file of that name) and `overwrite` is not set: nothing is replaced unasked."""
    found = [name for name in names if os.path.lexists(Path(folder) / name)]
    if found and not overwrite:
        raise ConfigError(f"{what} {folder} already holds {', '.join(found)}: pass --overwrite "
                          "to replace it, or pick another folder")


def report_folder(report: Path | str, overwrite: bool) -> Path:
    """A scan's --report folder, checked before any work: writable (prepare_output), and
    holding no earlier report unless `overwrite` (a user's own report.html was replaced)."""
    folder = prepare_output(report, directory=True, what="--report")
    refuse_replacing(folder, REPORT_FILES, what="--report", overwrite=overwrite)
    return folder


class _NoLock:
    """Where the platform has no flock (Windows): a lock that is always granted."""

    def close(self) -> None:
        return None


def folder_lock(folder: Path, holder: str | None = None) -> Any:
    """An exclusive, non-blocking flock on `folder/.lock`: the open lock file (keep it; closing
    it, `release_lock`, or the process's death frees the lock), or None if another process holds
    it. `holder` (e.g. "pid 123") is written into the file for whoever finds it held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): nothing is locked
        return _NoLock()
    f = open(folder / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 - held while locked
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    if holder is not None:
        f.seek(0)
        f.truncate()
        f.write(holder)
        f.flush()
    return f


def lock_holder(folder: Path) -> str:
    """What the holder of `folder/.lock` wrote into it (empty when nothing)."""
    try:
        return (folder / ".lock").read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def release_lock(lock: Any) -> None:
    """Free a lock `folder_lock` granted (None: nothing to free)."""
    if lock is not None:
        lock.close()  # closing the file drops the flock
