"""Reading runs back: one run in full, or several side by side."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from poisonlab.errors import RunError
from poisonlab.runs.index import flatten_numbers
from poisonlab.runs.layout import read_run_dir, read_yaml, resolve_run_dir, runs_root


def get_run(root: Path | str | None, run_id: str) -> dict[str, Any]:
    """Everything about one run (id or unique prefix): run.json fields plus path, config,
    metrics, and the names of its checkpoints and figures."""
    path = resolve_run_dir(run_id, runs_root(root))
    info, metrics = read_run_dir(path)
    return {
        **info,
        "path": str(path.resolve()),
        "config": read_yaml(path / "config.yaml") if (path / "config.yaml").exists() else {},
        "metrics": metrics,
        "checkpoints": sorted(p.stem for p in (path / "checkpoints").glob("*.safetensors")),
        "figures": sorted(p.name for p in (path / "figures").glob("*") if p.is_file()),
    }


def compare_runs(root: Path | str | None, run_ids: Sequence[str]) -> dict[str, Any]:
    """A table of runs side by side: {"columns": ["key", id1, id2, ...], "rows": [...]}.

    Rows: experiment and status, then every number of metrics.json under a dotted key
    ("metrics.asr.mean"; missing → None), then the config keys whose values differ
    ("config.attack.epsilon").
    """
    if len(run_ids) < 2:
        raise RunError("compare needs two or more run ids (`runs show ID` shows one run)")
    runs = [get_run(root, rid) for rid in run_ids]
    ids = [r["id"] for r in runs]
    twice = next((i for i in ids if ids.count(i) > 1), None)
    if twice is not None:
        raise RunError(f"run {twice} is named twice: compare different runs")
    rows: list[list[Any]] = [
        ["experiment", *(r["experiment"] for r in runs)],
        ["status", *(r["status"] for r in runs)],
    ]
    metrics = [flatten_numbers(r["metrics"]) for r in runs]
    for key in _union_keys(metrics):
        rows.append([f"metrics.{key}", *(m.get(key) for m in metrics)])
    configs = [flatten_values(r["config"]) for r in runs]
    for key in _union_keys(configs):
        values = [c.get(key) for c in configs]
        if any(_canonical(v) != _canonical(values[0]) for v in values[1:]):
            rows.append([f"config.{key}", *values])
    return {"columns": ["key", *(r["id"] for r in runs)], "rows": rows}


def flatten_values(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every leaf of a nested mapping under a dotted key (lists stay whole)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten_values(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _union_keys(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        seen.update(dict.fromkeys(d))
    return list(seen)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
