"""The user's own trigger, `--trigger FILE [--trigger-mask FILE]`: read into the same Trigger
classes as the named triggers, measured by scan's trigger check and by purify's ASR, and every
bad trigger input one line with exit code 2 through poisonlab.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from poisonlab.attacks.backdoor_injection import attack_success_rate
from poisonlab.attacks.triggers import AdditiveTrigger, MaskTrigger, badnets_patch
from poisonlab.audit import load_model, select_checks
from poisonlab.audit.data import sample
from poisonlab.audit.trigger import TriggerSource
from poisonlab.cli import main
from poisonlab.data.image_folder import load_image_folder
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import save_weights

# A BadNets tiny CNN (target 3, 14×14 glyphs) with clean and test image folders.
from test_backdoor_defense_cli import TARGET, files  # noqa: F401

SHAPE = (1, 14, 14)


def gray_png(path: Path, image: torch.Tensor) -> Path:
    """`image` [1, H, W] in [0, 1] as an 8-bit grayscale PNG (exact for 0 and 1)."""
    Image.fromarray((image[0] * 255).round().byte().numpy(), mode="L").save(path)
    return path


@pytest.fixture(scope="module")
def trigger_files(tmp_path_factory):
    """The BadNets patch of the model's training as pattern and mask PNGs and as a
    .safetensors file, and the all-zero additive trigger (a PNG that changes nothing)."""
    root = tmp_path_factory.mktemp("triggers")
    patch = badnets_patch(SHAPE)
    tensors = root / "badnets.safetensors"
    save_file({"pattern": patch.pattern.contiguous(), "mask": patch.mask[0].contiguous()},
              str(tensors))
    return {"pattern": gray_png(root / "pattern.png", patch.pattern),
            "mask": gray_png(root / "mask.png", patch.mask),
            "tensors": tensors,
            "blank": gray_png(root / "blank.png", torch.zeros(SHAPE)),
            "root": root}


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_trigger_files_become_the_trigger_classes(trigger_files, tmp_path):
    patch = badnets_patch(SHAPE)
    x = torch.rand(6, *SHAPE)
    from_images = TriggerSource.parse(str(trigger_files["pattern"]), trigger_files["mask"])
    from_tensors = TriggerSource.parse(str(trigger_files["tensors"]))
    for source in (from_images, from_tensors):
        trigger = source.build(SHAPE)
        assert isinstance(trigger, MaskTrigger) and torch.equal(trigger.apply(x), patch.apply(x))
    additive = TriggerSource.parse(str(trigger_files["pattern"])).build(SHAPE)
    assert isinstance(additive, AdditiveTrigger)
    assert torch.equal(additive.apply(x), (x + patch.pattern).clamp(0, 1))
    # A one-channel pattern serves a three-channel model; an RGB image keeps its colours.
    rgb = TriggerSource.parse(str(trigger_files["pattern"])).build((3, 14, 14))
    assert torch.equal(rgb.apply(torch.zeros(1, 3, 14, 14))[0], patch.pattern.expand(3, 14, 14))
    colour = torch.zeros(3, 14, 14)
    colour[0, :2, :2] = 1.0
    Image.fromarray((colour.permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "red.png")
    additive_rgb = TriggerSource.parse(str(tmp_path / "red.png")).build((3, 14, 14))
    assert torch.equal(additive_rgb.apply(torch.zeros(3, 14, 14)), colour)
    gray_rgb = patch.pattern[0].expand(3, 14, 14).permute(1, 2, 0)
    Image.fromarray((gray_rgb * 255).byte().numpy()).save(tmp_path / "gray_rgb.png")
    one = TriggerSource.parse(str(tmp_path / "gray_rgb.png")).build(SHAPE)
    assert torch.equal(one.apply(x), additive.apply(x))
    with pytest.raises(ShapeError, match="red.png has 3 channels, but the model takes 1-channel"):
        TriggerSource.parse(str(tmp_path / "red.png")).build(SHAPE)
    # Without a mask a .safetensors pattern is added, negative values included.
    delta = torch.full(SHAPE, -0.25)
    save_file({"pattern": delta}, str(tmp_path / "minus.safetensors"))
    minus = TriggerSource.parse(str(tmp_path / "minus.safetensors")).build(SHAPE)
    assert torch.allclose(minus.apply(torch.full((1, *SHAPE), 0.5)), torch.full((1, *SHAPE), 0.25))


def test_scan_reports_the_asr_of_a_trigger_file(files, trigger_files, capsys, tmp_path):  # noqa: F811
    report = tmp_path / "report"
    base = ["scan", str(files["model"]), "--arch", "tiny_cnn", "--data", str(files["test"]),
            "--check", "trigger", "--target", str(TARGET), "--samples", "300", "--json",
            "--quiet"]
    assert main([*base, "--trigger", str(trigger_files["pattern"]), "--trigger-mask",
                 str(trigger_files["mask"]), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    found = json.loads(out.strip().splitlines()[-1])["trigger"]
    # The same number computed directly with the named BadNets trigger on the same sample.
    model, _ = load_model(files["model"], "tiny_cnn")
    clean = sample(load_image_folder(files["test"])[0], 300, 0)
    expected = attack_success_rate(model, badnets_patch(SHAPE), clean, TARGET)
    assert found["attack_success_rate"] == pytest.approx(expected) and expected > 0.9
    assert found["works"] and found["images"] == int((clean.y != TARGET).sum())
    assert found["without_trigger"] < 0.1 and found["trigger"] == "pattern.png"
    assert f"trigger pattern.png: WORKS, sends {100 * expected:.1f}% of" in out
    assert json.loads((report / "scan.json").read_text())["trigger"] == found
    assert (report / "given_trigger.png").exists()
    assert "Given trigger" in (report / "report.html").read_text()
    # The .safetensors form gives the same; a trigger that changes nothing gives the base rate.
    assert main([*base, "--trigger", str(trigger_files["tensors"]), "--report",
                 str(tmp_path / "r2")]) == 0
    assert last_json(capsys)["trigger"]["attack_success_rate"] == found["attack_success_rate"]
    assert main([*base, "--trigger", str(trigger_files["blank"]), "--report",
                 str(tmp_path / "r3")]) == 0
    blank = last_json(capsys)["trigger"]
    assert blank["attack_success_rate"] == blank["without_trigger"] and not blank["works"]


def test_purify_measures_a_trigger_file_as_the_named_trigger(files, trigger_files, capsys,  # noqa: F811
                                                            tmp_path):
    base = ["purify", str(files["model"]), "--arch", "tiny_cnn", "--clean-data",
            str(files["clean"]), "--target", str(TARGET), "--test-data", str(files["test"]),
            "--epochs", "1", "--inversion-steps", "3", "--json", "--quiet"]
    results = {}
    for name, trigger in (("named", ["badnets"]),
                          ("images", [str(trigger_files["pattern"]), "--trigger-mask",
                                      str(trigger_files["mask"])]),
                          ("tensors", [str(trigger_files["tensors"])])):
        assert main([*base, "--trigger", *trigger, "--out",
                     str(tmp_path / f"{name}.safetensors")]) == 0
        results[name] = last_json(capsys)
    named = results["named"]
    assert named["before"]["attack_success_rate"] > 0.9
    for name in ("images", "tensors"):
        assert results[name]["before"] == named["before"], name
        assert results[name]["after"] == named["after"], name


# --- bad trigger inputs: one line, exit code 2 ----------------------------------------------------


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and captured.out == ""
    return err


@pytest.fixture(scope="module")
def model28(tmp_path_factory):
    """An untrained tiny CNN for 1×28×28 images (the size is the architecture's usual one) and
    a folder of 28×28 images; what is refused here is refused before the model matters."""
    root = tmp_path_factory.mktemp("model28")
    torch.manual_seed(0)
    path = save_weights(root / "m.safetensors", build_model("tiny_cnn", 10, 1).state_dict())
    for label in range(2):
        (root / "data" / str(label)).mkdir(parents=True)
        for i in range(3):
            gray_png(root / "data" / str(label) / f"{i}.png", torch.rand(1, 28, 28))
    return {"model": path, "data": root / "data", "root": root}


def commands(model28, model: Path | None = None) -> dict[str, list[str]]:
    model = str(model or model28["model"])
    return {"scan": ["scan", model, "--arch", "tiny_cnn", "--data", str(model28["data"]),
                     "--check", "trigger", "--target", "1", "--report",
                     str(model28["root"] / "report"), "--quiet"],
            "purify": ["purify", model, "--arch", "tiny_cnn", "--clean-data",
                       str(model28["data"]), "--test-data", str(model28["data"]), "--target", "1",
                       "--out", str(model28["root"] / "o.safetensors"), "--epochs", "1",
                       "--quiet"]}


@pytest.mark.parametrize("command", ["scan", "purify"])
def test_a_trigger_of_the_wrong_size_is_refused(model28, trigger_files, capsys, command):
    args = commands(model28)[command]
    assert main([*args, "--trigger", str(trigger_files["pattern"]), "--trigger-mask",
                 str(trigger_files["mask"])]) == 2
    err = one_line_error(capsys)
    assert "pattern.png is 14x14, but the model takes 28x28 images" in err
    assert main([*args, "--trigger", str(gray_png(model28["root"] / "p28.png",
                                                  torch.ones(1, 28, 28))),
                 "--trigger-mask", str(trigger_files["mask"])]) == 2
    assert "is 28x28 with a 14x14 mask, but the model takes 28x28" in one_line_error(capsys)
    assert main([*args, "--trigger", str(trigger_files["tensors"])]) == 2
    assert "badnets.safetensors is 14x14, but the model takes 28x28" in one_line_error(capsys)
    assert not (model28["root"] / "o.safetensors").exists()


def tensors_file(root: Path, name: str, **tensors: torch.Tensor) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(root / name))
    return str(root / name)


@pytest.mark.parametrize("command", ["scan", "purify"])
def test_bad_trigger_files_are_refused_before_any_work(model28, trigger_files, capsys, command,
                                                       tmp_path):
    # The model file does not exist: an error about the trigger shows it was refused first.
    args = commands(model28, tmp_path / "missing.safetensors")[command]
    ones = torch.ones(1, 28, 28)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 7)
    cases = [
        (["--trigger", tensors_file(tmp_path, "wide.safetensors", pattern=ones,
                                    mask=torch.full((28, 28), 1.5))],
         "'mask' of --trigger", "must be in [0, 1], found values in [1.5, 1.5]"),
        (["--trigger", tensors_file(tmp_path, "neg.safetensors", pattern=ones,
                                    mask=-ones)], "must be in [0, 1]"),
        (["--trigger", tensors_file(tmp_path, "nanpat.safetensors",
                                    pattern=torch.full((1, 28, 28), float("nan")))],
         "holds NaN or infinite values"),
        (["--trigger", tensors_file(tmp_path, "loud.safetensors", pattern=3 * ones)],
         "must be in [-1, 1]"),
        (["--trigger", tensors_file(tmp_path, "other.safetensors", delta=ones)],
         "holds delta: expected 'pattern'"),
        (["--trigger-mask", str(trigger_files["mask"])],
         "--trigger-mask needs a --trigger image file"),
        (["--trigger", "badnets", "--trigger-mask", str(trigger_files["mask"])],
         "not to the named trigger 'badnets'"),
        (["--trigger", str(trigger_files["tensors"]), "--trigger-mask",
          str(trigger_files["mask"])], "can hold its own 'mask'"),
        (["--trigger", str(tmp_path / "junk.png")], "junk.png: cannot read it as an image"),
        (["--trigger", str(tmp_path / "junk.safetensors")], "not a readable safetensors file"),
        (["--trigger", str(trigger_files["pattern"]), "--trigger-mask",
          str(tmp_path / "junk.png")], "--trigger-mask", "cannot read it as an image"),
        (["--trigger", str(tmp_path / "absent.png")],
         "--trigger", "absent.png: neither a known trigger (badnets, blend, grid, sig, trojan, "
         "warp) nor a file"),
        (["--trigger", str(trigger_files["pattern"]), "--trigger-mask",
          str(tmp_path / "absent.png")], "--trigger-mask", "absent.png: no such file"),
    ]
    for extra, *needles in cases:
        assert main([*args, *extra]) == 2, extra
        err = one_line_error(capsys)
        for needle in needles:
            assert needle in err, (needle, err)
        assert "missing.safetensors" not in err, err


def test_scan_trigger_options_go_together(model28, trigger_files, capsys):
    args = commands(model28)["scan"]
    no_target = [a for i, a in enumerate(args) if a != "--target" and args[i - 1] != "--target"]
    assert main([*no_target, "--trigger", "badnets"]) == 2
    assert "--trigger needs --target L" in one_line_error(capsys)
    assert main(args) == 2
    assert "--target applies only with --trigger" in one_line_error(capsys)
    scan_backdoor = [*args, "--trigger", "badnets"]
    scan_backdoor[scan_backdoor.index("trigger")] = "backdoor"
    assert main(scan_backdoor) == 2
    assert "add --check trigger" in one_line_error(capsys)
    assert main([*args, "--trigger", "badnets", "--target", "10"]) == 2
    assert "--target 10 is not a label of the model (0..9)" in one_line_error(capsys)
    purify = commands(model28)["purify"]
    no_test = purify[:purify.index("--test-data")] + purify[purify.index("--test-data") + 2:]
    assert main([*no_test, "--trigger", "badnets"]) == 2
    assert "--trigger is measured on a clean test set" in one_line_error(capsys)


def test_the_trigger_check_runs_when_a_trigger_and_clean_images_are_given():
    assert select_checks(None, True, False, True) == ["backdoor", "trigger"]
    assert select_checks(["trigger"], True, True, True) == ["trigger"]
    assert select_checks(None, True, True) == ["backdoor", "membership"]
    with pytest.raises(ConfigError, match="the trigger check needs clean images"):
        select_checks(None, False, True, True)
    with pytest.raises(ConfigError, match="the trigger check needs clean images"):
        select_checks(["trigger"], True, False, False)


def test_a_class_folder_name_prints_escaped_in_the_verdict():
    """The target's class is a folder name: a newline or an ANSI escape in it must not forge a
    line of the verdict or recolour the terminal."""
    from poisonlab.audit.trigger import TriggerResult

    name = "cat\n\x1b[32mtrigger none: does not take over the model"
    result = TriggerResult("patch.png", 3, name, 100, 0.97, 0.02)
    text = result.text()
    assert text.count("\n") == 0 and "\x1b" not in text
    assert "(cat\\n\\x1b[32mtrigger none" in text and "WORKS" in text
