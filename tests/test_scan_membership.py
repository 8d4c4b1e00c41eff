"""`poisonlab scan --members/--non-members`: membership leakage of a deliberately overfit model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from poisonlab.audit import select_checks
from poisonlab.cli import main
from poisonlab.data.records import load_records, save_records
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError
from poisonlab.runs.checkpoints import save_weights

N = 200  # members; each non-member set has as many records


@pytest.fixture(scope="module")
def files(shared_data, tmp_path_factory):
    """tiny_cnn overfit on 200 MNIST test images (100% train accuracy, no regularisation), saved
    as safetensors, with record files of its members and of two disjoint non-member sets."""
    from poisonlab.data.mnist import load_mnist
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    root = tmp_path_factory.mktemp("scan-membership")
    test = load_mnist(shared_data / "mnist").test
    members = test.subset(torch.arange(N))
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1)
    cfg = TrainConfig(epochs=40, batch_size=25, lr=1e-2, optimizer="adam", weight_decay=0.0,
                      schedule="none")
    train_classifier(model, members, cfg, progress=False)
    return {
        "model": save_weights(root / "model.safetensors", model.state_dict()),
        "members": save_records(root / "members.safetensors", members),
        "non_members": save_records(root / "non.safetensors", test.subset(torch.arange(N, 2 * N))),
        "non_members_2": save_records(root / "non2.safetensors",
                                      test.subset(torch.arange(2 * N, 3 * N))),
        "members_images": members,
        "root": root,
    }


def scan(files, tmp_path, *args: str) -> list[str]:
    return ["scan", str(files["model"]), "--arch", "tiny_cnn", "--report", str(tmp_path / "r"),
            "--json", "--quiet", *args]


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_members_leak_and_the_report_shows_the_roc(files, capsys, tmp_path):
    code = main(scan(files, tmp_path, "--members", str(files["members"]), "--non-members",
                     str(files["non_members"])))
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert "backdoor" not in result  # no clean images given: only the membership check runs
    mia = result["membership"]
    assert mia["attack"] == "loss_threshold" and "shadow" in mia["reason"]
    assert (mia["members"], mia["non_members"], mia["records"]) == (N, N, 2 * N)
    assert mia["auc"] > 0.6 and mia["attack_accuracy"] > 0.6
    assert mia["leakage_detected"] and mia["p_value"] < 1e-4 and mia["testable"]
    assert mia["tpr_at_fpr_0.001"] is None  # 200 non-members cannot measure a 0.1% FPR
    assert mia["tpr_at_fpr_0.01"] == mia["attacks"][0]["tpr_at_fpr_0.01"] is not None
    assert "membership leakage: DETECTED (loss_threshold attack" in out
    report = tmp_path / "r"
    assert (report / "membership_roc.png").stat().st_size > 5000
    html = (report / "report.html").read_text()
    assert "Membership leakage" in html and "data:image/png;base64" in html
    assert json.loads((report / "scan.json").read_text())["membership"]["auc"] == mia["auc"]


def test_two_non_member_sets_are_indistinguishable(files, capsys, tmp_path):
    assert main(scan(files, tmp_path, "--members", str(files["non_members_2"]), "--non-members",
                     str(files["non_members"]), "--check", "membership")) == 0
    mia = last_json(capsys)["membership"]
    assert abs(mia["auc"] - 0.5) < 0.1
    assert not mia["leakage_detected"]


def test_too_few_records_are_inconclusive_not_a_clean_bill(files, capsys, tmp_path):
    """Three members of an overfit model against three non-members: even if all three score
    above all three the p-value is 1/20, so the test cannot reject at 1% and the verdict says
    so instead of "not detected"."""
    members = load_records(files["members"])[0].subset(torch.arange(3))
    non = load_records(files["non_members"])[0].subset(torch.arange(3))
    few = [str(save_records(tmp_path / "m.safetensors", members)),
           str(save_records(tmp_path / "n.safetensors", non))]
    assert main(scan(files, tmp_path, "--members", few[0], "--non-members", few[1])) == 0
    out = capsys.readouterr().out
    mia = json.loads(out.strip().splitlines()[-1])["membership"]
    assert not mia["testable"] and not mia["leakage_detected"]
    assert "membership leakage: INCONCLUSIVE, too few records" in out
    assert "not detected" not in out


def test_label_only_attack_on_request(files, capsys, tmp_path):
    assert main(scan(files, tmp_path, "--members", str(files["members"]), "--non-members",
                     str(files["non_members"]), "--label-only")) == 0
    mia = last_json(capsys)["membership"]
    names = [a["attack"] for a in mia["attacks"]]
    assert names == ["loss_threshold", "label_only"]
    label_only = mia["attacks"][1]
    assert label_only["auc"] > 0.55 and "labels only" in label_only["reason"]


def test_image_folder_records_score_like_the_safetensors_file(files, capsys, tmp_path):
    folder = tmp_path / "members"
    images = files["members_images"]
    for i, (x, y) in enumerate(zip(images.x, images.y.tolist(), strict=True)):
        (folder / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{y}/{i}.png")
    loaded, _ = load_records(folder)
    assert sorted(loaded.y.tolist()) == sorted(images.y.tolist())
    args = ["--non-members", str(files["non_members"])]
    assert main(scan(files, tmp_path, "--members", str(folder), *args)) == 0
    from_folder = last_json(capsys)["membership"]["auc"]
    assert main(scan(files, tmp_path, "--members", str(files["members"]), "--overwrite",
                     *args)) == 0
    assert from_folder == pytest.approx(last_json(capsys)["membership"]["auc"], abs=1e-9)


def test_dataset_splits_as_record_sets(files, shared_data, capsys, tmp_path):
    assert main(scan(files, tmp_path, "--dataset", "mnist", "--data-dir",
                     str(shared_data / "mnist"), "--members-split", "train",
                     "--non-members-split", "test", "--records", "150",
                     "--check", "membership")) == 0
    mia = last_json(capsys)["membership"]
    assert (mia["members"], mia["non_members"]) == (150, 150)
    assert mia["members_source"] == "mnist train split"
    assert mia["non_members_source"] == "mnist test split"
    assert 0.0 <= mia["auc"] <= 1.0


def test_checks_run_when_their_inputs_are_given():
    assert select_checks(None, True, False) == ["backdoor"]
    assert select_checks(None, False, True) == ["membership"]
    assert select_checks(None, True, True) == ["backdoor", "membership"]
    assert select_checks(["membership"], True, True) == ["membership"]
    with pytest.raises(ConfigError, match="nothing to scan"):
        select_checks(None, False, False)


def _bad_records(root: Path) -> dict[str, Path]:
    """Record files that are each wrong in one way."""
    x, y = torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)
    from safetensors.torch import save_file

    bad = {
        "flat": {"images": torch.zeros(8, 28, 28, dtype=torch.uint8), "labels": y},
        "nolabels": {"images": x},
        "short": {"images": x, "labels": y[:5]},
        "range": {"images": x + 2.0, "labels": y},
        "floatlabels": {"images": x, "labels": y.float()},
    }
    out = {}
    for name, tensors in bad.items():
        save_file(tensors, str(root / f"{name}.safetensors"))
        out[name] = root / f"{name}.safetensors"
    out["label10"] = save_records(root / "label10.safetensors", ImageSet(x, y + 10))
    out["big"] = save_records(root / "big.safetensors", ImageSet(torch.zeros(8, 1, 32, 32), y))
    out["rgb"] = save_records(root / "rgb.safetensors", ImageSet(torch.zeros(8, 3, 28, 28), y))
    out["garbage"] = root / "garbage.safetensors"
    out["garbage"].write_bytes(b"not a safetensors file")
    out["pickle"] = root / "records.pt"
    torch.save({"images": x, "labels": y}, out["pickle"])
    return out


@pytest.mark.parametrize(
    ("members", "extra", "message"),
    [
        ("{root}/missing.safetensors", [], "does not exist"),
        ("{flat}", [], "must be [N, C, H, W]"),
        ("{nolabels}", [], "has no 'labels' tensor (found: images)"),
        ("{short}", [], "must be [8] (one per image)"),
        ("{range}", [], "must lie in [0, 1]"),
        ("{floatlabels}", [], "must be integers"),
        ("{label10}", [], "must be in 0..9 (the model has 10 classes), found 10"),
        ("{big}", [], "model expects 1x28x28"),
        ("{rgb}", [], "are 3x28x28 (CxHxW), but the model expects 1x28x28"),
        ("{garbage}", [], "not a valid safetensors file"),
        ("{pickle}", [], "unsupported record file"),
        ("{members}", ["--check", "backdoor"], "the backdoor check needs clean images"),
        (None, ["--members-split", "train", "--non-members", "{non_members}"], "need --dataset"),
    ],
)
def test_bad_inputs_are_one_line_errors(files, capsys, tmp_path, members, extra, message):
    paths = {k: str(v) for k, v in files.items() if isinstance(v, Path)}
    paths.update({k: str(v) for k, v in _bad_records(tmp_path).items()})
    args = ["--non-members", "{non_members}"] if members else []
    if members:
        args = ["--members", members, *args]
    args = [a.format(**paths) for a in [*args, *extra]]
    assert main(scan(files, tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err


def test_one_record_set_alone_is_an_error(files, capsys, tmp_path):
    assert main(scan(files, tmp_path, "--members", str(files["members"]))) == 2
    assert "needs --non-members" in capsys.readouterr().err


def test_a_tpr_at_an_fpr_the_non_members_cannot_measure_is_a_dash_not_a_number():
    """The verdict said "TPR at 0.1% FPR not measurable with 200 non-members" while the table
    beside it showed a number there (the TPR at zero false positives)."""
    from types import SimpleNamespace

    from poisonlab.report.audit import membership_section

    attack = SimpleNamespace(attack="loss_threshold", reason="r", p_value=0.01, metrics={
        "auc": 0.7, "tpr_at_fpr_0.001": 0.05, "tpr_at_fpr_0.01": 0.1, "attack_accuracy": 0.6})
    for non_members, cells in [(200, [None, 0.1]), (1000, [0.05, 0.1]), (99, [None, None])]:
        section = membership_section("v", [attack], 200, "m", non_members, "n", None)
        assert section.tables[0].columns[2:4] == ["TPR at 0.1% FPR", "TPR at 1% FPR"]
        assert section.tables[0].rows[0][2:4] == cells, non_members


def test_a_report_folder_holding_a_report_is_refused_unless_overwrite(files, tmp_path, capsys):
    """scan --report replaced the report.html already in the folder (a user's own, or an
    earlier scan's) without a word."""
    own = tmp_path / "r" / "report.html"
    own.parent.mkdir()
    own.write_text("MY OWN REPORT")
    args = ["--members", str(files["members"]), "--non-members", str(files["non_members"])]
    assert main(scan(files, tmp_path, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "already holds report.html" in err and "--overwrite" in err
    assert own.read_text() == "MY OWN REPORT" and not (own.parent / "scan.json").exists()
    assert main(scan(files, tmp_path, *args, "--overwrite")) == 0
    assert own.read_text() != "MY OWN REPORT" and (own.parent / "scan.json").exists()
