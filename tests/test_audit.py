"""poisonlab.audit from Python (scan, purify, load_model) and the CLI's refusal of bad option
values before any work."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

from poisonlab.attacks.triggers import badnets_patch
from poisonlab.audit import (
    BackdoorResult,
    MembershipResult,
    PurifyReport,
    RecordSets,
    ScanConfig,
    ScanReport,
    load_model,
    purify,
    scan,
)
from poisonlab.cli import main
from poisonlab.config import replace
from poisonlab.data.records import load_records
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mcl import MCL
from poisonlab.errors import ConfigError, ShapeError

# Fixtures shared with the CLI and Neural Cleanse tests (tests/ is on sys.path under pytest).
from test_neural_cleanse import TARGET, backdoored, glyphs14  # noqa: F401
from test_scan_membership import files  # noqa: F401


def test_scan_flags_the_backdoor_target_from_python(glyphs14, backdoored, tmp_path):  # noqa: F811
    _, test = glyphs14
    report = scan(backdoored, clean=test, config=ScanConfig(samples=64, steps=60, batch_size=16),
                  input_shape=(1, 14, 14))
    assert isinstance(report, ScanReport) and list(report.checks) == ["backdoor"]
    check = report.backdoor
    assert isinstance(check, BackdoorResult) and check.detected and check.target == TARGET
    # Both detectors run by default; the verdict says which fired, on which label.
    assert check.detectors == ["nc", "mmbd"] and check.detected_by == ["nc", "mmbd"]
    assert check.verdict.startswith(f"backdoor: SUSPECTED by neural cleanse (label {TARGET}, "
                                    "index ")
    assert f"and MM-BD (label {TARGET}, p = " in check.verdict
    assert check.notes[0].startswith(f"neural cleanse: SUSPECTED, target label {TARGET} (")
    assert check.notes[1].startswith(f"MM-BD: SUSPECTED, target label {TARGET} (")
    summary = report.to_dict()
    assert summary["samples"] == 64 and summary["backdoor"]["flagged"] == [TARGET]
    assert summary["backdoor"]["labels"][TARGET]["class"] == str(TARGET)
    mm = summary["backdoor"]["mm_bd"]
    assert mm["target"] == TARGET and mm["p_value"] < 0.05 and len(mm["margins"]) == 10
    assert summary["backdoor"]["combined"] == {
        "status": "detected", "detected_by": ["nc", "mmbd"],
        "targets": {"nc": TARGET, "mmbd": TARGET}, "verdict": check.verdict}
    assert check.figure is None and report.membership is None  # no report folder: no files
    section = check.section()
    assert section.heading == "Backdoor (Neural Cleanse, MM-BD)"
    assert [t.caption for t in section.tables] == ["Neural Cleanse", "MM-BD"]
    assert all(len(t.rows) == 10 for t in section.tables)


def test_scan_with_one_detector_keeps_its_own_verdict(glyphs14, backdoored):  # noqa: F811
    _, test = glyphs14
    config = ScanConfig(samples=64, steps=60, batch_size=16, detectors="nc")
    check = scan(backdoored, clean=test, config=config, input_shape=(1, 14, 14)).backdoor
    assert check.mm_bd is None and check.detectors == ["nc"]
    # Neural Cleanse alone: its verdict line as before MM-BD was added.
    assert check.verdict.startswith(f"backdoor: SUSPECTED, target label {TARGET} (")
    assert check.section().heading == "Backdoor (Neural Cleanse)"
    assert "mm_bd" not in check.to_dict()
    only = scan(backdoored, clean=test, config=ScanConfig(detectors=["mmbd"]),
                input_shape=(1, 14, 14)).backdoor
    assert only.detection is None and only.detected_by == ["mmbd"] and only.target == TARGET
    assert only.verdict.startswith(f"backdoor: SUSPECTED by MM-BD (label {TARGET}, p = ")
    summary = only.to_dict()
    assert "flagged" not in summary and summary["mm_bd"]["target"] == TARGET
    # Order and repeats do not matter; unknown names are refused with the key.
    assert ScanConfig(detectors="mmbd, nc,nc").detectors == ("nc", "mmbd")
    for bad in ("nc,ac", "", []):
        with pytest.raises(ConfigError, match="detectors"):
            ScanConfig(detectors=bad)


def _mm(margins: list[float]):
    from poisonlab.defenses.mm_bd import MMBDResult, mm_bd_verdict

    margins = torch.tensor([margins], dtype=torch.float64)
    null, log_p = mm_bd_verdict(margins)
    return MMBDResult(margins, 0.05, null, log_p)


@pytest.mark.parametrize(("nc_index", "mm_top", "verdict", "note"), [
    (3.0, 90.0, "backdoor: SUSPECTED by neural cleanse (label 4, index 3.00) and MM-BD (label 2, "
     "p = ", "the detectors name different labels: neural cleanse 4, MM-BD 2"),
    (1.2, 90.0, "backdoor: SUSPECTED by MM-BD (label 2, p = ", "; neural cleanse: none (largest "
     "index 1.20 for label 4)"),
    (2.2, 90.0, "backdoor: SUSPECTED by MM-BD (label 2, p = ", "; neural cleanse: inconclusive "
     "(label 4, index 2.20 within threshold 2 ± 0.5)"),
    (3.0, 31.0, "backdoor: SUSPECTED by neural cleanse (label 4, index 3.00); MM-BD: none "
     "(largest margin for label 2, p = 0.", None),
    (2.2, 31.0, "backdoor: INCONCLUSIVE, neural cleanse: label 4, index 2.20 within threshold "
     "2 ± 0.5; MM-BD: none (largest margin for label 2, p = 0.", "more --restarts"),
    (1.2, 31.0, "backdoor: none detected by neural cleanse (largest index 1.20 for label 4) or "
     "MM-BD (largest margin for label 2, p = 0.", None),
])
def test_the_combined_verdict_says_which_detector_fired(nc_index, mm_top, verdict, note):
    from poisonlab.defenses.neural_cleanse import DetectionResult
    from test_neural_cleanse import _index_norms

    detection = DetectionResult([], _index_norms(nc_index)[None], threshold=2.0, band=0.5)
    mm = _mm([28.0, 30.0, mm_top, 27.0, 29.5, 26.0, 30.5, 28.5, 27.5, 29.0])
    check = BackdoorResult(detection, [str(k) for k in range(10)], mm_bd=mm)
    assert check.verdict.startswith(verdict), check.verdict
    if note is not None and note.startswith("; "):
        assert note in check.verdict, check.verdict
    elif note is not None:
        assert any(line.startswith(note) for line in check.notes), check.notes
    fired = (["nc"] if nc_index > 2.5 else []) + (["mmbd"] if mm_top > 50 else [])
    assert check.detected_by == fired and check.detected == bool(fired)
    assert check.target == (4 if "nc" in fired else 2 if fired else None)


def test_p_values_print_where_the_float_underflows():
    from poisonlab.audit.backdoor import format_p

    assert format_p(math.log(0.31)) == "0.31" and format_p(math.log(3.1e-5)) == "3.1e-05"
    assert format_p(-2000.0) == "2.6e-869"  # e^-2000 = 10^-868.59
    assert format_p(-math.inf) == "0"


def test_membership_check_detects_leakage_from_python(files, tmp_path):  # noqa: F811
    model, shape = load_model(files["model"], "tiny_cnn")
    assert shape == (1, 28, 28) and not model.training
    members, _ = load_records(files["members"])
    non_members, _ = load_records(files["non_members"])
    report = scan(model, records=RecordSets(members, non_members), input_shape=shape,
                  report_dir=tmp_path / "r")
    check = report.membership
    assert isinstance(check, MembershipResult) and report.backdoor is None
    assert check.detected and check.attacks[0].attack == "loss_threshold"
    assert check.attacks[0].metrics["auc"] > 0.6 and check.attacks[0].p_value < 1e-4
    assert check.verdict.startswith("membership leakage: DETECTED (loss_threshold attack")
    written = json.loads((tmp_path / "r" / "scan.json").read_text())
    assert written == json.loads(json.dumps(report.to_dict()))
    assert written["membership"]["members"] == len(members)
    assert (tmp_path / "r" / "membership_roc.png").exists()


def test_records_that_do_not_fit_the_model_are_shape_errors(files):  # noqa: F811
    model, shape = load_model(files["model"], "tiny_cnn")
    members, _ = load_records(files["members"])
    big = ImageSet(torch.zeros(4, 1, 32, 32), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ShapeError, match="model expects 1x28x28"):
        scan(model, records=RecordSets(members, big), input_shape=shape)
    high = ImageSet(members.x[:4], torch.full((4,), 10))
    with pytest.raises(ShapeError, match=r"must be in 0\.\.9"):
        scan(model, records=RecordSets(members, high))
    with pytest.raises(ConfigError, match="samples"):
        ScanConfig(samples=0)


def test_purify_from_python_returns_a_purified_copy(glyphs14, backdoored):  # noqa: F811
    train, test = glyphs14
    before = {k: v.clone() for k, v in backdoored.state_dict().items()}
    config = MCL.Config(inversion=replace(MCL.Config().inversion, steps=5),
                        finetune=replace(MCL.Config().finetune, epochs=1))
    report = purify(backdoored, train.subset(torch.arange(200)), target=TARGET, config=config,
                    test=test.subset(torch.arange(200)), trigger=badnets_patch((1, 14, 14)))
    assert isinstance(report, PurifyReport) and report.target == TARGET
    assert report.model is not backdoored and report.detection is None
    assert all(torch.equal(v, backdoored.state_dict()[k]) for k, v in before.items())
    summary = report.to_dict()
    assert list(summary) == ["target", "clean_images", "before", "after"]
    assert set(summary["after"]) == {"benign_accuracy", "attack_success_rate"}
    assert summary["before"]["attack_success_rate"] > 0.9
    with pytest.raises(ConfigError, match="not a label of the model"):
        purify(backdoored, train, target=10, config=config)


# --- bad option values: one line naming the option, exit 2, before any work ----------------------

SCAN = ["scan", "missing-model.safetensors", "--arch", "tiny_cnn", "--dataset", "glyphs"]
PURIFY = ["purify", "missing-model.safetensors", "--arch", "tiny_cnn", "--dataset", "glyphs",
          "--target", "3", "--out", "o.safetensors"]


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        (SCAN, "--samples", "0"),
        (SCAN, "--steps", "0"),
        (SCAN, "--batch-size", "0"),
        (SCAN, "--threshold", "-1"),
        (SCAN, "--threshold", "0"),
        (SCAN, "--threshold", "nan"),
        (SCAN, "--threshold", "inf"),
        (SCAN, "--records", "0"),
        (SCAN, "--restarts", "0"),
        (SCAN, "--band", "-1"),
        (SCAN, "--band", "nan"),
        (SCAN, "--detectors", "nc,strip"),
        (SCAN, "--detectors", ""),
        (PURIFY, "--restarts", "0"),
        (PURIFY, "--inversion-steps", "0"),
        (PURIFY, "--epochs", "0"),
        (PURIFY, "--ce-weight", "-1"),
        (PURIFY, "--distill-weight", "-1"),
        (PURIFY, "--clean-fraction", "0"),
        (PURIFY, "--clean-fraction", "2"),
        (PURIFY, "--clean-fraction", "nan"),
        (PURIFY, "--steps", "0"),
    ],
)
def test_bad_option_values_are_one_line_errors_before_any_work(capsys, command, option, value):
    # The model file does not exist: an error about the option shows it was refused first.
    assert main([*command, option, value, "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {option} ") and "does not exist" not in err, err
    assert "Traceback" not in err and captured.out == ""


def test_purify_inversion_steps_0_is_one_line_in_a_subprocess(tmp_path):
    """The command of issue 16 that ended in a traceback."""
    proc = subprocess.run(
        [sys.executable, "-c", "from poisonlab.cli import entry; entry()", "purify", "M",
         "--arch", "tiny_cnn", "--dataset", "glyphs", "--target", "3", "--inversion-steps", "0",
         "--out", str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --inversion-steps 0: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("meta", ["[1.5, 28, 28]", '"abc"', "null", "{}", "[1, 28]", "[0, 28, 28]",
                                  "[true, 28, 28]", "not json"])
def test_input_shape_metadata_that_is_not_three_positive_integers_is_refused(meta):
    """[1.5, 28, 28] used to be read as [1, 28, 28]; "abc", null and {} were silently ignored."""
    from poisonlab.audit.model import input_shape
    from poisonlab.errors import ModelFileError

    with pytest.raises(ModelFileError, match=r"input_shape metadata of m.safetensors is .*not \[C, H, W\]"):
        input_shape("small_cnn", {"input_shape": meta}, None, 1, "m.safetensors")
    assert input_shape("small_cnn", {"input_shape": meta}, 14, 1) == (1, 14, 14)  # overridden
    assert input_shape("small_cnn", {"input_shape": "[1, 28, 28]"}, None, 1) == (1, 28, 28)


def test_degenerate_inputs_get_no_verdict(files):  # noqa: F811
    """An all-zero model came out INCONCLUSIVE, the same records as members and non-members
    "not detected", and 20 non-members reported a TPR "at 0.1% FPR" (really at 0%)."""
    from poisonlab.errors import DataError, ModelFileError

    model, shape = load_model(files["model"], "tiny_cnn")
    members, _ = load_records(files["members"])
    non_members, _ = load_records(files["non_members"])
    with pytest.raises(DataError, match="are also in .*two disjoint sets"):
        scan(model, records=RecordSets(members, members), input_shape=shape)
    zero = copy.deepcopy(model)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()
    with pytest.raises(ModelFileError, match="same output for all .* images"):
        scan(zero, records=RecordSets(members, non_members), input_shape=shape)
    few = non_members.subset(torch.arange(20))
    verdict = scan(model, records=RecordSets(members, few), input_shape=shape).membership.verdict
    assert "TPR at 0.1% FPR not measurable with 20 non-members" in verdict
    assert "TPR at 1% FPR not measurable with 20 non-members" in verdict


def test_neural_cleanse_is_kept_when_mm_bd_cannot_finish(glyphs14, backdoored, monkeypatch):  # noqa: F811
    """On extreme weights MM-BD's margins overflow after Neural Cleanse has finished: the scan
    used to end in the error and lose Neural Cleanse's result."""
    from poisonlab.defenses.mm_bd import MMBD

    def overflow(self, *args, **kwargs):
        raise ConfigError("MM-BD: the model's logit margins are not finite")

    monkeypatch.setattr(MMBD, "detect", overflow)
    _, test = glyphs14
    config = ScanConfig(samples=64, steps=10, batch_size=16)
    check = scan(backdoored, clean=test, config=config, input_shape=(1, 14, 14)).backdoor
    assert check.detection is not None and check.mm_bd is None and check.detectors == ["nc"]
    assert check.verdict.endswith("; MM-BD could not run")
    assert check.notes[0] == "MM-BD could not run: MM-BD: the model's logit margins are not finite"
    assert check.to_dict()["mm_bd_error"].startswith("MM-BD: the model's logit margins")


