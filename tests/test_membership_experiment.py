"""`poisonlab run membership --preset smoke` end to end: metrics, figures, report, resume, errors.

The smoke target (tiny CNN, 200 glyph records, no regularisation) fits its training set exactly
while its test accuracy stays lower, so the score-based attacks see the gap. Its label-only
attack stays near chance (the glyph classes are so well separated that members and non-members
are equally robust to shifts): the test checks its keys, not its strength.
"""

from __future__ import annotations

import io
import json
import math
import sys

import pytest
import torch

from poisonlab.attacks.membership import Queried, ThresholdAttack
from poisonlab.cli import main
from poisonlab.evaluation.membership_study import load_data, split_parts
from poisonlab.experiments import membership as membership_experiment
from poisonlab.experiments.membership import Config
from poisonlab.metrics import roc_auc
from poisonlab.runs import Run
from poisonlab.sweeps.summary import metric_names, undeclared_metrics

ATTACKS = {"shadow", "lira_online", "lira_offline", "label_only", "threshold"}
DEFENSES = {"none", "dropout", "early_stopping", "dp_sgd", "labels_only", "rounding", "top_k"}
METRICS = {"attack_accuracy", "auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "test_accuracy"}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def run_cli(args: list[str]) -> tuple[int, str]:
    capture = pytest.MonkeyPatch()
    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        code = main(args)
    finally:
        capture.undo()
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("opacus")
    root = tmp_path_factory.mktemp("runs")
    code, out = run_cli(["run", "membership", "--preset", "smoke", "--out", str(root), "--json",
                         "-q"])
    assert code == 0, out
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return root, run_dir, last_json(out), out


def _fractions(entry: dict) -> None:
    for key in METRICS:
        assert 0.0 <= entry[key] <= 1.0, key


def test_keys_are_present_and_fractions(smoke):
    _, _, metrics, out = smoke
    # every number it writes is one `sweep --metric` accepts before a run
    assert undeclared_metrics(metric_names(metrics), membership_experiment.METRICS) == []
    assert set(metrics["attacks"]) == ATTACKS and set(metrics["defenses"]) == DEFENSES
    for entry in metrics["attacks"].values():
        assert set(entry) == METRICS
        _fractions(entry)
    for name, entry in metrics["defenses"].items():
        extra = {"dp_sgd": {"epsilon"}, "early_stopping": {"epochs"}}.get(name, set())
        assert set(entry) == METRICS | {"attack", "threshold_attack"} | extra
        assert set(entry["threshold_attack"]) == {"attack_accuracy", "auc"}
        assert entry["attack"] == "shadow"
        _fractions(entry)
    matrix = metrics["matrix"]
    assert matrix["targets"] == ["tiny_cnn"] and matrix["shadows"] == ["tiny_cnn", "small_cnn"]
    for block in (matrix, matrix["dropout"]):
        assert len(block["attack_accuracy"]) == 1 and len(block["attack_accuracy"][0]) == 2
        assert all(0.0 <= v <= 1.0 for v in block["attack_accuracy"][0])
    # The matrix cell of the target's own architecture is the shadow attack itself.
    assert matrix["attack_accuracy"][0][0] == pytest.approx(metrics["attacks"]["shadow"]["attack_accuracy"])
    assert "defences" in out and "target × shadow" in out


def test_shadow_variants_include_the_configured_attack(smoke):
    """The forms of the shadow attack are fitted on the same shadows: the configured one
    (smoke: one MLP on unsorted probabilities) must reproduce the `shadow` entry exactly."""
    metrics = smoke[2]
    shadow, variants = metrics["attacks"]["shadow"], metrics["shadow_variants"]
    assert set(variants) == {"default", "per_class", "sorted", "boosting"}
    for key, value in variants["default"].items():
        assert value == pytest.approx(shadow[key]), key


def test_attacks_beat_chance_on_the_overfit_target(smoke):
    _, _, metrics, _ = smoke
    assert metrics["target"]["train_accuracy"] == 1.0
    for name in ("shadow", "lira_online", "lira_offline", "threshold"):
        assert metrics["attacks"][name]["auc"] > 0.58, name
        assert metrics["attacks"][name]["attack_accuracy"] > 0.58, name


def test_a_model_trained_on_disjoint_data_gives_chance(smoke):
    """The shadow model never saw target-in or target-out: on it the loss threshold finds nothing,
    while on the target it does (both queried on the same records, kept in the run)."""
    _, run_dir, _, _ = smoke
    run = Run.open(run_dir)
    cfg = Config.model_validate(run.config)
    parts = split_parts(load_data(cfg, None, cfg.seed)[0].train, cfg.data.part_size, cfg.seed)
    y = torch.cat([parts["target_in"].y, parts["target_out"].y])
    member = torch.cat([torch.ones(len(parts["target_in"])), torch.zeros(len(parts["target_out"]))])
    attack = ThresholdAttack(score="loss")
    unseen = run.load_checkpoint("logits-shadow-tiny_cnn-0-lira")[0]["logits"]
    target = run.load_checkpoint("logits-target-tiny_cnn")[0]["logits"]
    assert abs(roc_auc(attack.score(Queried(y, probs=unseen.softmax(1))), member) - 0.5) < 0.1
    assert roc_auc(attack.score(Queried(y, probs=target.softmax(1))), member) > 0.58


def test_training_side_defences_lower_the_attack(smoke):
    """Dropout and DP-SGD lower the shadow attack's AUC; in this smoke setting they also cost
    much test accuracy (the tiny target is trained briefly), which the table reports. Early
    stopping is not asserted to help here: the 4-epoch tiny CNN (Adam, no schedule) is far from
    fitting its records yet, but its train/test gap is not smaller than the full target's, so
    the attack need not weaken; only that the defended target is the cut one is checked."""
    _, run_dir, metrics, _ = smoke
    d = metrics["defenses"]
    none = dict(d["none"])
    assert none.pop("threshold_attack")["auc"] == pytest.approx(metrics["attacks"]["threshold"]["auc"])
    assert none == {**metrics["attacks"]["shadow"], "attack": "shadow"}
    assert d["dropout"]["auc"] < d["none"]["auc"]
    assert d["dp_sgd"]["auc"] < d["none"]["auc"]
    assert d["early_stopping"]["epochs"] == 4
    assert "target-tiny_cnn-early4: trained 4 epochs" in (run_dir / "log.txt").read_text()
    assert d["labels_only"]["test_accuracy"] == pytest.approx(d["none"]["test_accuracy"])


def test_dp_sgd_reports_a_finite_epsilon(smoke):
    _, _, metrics, _ = smoke
    eps = metrics["defenses"]["dp_sgd"]["epsilon"]
    assert math.isfinite(eps) and eps > 0
    assert metrics["dp_sgd"]["epsilon"] == eps and 0 < metrics["dp_sgd"]["delta"] < 1


def test_run_directory_holds_metrics_figures_and_report(smoke):
    _, run_dir, metrics, _ = smoke
    assert json.loads((run_dir / "metrics.json").read_text())["attacks"] == metrics["attacks"]
    for name in ("roc.png", "matrix.png", "matrix_dropout.png", "defense_tradeoff.png"):
        assert (run_dir / "figures" / name).stat().st_size > 1000, name
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64") == 4 and "Defences" in report


def test_resume_reuses_trained_models_and_redoes_only_what_is_missing(smoke):
    """As if the run had been killed before one LiRA shadow, the label-only attack and DP-SGD
    finished: the resumed run retrains only those and reproduces the same numbers."""
    root, run_dir, metrics, _ = smoke
    for pattern in ("*lira-01*", "scores-label_only*", "*target-dpsgd*"):
        for path in (run_dir / "checkpoints").glob(pattern):
            path.unlink()
    code, out = run_cli(["run", "membership", "--resume", run_dir.name, "--out", str(root),
                         "--json", "-q"])
    assert code == 0
    again = last_json(out)
    assert again["attacks"] == metrics["attacks"] and again["defenses"] == metrics["defenses"]
    assert again["matrix"] == metrics["matrix"]
    log = (run_dir / "log.txt").read_text().split("resumed")[-1]
    retrained = [line for line in log.splitlines() if ": trained" in line]
    assert len(retrained) == 1 and "lira-01: trained" in retrained[0]
    assert "target-tiny_cnn: model loaded from the run" in log and "target-dpsgd: 10 epochs" in log


@pytest.mark.parametrize(("override", "word"), [
    ("data.part_size=2000", "data.part_size=2000"),
    ("matrix.shadows=[resnet21]", "unknown architecture 'resnet21'"),
    ("defense.dropout=1.5", "defense.dropout"),
    ("lira.shadows=1", "lira.shadows"),
    ("attacks=[bogus]", "attacks"),
    ("defense.dp.noise_multiplier=null", "exactly one of"),
    ("label_only.records=1000", "label_only.records=1000"),
    ("arch=cnn4", "no dropout option"),
    ("arch=resnet21", "unknown architecture 'resnet21'"),
    ("defense.early_stopping_epochs=15", "early_stopping_epochs=15 must be fewer"),
    ("train.epochs=-1", "train.epochs:"),
    ("train.lr=0", "train.lr:"),
    ("shadow.count=0", "shadow.count:"),
    ("shadow.epochs=0", "shadow.epochs:"),
    ("shadow.model=forest", "shadow.model:"),
    ("lira.min_var=0", "lira.min_var:"),
    ("label_only.noise_std=-1", "label_only.noise_std:"),
    ("label_only.noise_samples=3", "noise_samples > 0 needs noise_std > 0"),
    ("threshold.score=entropy", "threshold.score:"),
    ("defense.rounding.decimals=-1", "defense.rounding.decimals:"),
    ("defense.top_k.k=0", "defense.top_k.k:"),
    ("defense.dp.max_grad_norm=0", "defense.dp.max_grad_norm:"),
    ("defense.dp.delta=1", "defense.dp.delta:"),
    ("data.test_size=5", "data.test_size:"),
])
def test_bad_config_is_one_line_exit_2_before_any_training(tmp_path, capsys, override, word):
    code = main(["run", "membership", "--preset", "smoke", "--out", str(tmp_path),
                 "--set", override, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and err.count(word) == 1
    assert not list(tmp_path.glob("*/checkpoints/*"))
