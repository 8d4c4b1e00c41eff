"""One trial of an experiment inside an existing run directory: start it, or resume it.

`poisonlab run --resume RUN_ID` and a sweep's points both continue a run from what its directory
holds: the resolved config in config.yaml (validated again against the experiment's Config), the
checkpoints each experiment saves as it goes (meta-training state, trained models, cached
logits), so a resumed trial skips what is done. A run that is already `completed` with its
metrics written is not run again: its metrics are read back.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType
from typing import Any

from pydantic import BaseModel

from poisonlab.config import validate_config
from poisonlab.experiments import get_experiment
from poisonlab.runs import Run, read_run_dir


def run_trial(exp: ModuleType, cfg: BaseModel, run: Run, data_dir: Path | None = None, *,
              progress: bool = True, **options: Any) -> dict:
    """`exp.run(cfg, run, data_dir, **options)` inside the run's lifecycle (status running, then
    completed, interrupted or failed); `progress` only to an experiment whose `run` accepts it
    (the caller checks `options` against it, see `accepts`)."""
    extra: dict[str, Any] = {"progress": progress} if accepts(exp, "progress") else {}
    with run:
        return exp.run(cfg, run, data_dir, **extra, **options)


def accepts(exp: ModuleType, option: str) -> bool:
    """Whether the experiment's `run` takes keyword `option` (model, executor, progress)."""
    return option in inspect.signature(exp.run).parameters


def finished_metrics(run: Run) -> dict | None:
    """The metrics of a run that completed and wrote them, else None."""
    info, metrics = read_run_dir(run.path)
    if info.get("status") == "completed" and (run.path / "metrics.json").is_file():
        return metrics
    return None


def resume_trial(run_id_or_path: str | Path, root: Path | str | None = None,
                 data_dir: Path | None = None, *, progress: bool = True) -> tuple[Run, dict]:
    """Run or resume the trial of an existing run directory; a completed one is read back."""
    run = Run.open(run_id_or_path, root=root)
    done = finished_metrics(run)
    if done is not None:
        return run, done
    exp = get_experiment(run.experiment)
    cfg = validate_config(exp.Config, run.config)
    return run, run_trial(exp, cfg, run, data_dir, progress=progress)
