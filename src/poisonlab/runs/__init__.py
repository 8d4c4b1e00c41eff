"""Run records: a directory per run (the source of truth), an SQLite index, safe checkpoints."""

from poisonlab.runs.checkpoints import (
    load_into,
    load_weights,
    pack_state,
    save_weights,
    unpack_state,
)
from poisonlab.runs.index import flatten_numbers, headline_metrics, list_runs, rebuild_index
from poisonlab.runs.query import compare_runs, flatten_values, get_run
from poisonlab.runs.record import (
    STATUSES,
    Run,
    StateFile,
    read_run_dir,
    resolve_run_dir,
    runs_root,
)

__all__ = [
    "STATUSES",
    "Run",
    "StateFile",
    "compare_runs",
    "flatten_numbers",
    "flatten_values",
    "get_run",
    "headline_metrics",
    "list_runs",
    "load_into",
    "load_weights",
    "pack_state",
    "read_run_dir",
    "rebuild_index",
    "resolve_run_dir",
    "runs_root",
    "save_weights",
    "unpack_state",
]
