"""One look for every figure, drawn without pyplot's global state (safe in any process).

fig, ax = new_figure()
ax.plot(x, y, label="clean")
save_figure(fig, run.figure_path("accuracy.png"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from cycler import cycler
from matplotlib.figure import Figure

# Okabe–Ito colours: distinguishable with the common colour-vision deficiencies.
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]

STYLE: dict[str, Any] = {
    "axes.prop_cycle": cycler(color=COLORS),
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 10,
    "axes.titlesize": 11,
    "legend.frameon": False,
    "savefig.bbox": "tight",
}


def new_figure(
    width: float = 6.0, height: float = 4.0, nrows: int = 1, ncols: int = 1, **subplots: Any
) -> tuple[Figure, Any]:
    """A styled figure and its axes (one Axes, or an array for a grid)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, **subplots)
    return fig, axes


def save_figure(fig: Figure, path: Path | str, dpi: int = 150) -> Path:
    """Write the figure (format from the extension, PNG for the HTML report) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, dpi=dpi)
    return path


def annotated_heatmap(ax: Any, values: Any, columns: list[str], rows: list[str], *,
                      decimals: int, dark_below: float, label: str, **imshow: Any) -> None:
    """`values` [rows, columns] as an image with every cell's value written on it (white on cells
    below `dark_below`), the column labels rotated, and a colour bar named `label`."""
    image = ax.imshow(values, **imshow)
    ax.set_xticks(range(values.shape[1]), columns, rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), rows)
    ax.grid(False)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.{decimals}f}", ha="center", va="center", fontsize=8,
                color="white" if v < dark_below else "black")
    ax.figure.colorbar(image, ax=ax, label=label)
