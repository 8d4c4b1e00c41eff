"""What an auditor meets first with `poisonlab scan` / `poisonlab purify`: the options' names,
the data they read, model files saved by other tools and the input size of the model. Every
problem is one line and exit code 2 through poisonlab.cli.main."""

from __future__ import annotations

import pytest

from poisonlab.cli import main


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("command", [["scan", "M.safetensors", "--arch", "tiny_cnn"],
                                     ["purify", "M.safetensors", "--arch", "tiny_cnn", "--out",
                                      "o.safetensors", "--target", "1"]])
def test_missing_data_names_the_data_dir_option_the_command_has(capsys, tmp_path, command):
    missing = tmp_path / "nowhere"
    assert main([*command, "--dataset", "mnist", "--data-dir", str(missing), "--quiet"]) == 2
    err = one_line_error(capsys)
    assert f"mnist data not found at {missing}" in err
    assert f"poisonlab data download mnist --data-dir {missing}" in err
    assert "or pass --data-dir" in err and "--dir " not in err.replace("--data-dir ", "")
