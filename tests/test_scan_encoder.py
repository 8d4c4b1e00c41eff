"""poisonlab.audit.scan_encoder / load_encoder and `poisonlab scan ENCODER --encoder`: the
report and its files, loading encoders from classifier and head-less files, and one-line errors
for bad options and files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.audit import (
    EncoderAuditConfig,
    EncoderScanReport,
    FeatureEncoder,
    load_encoder,
    scan_encoder,
)
from poisonlab.cli import main
from poisonlab.defenses.encoder_scan import EncoderScan
from poisonlab.errors import ConfigError, ModelFileError, ShapeError
from poisonlab.models import available_models, build_model, register_model
from poisonlab.runs.checkpoints import save_weights

# The hand-built planted encoder of the technique's tests (tests/ is on sys.path under pytest).
from test_encoder_scan import SIZE, PlantedEncoder, noise_images

ARCH = "planted_encoder_test"
if ARCH not in available_models():
    register_model(ARCH)(lambda num_classes, in_channels=3: PlantedEncoder(True))

FAST = ["--samples", "48", "--steps", "120", "--restarts", "2", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A planted encoder saved as safetensors and a folder of noise images (two classes)."""
    root = tmp_path_factory.mktemp("encoder")
    path = save_weights(root / "planted.safetensors", PlantedEncoder(True).state_dict(),
                        {"input_shape": json.dumps([3, SIZE, SIZE])})
    images = (noise_images(48).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, img in enumerate(images):
        folder = root / "data" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i}.png")
    return path, root / "data"


def test_scan_encoder_from_python_writes_the_trigger_and_the_summary(tmp_path):
    torch.set_num_threads(1)
    config = EncoderAuditConfig(samples=48, scan=EncoderScan.Config(steps=120, restarts=2))
    report = scan_encoder(PlantedEncoder(True), noise_images(64), config=config,
                          report_dir=tmp_path, name="planted")
    assert isinstance(report, EncoderScanReport) and report.detected and report.samples == 48
    assert report.verdict.startswith("encoder backdoor: SUSPECTED (inverted trigger PL1 0.0")
    assert "mask L1" in report.notes[0] and "restarts" in report.notes[-1]
    assert (tmp_path / "encoder_trigger.png").stat().st_size > 0
    assert (tmp_path / "encoder_trigger.safetensors").is_file()
    assert (tmp_path / "report.html").is_file()
    summary = json.loads((tmp_path / "encoder_scan.json").read_text())
    assert summary["backdoored"] is True and summary["samples"] == 48
    assert summary["normalised_l1"] < 0.1 and len(summary["restarts"]) == 2
    # the scan's settings alone are accepted too (then the audit's 50 samples)
    small = scan_encoder(PlantedEncoder(False), noise_images(8),
                         config=EncoderScan.Config(steps=2))
    assert small.samples == 8 and not small.detected


def test_scan_encoder_refuses_images_that_do_not_fit():
    with pytest.raises(ShapeError, match="expects 3x32x32"):
        scan_encoder(PlantedEncoder(True), noise_images(4), input_shape=(3, 32, 32))
    with pytest.raises(ShapeError, match=r"\[N, C, H, W\]"):
        scan_encoder(PlantedEncoder(True), torch.rand(3, SIZE, SIZE))
    with pytest.raises(ConfigError, match="samples"):
        EncoderAuditConfig(samples=1)


def test_load_encoder_uses_a_classifiers_features_with_or_without_its_head(tmp_path):
    net = build_model("resnet20", num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    full = save_weights(tmp_path / "classifier.safetensors", net.state_dict())
    body = {k: v for k, v in net.state_dict().items() if not k.startswith("head.")}
    headless = save_weights(tmp_path / "encoder.safetensors", body)
    for path in (full, headless):
        encoder, shape = load_encoder(path, "resnet20")
        assert isinstance(encoder, FeatureEncoder) and shape == (3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(encoder(x), net.features(x))
    broken = dict(body)
    broken.pop("stem.1.weight")
    with pytest.raises(ModelFileError, match=r"stem\.1\.weight is missing"):
        load_encoder(save_weights(tmp_path / "broken.safetensors", broken), "resnet20")


def test_cli_scan_encoder_happy_path(files, tmp_path, capsys):
    model, data = files
    report = tmp_path / "report"
    code = main(["scan", str(model), "--encoder", "--arch", ARCH, "--data", str(data),
                 "--report", str(report), "--json", *FAST])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "encoder backdoor: SUSPECTED" in out and "mask L1" in out and "normalised" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["backdoored"] is True and summary["arch"] == ARCH
    assert summary["samples"] == 48 and summary["threshold"] == 0.1
    assert (report / "encoder_trigger.png").is_file()
    assert json.loads((report / "encoder_scan.json").read_text())["backdoored"] is True


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "0"], "--steps 0"),
    (["--restarts", "0"], "--restarts 0"),
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--threshold", "0"], "--threshold 0"),
    (["--similarity", "0"], "--similarity 0"),
    (["--samples", "1"], "--samples 1"),
    (["--batch-size", "1"], "--batch-size 1"),
    (["--members", "x.safetensors"], "--members does not apply to --encoder"),
    (["--check", "backdoor"], "--check does not apply to --encoder"),
    (["--band", "0.5"], "--band does not apply to --encoder"),
])
def test_cli_bad_encoder_options_are_one_line_errors(files, capsys, args, message):
    model, data = files
    assert main(["scan", str(model), "--encoder", "--arch", ARCH, "--data", str(data),
                 "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_encoder_errors_on_inputs(files, tmp_path, capsys):
    model, data = files
    cases = [
        (["scan", str(model), "--encoder", "--arch", ARCH], "needs clean images"),
        (["scan", str(model), "--encoder", "--arch", "resnet20", "--data", str(data)],
         f"weights in {model} do not fit resnet20"),
        (["scan", str(tmp_path / "missing.safetensors"), "--encoder", "--arch", ARCH,
          "--data", str(data)], "model file not found"),
        (["scan", str(model), "--arch", ARCH, "--data", str(data), "--similarity", "0.9"],
         "--similarity applies only with --encoder"),
    ]
    for argv, message in cases:
        assert main([*argv, "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1
