"""The sweep driver: one run directory per point, the missing points as pieces, each recorded once.

The driver, never a piece, creates the points' run directories (ordinary runs of the experiment,
with `"sweep": {"id", "point", "values", "seed"}` in run.json), so each point has exactly one run
however often its piece is started: a piece retried after its worker was killed, or a sweep
re-run after its driver was killed, resumes that run from its checkpoints. Points whose run
completed are skipped (their metrics are read back); the others go to the executor as
`run_point` pieces, in the plan's order (the local executor runs them one after the other in this
process), and each is mirrored into the run index as its result arrives. The sweep's own folder,
`<root>/sweeps/<sweep id>/`, holds sweep.json (the plan) and the summary written from the runs;
while a driver runs the sweep it holds an exclusive lock on the folder's `.lock` file (released
by the kernel even when the driver is killed), so a second driver of the same sweep stops with a
one-line error instead of creating a second run for a point. Run directories must be on a file
system the executor's workers share with the driver.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from poisonlab.config import resolved
from poisonlab.errors import RunError
from poisonlab.executors import Executor, run_missing
from poisonlab.runs import Run, read_run_dir, runs_root
from poisonlab.runs.index import headline_metrics, record_run
from poisonlab.runs.layout import (
    atomic_write_text,
    folder_lock,
    lock_holder,
    prepare_output,
    release_lock,
)
from poisonlab.sweeps.piece import run_point
from poisonlab.sweeps.plan import Sweep

SWEEPS_FOLDER = "sweeps"
PointCallback = Callable[[str, dict, int, int], None]


def sweep_folder(root: Path | str | None, sweep_id: str) -> Path:
    """`<root>/sweeps/<sweep id>`: the sweep's plan, summary, figures and report."""
    return runs_root(root) / SWEEPS_FOLDER / sweep_id


@dataclass
class SweepOutcome:
    """What a sweep holds after `run_sweep`: every point's run and the completed metrics."""

    plan: Sweep
    root: Path
    folder: Path
    runs: dict[str, Path]                                  # point label → run directory
    metrics: dict[str, dict] = field(default_factory=dict)  # point label → metrics.json
    computed: list[str] = field(default_factory=list)       # points run (or resumed) by this call

    @property
    def skipped(self) -> list[str]:
        return [label for label in self.metrics if label not in self.computed]


@contextmanager
def driving(folder: Path) -> Iterator[None]:
    """Hold the sweep folder's lock for as long as this driver runs; a RunError if another
    process holds it (no lock where the platform has no `fcntl`)."""
    lock = folder_lock(folder, holder=f"pid {os.getpid()}")
    if lock is None:
        holder = lock_holder(folder) or "another process"
        raise RunError(f"sweep {folder.name} is being run by {holder}; wait for it or "
                       "stop it first")
    try:
        yield
    finally:
        release_lock(lock)


def find_point_runs(plan: Sweep, root: Path | str | None = None) -> dict[str, Path]:
    """The run directory of each point of `plan` already under `root`, read from the run
    directories (the source of truth). Should a point have two (runs copied in by hand), the
    completed one wins, then the earlier."""
    found: dict[str, tuple[tuple, Path]] = {}
    for run_json in sorted(runs_root(root).glob("*/run.json")):
        try:
            info, _ = read_run_dir(run_json.parent)
        except RunError:
            continue
        sweep = info.get("sweep")
        if not isinstance(sweep, dict) or sweep.get("id") != plan.id:
            continue
        rank = (info.get("status") != "completed", info.get("started") or "")
        label = str(sweep.get("point"))
        if label not in found or rank < found[label][0]:
            found[label] = (rank, run_json.parent)
    return {label: path for label, (_, path) in found.items()}


def prepare_points(plan: Sweep, root: Path | str | None = None) -> dict[str, Path]:
    """Every point's run directory, in plan order: found again, or created now (status created)."""
    found = find_point_runs(plan, root)
    paths: dict[str, Path] = {}
    for point in plan.points:
        if point.label not in found:
            sweep = {"id": plan.id, "point": point.label, "values": dict(point.values),
                     "seed": point.seed}
            run = Run.create(plan.experiment, plan.point_config(point), root=root, sweep=sweep)
            run.log(f"sweep {plan.id}, point {point.label}")
            found[point.label] = run.path
        paths[point.label] = found[point.label].resolve()
    return paths


def run_sweep(plan: Sweep, root: Path | str | None = None, *, executor: Executor | None = None,
              data_dir: Path | None = None, on_point: PointCallback | None = None,
              cpus: int = 1, progress: bool = False,
              check: Callable[[dict], None] | None = None) -> SweepOutcome:
    """Run the points of `plan` that have not completed; see the module docstring.

    `executor`: where pieces run (None: this process, in order). `on_point(label, run_info,
    done, total)` is called as each point is recorded; `check(metrics)` on the first metrics
    there are (a recorded point's, else the first computed), so a request the metrics cannot
    meet (an unknown --metric) stops the sweep after one point, not all; `cpus`: the cores of one piece;
    `progress`: the executor's progress bar, where it has one. An interrupted or failed piece
    stops the sweep; what completed stays recorded and the next call goes on from there."""
    root = prepare_output(runs_root(root), directory=True)
    folder = sweep_folder(root, plan.id)
    folder.mkdir(parents=True, exist_ok=True)
    with driving(folder):
        atomic_write_text(folder / "sweep.json", json.dumps(plan.record(), indent=2) + "\n")
        return _drive(plan, root, folder, executor, data_dir, on_point, cpus, progress, check)


def _drive(plan: Sweep, root: Path, folder: Path, executor: Executor | None,
           data_dir: Path | None, on_point: PointCallback | None, cpus: int,
           progress: bool, check: Callable[[dict], None] | None) -> SweepOutcome:
    outcome = SweepOutcome(plan, root, folder, prepare_points(plan, root))
    todo: dict[str, dict] = {}
    for label, path in outcome.runs.items():
        info, metrics = read_run_dir(path)
        if info.get("status") == "completed" and (path / "metrics.json").is_file():
            outcome.metrics[label] = metrics
        else:
            todo[label] = {"path": str(path), "label": label,
                           "data_dir": str(resolved(data_dir, "--data-dir")) if data_dir else None}

    if check is not None and outcome.metrics:
        check(next(iter(outcome.metrics.values())))

    def record(label: str, metrics: dict) -> None:
        path = outcome.runs[label]
        info, _ = read_run_dir(path)
        try:  # a worker elsewhere wrote the run directory: mirror it here too
            record_run(root, info, headline_metrics(metrics), path)
        except RunError as exc:
            warnings.warn(str(exc), stacklevel=2)
        outcome.metrics[label] = metrics
        outcome.computed.append(label)
        if on_point is not None:
            on_point(label, info, len(outcome.metrics), len(outcome.runs))
        if check is not None and len(outcome.metrics) == 1:  # the first point, recorded
            check(metrics)

    run_missing(executor, run_point, todo, record, shared={"progress": False}, cpus=cpus,
                description=f"sweep {plan.id}" if progress else "")
    return outcome
