"""`poisonlab run EXPERIMENT` and `poisonlab demo`: reproduce an experiment into a run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import typer

from poisonlab.config import replace, resolve_config, resolved, validate_config
from poisonlab.errors import ConfigError, DataError, PoisonlabError, printable
from poisonlab.executors import BACKENDS, Executor, get_executor
from poisonlab.experiments import EXPERIMENTS, get_experiment
from poisonlab.experiments.trial import accepts, run_trial
from poisonlab.progress import terminal
from poisonlab.runs import Run
from poisonlab.runs.layout import prepare_output, to_jsonable

OutOpt = typer.Option(None, "--out", "-o", help="Root folder of run directories (default ./runs or $POISONLAB_RUNS).")
SeedOpt = typer.Option(None, "--seed", help="Random seed (overrides the config's).")
JsonOpt = typer.Option(False, "--json", help="Print the metrics as one JSON object on the last line.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars.")
BackendOpt = typer.Option("local", "--backend", "-b",
                          help=f"Where independent pieces run: {', '.join(BACKENDS)}.")
RayAddressOpt = typer.Option(None, "--ray-address", help="Join this Ray cluster (host:port, "
                             "ray://host:port or auto) instead of starting one here.")
RayCpusOpt = typer.Option(None, "--ray-cpus", help="CPUs of the Ray instance started here "
                          "(default: all).")


def _nothing_computed(run: Run) -> bool:
    """Whether a run holds no result yet: no metrics, checkpoint, state or figure (a setting
    the data refuses, found once the data is loaded, leaves nothing worth keeping)."""
    if (run.path / "metrics.json").exists():
        return False
    return not any(p.is_file() for sub in ("checkpoints", "figures")
                   for p in (run.path / sub).rglob("*"))


def _resumed_data_dir(run: Run, given: Path | None) -> Path | None:
    """The data folder a resumed run reads: the one it started on (recorded in run.json); a
    different --data-dir would mix two data sets in one run and is refused. (A run recorded
    before run.json kept it reads the --data-dir given.)"""
    if "data_dir" not in run.info:
        return given
    recorded = run.info["data_dir"]
    if given is None:
        if recorded is not None and not Path(recorded).exists():
            raise DataError(f"run {run.id} read {recorded}, which no longer exists: restore it "
                            "there (a resume must read the same data)")
        return Path(recorded) if recorded is not None else None
    if recorded is None or Path(recorded) != resolved(given, "--data-dir"):
        started = f"on --data-dir {recorded}" if recorded else "without --data-dir"
        raise ConfigError(f"run {run.id} was started {started}: --data-dir {given} cannot "
                          "change the data of a resumed run (omit --data-dir)")
    return given


def execute(name: str, preset: str | None = None, config: Path | None = None,
            sets: list[str] | None = None, data_dir: Path | None = None, out: Path | None = None,
            seed: int | None = None, resume: str | None = None, model: str | None = None,
            progress: bool = True, *, backend: str = "local", ray_address: str | None = None,
            ray_cpus: int | None = None, no_compile: bool = False,
            executor: Executor | None = None) -> tuple[Run, dict, object]:
    """Resolve the config (before any work), open the run, run the trial; return (run, metrics, module).

    The pieces run on `executor` when given (the caller closes it), else on the one named by
    `backend` (with `ray_address`, `ray_cpus`), built before the run opens and closed after it;
    an experiment whose `run` takes no executor runs locally (asking it for another backend is
    a ConfigError). `no_compile` keeps every computation eager (`meta.compile=off`; allowed on a
    resume: the same math, only the float rounding's order differs)."""
    exp = get_experiment(name)
    if data_dir is not None and not data_dir.exists():  # even a preset that needs no data
        raise DataError(f"--data-dir {data_dir} does not exist")
    if resume is not None:
        changes = [flag for flag, value in (("--preset", preset), ("--config", config),
                                            ("--set", sets), ("--seed", seed))
                   if value is not None and value != []]
        if changes:  # a resumed run continues its recorded config; new settings = a new run
            raise ConfigError(f"--resume continues run {resume} with its recorded config: "
                              f"{', '.join(changes)} cannot change it (start a new run instead)")
        run = Run.open(resume, root=out)
        if run.experiment != name:
            raise ConfigError(f"run {run.id} is a '{run.experiment}' run, not '{name}'")
        data_dir = _resumed_data_dir(run, data_dir)
        run.check_checkpoints()
        cfg = validate_config(exp.Config, run.config)
    else:
        cfg = resolve_config(exp.Config, exp.PRESETS, preset, config, sets or [])
        if seed is not None:
            cfg = replace(cfg, seed=seed)
        if out is not None:  # after the settings: a refused setting leaves no folder behind
            prepare_output(out, directory=True)
    if no_compile:
        cfg = _eager(cfg, name)
    extra = {}
    if model is not None:
        if not accepts(exp, "model"):
            raise ConfigError(f"--model is not supported by experiment '{name}'")
        extra["model"] = model
    own = executor is None
    if own:
        executor = choose_executor(name, backend, ray_address, ray_cpus, accepts(exp, "executor"))
    try:
        if accepts(exp, "executor"):
            extra["executor"] = executor
        if resume is None:
            run = Run.create(name, cfg, root=out, data_dir=data_dir)
        try:
            metrics = run_trial(exp, cfg, run, data_dir, progress=progress, **extra)
        except PoisonlabError:
            if resume is None and _nothing_computed(run):
                shutil.rmtree(run.path, ignore_errors=True)  # a bad input, not a failed run
            raise
    finally:
        if own and executor is not None:
            executor.close()
    return run, metrics, exp


def _eager(cfg, name: str):
    """`cfg` with `meta.compile=off` (--no-compile); an experiment without it refuses the flag."""
    meta = getattr(cfg, "meta", None)
    if meta is None or not hasattr(meta, "compile"):
        raise ConfigError(f"--no-compile is not supported by experiment '{name}' (it compiles "
                          "nothing)")
    return replace(cfg, meta=replace(meta, compile="off"))


def choose_executor(name: str, backend: str, address: str | None, cpus: int | None,
                    supported: bool) -> Executor:
    """The executor of --backend/--ray-address/--ray-cpus: bad combinations and an experiment
    that cannot use a Ray backend fail (ConfigError) before a Ray instance starts."""
    if backend != "ray":
        if cpus is not None:
            raise ConfigError("--ray-cpus needs --backend ray")
        return get_executor(backend, address=address)  # unknown names, a stray --ray-address
    if not supported:
        raise ConfigError(f"--backend ray is not supported by experiment '{name}'")
    return get_executor(backend, address=address, num_cpus=cpus)


def show(run: Run, metrics: dict, exp, as_json: bool) -> None:
    console = terminal()
    console.print(exp.render(metrics))
    console.print(f"run {run.id}: {printable(str(run.path))}" + (
        f"  report: {printable(str(run.path / 'report.html'))}"
        if (run.path / "report.html").exists() else ""))
    if as_json:
        print(json.dumps(to_jsonable(metrics)))


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        experiment: str = typer.Argument(..., help=f"One of: {', '.join(EXPERIMENTS)}."),
        preset: str = typer.Option(None, "--preset", "-p", help="smoke, cpu, paper (default: the published settings)."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML/TOML/JSON config file."),
        sets: list[str] = typer.Option(None, "--set", "-s", help="Override: key=value (dotted keys)."),
        data_dir: Path = typer.Option(None, "--data-dir", "-d", help="Folder with the data set."),
        out: Path = OutOpt, seed: int = SeedOpt, as_json: bool = JsonOpt,
        resume: str = typer.Option(None, "--resume", help="Continue an interrupted run (id)."),
        model: str = typer.Option(None, "--model", "-m", help="Attack an existing model (run id or weights file)."),
        quiet: bool = QuietOpt, backend: str = BackendOpt, ray_address: str = RayAddressOpt,
        ray_cpus: int = RayCpusOpt,
        no_compile: bool = typer.Option(False, "--no-compile", help="Eager PyTorch only: no "
                                        "torch.compile (fewshot-backdoor's meta-training)."),
    ) -> None:
        """Run a reproducible experiment into its own run directory."""
        run, metrics, exp = execute(experiment, preset, config, sets, data_dir, out, seed, resume,
                                    model, progress=not quiet, backend=backend,
                                    ray_address=ray_address, ray_cpus=ray_cpus,
                                    no_compile=no_compile)
        show(run, metrics, exp, as_json)

    @app.command("demo")
    def demo_cmd(out: Path = OutOpt, seed: int = SeedOpt, as_json: bool = JsonOpt,
                 quiet: bool = QuietOpt) -> None:
        """The main job on the embedded glyph set: meta-train MAML, backdoor its support sets."""
        run, metrics, exp = execute("fewshot-backdoor", preset="demo", out=out, seed=seed,
                                    progress=not quiet)
        show(run, metrics, exp, as_json)
