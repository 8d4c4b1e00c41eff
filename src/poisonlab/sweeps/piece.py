"""The piece of a sweep: run or resume one point's run directory, return its metrics.

A module-level function of plain inputs (the run directory's absolute path, the data folder), so
an executor can ship it to another process (Ray pickles it by reference). The driver created the
run directory before sending the piece, so a piece retried after its worker died resumes that
same run from its checkpoints instead of starting a second one; a run that already completed is
read back, not recomputed. The experiment seeds itself from the run's config (its `seed`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from poisonlab.errors import PoisonlabError, RunError
from poisonlab.experiments.trial import resume_trial
from poisonlab.runs.layout import to_jsonable


def run_point(item: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """`item`: {"path": the point's run directory, "data_dir": a folder or None, "label": the
    point's name}. A user-facing error (bad data, an infeasible setting) names the point."""
    data_dir = Path(item["data_dir"]) if item.get("data_dir") else None
    path = Path(item["path"])
    try:
        _, metrics = resume_trial(path, data_dir=data_dir, progress=progress)
    except PoisonlabError as exc:
        raise RunError(f"sweep point {item.get('label', path.name)} (run {path.name}): "
                       f"{exc}") from None
    return to_jsonable(metrics)
