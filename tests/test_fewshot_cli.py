"""`poisonlab run fewshot-backdoor` end to end on the smoke preset: outputs, model reuse, resume,
and bad configs rejected before any work."""

from __future__ import annotations

import json

import pytest

from poisonlab.cli import main
from poisonlab.config import resolve_config
from poisonlab.errors import ConfigError
from poisonlab.evaluation.fewshot import FewShotResult
from poisonlab.experiments import fewshot_backdoor
from poisonlab.runs import Run
from poisonlab.sweeps.summary import metric_names, undeclared_metrics

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
    # every number it writes is one `sweep --metric` accepts before a run
    assert undeclared_metrics(metric_names(metrics), fewshot_backdoor.METRICS) == []
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


def test_metrics_round_trip_through_the_typed_result(smoke_run):
    _, metrics = smoke_run
    own = {k: v for k, v in metrics.items() if k not in ("dataset", "meta_training", "seconds")}
    again = FewShotResult.from_metrics(metrics).metrics()
    assert json.dumps(again) == json.dumps(own)  # same keys, same order, same values
    assert list(metrics)[-3:] == ["dataset", "meta_training", "seconds"]


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


# One out-of-range value per configurable section and setting: refused once, the key named.
SECTION_KEYS = [
    ("data.glyph_classes=10", "data.glyph_classes"), ("model.hidden=0", "model.hidden"),
    ("meta.inner_lr=-1", "meta.inner_lr"), ("meta.meta_lr=0", "meta.meta_lr"),
    ("meta.shots=0", "meta.shots"), ("meta.queries=0", "meta.queries"),
    ("meta.meta_batch=0", "meta.meta_batch"), ("meta.adaptation_steps=0", "meta.adaptation_steps"),
    ("meta.iterations=-1", "meta.iterations"), ("meta.eval_every=0", "meta.eval_every"),
    ("meta.val_tasks=0", "meta.val_tasks"), ("attack.epsilon=-1", "attack.epsilon"),
    ("attack.epsilons=[0.1, -1]", "attack.epsilons.1"), ("attack.epsilons=[]", "attack.epsilons"),
    ("attack.step_size=0", "attack.step_size"), ("attack.iterations=0", "attack.iterations"),
    ("attack.finetune_steps=0", "attack.finetune_steps"),
    ("attack.finetune_lr=0", "attack.finetune_lr"), ("attack.keep_support=-1", "attack.keep_support"),
    ("attack.trigger_batch=oracle", "attack.trigger_batch"),
    ("attack.protocol=oracle", "attack.protocol"), ("attack.tasks=0", "attack.tasks"),
    ("attack.task_batch=0", "attack.task_batch"), ("attack.asp_epsilons=[-1]", "attack.asp_epsilons.0"),
    ("meta.hidden=32", "meta.hidden"),  # moved to model.hidden: an unknown key now
]


@pytest.mark.parametrize("override, key", SECTION_KEYS)
def test_out_of_range_value_is_refused_once_with_its_key(override, key):
    with pytest.raises(ConfigError) as excinfo:
        resolve_config(fewshot_backdoor.Config, fewshot_backdoor.PRESETS, "smoke", None, [override])
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1 and message.startswith("invalid config: ")
    assert message.count(f"{key}:") == 1 and message.count(": ") >= 2, message
    assert message.split(": ")[1] == key, message


def test_out_of_range_meta_value_at_the_cli_names_the_key(tmp_path, capsys):
    code = main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(tmp_path),
                 "--set", "meta.inner_lr=-1", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "meta.inner_lr" in err


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    saved = []
    original = Run.save_state

    def interrupt_after_first(self, name, state):
        path = original(self, name, state)
        if name != "meta_state":  # the attack pieces are kept in the run too
            return path
        saved.append(state["iteration"])
        if len(saved) == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Run, "save_state", interrupt_after_first)
    assert main(["run", "fewshot-backdoor", "--preset", "smoke", "--out", str(tmp_path), *FAST]) != 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    # --no-compile is allowed on a resume: the same math, only eager
    code = main(["run", "fewshot-backdoor", "--out", str(tmp_path), "--resume", run_dir.name, "-q",
                 "--no-compile"])
    assert code == 0
    assert saved == [5, 10]  # continued at iteration 5, not from scratch
    assert "resuming meta-training at iteration 5" in (run_dir / "log.txt").read_text()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


def test_no_compile_is_refused_by_an_experiment_that_compiles_nothing(tmp_path, capsys):
    code = main(["run", "badencoder", "--preset", "smoke", "--out", str(tmp_path), "--no-compile",
                 "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--no-compile" in err
    assert not any(tmp_path.iterdir())  # refused before a run folder opened
