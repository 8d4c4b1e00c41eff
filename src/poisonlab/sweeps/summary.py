"""A sweep's summary from its runs' metrics: mean and 95% CI over seeds per grid setting.

A metric is named as in `poisonlab runs list`: a headline metric by its headline name, any other
number of metrics.json by its dotted key (`per_epsilon` lists are not numbers; `seconds.attack`
is). Without names, the experiment's headline metrics are summarised (those of its first run).
The summary, one figure per metric and report.html are written into the sweep's folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from difflib import get_close_matches
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from poisonlab.errors import ConfigError
from poisonlab.metrics import mean_ci95
from poisonlab.report.sweep import (
    SweepCell,
    SweepSummary,
    figure_name,
    metric_figure,
    write_report,
)
from poisonlab.runs.index import flatten_numbers, headline_metrics
from poisonlab.runs.layout import atomic_write_text
from poisonlab.sweeps.driver import SweepOutcome


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """The number called `name` in a run's metrics (headline name first), or None (also for an
    integer too large for a float: a damaged metrics.json, not a measurement)."""
    for source in (headline_metrics(metrics), flatten_numbers(metrics)):
        if name in source:
            try:
                return float(source[name])
            except OverflowError:
                return None
    return None


def metric_names(metrics: Mapping[str, Any]) -> list[str]:
    """Every name a --metric may give for a run's metrics: headline names and dotted keys."""
    return sorted(set(flatten_numbers(metrics)) | set(headline_metrics(metrics)))


def undeclared_metrics(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The names that match none of an experiment's METRICS patterns (fnmatch: `*` stands for
    a task, attack or other name its config chooses), so cannot be in any of its runs."""
    return [n for n in names if not any(fnmatchcase(n, p) for p in patterns)]


def check_declared_metrics(names: Sequence[str] | None, patterns: Sequence[str] | None) -> None:
    """Before any point runs: a ConfigError for a --metric no run of the experiment can hold.
    A name a pattern admits is still checked against the first point's metrics (choose_metrics):
    the patterns are a superset of what the runs hold, never a subset."""
    if not names or patterns is None:
        return
    for name in undeclared_metrics(names, patterns):
        close = get_close_matches(name, patterns, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else (
            "its numbers are: " + ", ".join(patterns[:25]) + (", ..." if len(patterns) > 25
                                                               else ""))
        raise ConfigError(f"--metric {name}: the experiment's runs hold no such number ({hint})")


def choose_metrics(names: Sequence[str] | None, runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """`names` checked against the runs' metrics, or the headline metrics of the first run."""
    if not runs:
        return list(names or [])
    if not names:
        return list(headline_metrics(runs[0]))
    known = metric_names(runs[0])
    for name in names:
        if all(metric_value(m, name) is None for m in runs):
            shown = ", ".join(sorted(known)[:25]) + (", ..." if len(known) > 25 else "")
            raise ConfigError(f"--metric {name}: no such number in the runs' metrics "
                              f"(known: {shown})")
    return list(dict.fromkeys(names))


def summarise(outcome: SweepOutcome, names: Sequence[str] | None = None) -> SweepSummary:
    """Group the completed points by setting; mean and 95% CI over their seeds per metric."""
    plan = outcome.plan
    chosen = choose_metrics(names, [outcome.metrics[p.label] for p in plan.points
                                    if p.label in outcome.metrics])
    summary = SweepSummary(plan.id, plan.experiment, plan.grid, list(plan.seeds), chosen)
    cells: dict[tuple, SweepCell] = {}
    for point in plan.points:
        if point.label not in outcome.metrics:
            continue
        cell = cells.setdefault(point.setting, SweepCell(dict(point.values), [], [],
                                                         {m: [] for m in chosen}, {}, {}))
        cell.seeds.append(point.seed)
        cell.runs.append(outcome.runs[point.label].name)
        for name in chosen:
            cell.per_seed[name].append(metric_value(outcome.metrics[point.label], name))
    for cell in cells.values():
        for name in chosen:
            values = [v for v in cell.per_seed[name] if v is not None]
            cell.mean[name], cell.ci95[name] = mean_ci95(values) if values else (None, None)
    summary.cells = list(cells.values())
    return summary


def write_summary(summary: SweepSummary, folder: Path) -> Path:
    """summary.json, figures/<metric>.png and report.html in the sweep's folder; the report's path."""
    atomic_write_text(folder / "summary.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    figures = [metric_figure(folder / "figures" / figure_name(m), summary, m)
               for m in summary.metrics if any(c.mean[m] is not None for c in summary.cells)]
    return write_report(folder / "report.html", summary, figures)
