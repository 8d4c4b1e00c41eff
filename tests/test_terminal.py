"""User strings print as themselves: rich markup is off on every console the CLI prints through."""

from __future__ import annotations

from poisonlab.cli import main
from poisonlab.progress import terminal


def test_markup_in_a_user_string_prints_literally(capsys):
    terminal().print("runs under /data/[/]odd/[bold]x")
    assert capsys.readouterr().out.strip() == "runs under /data/[/]odd/[bold]x"


def test_a_command_prints_a_path_holding_markup(tmp_path, capsys):
    root = tmp_path / "a[/]b" / "[red]runs"
    root.mkdir(parents=True)
    assert main(["runs", "list", "--out", str(root)]) == 0
    printed = "".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"norunsunder{root}" in printed
