"""`poisonlab runs`: list, show and compare recorded runs.

With --json each command prints one JSON object on the last line of stdout (and nothing else).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.table import Table as RichTable
from rich.text import Text

from poisonlab.errors import ConfigError, printable
from poisonlab.experiments import EXPERIMENTS
from poisonlab.progress import terminal
from poisonlab.report.html import format_value, rich_table
from poisonlab.runs import compare_runs, flatten_numbers, get_run, list_runs, runs_root
from poisonlab.runs.index import resolve_sweep
from poisonlab.runs.record import Run, mark_if_stale, mark_stale

runs_app = typer.Typer(
    name="runs", help="List, show and compare recorded runs.", no_args_is_help=True
)

OutOption = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Runs folder (default: $POISONLAB_RUNS or ./runs)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")]

_INFO_KEYS = (
    "id", "experiment", "status", "seed", "started", "ended", "resumed_at", "error",
    "config_hash", "git_revision", "poisonlab_version", "python", "torch", "device", "host", "path",
)  # fmt: skip


def _emit_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def _root(out: Path | None) -> Path:
    """The runs folder of --out (or its default); a file there is refused (runs_root), not
    shown empty."""
    return runs_root(out)


@runs_app.command("list")
def list_command(
    out: OutOption = None,
    experiment: Annotated[
        str | None, typer.Option("--experiment", "-e", help="Only this experiment.")
    ] = None,
    sweep: Annotated[
        str | None, typer.Option("--sweep", help="Only the runs of this sweep (id or prefix).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, oldest first, with their status and headline metrics."""
    root = _root(out)
    mark_stale(root)
    if sweep is not None:
        sweep = resolve_sweep(root, sweep)
    rows = list_runs(root, experiment=experiment, sweep=sweep)
    if not rows and experiment is not None and experiment not in EXPERIMENTS:
        # a typo listed "no runs", as if the experiment existed (a run made from Python under
        # an experiment name of its own is listed by that name)
        present = sorted({row["experiment"] for row in list_runs(root)} - set(EXPERIMENTS))
        raise ConfigError(f"unknown experiment '{experiment}' (known: "
                          f"{', '.join([*sorted(EXPERIMENTS), *present])})")
    if as_json:
        _emit_json({"root": str(root), "runs": rows} | ({"sweep": sweep} if sweep else {}))
        return
    console = terminal()
    if not rows:
        console.print(f"no runs under {printable(str(root))}" + (
            f" for '{printable(experiment)}'" if experiment else "")
            + ("" if root.exists() else " (the folder does not exist)"))
        return
    title = f"runs under {root}" + (f", sweep {sweep}" if sweep else "")
    table = RichTable(title=title)
    columns = ("id", "status", "started", *(("point",) if sweep else ()), "headline")
    for name in columns:
        table.add_column(name, overflow="fold")
    for row in rows:
        headline = ", ".join(f"{k}={format_value(v)}" for k, v in row["headline"].items())
        started = (row["started"] or "")[:19].replace("T", " ")
        point = (Text(row["sweep_point"] or ""),) if sweep else ()
        table.add_row(Text(row["run_id"]), _status(row["status"]), started, *point,
                      Text(headline))
    console.print(table)


@runs_app.command("show")
def show_command(
    run_id: Annotated[str, typer.Argument(help="Run id (or a unique prefix).")],
    out: OutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one run: its record, config, metrics, checkpoints and figures."""
    run = get_run(_root(out), run_id)
    if run["status"] == "running" and mark_if_stale(Run.open(run["path"])):
        run = get_run(_root(out), run_id)  # its process is gone: now recorded as interrupted
    if as_json:
        _emit_json(run)
        return
    console = terminal()
    info = RichTable(show_header=False, title=f"run {run['id']}")
    info.add_column("field", style="bold")
    info.add_column("value", overflow="fold")
    for key in _INFO_KEYS:
        value = run.get(key)
        if value not in (None, [], ""):
            shown = _status(value) if key == "status" else Text(format_value(value))
            info.add_row(key, shown)
    console.print(info)
    console.print(Text("config", style="bold"))
    console.print(Text(yaml.safe_dump(run["config"], sort_keys=False).rstrip() or "{}"))
    metrics = flatten_numbers(run["metrics"])
    if metrics:
        table = {"columns": ["metric", "value"], "rows": [[k, v] for k, v in metrics.items()]}
        console.print(rich_table(table, title="metrics"))
    for kind in ("checkpoints", "figures"):
        if run[kind]:
            console.print(Text(f"{kind}: {', '.join(run[kind])}"))


@runs_app.command("compare")
def compare_command(
    run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids (or prefixes).")],
    out: OutOption = None,
    as_json: JsonOption = False,
) -> None:
    """Metrics of several runs side by side, plus the config keys that differ."""
    table = compare_runs(_root(out), run_ids)
    if as_json:
        _emit_json(table)
        return
    terminal().print(rich_table(table, title="comparison"))


def _status(status: str) -> Text:
    colour = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    return Text(str(status), style=colour.get(status, ""))


def register(app: typer.Typer) -> None:
    """Add the `runs` command group to the main app."""
    app.add_typer(runs_app, name="runs")
