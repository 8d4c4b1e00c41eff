"""Inputs found by the eighth bad-input sweep, each now refused in one line before any work.

In-process and small, as test_odd_inputs.py."""

from __future__ import annotations

import pytest

from poisonlab.cli import main
from poisonlab.config import load_yaml_tree


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize(("experiment", "override", "needle"), [
    # an empty victim list crafted everything, then failed with an IndexError (exit 1)
    ("metapoison", "victims.archs=[]", "victims.archs: Tuple should have at least 1 item"),
    # a repeated entry was wasted work whose results overwrote each other's
    ("backdoor-defense", "attack.attacks=[badnets,badnets]", "'badnets' appears twice"),
    ("fewshot-backdoor", "attack.epsilons=[0.1,0.1]", "0.1 appears twice"),
    ("metapoison", "victims.archs=[convnet_bn,convnet_bn]", "'convnet_bn' appears twice"),
    # ε is a perturbation of images in [0, 1]
    ("fewshot-backdoor", "attack.epsilons=[2]", "attack.epsilons.0: Input should be less than "
                                                "or equal to 1"),
])
def test_settings_that_name_no_work_or_the_same_work_twice_are_refused(
        tmp_path, monkeypatch, capsys, experiment, override, needle):
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path / "runs"))
    assert main(["run", experiment, "--preset", "smoke", "-q", "--set", override]) == 2
    assert needle in _one_line(capsys)
    assert not [p for p in (tmp_path / "runs").glob("*") if p.is_dir()]  # no run was started


@pytest.mark.parametrize("text", ["!!binary dGlueV9jbm4=", "!!set {a: null}",
                                  "!!omap [a: 1]", "!!pairs [a: 1]"])
def test_yaml_tags_that_build_bytes_sets_or_pairs_are_refused(text):
    """pydantic turned the bytes of `arch=!!binary dGlueV9jbm4=` into the text 'tiny_cnn'."""
    import yaml

    with pytest.raises(yaml.YAMLError, match=r"the tag !!\w+ is not allowed in a config"):
        load_yaml_tree(text)
    assert load_yaml_tree("[tiny_cnn, 2]") == ["tiny_cnn", 2]


def test_options_of_a_check_that_does_not_run_are_refused(tmp_path, capsys):
    """scan --label-only / --records with no membership check, and craft metapoison
    --surrogate-epochs (a gradient-matching option, even at -1), were silently ignored."""
    from poisonlab.models import build_model
    from poisonlab.runs.checkpoints import save_weights

    model = save_weights(tmp_path / "m.safetensors", build_model("tiny_cnn", 3).state_dict())
    for option in (["--label-only"], ["--records", "5"]):
        assert main(["scan", str(model), "--arch", "tiny_cnn", "--data", str(tmp_path), "-q",
                     "--report", str(tmp_path / "r"), *option]) == 2
        assert "applies only to the membership check" in _one_line(capsys)
    assert not (tmp_path / "r" / "report.html").exists()
    for attack, value, needle in [("metapoison", "3", "is a gradient-matching option"),
                                  ("gradient-matching", "-1", "must be at least 1, got -1")]:
        assert main(["craft", attack, "--data", str(tmp_path), "--target", str(model),
                     "--adv-class", "1", "--out", str(tmp_path / "c"), "--surrogate-epochs",
                     value]) == 2
        assert needle in _one_line(capsys)


def test_a_runs_folder_that_is_a_file_and_an_unknown_experiment_are_named(
        tmp_path, monkeypatch, capsys):
    """POISONLAB_RUNS naming a file gave 'error: <path>: File exists'; `runs list -e bogus`
    said 'no runs' and exit 0, as if the experiment existed."""
    afile = tmp_path / "runs.yaml"
    afile.write_text("x: 1\n")
    monkeypatch.setenv("POISONLAB_RUNS", str(afile))
    for args in (["runs", "list"], ["run", "membership", "--preset", "smoke", "-q"]):
        assert main(args) == 2
        assert f"$POISONLAB_RUNS {afile} is not a folder of runs" in _one_line(capsys)
    assert main(["runs", "list", "--out", str(afile)]) == 2
    assert f"--out {afile} is not a folder of runs" in _one_line(capsys)
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path / "runs"))
    assert main(["runs", "list", "-e", "bogus"]) == 2
    assert "unknown experiment 'bogus' (known: backdoor-defense" in _one_line(capsys)


