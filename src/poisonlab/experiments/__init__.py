"""Reproducible experiments, one module each, looked up by name.

An experiment module exposes:
    Config             a poisonlab.config.BaseConfig subclass whose defaults are the published settings
    PRESETS            {"smoke": {...}, "cpu": {...}, "paper": {...}} overrides of Config's defaults
    run(cfg, run, data_dir) -> dict
                       one independent trial: config in, metrics out (also written to run.path);
                       `run` is a poisonlab.runs.Run, `data_dir` a Path or None
    render(metrics) -> str | rich renderable
                       the headline table for the terminal
    METRICS            the numbers metrics.json may hold, as `sweep --metric` names them
                       (headline names and dotted keys; fnmatch patterns, `*` for a name the
                       config chooses): a superset, so a --metric matching none is refused
                       before any run (each experiment's smoke test checks the superset)
It wires data, models, techniques, metrics and reports together and holds no technique itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from poisonlab.errors import ConfigError

EXPERIMENTS: dict[str, str] = {
    "fewshot-backdoor": "poisonlab.experiments.fewshot_backdoor",
    "backdoor-defense": "poisonlab.experiments.backdoor_defense",
    "membership": "poisonlab.experiments.membership",
    "metapoison": "poisonlab.experiments.metapoison",
    "badencoder": "poisonlab.experiments.badencoder",
}


def get_experiment(name: str) -> ModuleType:
    """Import the module of experiment `name`; unknown names get a one-line error."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment '{name}' (known: {', '.join(sorted(EXPERIMENTS))})")
    try:
        return importlib.import_module(EXPERIMENTS[name])
    except ModuleNotFoundError as exc:
        if exc.name == EXPERIMENTS[name]:
            raise ConfigError(f"experiment '{name}' is not available in this version") from exc
        raise
