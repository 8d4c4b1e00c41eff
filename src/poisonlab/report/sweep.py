"""A sweep's summary: the chosen metrics across the grid with their mean and 95% CI over seeds,
one figure per metric and an HTML report, from the typed `SweepSummary` alone.

A figure puts the first grid axis on x and draws one line per value of the other axes (per
combination of them when there are several), with the 95% CI as error bars; an axis whose values
are not all numbers is drawn at evenly spaced positions labelled with its values.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from poisonlab.report.html import Section, Table, write_html_report
from poisonlab.report.style import new_figure, save_figure


@dataclass
class SweepCell:
    """One setting of the grid (its axes' values) over the seeds: per-metric values per seed
    (None where a run lacks the metric), their mean and the half-width of the 95% CI."""

    values: dict[str, Any]
    seeds: list[int]
    runs: list[str]
    per_seed: dict[str, list[float | None]]
    mean: dict[str, float | None]
    ci95: dict[str, float | None]


@dataclass
class SweepSummary:
    sweep_id: str
    experiment: str
    grid: dict[str, list[Any]]
    seeds: list[int]
    metrics: list[str]
    cells: list[SweepCell] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        return list(self.grid)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def summary_table(summary: SweepSummary) -> Table:
    """One row per setting: its axes' values, the seeds, and per metric mean and ± 95% CI."""
    columns = [*summary.axes, "seeds"]
    for name in summary.metrics:
        columns += [name, "± 95% CI"]
    rows = []
    for cell in summary.cells:
        row: list[Any] = [_text(v) if not _is_number(v) else v for v in cell.values.values()]
        row.append(len(cell.seeds))
        for name in summary.metrics:
            row += [cell.mean[name], cell.ci95[name]]
        rows.append(row)
    return Table(columns, rows, caption=f"sweep {summary.sweep_id}: mean and 95% CI over seeds")


def points_table(summary: SweepSummary) -> Table:
    """One row per run: the setting, the seed, the run id and its metrics."""
    rows = []
    for cell in summary.cells:
        setting = " ".join(f"{k}={_text(v)}" for k, v in cell.values.items())
        for i, (seed, run_id) in enumerate(zip(cell.seeds, cell.runs, strict=True)):
            rows.append([setting, seed, run_id, *(cell.per_seed[m][i] for m in summary.metrics)])
    return Table(["setting", "seed", "run", *summary.metrics], rows, caption="runs")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def figure_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png"


def metric_figure(path: Path, summary: SweepSummary, metric: str) -> Path:
    """The metric against the first axis, one line per value of the other axes."""
    x_axis, others = summary.axes[0], summary.axes[1:]
    xs = summary.grid[x_axis]
    numeric = all(_is_number(v) for v in xs)
    position = {_text(v): (v if numeric else i) for i, v in enumerate(xs)}
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for cell in summary.cells:
        mean, half = cell.mean[metric], cell.ci95[metric]
        if mean is None:
            continue
        name = ", ".join(f"{k}={_text(cell.values[k])}" for k in others) or metric
        lines.setdefault(name, []).append((position[_text(cell.values[x_axis])], mean, half or 0.0))
    fig, ax = new_figure(6.0, 4.0)
    for name, pts in lines.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=name)
    if not numeric:
        ax.set_xticks(list(range(len(xs))), [_text(v) for v in xs])
    ax.set_xlabel(x_axis)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} (mean, 95% CI over {len(summary.seeds)} seeds)")
    if others:
        ax.legend()
    return save_figure(fig, path)


def write_report(path: Path, summary: SweepSummary, figures: list[Path]) -> Path:
    """The sweep's report.html: the plan, the summary table, the figures, the runs."""
    grid = "; ".join(f"{k} ∈ {{{', '.join(_text(v) for v in vs)}}}" for k, vs in summary.grid.items())
    about = (f"Sweep {summary.sweep_id} of experiment {summary.experiment}: {grid}; seeds "
             f"{', '.join(map(str, summary.seeds))}. Every point is an ordinary run; the table "
             "gives each metric's mean over the seeds and the half-width of its 95% confidence "
             "interval (Student t; 0 with one seed).")
    sections = [Section("Sweep", [about], [summary_table(summary)], list(figures)),
                Section("Runs", [], [points_table(summary)])]
    return write_html_report(path, f"poisonlab sweep: {summary.experiment}", sections)