@pytest.mark.parametrize("norms", [[1.006, 317.6], [300.0, 310.0], [5.0]])
def test_a_model_of_fewer_than_three_labels_is_never_judged_clean(norms):
    """Two mask sizes always give the anomaly index 1/1.4826 = 0.67, so a 2-class model came out
    "none detected" (and a threshold under 0.67 flagged it) whatever its triggers: the verdict
    was fixed before the scan ran (fifth re-sweep). It is inconclusive, and says why."""
    from poisonlab.defenses.neural_cleanse import DetectionResult

    for threshold, band in ((2.0, 0.5), (0.5, 0.0)):
        detection = DetectionResult([], torch.tensor([norms]), threshold=threshold, band=band)
        assert not detection.judgeable and detection.flagged == []
        assert detection.status == "inconclusive"
        check = BackdoorResult(detection, [str(k) for k in range(len(norms))])
        assert check.status == "inconclusive" and not check.detected
        assert check.verdict.startswith(f"backdoor: INCONCLUSIVE, cannot judge a model of "
                                        f"{len(norms)} label"), check.verdict
    three = DetectionResult([], torch.tensor([[1.0, 300.0, 310.0]]), threshold=2.0)
    assert three.judgeable and three.flagged == [0]


def test_purify_never_returns_non_finite_weights(glyphs14, backdoored, monkeypatch):  # noqa: F811
    """--ce-weight 1e30 made MCL diverge and purify wrote NaN weights as the purified model."""
    import copy

    from poisonlab.defenses import mcl as mcl_module

    def diverged(self, model, clean, target, progress=None):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            next(broken.parameters()).fill_(float("nan"))
        return type("Out", (), {"model": broken})()

    monkeypatch.setattr(mcl_module.MCL, "purify", diverged)
    train, _ = glyphs14
    with pytest.raises(ConfigError, match=r"MCL diverged: 1 of \d+ tensors .* not finite"):
        purify(backdoored, train.subset(torch.arange(50)), target=TARGET)


def test_purify_of_a_two_class_model_asks_for_the_target():
    """Neural Cleanse cannot judge 2 labels (its verdict is inconclusive), so the label purify
    defended was a coin toss; it now asks for --target before any inversion runs."""
    from poisonlab.audit.purify import find_target
    from poisonlab.data.types import ImageSet
    from poisonlab.models import build_model

    model = build_model("tiny_cnn", 2, 1)
    clean = ImageSet(torch.rand(8, 1, 14, 14), torch.tensor([0, 1] * 4))
    with pytest.raises(ConfigError, match="the model has 2 classes, .* pass --target L"):
        find_target(model, clean)
