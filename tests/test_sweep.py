"""`poisonlab sweep`: one run per grid point × seed, grouped in the index, re-runs compute nothing,
an interrupted sweep (a Ctrl-C, a killed worker) resumes to every point recorded once, bad input
is one line and exit 2 before any work, and the summary's mean/CI are those of the runs.

The experiment is the few-shot smoke preset cut down further; its per-run report (figures, tested
in test_fewshot_cli.py) is replaced by a no-op here, since it costs most of a tiny run's time.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from scipy import stats

from poisonlab.cli import main
from poisonlab.experiments import fewshot_backdoor
from poisonlab.runs import Run, list_runs, rebuild_index
from poisonlab.runs.index import headline_metrics, index_path
from poisonlab.sweeps import Sweep, find_point_runs, run_sweep, sweep_folder
from poisonlab.sweeps.driver import driving

EXPERIMENT = "fewshot-backdoor"
FAST = ["meta.iterations=4", "meta.eval_every=2", "meta.val_tasks=4", "meta.meta_batch=4",
        "attack.tasks=4", "attack.task_batch=4", "attack.epsilons=[0.3]",
        "attack.asp_epsilons=[0.3]", "attack.iterations=2", "model.hidden=8"]
GRID = "attack.keep_support=0,0.1"
LABELS = [f"attack.keep_support={v} seed={s}" for v in ("0.0", "0.1") for s in (0, 1)]


def cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    patch = pytest.MonkeyPatch()
    patch.setattr(sys, "stdout", out)
    patch.setattr(sys, "stderr", err)
    try:
        code = main(args)
    finally:
        patch.undo()
    return code, out.getvalue(), err.getvalue()


def sweep_args(root: Path, *extra: str, grid: str = GRID, seeds: str = "0-1") -> list[str]:
    sets = [a for s in FAST for a in ("--set", s)]
    return ["sweep", EXPERIMENT, "--grid", grid, "--seeds", seeds, "--preset", "smoke", *sets,
            "--out", str(root), "-q", "--json", *extra]


def plan(grid: dict | None = None, seeds: str = "0-1") -> Sweep:
    return Sweep(EXPERIMENT, grid or {"attack.keep_support": [0, 0.1]}, seeds, preset="smoke",
                 sets=FAST)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/run.json"))


def info(path: Path) -> dict:
    return json.loads((path / "run.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def no_run_reports():
    patch = pytest.MonkeyPatch()
    patch.setattr(fewshot_backdoor, "write_report", lambda *args, **kwargs: None)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    code, out, err = cli(sweep_args(root))
    assert code == 0, err
    return root, json.loads(out.strip().splitlines()[-1])


def test_every_point_is_one_run_grouped_as_the_sweep(swept, capsys):
    root, result = swept
    dirs = run_dirs(root)
    assert len(dirs) == 4 and sorted(result["points"]) == sorted(LABELS)
    assert {d.name for d in dirs} == set(result["points"].values())
    for d in dirs:
        record = info(d)
        assert record["status"] == "completed" and record["sweep"]["id"] == result["sweep"]
        assert result["points"][record["sweep"]["point"]] == d.name
        assert record["seed"] == record["sweep"]["seed"]
    rows = list_runs(root, sweep=result["sweep"])
    assert sorted(r["sweep_point"] for r in rows) == sorted(LABELS)
    assert main(["runs", "list", "--out", str(root), "--sweep", result["sweep"][:-3], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["run_id"] for r in listed["runs"]} == {d.name for d in dirs}
    assert main(["runs", "list", "--out", str(root), "--sweep", "no-such-sweep"]) == 2
    assert capsys.readouterr().err.strip() == f"error: no sweep 'no-such-sweep' under {root}"
    folder = Path(result["path"])
    assert (folder / "sweep.json").is_file() and Path(result["report"]).is_file()
    assert list((folder / "figures").glob("*.png"))


def test_the_index_rebuilt_from_the_directories_keeps_the_sweep(swept):
    root, result = swept
    before = {r["run_id"]: r["sweep_point"] for r in list_runs(root, sweep=result["sweep"])}
    index_path(root).unlink()
    assert rebuild_index(root) == 4
    assert {r["run_id"]: r["sweep_point"] for r in list_runs(root, sweep=result["sweep"])} == before


def test_an_index_from_before_sweeps_gains_the_sweep_columns(tmp_path):
    with sqlite3.connect(index_path(tmp_path)) as conn:  # the schema before sweeps
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, experiment TEXT NOT NULL, "
                     "config_hash TEXT, status TEXT NOT NULL, started TEXT, ended TEXT, "
                     "headline TEXT, path TEXT NOT NULL)")
    sweep = plan()
    run = Run.create(EXPERIMENT, sweep.point_config(sweep.points[0]), root=tmp_path,
                     sweep={"id": sweep.id, "point": sweep.points[0].label})
    assert [(r["run_id"], r["sweep_point"]) for r in list_runs(tmp_path, sweep=sweep.id)] == [
        (run.id, sweep.points[0].label)]
    assert not list(tmp_path.glob("index.sqlite.bad-*"))  # migrated, not set aside and rebuilt


def test_a_rerun_finds_the_sweep_and_computes_nothing(swept, monkeypatch):
    root, first = swept
    mtimes = {d.name: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(root)}
    calls = []
    real = fewshot_backdoor.run
    monkeypatch.setattr(fewshot_backdoor, "run", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, out, err = cli(sweep_args(root))
    assert code == 0, err
    again = json.loads(out.strip().splitlines()[-1])
    assert again["sweep"] == first["sweep"] and again["points"] == first["points"]
    assert again["computed"] == [] and calls == []
    assert {d.name: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(root)} == mtimes
    assert again["summary"] == first["summary"]


def test_the_summary_is_the_mean_and_ci_of_the_runs_over_seeds(swept):
    root, result = swept
    summary = result["summary"]
    assert summary["metrics"] == list(headline_metrics(
        json.loads((root / result["points"][LABELS[0]] / "metrics.json").read_text())))
    assert len(summary["cells"]) == 2
    for cell in summary["cells"]:
        value = cell["values"]["attack.keep_support"]
        assert cell["seeds"] == [0, 1]
        for metric in summary["metrics"]:
            per_run = [headline_metrics(json.loads(
                (root / result["points"][f"attack.keep_support={value} seed={s}"]
                 / "metrics.json").read_text()))[metric] for s in (0, 1)]
            assert cell["per_seed"][metric] == per_run
            assert cell["mean"][metric] == pytest.approx(statistics.mean(per_run))
            half = stats.t.ppf(0.975, 1) * statistics.stdev(per_run) / math.sqrt(2)
            assert cell["ci95"][metric] == pytest.approx(half, abs=1e-12)


def test_a_chosen_metric_is_summarised_and_an_unknown_one_named(swept):
    root, _ = swept
    code, out, _ = cli(sweep_args(root, "--metric", "clean_accuracy_ci95"))
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["summary"]["metrics"] == ["clean_accuracy_ci95"]
    code, _, err = cli(sweep_args(root, "--metric", "no_such_metric"))
    assert code == 2 and err.strip().startswith("error: --metric no_such_metric")
    assert len(err.strip().splitlines()) == 1 and len(run_dirs(root)) == 4


@pytest.mark.parametrize("args, needle", [
    (["--grid", "attack.nope=1,2"], "attack.nope"),
    (["--grid", "attack.keep_support=0.1,-1"], "attack.keep_support=-1"),
    (["--grid", "attack.keep_support="], "no values"),
    ([], "grid is empty"),
    (["--grid", "seed=1,2"], "--seeds"),
    (["--grid", GRID, "--seeds", "0-x"], "--seeds"),
    (["--grid", GRID, "--seeds", "3-1"], "--seeds"),
    (["--grid", GRID, "--seeds", "0-100000000000"], "more than 10000 seeds"),
    (["--grid", GRID, "--set", "meta.iterations=-1"], "meta.iterations"),
    (["--grid", GRID, "--backend", "spark"], "backend"),
    (["--grid", GRID, "--ray-address", "127.0.0.1:1"], "--ray-address needs --backend ray"),
    (["--grid", GRID, "--ray-cpus", "2"], "--ray-cpus needs --backend ray"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_work(tmp_path, args, needle):
    root = tmp_path / "runs"
    code, _, err = cli(["sweep", EXPERIMENT, "--preset", "smoke", "--out", str(root), *args])
    assert code == 2 and err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1
    assert not root.exists()


def test_an_unknown_experiment_is_one_line_and_exit_2(tmp_path):
    code, _, err = cli(["sweep", "nope", "--grid", "a=1", "--out", str(tmp_path / "r")])
    assert code == 2 and err.strip() == (
        "error: unknown experiment 'nope' (known: backdoor-defense, badencoder, "
        "fewshot-backdoor, membership, metapoison)")


def test_the_identity_is_the_experiment_base_config_grid_and_seeds():
    assert plan().id == plan().id
    assert plan({"attack.keep_support": [0.0, 0.1]}).id == plan().id  # values as the Config reads them
    assert plan(seeds="0-2").id != plan().id
    assert plan({"attack.keep_support": [0.1, 0]}).id != plan().id
    other = Sweep(EXPERIMENT, {"attack.keep_support": [0, 0.1]}, "0-1", preset="smoke",
                  sets=[*FAST, "attack.iterations=3"])
    assert other.id != plan().id


def test_a_second_driver_of_the_same_sweep_stops_before_any_work(tmp_path):
    folder = sweep_folder(tmp_path, plan().id)
    folder.mkdir(parents=True)
    with driving(folder):
        code, _, err = cli(sweep_args(tmp_path))
    assert code == 2 and f"error: sweep {plan().id} is being run by pid {os.getpid()}" in err
    assert len(err.strip().splitlines()) == 1 and run_dirs(tmp_path) == []


def _interrupt_second_attack(monkeypatch) -> None:
    """The second point's trial is interrupted after meta-training checkpointed (a Ctrl-C)."""
    real = fewshot_backdoor.evaluate_attacks
    calls = []

    def attack(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fewshot_backdoor, "evaluate_attacks", attack)


