"""What an auditor meets first with `poisonlab scan` / `poisonlab purify`: the options' names,
the data they read, model files saved by other tools and the input size of the model. Every
problem is one line and exit code 2 through poisonlab.cli.main."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import typer
from PIL import Image

from poisonlab.audit import load_model
from poisonlab.cli import app, main
from poisonlab.data.cache import cache_dir
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import save_weights


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


# --- model files: wrapper prefixes, nesting and keys that do not fit ----------------------------


def tiny_state(classes: int = 10, channels: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return build_model("tiny_cnn", classes, channels).state_dict()


def image_folder(root: Path, size: int, channels: int = 3, per_class: int = 2,
                 classes: int = 2) -> Path:
    """`classes` sub-folders of random `size`×`size` PNGs (RGB or grayscale)."""
    gen = torch.Generator().manual_seed(size)
    for label in range(classes):
        (root / str(label)).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, channels, generator=gen) * 255).byte().numpy()
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels).save(
                root / str(label) / f"{i}.png")
    return root


# Neural Cleanse alone: these scans check how models and data are read, and MM-BD's 300 steps
# would be most of their time.
QUICK_SCAN = ["--check", "backdoor", "--detectors", "nc", "--steps", "1", "--samples", "4",
              "--batch-size", "4", "--quiet"]


@pytest.mark.parametrize(("wrapper", "prefix"), [
    (None, "module."),  # DataParallel / DDP, saved as safetensors
    (None, "model."),  # a training module's self.model
    ("state_dict", "module."),  # .pt checkpoints holding more than the weights
    ("model", "model."),
    ("model_state_dict", "module.model."),
])
def test_weights_saved_through_a_wrapper_load_and_scan(tmp_path, capsys, wrapper, prefix):
    state = tiny_state()
    wrapped = {prefix + k: v for k, v in state.items()}
    if wrapper is None:
        path = save_weights(tmp_path / "m.safetensors", wrapped)
    else:
        path = tmp_path / "m.pt"
        torch.save({"epoch": 3, wrapper: wrapped, "optimizer": {"lr": 0.1}}, path)
    model, shape = load_model(path, "tiny_cnn")
    reference = build_model("tiny_cnn", 10, 1).eval()
    reference.load_state_dict(state)
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), reference(x)) and shape == (1, 28, 28)
    data = image_folder(tmp_path / "data", 28, channels=1)
    assert main(["scan", str(path), "--arch", "tiny_cnn", "--data", str(data),
                 "--report", str(tmp_path / "r"), *QUICK_SCAN]) == 0, capsys.readouterr().err
    assert (tmp_path / "r" / "scan.json").exists()


def command_options(command: str) -> set[str]:
    """Every option name (each spelling) of `poisonlab COMMAND`."""
    params = typer.main.get_command(app).commands[command].params
    return {name for param in params for name in [*param.opts, *param.secondary_opts]}


@pytest.mark.parametrize("command", ["scan", "purify"])
def test_keys_that_do_not_fit_are_named_and_no_option_is_invented(tmp_path, capsys, command):
    options = command_options(command)
    data = image_folder(tmp_path / "data", 28, channels=1)
    args = {"scan": ["--data", str(data), *QUICK_SCAN],
            "purify": ["--clean-data", str(data), "--target", "1", "--out",
                       str(tmp_path / "o.safetensors"), "--quiet"]}[command]
    renamed = {k.replace("fc.1.", "dense."): v for k, v in tiny_state().items()}
    headless = {k: v for k, v in tiny_state().items() if not k.startswith("head.")}
    for state, needles in (
            (renamed, ["do not fit tiny_cnn", "fc.1.weight is missing",
                       "dense.weight is not part of the model"]),
            ({f"module.{k}": v for k, v in renamed.items()}, ["fc.1.weight is missing",
                                                              "dense.weight is not part"]),
            (headless, ["cannot tell the number of classes", "no 2-D 'head.weight'",
                        "its keys: conv.0.bias, conv.0.weight", "tiny_cnn's: conv.0.weight"])):
        path = save_weights(tmp_path / "bad.safetensors", state)
        assert main([command, str(path), "--arch", "tiny_cnn", *args]) == 2
        err = one_line_error(capsys)
        for needle in needles:
            assert needle in err, (needle, err)
        named = set(re.findall(r"(?<![\w.])--[a-z][a-z-]+", err))
        assert named <= options, (named - options, err)  # e.g. never --num-classes


# --- the input size the model expects -----------------------------------------------------------


def test_a_size_the_weights_do_not_fix_is_an_error_naming_image_size(tmp_path, capsys):
    """small_cnn pools to a fixed 4×4 grid: its weights are the same for every input size, so
    the 28×28 it is usually trained on is assumed, and CIFAR-sized images need --image-size."""
    torch.manual_seed(0)
    path = save_weights(tmp_path / "cifar_cnn.safetensors",
                        build_model("small_cnn", 10, 3).state_dict())
    data = image_folder(tmp_path / "cifar", 32)
    report = ["--report", str(tmp_path / "r"), "--overwrite"]  # one folder for every scan
    assert main(["scan", str(path), "--arch", "small_cnn", "--data", str(data), *report,
                 *QUICK_SCAN]) == 2
    err = one_line_error(capsys)
    assert "are 3x32x32 (CxHxW), but the model expects 3x28x28" in err  # channels: the weights'
    assert "its weights do not fix the input size" in err and "--image-size 32" in err
    assert main(["scan", str(path), "--arch", "small_cnn", "--data", str(data), *report,
                 "--image-size", "32", *QUICK_SCAN]) == 0
    gray = image_folder(tmp_path / "gray", 32, channels=1)
    assert main(["purify", str(path), "--arch", "small_cnn", "--clean-data", str(gray),
                 "--target", "1", "--out", str(tmp_path / "o.safetensors"), "--quiet"]) == 2
    assert "its first convolution takes 3-channel images" in one_line_error(capsys)


def test_a_size_the_weights_fix_is_read_from_them(tmp_path, capsys):
    """convnet_bn's head sees widths[-1]·(size / 32)² features: weights built for 64×64
    inputs fit 64..95, so 64×64 images need no option and 32×32 ones are refused saying so."""
    torch.manual_seed(0)
    path = save_weights(tmp_path / "cnn64.safetensors",
                        build_model("convnet_bn", 10, 3, image_size=64).state_dict())
    model, shape = load_model(path, "convnet_bn")
    assert shape == (3, 64, 64) and model(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    report = ["--report", str(tmp_path / "r"), "--overwrite"]  # one folder for every scan
    big = image_folder(tmp_path / "big", 64)
    assert main(["scan", str(path), "--arch", "convnet_bn", "--data", str(big), *report,
                 *QUICK_SCAN]) == 0, capsys.readouterr().err
    small = image_folder(tmp_path / "small", 32)
    assert main(["scan", str(path), "--arch", "convnet_bn", "--data", str(small), *report,
                 *QUICK_SCAN]) == 2
    err = one_line_error(capsys)
    assert "expects 3x64x64 (its weights fit inputs of 64x64 to 95x95 only" in err
    assert main(["scan", str(path), "--arch", "convnet_bn", "--data", str(big), *report,
                 "--image-size", "32", *QUICK_SCAN]) == 2
    assert "fit convnet_bn inputs of 64x64 to 95x95, not --image-size 32" in one_line_error(capsys)
    odd = image_folder(tmp_path / "odd", 80)  # fits the weights, not the size assumed
    assert main(["scan", str(path), "--arch", "convnet_bn", "--data", str(odd), *report,
                 *QUICK_SCAN]) == 2
    assert "pass --image-size 80" in one_line_error(capsys)
    assert main(["scan", str(path), "--arch", "convnet_bn", "--data", str(odd), *report,
                 "--image-size", "80", *QUICK_SCAN]) == 0


# --- option names, defaults and help --------------------------------------------------------------

QUICK_PURIFY = ["--target", "1", "--epochs", "1", "--inversion-steps", "1", "--quiet"]


def test_scan_and_purify_take_both_spellings_of_the_clean_data_option(tmp_path, capsys):
    path = save_weights(tmp_path / "m.safetensors", tiny_state())
    data = image_folder(tmp_path / "data", 28, channels=1)
    assert main(["scan", str(path), "--arch", "tiny_cnn", "--clean-data", str(data),
                 "--report", str(tmp_path / "r"), "--json", *QUICK_SCAN]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 4
    out = tmp_path / "p.safetensors"
    assert main(["purify", str(path), "--arch", "tiny_cnn", "--data", str(data), "--out",
                 str(out), "--json", *QUICK_PURIFY]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["clean_images"] == 4
    assert out.exists()
    for command in ("scan", "purify"):
        assert {"--data", "--clean-data"} <= command_options(command)


@pytest.mark.parametrize(("source", "fraction", "used"), [
    ("folder", None, 10),  # all of the folder the user gave
    ("folder", "0.5", 5),  # an explicit share applies to a folder too
    ("glyphs", None, 250),  # 5% of the 5,000-image training split
    ("glyphs", "0.01", 50),
])
def test_clean_fraction_applies_to_a_folder_only_when_given(tmp_path, capsys, source, fraction,
                                                            used):
    path = save_weights(tmp_path / "m.safetensors", tiny_state())
    clean = (["--clean-data", str(image_folder(tmp_path / "data", 28, 1, per_class=5))]
             if source == "folder" else ["--dataset", source])
    share = ["--clean-fraction", fraction] if fraction else []
    assert main(["purify", str(path), "--arch", "tiny_cnn", *clean, *share, "--out",
                 str(tmp_path / "p.safetensors"), "--json", *QUICK_PURIFY]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["clean_images"] == used


def test_help_says_where_the_decoded_arrays_are_cached_and_they_go_there(tmp_path, capsys,
                                                                        monkeypatch):
    where = "$POISONLAB_CACHE, else ~/.cache/poisonlab"
    commands = typer.main.get_command(app).commands
    for command in ("scan", "purify"):
        helps = {p.opts[0]: p.help for p in commands[command].params}
        assert where in helps["--dataset"], command
        assert "nothing is cached" in helps["--data"], command
        assert "$POISONLAB_DATA/NAME, else ./data/NAME" in helps["--data-dir"], command
    data = commands["data"]
    assert where in data.help and where in data.commands["info"].help
    monkeypatch.setenv("POISONLAB_CACHE", str(tmp_path / "cache"))
    assert main(["data", "info", "glyphs", "--json"]) == 0
    assert list((tmp_path / "cache").glob("glyph*.safetensors"))
    monkeypatch.delenv("POISONLAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "poisonlab"
