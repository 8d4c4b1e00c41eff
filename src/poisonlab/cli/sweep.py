"""`poisonlab sweep EXPERIMENT --grid key=v1,v2 [--grid ...] --seeds 0-4`: one run per point.

Everything the user gave (experiment, grid keys and values, seeds, preset, config, overrides,
backend, --metric names against the experiment's METRICS) is checked before any point runs; a
problem is one line `error: ...` and exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from poisonlab.errors import ConfigError, DataError
from poisonlab.executors import BACKENDS, get_executor
from poisonlab.experiments import EXPERIMENTS, get_experiment
from poisonlab.progress import terminal
from poisonlab.report.html import rich_table
from poisonlab.report.sweep import summary_table
from poisonlab.runs import runs_root
from poisonlab.runs.layout import prepare_output, to_jsonable
from poisonlab.sweeps import Sweep, parse_grid, run_sweep, summarise, write_summary
from poisonlab.sweeps.summary import check_declared_metrics, choose_metrics


def sweep(experiment: str, grid: list[str], seeds: str | None = None, *,
          preset: str | None = None, config: Path | None = None, sets: list[str] | None = None,
          data_dir: Path | None = None, out: Path | None = None, backend: str = "local",
          ray_address: str | None = None, ray_cpus: int | None = None,
          metrics: list[str] | None = None, quiet: bool = False) -> dict:
    """Validate, run the missing points, summarise; returns what --json prints."""
    plan = Sweep(experiment, parse_grid(grid or []), seeds, preset=preset, config=config,
                 sets=sets or [])
    check_declared_metrics(metrics, get_experiment(plan.experiment).METRICS)
    status = terminal(stderr=True)

    def said(label: str, info: dict, done: int, total: int) -> None:
        if not quiet:
            status.print(f"point {done}/{total} {label}: run {info['id']} {info['status']}")

    if backend != "ray" and ray_cpus is not None:
        raise ConfigError("--ray-cpus needs --backend ray")
    if data_dir is not None and not data_dir.exists():  # a symlink loop does not exist either
        raise DataError(f"--data-dir {data_dir} does not exist")
    executor = get_executor(backend, address=ray_address, num_cpus=ray_cpus)
    try:
        root = prepare_output(runs_root(out), directory=True)
        outcome = run_sweep(plan, root, executor=executor, data_dir=data_dir, on_point=said,
                            progress=not quiet, check=lambda m: choose_metrics(metrics, [m]))
    finally:
        executor.close()
    summary = summarise(outcome, metrics)
    report = write_summary(summary, outcome.folder)
    console = terminal()
    console.print(rich_table(summary_table(summary)))
    console.print(f"sweep {plan.id}: {len(outcome.runs)} points, {len(outcome.computed)} run "
                  f"now, {len(outcome.skipped)} already recorded; folder {outcome.folder}  "
                  f"report: {report}")
    return {"sweep": plan.id, "path": str(outcome.folder), "report": str(report),
            "points": {label: path.name for label, path in outcome.runs.items()},
            "computed": outcome.computed, "summary": to_jsonable(summary.to_dict())}


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_cmd(
        experiment: str = typer.Argument(..., help=f"One of: {', '.join(EXPERIMENTS)}."),
        grid: list[str] = typer.Option(None, "--grid", "-g", help="Axis: key=v1,v2,... (dotted key, values as --set; repeatable)."),
        seeds: str = typer.Option(None, "--seeds", help="Seeds, e.g. 0-4 or 0,2,5 (default: the config's seed)."),
        preset: str = typer.Option(None, "--preset", "-p", help="smoke, cpu, paper (default: the published settings)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML/TOML/JSON config file."),
        sets: list[str] = typer.Option(None, "--set", "-s", help="Override of the base config: key=value."),
        data_dir: Path = typer.Option(None, "--data-dir", "-d", help="Folder with the data set."),
        out: Path = typer.Option(None, "--out", "-o", help="Root folder of run directories (default ./runs or $POISONLAB_RUNS)."),
        backend: str = typer.Option("local", "--backend", help=f"Where points run: {' or '.join(BACKENDS)}."),
        ray_address: str = typer.Option(None, "--ray-address", help="A running Ray cluster (default: start a local one)."),
        ray_cpus: int = typer.Option(None, "--ray-cpus", help="CPUs of the Ray instance started here (default: all)."),
        metrics: list[str] = typer.Option(None, "--metric", "-m", help="Metric to summarise (repeatable; default: the headline metrics)."),
        as_json: bool = typer.Option(False, "--json", help="Print the sweep and its summary as one JSON object on the last line."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No line per point."),
    ) -> None:
        """Run an experiment over a grid of settings × seeds, one run per point, and summarise it."""
        result = sweep(experiment, grid, seeds, preset=preset, config=config, sets=sets,
                       data_dir=data_dir, out=out, backend=backend, ray_address=ray_address,
                       ray_cpus=ray_cpus, metrics=metrics, quiet=quiet)
        if as_json:
            print(json.dumps(result))
