"""The self-contained HTML report, terminal tables and the figure style."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest
import torch
from rich.console import Console

from poisonlab.errors import RunError
from poisonlab.report import (
    Section,
    Table,
    format_value,
    new_figure,
    rich_table,
    save_figure,
    write_html_report,
)


@pytest.fixture
def figure(tmp_path):
    fig, ax = new_figure(3, 2)
    ax.plot([0, 1, 2], [0.2, 0.5, 0.9], label="clean")
    ax.legend()
    return save_figure(fig, tmp_path / "figs" / "accuracy_curve.png")


def test_figure_is_a_png(figure):
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_embeds_figures_and_tables(tmp_path, figure):
    path = write_html_report(
        tmp_path / "out" / "report.html",
        "Backdoor <audit>",
        [
            {
                "heading": "Results",
                "paragraphs": ["ASR & clean accuracy"],
                "tables": [
                    {
                        "columns": ["attack", "asr", "clean"],
                        "rows": [["badnets", 0.91234, 0.8], ["blend", None, 0.79]],
                        "caption": "5-way 1-shot",
                    }
                ],
                "figures": [figure],
            },
            Section("Notes", paragraphs=["Offline report."], tables=[Table(["k"], [[True]])]),
        ],
    )
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<title>Backdoor &lt;audit&gt;</title>" in text
    assert "<p>ASR &amp; clean accuracy</p>" in text
    assert '<td class="num">0.9123</td>' in text and "<td>badnets</td>" in text
    assert "<td>–</td>" in text and "<caption>5-way 1-shot</caption>" in text
    assert "<td>true</td>" in text
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert embedded and base64.b64decode(embedded.group(1)) == figure.read_bytes()
    assert "accuracy curve" in text  # caption from the file name
    assert "http://" not in text and "https://" not in text  # nothing fetched from outside


def test_missing_figure_is_named(tmp_path):
    missing = tmp_path / "gone.png"
    with pytest.raises(RunError, match=f"cannot embed figure {missing}"):
        write_html_report(tmp_path / "r.html", "t", [{"heading": "h", "figures": [missing]}])
    assert not (tmp_path / "r.html").exists()


def test_unsupported_figure_type(tmp_path):
    pdf = tmp_path / "plot.pdf"
    pdf.write_bytes(b"%PDF")
    with pytest.raises(RunError, match="cannot embed figure .*plot.pdf: expected one of"):
        write_html_report(tmp_path / "r.html", "t", [Section("h", figures=[pdf])])


def test_bad_section_and_table_shapes(tmp_path):
    with pytest.raises(RunError, match=r"unknown: text"):
        write_html_report(tmp_path / "r.html", "t", [{"heading": "h", "text": "x"}])
    with pytest.raises(RunError, match="a report table needs 'columns' and 'rows'"):
        write_html_report(tmp_path / "r.html", "t", [{"heading": "h", "tables": [{"rows": []}]}])


def test_rich_table_shows_the_same_values():
    console = Console(record=True, width=120)
    console.print(
        rich_table({"columns": ["attack", "asr"], "rows": [["[bold]x", 0.123456], ["y", 2]]})
    )
    text = console.export_text()
    assert "[bold]x" in text and "0.1235" in text and "attack" in text


@pytest.mark.parametrize(
    "value, text",
    [(None, "–"), (0.123456, "0.1235"), (3, "3"), (False, "false"), ([0.1, 2], "[0.1, 2]"),
     (float("nan"), "nan"), ("ok", "ok")],
)  # fmt: skip
def test_format_value(value, text):
    assert format_value(value) == text


@pytest.mark.parametrize("epsilons", [[0.0, 0.1, 0.3], [0.0], [0.05, 0.3]],
                         ids=["with the baseline", "baseline only", "all positive"])
def test_ba_asr_figure_takes_an_epsilon_of_zero_without_a_warning(tmp_path, epsilons):
    """ε = 0 (the unattacked baseline) on the log axis made matplotlib warn on every run."""
    import warnings

    from poisonlab.evaluation.fewshot_results import EpsilonRow, FewShotResult
    from poisonlab.report.fewshot import plot_ba_asr

    rows = [EpsilonRow(e, 0.9 - e, 0.01, 0.9 - e, 0.01, e, 0.01, None, None, 0.5) for e in epsilons]
    result = FewShotResult(10, "p", "b", 1.0, 0.95, 0.01, 0.1, 0.01, 0.9, 0.01, rows, rows[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_ba_asr(tmp_path / "ba.png", result)
    assert (tmp_path / "ba.png").read_bytes()[:4] == b"\x89PNG"


def test_control_characters_in_names_are_shown_escaped():
    """A class folder named with an ANSI escape or a newline was printed raw into the terminal
    table (recolouring or breaking it); it is shown as its escapes."""
    from poisonlab.errors import printable

    name = "cat\x1b[31m\nred\u202e"
    assert printable(name) == "cat\\x1b[31m\\nred\\u202e"
    console = Console(record=True, width=120)
    console.print(rich_table({"columns": ["class", name], "rows": [[name, 1.0]]}, title=name))
    text = console.export_text()
    assert "\x1b" not in text and "\u202e" not in text and text.count("cat\\x1b[31m\\nred") == 3


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_feature_embedding_takes_any_run_seed(method):
    """A run's seed may be any below 2^63; scikit-learn refused one of 2^32 or more (the
    backdoor-defense report crashed after all the training was done)."""
    from poisonlab.report.backdoor import _embed

    features = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    big = _embed(features, method, 2**40 + 7)
    assert big.shape == (12, 2)
    if method == "pca":  # deterministic: the same as the seed it reduces to
        assert np.allclose(big, _embed(features, method, 7))
