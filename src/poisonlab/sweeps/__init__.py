"""Sweeps: one ordinary run per grid point × seed of an experiment, grouped, resumable, summarised.

`Sweep` (plan.py) is the validated plan and its identity; `run_sweep` (driver.py) creates each
point's run directory, runs the missing points as pieces on an executor (piece.py) and records
them as they complete; `summarise` (summary.py) gives the metrics' mean and 95% CI over seeds
across the grid, with a plot and an HTML report in the sweep's folder.
"""

from poisonlab.sweeps.driver import SweepOutcome, find_point_runs, run_sweep, sweep_folder
from poisonlab.sweeps.piece import run_point
from poisonlab.sweeps.plan import Point, Sweep, parse_grid, parse_seeds
from poisonlab.sweeps.summary import summarise, write_summary

__all__ = [
    "Point",
    "Sweep",
    "SweepOutcome",
    "find_point_runs",
    "parse_grid",
    "parse_seeds",
    "run_point",
    "run_sweep",
    "summarise",
    "sweep_folder",
    "write_summary",
]