def test_an_interrupted_sweep_resumes_with_every_point_recorded_once(tmp_path, monkeypatch,
                                                                     swept):
    plain_root, plain = swept
    sweep = plan()
    with monkeypatch.context() as patch:
        _interrupt_second_attack(patch)
        with pytest.raises(KeyboardInterrupt):
            run_sweep(sweep, tmp_path)
    runs = find_point_runs(sweep, tmp_path)
    status = {label: info(path)["status"] for label, path in runs.items()}
    assert status == dict(zip(LABELS, ["completed", "interrupted", "created", "created"],
                              strict=True))
    first_mtime = (runs[LABELS[0]] / "metrics.json").stat().st_mtime_ns

    outcome = run_sweep(sweep, tmp_path)
    assert outcome.computed == LABELS[1:] and outcome.skipped == LABELS[:1]
    assert {label: p.name for label, p in outcome.runs.items()} == {
        label: p.name for label, p in runs.items()}
    assert len(run_dirs(tmp_path)) == 4
    assert (runs[LABELS[0]] / "metrics.json").stat().st_mtime_ns == first_mtime
    resumed = info(runs[LABELS[1]])
    assert resumed["status"] == "completed" and len(resumed["resumed_at"]) == 1
    assert "resuming meta-training at iteration 4" in (runs[LABELS[1]] / "log.txt").read_text()
    assert sorted(r["sweep_point"] for r in list_runs(tmp_path, sweep=sweep.id)) == sorted(LABELS)
    for label in LABELS:  # nothing lost: the same numbers as the uninterrupted sweep
        expected = json.loads((plain_root / plain["points"][label] / "metrics.json").read_text())
        assert outcome.metrics[label]["headline"] == pytest.approx(expected["headline"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_driver_killed_half_way_loses_nothing_and_recomputes_nothing(tmp_path, monkeypatch):
    sweep = plan()
    pid = os.fork()
    if pid == 0:  # the driver: kill -9 itself in the second point's attack
        try:
            real = fewshot_backdoor.evaluate_attacks
            calls = []

            def attack(*args, **kwargs):
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)

            fewshot_backdoor.evaluate_attacks = attack
            run_sweep(sweep, tmp_path)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    runs = find_point_runs(sweep, tmp_path)
    assert [info(runs[label])["status"] for label in LABELS] == [
        "completed", "running", "created", "created"]
    done = (runs[LABELS[0]] / "metrics.json").stat().st_mtime_ns
    outcome = run_sweep(sweep, tmp_path)  # the lock died with the driver
    assert outcome.computed == LABELS[1:] and len(run_dirs(tmp_path)) == 4
    assert (runs[LABELS[0]] / "metrics.json").stat().st_mtime_ns == done
    assert all(info(runs[label])["status"] == "completed" for label in LABELS)
    assert len(info(runs[LABELS[1]])["resumed_at"]) == 1


class ForkExecutor:
    """A test double of a cluster executor: every piece in a forked child process, retried when
    the child dies without a result (as Ray retries a task whose worker was killed)."""

    name = "fork"

    def __init__(self, retries: int = 2):
        self.retries = retries
        self.attempts: dict[str, int] = {}

    def map(self, fn, items, *, shared=None, cpus=1, description=""):  # noqa: ARG002
        for key, item in items.items():
            yield key, self._run(key, fn, item, dict(shared or {}))

    def _run(self, key, fn, item, shared):
        for _ in range(self.retries + 1):
            self.attempts[key] = self.attempts.get(key, 0) + 1
            fd, result = tempfile.mkstemp(suffix=".json")
            os.close(fd)
            pid = os.fork()
            if pid == 0:  # the child: never returns into pytest
                code = 1
                try:
                    Path(result).write_text(json.dumps(fn(item, **shared)))
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            text = Path(result).read_text()
            os.unlink(result)
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                return json.loads(text)
            if os.WIFEXITED(status):
                raise RuntimeError(f"piece {key} failed")
        raise RuntimeError(f"piece {key} was killed {self.retries + 1} times")

    def close(self):
        return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_worker_costs_only_its_piece(tmp_path, monkeypatch):
    marker = tmp_path / "killed-once"
    real = fewshot_backdoor.evaluate_attacks

    def attack(*args, **kwargs):  # the first worker to reach the attack dies (kill -9)
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(fewshot_backdoor, "evaluate_attacks", attack)
    sweep = plan(seeds="0")
    executor = ForkExecutor()
    outcome = run_sweep(sweep, tmp_path / "runs", executor=executor)
    first, second = (p.label for p in sweep.points)
    assert executor.attempts == {first: 2, second: 1}
    assert outcome.computed == [first, second] and len(run_dirs(tmp_path / "runs")) == 2
    killed, other = info(outcome.runs[first]), info(outcome.runs[second])
    assert killed["status"] == other["status"] == "completed"
    assert len(killed["resumed_at"]) == 1 and other["resumed_at"] == []
    assert sorted(r["sweep_point"] for r in list_runs(tmp_path / "runs", sweep=sweep.id)) == [
        first, second]


# --- Ray: skipped until poisonlab.executors.ray_backend exists -------------------------------

def _ray_session(request):
    pytest.importorskip("ray")
    pytest.importorskip("poisonlab.executors.ray_backend")
    try:
        request.getfixturevalue("ray_local")
    except pytest.FixtureLookupError:
        pytest.skip("the session's ray_local fixture is not defined")


def _kill_one_running_point(root: Path, stop: threading.Event, killed: list[int]) -> None:
    """kill -9 the first worker seen running a point: the pid its run.json records."""
    while not stop.is_set() and not killed:
        for path in run_dirs(root):
            try:
                record = info(path)
            except (OSError, ValueError):
                continue  # being replaced right now
            pid = record.get("pid")
            if record.get("status") == "running" and pid and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.05)