def test_craft_overwrite_replaces_only_what_a_craft_wrote(tmp_path, capsys):
    """A user's own manifest.json in --out was taken for an earlier craft and replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("my own manifest\n")
    (tmp_path / "data").mkdir()
    assert main(["craft", "metapoison", "--data", str(tmp_path / "data"), "--target",
                 str(tmp_path / "t.png"), "--adv-class", "1", "--out", str(out),
                 "--overwrite"]) == 2
    assert "is not empty (it holds manifest.json)" in _one_line(capsys)
    assert (out / "manifest.json").read_text() == "my own manifest\n"


def test_paths_in_success_lines_print_escaped(tmp_path, monkeypatch, capsys):
    """A runs folder named with a newline split the final `run ...: PATH` line in two, and a
    right-to-left override printed raw; error lines were escaped, success lines were not."""
    root = tmp_path / "a\nb\u202e"
    monkeypatch.setenv("POISONLAB_RUNS", str(root))
    assert main(["runs", "list"]) == 0
    out = capsys.readouterr().out
    assert "a\\nb\\u202e" in out and "a\nb" not in out and "\u202e" not in out


# --- found by the ninth sweep ---------------------------------------------------------------

def test_a_sweep_refuses_a_set_of_a_grid_axis(tmp_path, capsys):
    """`--grid train.lr=0.01,0.02 --set train.lr=0.5`: every point silently took the grid's."""
    assert main(["sweep", "membership", "--preset", "smoke", "-q", "--out", str(tmp_path),
                 "--grid", "train.lr=0.01,0.02", "--set", "train.lr=0.5"]) == 2
    assert "--set train.lr and --grid train.lr set the same setting" in _one_line(capsys)
    assert main(["sweep", "membership", "--preset", "smoke", "-q", "--out", str(tmp_path),
                 "--grid", "train.lr=0.01,0.02", "--set", "train={epochs: 2}"]) == 2
    assert "--set train and --grid train.lr" in _one_line(capsys)


@pytest.mark.parametrize(("experiment", "override", "needle"), [
    ("badencoder", "downstream.tasks=[synthetic,synthetic]", "'synthetic' appears twice"),
    ("backdoor-defense", "train.milestones=[3,1]", "milestones must ascend strictly"),
    ("backdoor-defense", "train.milestones=[2,2]", "milestones must ascend strictly"),
])
def test_more_settings_that_name_work_twice_or_out_of_order_are_refused(
        tmp_path, monkeypatch, capsys, experiment, override, needle):
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path / "runs"))
    assert main(["run", experiment, "--preset", "smoke", "-q", "--set", override]) == 2
    assert needle in _one_line(capsys)


def test_backdoor_options_without_the_backdoor_check_are_refused(tmp_path, capsys):
    """--detectors, --steps, --threshold, ... on a membership-only scan had no effect."""
    from poisonlab.models import build_model
    from poisonlab.runs.checkpoints import save_weights

    model = save_weights(tmp_path / "m.safetensors", build_model("tiny_cnn", 3).state_dict())
    for option in (["--detectors", "nc"], ["--steps", "3"], ["--threshold", "1.5"]):
        assert main(["scan", str(model), "--arch", "tiny_cnn", "--members", str(tmp_path / "a"),
                     "--non-members", str(tmp_path / "b"), "-q", "--report",
                     str(tmp_path / "r"), *option]) == 2
        assert f"{option[0]} applies only to the backdoor check" in _one_line(capsys)

