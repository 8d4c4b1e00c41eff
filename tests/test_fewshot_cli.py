"""`poisonlab run fewshot-backdoor` end to end on the smoke preset: outputs, model reuse, resume,
and bad configs rejected before any work."""

from __future__ import annotations

import json

import pytest

from poisonlab.cli import main
from poisonlab.runs import Run

FAST = ["--set", "meta.iterations=10", "--set", "meta.eval_every=5", "--set", "attack.tasks=8",
        "--set", "attack.epsilons=[0.1, 0.3]", "--set", "attack.iterations=3", "-q"]


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    capture = pytest.MonkeyPatch()
    import io
    import sys

    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(root), "--json", *FAST])
    capture.undo()
    assert code == 0, buf.getvalue()
    return root, last_json(buf.getvalue())


def test_smoke_run_writes_metrics_figures_report(smoke_run):
    root, metrics = smoke_run
    assert 0 <= metrics["clean_accuracy"] <= 1 and metrics["clean_accuracy_ci95"] >= 0
    assert [r["epsilon"] for r in metrics["per_epsilon"]] == [0.1, 0.3]
    for row in metrics["per_epsilon"]:
        for key in ("backdoor_accuracy", "attack_success_rate", "asp_accuracy"):
            assert 0 <= row[key] <= 1 and row[f"{key}_ci95"] >= 0
    assert 0 <= metrics["asp_accuracy"] <= 1
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    for name in ("metrics.json", "config.yaml", "run.json", "log.txt", "report.html",
                 "checkpoints/model.safetensors", "figures/pgd_loss.png",
                 "figures/ba_asr_vs_epsilon.png", "figures/poisoned_examples.png"):
        assert (run_dir / name).exists(), name
    assert "data:image/png;base64" in (run_dir / "report.html").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_model_from_a_run_is_attacked_without_training(smoke_run, capsys):
    root, first = smoke_run
    (run_dir,) = [p for p in root.iterdir() if p.is_dir()]
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(root), "--json",
                 "--model", run_dir.name, *FAST])
    assert code == 0
    metrics = last_json(capsys.readouterr().out)
    assert metrics["meta_training"] == {"source": run_dir.name}
    assert metrics["clean_accuracy"] == pytest.approx(first["clean_accuracy"])  # same model, tasks
    assert metrics["protocol"] == "transductive"
    assert metrics["clean_trigger_accuracy"] == pytest.approx(first["clean_trigger_accuracy"])


def test_paper_protocol_run_reports_the_lone_trigger(smoke_run, capsys):
    root, first = smoke_run
    run_dir = sorted(p for p in root.iterdir() if p.is_dir())[0]  # every run holds the same model
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(root), "--json",
                 "--model", run_dir.name, "--set", "attack.protocol=paper", *FAST])
    assert code == 0
    metrics = last_json(capsys.readouterr().out)
    assert (metrics["protocol"], metrics["attacker_trigger_batch"]) == ("paper", "alone")
    assert metrics["attacker_keep_support"] == 0
    assert metrics["clean_accuracy"] == pytest.approx(first["clean_accuracy"])  # query batch as before
    assert 0 <= metrics["clean_trigger_accuracy"] <= 1


def test_keep_support_run_records_the_extended_objective(smoke_run, capsys):
    root, first = smoke_run
    run_dir = sorted(p for p in root.iterdir() if p.is_dir())[0]
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(root), "--json",
                 "--model", run_dir.name, "--set", "attack.keep_support=0.5", *FAST])
    assert code == 0
    metrics = last_json(capsys.readouterr().out)
    assert metrics["attacker_keep_support"] == 0.5
    assert metrics["clean_accuracy"] == pytest.approx(first["clean_accuracy"])
    newest = max((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    assert "keep_support" in (newest / "report.html").read_text()


@pytest.mark.parametrize("override, word", [
    ("attack.epsilons=[-0.1]", "epsilon"), ("meta.ways=1", "meta.ways"),
    ("bogus=1", "bogus"), ("meta.ways=50", "ways=50"), ("attack.keep_support=-1", "keep_support"),
])
def test_bad_config_is_one_line_exit_2_before_any_training(tmp_path, capsys, override, word):
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(tmp_path),
                 "--set", override, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and word in err
    assert not list(tmp_path.glob("*/checkpoints/*"))


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    saved = []
    original = Run.save_state

    def interrupt_after_first(self, name, state):
        path = original(self, name, state)
        saved.append(state["iteration"])
        if len(saved) == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Run, "save_state", interrupt_after_first)
    assert main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(tmp_path), *FAST]) != 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    code = main(["run", "fewshot-backdoor", "--out", str(tmp_path), "--resume", run_dir.name, "-q"])
    assert code == 0
    assert saved == [5, 10]  # continued at iteration 5, not from scratch
    assert "resuming meta-training at iteration 5" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