def test_ray_gives_the_local_numbers_and_a_killed_worker_costs_only_its_piece(
        request, tmp_path, swept):
    _ray_session(request)
    plain_root, plain = swept
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_running_point, args=(tmp_path, stop, killed),
                              daemon=True)
    killer.start()
    try:
        code, out, err = cli(sweep_args(tmp_path, "--backend", "ray", seeds="0"))
    finally:
        stop.set()
        killer.join()
    assert code == 0, err
    assert killed, "no Ray worker running a sweep point was seen"
    result = json.loads(out.strip().splitlines()[-1])
    labels = [label for label in LABELS if label.endswith("seed=0")]
    assert sorted(result["points"]) == labels and len(run_dirs(tmp_path)) == 2
    records = [info(d) for d in run_dirs(tmp_path)]
    assert all(r["status"] == "completed" for r in records)
    assert sorted(len(r["resumed_at"]) for r in records) == [0, 1]
    assert sorted(r["sweep_point"] for r in list_runs(tmp_path, sweep=result["sweep"])) == labels
    for label in labels:  # the same numbers as the local sweep's points
        ours = json.loads((tmp_path / result["points"][label] / "metrics.json").read_text())
        local = json.loads((plain_root / plain["points"][label] / "metrics.json").read_text())
        assert ours["headline"] == pytest.approx(local["headline"], abs=1e-6)


