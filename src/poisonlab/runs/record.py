"""Run records: every run gets a directory (the source of truth) and a row in the index.

Layout of `<root>/<experiment>-<YYYYmmdd-HHMMSS>-<4 hex>/`:

    config.yaml    the resolved config
    run.json       id, experiment, seed, status, start/end, config hash, versions, git revision,
                   and the sweep and point the run belongs to, if any
    log.txt        timestamped log lines
    metrics.json   the experiment's results
    checkpoints/   safetensors files (weights, or packed training state for --resume)
    figures/       images written by the experiment

The root is an argument, else $POISONLAB_RUNS, else ./runs. Use a run as a context manager:
the status becomes "running", then "completed", "interrupted" (Ctrl-C or SIGTERM) or "failed".

While a process works in a run it holds an exclusive lock on the run's `.lock` file (flock): a
second process that enters the same run (a parallel `--resume`) is refused with one line naming
the pid; the operating system drops the lock when the process dies, however it dies, so a run
that says "running" but whose lock is free was killed (SIGKILL, power loss): `mark_stale` records
it as interrupted (`runs list` does this), and `--resume` continues it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor

import poisonlab
from poisonlab.config import config_hash, dump_yaml, resolved
from poisonlab.device import default_device
from poisonlab.errors import RunError
from poisonlab.runs import index
from poisonlab.runs.checkpoints import load_checked, pack_state, save_checked, unpack_state
from poisonlab.runs.layout import (  # noqa: F401  (re-exported: the run-record API)
    atomic_write_text,
    folder_lock,
    read_json,
    read_run_dir,
    read_yaml,
    release_lock,
    resolve_run_dir,
    runs_root,
    to_jsonable,
)

STATUSES = ("created", "running", "completed", "interrupted", "failed")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_META_KEY = "poisonlab.meta"
_STATE_KEY = "poisonlab.state"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


class Run:
    """One run directory. Create with `Run.create`, reopen with `Run.open`."""

    def __init__(self, path: Path, info: dict[str, Any], config: dict[str, Any], resumed: bool):
        self.path = Path(path)
        self.info = info
        self.config = config
        # The (C, H, W) its classifiers take, when the experiment sets it: written into the
        # header of every classifier checkpoint, so `scan` and `purify` of one know its size.
        self.input_shape: tuple[int, ...] | None = None
        self.resumed = resumed
        self.id: str = info["id"]
        self.experiment: str = info["experiment"]
        self.seed: int = int(info.get("seed", 0))
        self._prev_sigterm: Any = None
        self._sigterm_installed = False
        self._lock: Any = None

    def __repr__(self) -> str:
        return f"Run({self.id!r}, status={self.status!r}, path='{self.path}')"

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def status(self) -> str:
        return self.info.get("status", "created")

    @classmethod
    def create(cls, experiment: str, config: BaseModel, root: Path | str | None = None, *,
               sweep: Mapping[str, Any] | None = None, data_dir: Path | None = None) -> Run:
        """Make a new run directory for `experiment` with the resolved `config`. `sweep`: the
        sweep this run is a point of (`{"id": ..., "point": ...}` and what else describes the
        point), kept in run.json so the index can be rebuilt with its sweep grouping.
        `data_dir`: the data folder it reads, kept (absolute) so a resume reads the same."""
        if not _SAFE_NAME.match(experiment):
            raise RunError(
                f"bad experiment name '{experiment}': use letters, digits, '_', '-', '.'"
            )
        base = runs_root(root)
        base.mkdir(parents=True, exist_ok=True)
        path = _new_run_dir(base, experiment)
        (path / "checkpoints").mkdir()
        (path / "figures").mkdir()
        (path / "log.txt").touch()
        atomic_write_text(path / "config.yaml", dump_yaml(config))
        cfg = config.model_dump(mode="json")
        info = {
            "id": path.name,
            "experiment": experiment,
            "seed": int(cfg.get("seed", 0)),
            "status": "created",
            "started": _now(),
            "ended": None,
            "config_hash": config_hash(config),
            **environment(),
            "resumed_at": [],
        }
        if sweep is not None:
            info["sweep"] = to_jsonable(dict(sweep))
        info["data_dir"] = (str(resolved(data_dir, "--data-dir")) if data_dir is not None
                            else None)
        run = cls(path, info, cfg, resumed=False)
        run._save_info()
        return run

    @classmethod
    def open(cls, run_id_or_path: str | Path, root: Path | str | None = None) -> Run:
        """Reopen an existing run (by path, id or unique id prefix); resumed=True unless it
        never started (status created: a sweep's driver makes the run before its piece runs)."""
        path = resolve_run_dir(run_id_or_path, root)
        info, _ = read_run_dir(path)
        config = read_yaml(path / "config.yaml")
        return cls(path, info, config, resumed=info.get("status", "created") != "created")

    # --- records -------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Append a timestamped line to log.txt."""
        line = " ".join(str(message).splitlines())
        with open(self.path / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{_now()} {line}\n")

    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Write metrics.json atomically and put its headline numbers into the index."""
        clean = to_jsonable(dict(metrics))
        atomic_write_text(self.path / "metrics.json", json.dumps(clean, indent=2) + "\n")
        self._update_index(clean)

    def figure_path(self, name: str) -> Path:
        """Where to save figure `name` (figures/<name>); the folder exists."""
        _check_name(name, "figure")
        folder = self.path / "figures"
        folder.mkdir(exist_ok=True)
        return folder / name

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint_path(self, name: str) -> Path:
        _check_name(name, "checkpoint")
        return self.path / "checkpoints" / f"{name}.safetensors"

    def save_checkpoint(
        self, name: str, tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None
    ) -> Path:
        """Save tensors to checkpoints/<name>.safetensors atomically; `meta` is JSON in the header."""
        header = {_META_KEY: json.dumps(to_jsonable(dict(meta or {})))}
        head = tensors.get("head.weight")
        if self.input_shape is not None and isinstance(head, Tensor) and head.dim() == 2:
            header["input_shape"] = json.dumps([int(v) for v in self.input_shape])
        return save_checked(self.checkpoint_path(name), tensors, header)

    def load_checkpoint(self, name: str) -> tuple[dict[str, Tensor], dict] | None:
        """(tensors, meta) of checkpoint `name`, or None if it was never saved."""
        path = self.checkpoint_path(name)
        if not path.exists():
            return None
        tensors, header = load_checked(path, f"checkpoint {path}")
        return tensors, json.loads(header.get(_META_KEY) or "{}")

    def check_checkpoints(self) -> None:
        """RunError naming the first entry of checkpoints/ that is not a regular file (a FIFO,
        device or folder), before a resume: it could finish without reading that checkpoint
        and leave it where the run's weights should be."""
        folder = self.path / "checkpoints"
        for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
            if entry.name.startswith("."):
                continue  # a temporary file of an atomic write
            try:
                regular = entry.is_file()
            except OSError:
                regular = False
            if not regular:
                raise RunError(f"run {self.id} cannot be resumed: {entry} is not a regular file "
                               "(a FIFO, device, folder or broken link?); remove it, and the "
                               "resume redoes what it held")

    def save_state(self, name: str, state: Any) -> Path:
        """Save a nested training state (state dicts, optimizer state, counters) for resuming."""
        return self.state_file(name).save(state)

    def load_state(self, name: str) -> Any | None:
        """The state saved by `save_state(name, ...)`, or None if there is none."""
        return self.state_file(name).load()

    def state_file(self, name: str) -> StateFile:
        """The picklable handle of state `name` (what save_state / load_state use)."""
        return StateFile(self.checkpoint_path(name))

    # --- lifecycle -----------------------------------------------------------------------
    def finish(self, status: str = "completed") -> None:
        """Record the final status and end time."""
        if status not in STATUSES:
            raise RunError(f"unknown run status '{status}' (one of: {', '.join(STATUSES)})")
        self.info["status"] = status
        self.info["ended"] = _now()
        self.log(f"status: {status}")
        self._save_info()

    def __enter__(self) -> Run:
        self._lock = folder_lock(self.path)
        if self._lock is None:
            raise RunError(f"run {self.id} is in use by another process (pid "
                           f"{self.info.get('pid', '?')}): wait for it to end or stop it")
        if self.resumed:
            self.info.setdefault("resumed_at", []).append(_now())
        self.info.update(status="running", ended=None, pid=os.getpid())
        self.info.pop("error", None)
        self._save_info()
        self.log("resumed" if self.resumed else "started")
        self._install_sigterm()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._restore_sigterm()
        try:
            if exc_type is None:
                self.finish("completed")
            elif issubclass(exc_type, KeyboardInterrupt):
                self.log(f"interrupted{': ' + str(exc) if str(exc) else ''}")
                self.finish("interrupted")
            else:
                text = str(exc).strip().splitlines()
                error = f"{exc_type.__name__}: {text[0] if text else ''}".rstrip(": ")
                self.info["error"] = error
                self.log(f"failed: {error}")
                self.finish("failed")
        finally:
            release_lock(self._lock)
            self._lock = None
        return False

    def in_use(self) -> bool:
        """Whether a live process (this one included) holds the run's lock."""
        if self._lock is not None:
            return True
        lock = folder_lock(self.path)
        release_lock(lock)
        return lock is None

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._prev_sigterm = signal.signal(signal.SIGTERM, sigterm_to_interrupt)
        self._sigterm_installed = True

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed:
            prev = self._prev_sigterm if self._prev_sigterm is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, prev)
            self._sigterm_installed = False

    # --- persistence ---------------------------------------------------------------------
    def _save_info(self) -> None:
        atomic_write_text(self.path / "run.json", json.dumps(self.info, indent=2) + "\n")
        self.reindex()

    def reindex(self) -> None:
        """Mirror run.json and the headline metrics into the index."""
        metrics = (
            read_json(self.path / "metrics.json") if (self.path / "metrics.json").exists() else {}
        )
        self._update_index(metrics)

    def _update_index(self, metrics: Mapping[str, Any]) -> None:
        """Mirror the run into the index; a failure is logged, the run directory stays valid."""
        try:
            index.record_run(self.root, self.info, index.headline_metrics(metrics), self.path)
        except RunError as exc:
            self.log(f"warning: {exc}")
            warnings.warn(str(exc), stacklevel=3)


def mark_stale(root: Path | str | None = None) -> list[str]:
    """Bring the index in line with the run directories: a run that says "running" but whose
    process is gone is marked interrupted (run.json, log, index); a row whose status is not
    its run.json's (an index write that failed, a directory copied in) is rewritten from it.
    Returns the ids marked interrupted."""
    stale = []
    for row in index.list_runs(root):
        try:
            run = Run.open(row["path"])
        except RunError:
            continue
        if mark_if_stale(run):
            stale.append(run.id)
        elif run.status != row["status"]:
            run.reindex()
    return stale


def mark_if_stale(run: Run) -> bool:
    """Mark `run` interrupted if it says "running" but no live process holds its lock."""
    if run.status != "running" or run.in_use():
        return False
    run.log(f"interrupted: its process (pid {run.info.get('pid', '?')}) is gone")
    run.finish("interrupted")
    return True


class StateFile:
    """One saved state of a run (checkpoints/<name>.safetensors, the format of Run.save_state)
    as a small picklable handle: how a piece running in another process that sees the run
    directory keeps its own in-progress state (a training's epochs, a craft's steps). It is a
    training.supervised.CheckpointStore (save / load)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def save(self, state: Any) -> Path:
        tensors, skeleton = pack_state(state)
        return save_checked(self.path, tensors, {_STATE_KEY: skeleton})

    def load(self) -> Any | None:
        if not self.path.exists():
            return None
        tensors, header = load_checked(self.path, f"checkpoint {self.path}")
        if _STATE_KEY not in header:
            raise RunError(f"checkpoint {self.path} was not written by save_state")
        return unpack_state(tensors, header[_STATE_KEY], str(self.path))

    def discard(self) -> None:
        """Delete the state (its piece has finished and was recorded)."""
        self.path.unlink(missing_ok=True)


# Set by the first SIGTERM of a command (poisonlab.cli.main clears it when a command starts).
STOPPING: list[int] = []


def sigterm_to_interrupt(signum, frame) -> None:
    """The first SIGTERM ends the command as Ctrl-C does; a further one while its clean-up runs
    (a second `kill`, a supervisor that repeats it) is ignored: raised inside the clean-up it
    broke it, and after it the default action killed the process with exit code 143."""
    if STOPPING:
        return
    STOPPING.append(signum)
    raise KeyboardInterrupt("terminated by SIGTERM")


def _new_run_dir(base: Path, experiment: str) -> Path:
    for _ in range(50):
        run_id = f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            (base / run_id).mkdir()
            return base / run_id
        except FileExistsError:
            continue
    raise RunError(f"cannot create a new run directory under {base}")


def _check_name(name: str, kind: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise RunError(f"bad {kind} name '{name}': use a plain file name")


def environment() -> dict[str, Any]:
    """Versions and place of this process: what run.json records beside the config."""
    return {
        "git_revision": _source_revision(),
        "poisonlab_version": poisonlab.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(default_device()),
        "host": platform.node(),
    }


@lru_cache(maxsize=1)
def _source_revision() -> str | None:
    """`git rev-parse HEAD` of the poisonlab source tree (with '+dirty'), or None without git."""
    here = Path(poisonlab.__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
