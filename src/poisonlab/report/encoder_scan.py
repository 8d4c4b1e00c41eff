"""Figure and report section of the encoder scan (poisonlab.defenses.encoder_scan).

The figure shows each restart's inverted trigger: its mask, its pattern where the mask is, and
the trigger stamped on a mid-grey image; the restart the verdict rests on carries a '*'. The
section holds the verdict, the per-restart table (L1, PL1, similarity reached) and the figure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from poisonlab.defenses.encoder_scan import EncoderScanResult
from poisonlab.report.html import Section, Table
from poisonlab.report.style import new_figure, save_figure


def _show(ax, img: torch.Tensor, title: str) -> None:
    img = img.detach().clamp(0, 1)
    ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
              cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def encoder_trigger_figure(path: Path, result: EncoderScanResult) -> Path:
    """Mask, masked pattern and the trigger on grey (columns) for every restart (rows)."""
    k = len(result.restarts)
    fig, axes = new_figure(4.2, 1.5 * k + 0.3, nrows=k, ncols=3, squeeze=False)
    for i, run in enumerate(result.restarts):
        trig = run.trigger
        star = "*" if i == result.best else ""
        grey = torch.full(trig.image_shape, 0.5)
        panels = ((trig.mask.expand_as(trig.pattern), f"restart {i + 1}{star} mask"),
                  (trig.mask * trig.pattern, f"mask·pattern, PL1 {run.normalised_l1:.3f}"),
                  (trig.apply(grey), f"on grey, S {run.similarity:.3f}"))
        for j, (img, title) in enumerate(panels):
            _show(axes[i, j], img, title)
    return save_figure(fig, path)


def encoder_scan_section(verdict: str, result: EncoderScanResult, figure: Path | None,
                         about: str | None = None) -> Section:
    """The verdict, how it is decided, the per-restart table and the trigger figure."""
    rows = [[i + 1, run.l1, run.normalised_l1, run.similarity, run.reached,
             "verdict" if i == result.best else ""] for i, run in enumerate(result.restarts)]
    rule = (f"An encoder is flagged when the smallest inverted trigger whose triggered "
            f"embeddings reach a mean pairwise cosine of {result.similarity_threshold:g} covers "
            f"less than {result.threshold:g} of the image (PL1 = mask L1 / (H·W)); the clean "
            f"images' embeddings have a mean pairwise cosine of {result.clean_similarity:.3f}.")
    paragraphs = [verdict, rule] + ([about] if about else [])
    table = Table(["restart", "mask L1", "PL1", "similarity", "reached", ""], rows)
    return Section("Encoder backdoor (DECREE-style scan)", paragraphs, [table],
                   [figure] if figure is not None else [])