def test_a_metric_the_experiment_never_writes_is_refused_before_any_run(tmp_path):
    """`--metric atack_success_rate` (a typo) matches none of the experiment's METRICS: refused
    before any point runs, with the name it was probably meant to be."""
    code, _, err = cli(sweep_args(tmp_path, "--metric", "atack_success_rate"))
    assert code == 2 and err.strip().startswith("error: --metric atack_success_rate"), err
    assert "did you mean attack_success_rate" in err and len(err.strip().splitlines()) == 1
    assert run_dirs(tmp_path) == []


def test_an_admitted_metric_absent_from_the_runs_stops_after_the_first_point(tmp_path):
    """A name the patterns admit (meta_training.*) but no run holds: the first point's metrics
    name it, and that point stays recorded for the next call."""
    code, _, err = cli(sweep_args(tmp_path, "--metric", "meta_training.no_such_number"))
    assert code == 2 and err.strip().startswith("error: --metric meta_training.no_such_number")
    done = [p for p in run_dirs(tmp_path) if info(p)["status"] == "completed"]
    assert len(done) == 1
    code, out, _ = cli(sweep_args(tmp_path))
    assert code == 0 and len(json.loads(out.strip().splitlines()[-1])["computed"]) == 3


def test_a_point_breaking_a_rule_across_sections_stops_the_sweep_before_any_work(tmp_path):
    """The membership smoke preset stops early after 4 epochs: a point training the target 3
    epochs breaks that rule, which is a rule across two sections, and is named before the
    first point runs."""
    root = tmp_path / "runs"
    code, _, err = cli(["sweep", "membership", "--preset", "smoke", "--out", str(root),
                        "--grid", "train.epochs=20,3"])
    assert code == 2 and err.startswith("error: --grid point train.epochs=3 seed=0: invalid config")
    assert "early_stopping_epochs=4 must be fewer" in err and len(err.strip().splitlines()) == 1
    assert not root.exists()


def test_a_rule_across_sections_is_judged_on_the_combination_not_the_base():
    """train.epochs=3 breaks the base config's early-stopping rule, but every point of this grid
    also sets early_stopping_epochs=2: the grid is valid and its values keep their types."""
    sweep = Sweep("membership", {"train.epochs": [20, 3],
                                 "defense.early_stopping_epochs": [2]}, preset="smoke")
    assert [dict(p.values)["train.epochs"] for p in sweep.points] == [20, 3]
    assert sweep.point_config(sweep.points[1]).train.epochs == 3
