"""Run records: directory layout, lifecycle statuses, resume, the SQLite index and its CLI."""

from __future__ import annotations

import json
import multiprocessing
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import Field

from poisonlab.cli import main
from poisonlab.config import BaseConfig, config_hash
from poisonlab.errors import RunError
from poisonlab.runs import (
    Run,
    compare_runs,
    get_run,
    list_runs,
    rebuild_index,
    runs_root,
)
from poisonlab.runs import index as index_module
from poisonlab.runs import record as record_module
from poisonlab.runs.index import index_path

ID_PATTERN = re.compile(r"^demo-\d{8}-\d{6}-[0-9a-f]{4}$")


class DemoConfig(BaseConfig):
    lr: float = Field(0.01, gt=0)
    ways: int = 5


def index_status(root: Path, run_id: str) -> str:
    with sqlite3.connect(index_path(root)) as conn:
        return conn.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()[0]


def run_json(run: Run) -> dict:
    return json.loads((run.path / "run.json").read_text())


def test_create_lays_out_the_directory(tmp_path):
    cfg = DemoConfig(seed=7, lr=0.1)
    run = Run.create("demo", cfg, root=tmp_path)
    assert ID_PATTERN.match(run.id) and run.path == tmp_path / run.id
    assert (run.seed, run.experiment, run.resumed) == (7, "demo", False)
    assert {p.name for p in run.path.iterdir()} == {
        "config.yaml", "run.json", "log.txt", "checkpoints", "figures",
    }  # fmt: skip
    assert yaml.safe_load((run.path / "config.yaml").read_text()) == {
        "seed": 7,
        "lr": 0.1,
        "ways": 5,
    }
    info = run_json(run)
    assert info["status"] == "created" and info["config_hash"] == config_hash(cfg)
    assert info["torch"] == torch.__version__ and info["poisonlab_version"]
    assert info["python"] == ".".join(map(str, sys.version_info[:3]))
    assert {"git_revision", "device", "started", "ended"} <= info.keys()
    assert index_status(tmp_path, run.id) == "created"


def test_root_comes_from_the_environment_then_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path / "env-runs"))
    assert Run.create("demo", DemoConfig()).path.parent == tmp_path / "env-runs"
    monkeypatch.delenv("POISONLAB_RUNS")
    monkeypatch.chdir(tmp_path)
    assert runs_root() == Path("runs")
    assert Run.create("demo", DemoConfig()).path.parent.resolve() == tmp_path / "runs"


def test_git_absent_is_not_an_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    record_module._source_revision.cache_clear()
    try:
        assert record_module.environment()["git_revision"] is None
    finally:
        record_module._source_revision.cache_clear()


def test_bad_experiment_name(tmp_path):
    with pytest.raises(RunError, match="bad experiment name '../x'"):
        Run.create("../x", DemoConfig(), root=tmp_path)


def test_completed_run_records_log_metrics_and_index(tmp_path):
    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        assert run_json(run)["status"] == "running"
        assert index_status(tmp_path, run.id) == "running"
        run.log("epoch 1\nloss 0.3")
        run.write_metrics({"acc": torch.tensor(0.75), "asr": {"mean": 0.5}, "curve": [1, 2]})
    info = run_json(run)
    assert info["status"] == "completed" and info["ended"] is not None
    assert index_status(tmp_path, run.id) == "completed"
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics == {"acc": 0.75, "asr": {"mean": 0.5}, "curve": [1, 2]}
    log = (run.path / "log.txt").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in log] == [
        "started",
        "epoch 1 loss 0.3",
        "status: completed",
    ]
    assert list_runs(tmp_path)[0]["headline"] == {"acc": 0.75}
    assert not list(run.path.glob(".*.tmp"))


def test_explicit_headline_metrics(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    run.write_metrics({"headline": {"clean_acc": 0.9, "asr": {"mean": 0.8}}, "acc": 0.1})
    assert list_runs(tmp_path)[0]["headline"] == {"clean_acc": 0.9, "asr.mean": 0.8}


def test_keyboard_interrupt_marks_interrupted_and_reraises(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    with pytest.raises(KeyboardInterrupt), run:
        raise KeyboardInterrupt
    assert run_json(run)["status"] == "interrupted"
    assert index_status(tmp_path, run.id) == "interrupted"


def test_exception_marks_failed_with_one_line_error(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    with pytest.raises(ValueError), run:
        raise ValueError("bad batch\nsecond line")
    info = run_json(run)
    assert info["status"] == "failed" and info["error"] == "ValueError: bad batch"
    assert "failed: ValueError: bad batch" in (run.path / "log.txt").read_text()
    assert index_status(tmp_path, run.id) == "failed"


def test_sigterm_handler_is_installed_and_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Run.create("demo", DemoConfig(), root=tmp_path):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


SLEEPER = textwrap.dedent(
    """
    import sys, time
    from poisonlab.config import BaseConfig
    from poisonlab.runs import Run
    with Run.create("sleepy", BaseConfig(), root=sys.argv[1]) as run:
        print(run.id, flush=True)
        time.sleep(120)
    """
)


def test_sigterm_in_a_subprocess_marks_interrupted(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SLEEPER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id.startswith("sleepy-"), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    info = json.loads((tmp_path / run_id / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert index_status(tmp_path, run_id) == "interrupted"
    assert "interrupted: terminated by SIGTERM" in (tmp_path / run_id / "log.txt").read_text()


def test_resume_reopens_the_same_directory(tmp_path):
    run = Run.create("demo", DemoConfig(seed=3, lr=0.2), root=tmp_path)
    with pytest.raises(KeyboardInterrupt), run:
        run.save_checkpoint("last", {"w": torch.ones(2)}, {"epoch": 4})
        raise KeyboardInterrupt
    again = Run.open(run.id, root=tmp_path)
    assert again.path == run.path and again.resumed and again.id == run.id
    assert again.config == {"seed": 3, "lr": 0.2, "ways": 5} and again.seed == 3
    assert DemoConfig.model_validate(again.config) == DemoConfig(seed=3, lr=0.2)
    tensors, meta = again.load_checkpoint("last")
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {"epoch": 4}
    with again:
        pass
    info = run_json(again)
    assert info["status"] == "completed" and len(info["resumed_at"]) == 1
    assert "resumed" in (run.path / "log.txt").read_text()
    assert len(list(tmp_path.glob("demo-*"))) == 1


def test_open_by_path_and_prefix(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    assert Run.open(str(run.path)).path == run.path
    assert Run.open(run.id[:-2], root=tmp_path).id == run.id


def test_unknown_and_ambiguous_ids(tmp_path):
    Run.create("demo", DemoConfig(), root=tmp_path)
    Run.create("demo", DemoConfig(), root=tmp_path)
    with pytest.raises(RunError, match=f"^no run 'nope' under {tmp_path}$"):
        Run.open("nope", root=tmp_path)
    with pytest.raises(RunError, match="run id prefix 'demo-' is ambiguous"):
        get_run(tmp_path, "demo-")


def test_checkpoints_and_state(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    assert run.load_checkpoint("none") is None and run.load_state("none") is None
    path = run.save_checkpoint("w", {"a": torch.arange(3.0)})
    assert path == run.path / "checkpoints" / "w.safetensors"
    assert run.load_checkpoint("w")[1] == {}
    run.save_state("train", {"step": 5, "weights": {"a": torch.ones(1)}})
    state = run.load_state("train")
    assert state["step"] == 5 and torch.equal(state["weights"]["a"], torch.ones(1))
    with pytest.raises(RunError, match="was not written by save_state"):
        run.load_state("w")
    with pytest.raises(RunError, match="bad checkpoint name '../w'"):
        run.save_checkpoint("../w", {})


def test_figure_path(tmp_path):
    run = Run.create("demo", DemoConfig(), root=tmp_path)
    assert run.figure_path("acc.png") == run.path / "figures" / "acc.png"
    with pytest.raises(RunError, match="bad figure name"):
        run.figure_path("a/b.png")


def test_finish_rejects_unknown_status(tmp_path):
    with pytest.raises(RunError, match="unknown run status 'done'"):
        Run.create("demo", DemoConfig(), root=tmp_path).finish("done")


def _create_runs(root: str, count: int, barrier) -> None:
    barrier.wait()
    for i in range(count):
        with Run.create("demo", DemoConfig(seed=i), root=root) as run:
            run.write_metrics({"acc": i / count})


def test_concurrent_processes_all_reach_the_index(tmp_path):
    # fork starts at once (spawn would re-import torch in every worker); no connection is open
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    workers, per_worker = 4, 8
    barrier = ctx.Barrier(workers)
    procs = [
        ctx.Process(target=_create_runs, args=(str(tmp_path), per_worker, barrier))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    rows = list_runs(tmp_path)
    assert len(rows) == workers * per_worker == len(list(tmp_path.glob("demo-*")))
    assert {r["status"] for r in rows} == {"completed"}


def test_rebuild_index_from_directories(tmp_path):
    with Run.create("demo", DemoConfig(), root=tmp_path) as a:
        a.write_metrics({"acc": 0.5})
    b = Run.create("other", DemoConfig(), root=tmp_path)
    index_path(tmp_path).unlink()
    assert rebuild_index(tmp_path) == 2
    rows = {r["run_id"]: r for r in list_runs(tmp_path)}
    assert rows[a.id]["status"] == "completed" and rows[a.id]["headline"] == {"acc": 0.5}
    assert rows[b.id]["status"] == "created"
    index_path(tmp_path).unlink()
    assert [r["run_id"] for r in list_runs(tmp_path, experiment="other")] == [b.id]


def test_list_runs_on_missing_root(tmp_path):
    assert list_runs(tmp_path / "nothing") == []


def test_get_run_and_compare(tmp_path):
    with Run.create("demo", DemoConfig(lr=0.1), root=tmp_path) as a:
        a.write_metrics({"acc": 0.5, "asr": {"mean": 0.9}})
        a.save_checkpoint("final", {"w": torch.ones(1)})
    with Run.create("demo", DemoConfig(lr=0.2), root=tmp_path) as b:
        b.write_metrics({"acc": 0.6})
    shown = get_run(tmp_path, a.id)
    assert shown["metrics"]["asr"]["mean"] == 0.9 and shown["checkpoints"] == ["final"]
    assert shown["config"]["lr"] == 0.1 and shown["status"] == "completed"
    table = compare_runs(tmp_path, [a.id, b.id])
    assert table["columns"] == ["key", a.id, b.id]
    assert table["rows"] == [
        ["experiment", "demo", "demo"],
        ["status", "completed", "completed"],
        ["metrics.acc", 0.5, 0.6],
        ["metrics.asr.mean", 0.9, None],
        ["config.lr", 0.1, 0.2],
    ]


# --- CLI ----------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with Run.create("demo", DemoConfig(lr=0.1), root=tmp_path) as a:
        a.write_metrics({"acc": 0.5})
    with Run.create("demo", DemoConfig(lr=0.2), root=tmp_path) as b:
        b.write_metrics({"acc": 0.625})
    return tmp_path, a.id, b.id


def test_cli_list(two_runs, capsys):
    root, a, b = two_runs
    assert main(["runs", "list", "--out", str(root)]) == 0
    out = capsys.readouterr().out
    assert a in out and b in out and "acc=0.625" in out and "completed" in out
    assert main(["runs", "list", "--out", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["run_id"] for r in data["runs"]] == [a, b]
    assert main(["runs", "list", "--out", str(root), "-e", "membership"]) == 0
    assert "no runs under" in capsys.readouterr().out
    assert main(["runs", "list", "--out", str(root), "-e", "demo"]) == 0  # a name of its own
    assert a in capsys.readouterr().out
    assert main(["runs", "list", "--out", str(root), "-e", "other"]) == 2
    assert "unknown experiment 'other' (known: backdoor-defense" in capsys.readouterr().err


def test_cli_show(two_runs, capsys):
    root, a, _ = two_runs
    assert main(["runs", "show", a, "--out", str(root)]) == 0
    out = capsys.readouterr().out
    assert a in out and "lr: 0.1" in out and "0.5" in out
    assert main(["runs", "show", a[:-1], "--out", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data["id"] == a and data["metrics"] == {"acc": 0.5}


def test_cli_compare(two_runs, capsys):
    root, a, b = two_runs
    assert main(["runs", "compare", a, b, "--out", str(root)]) == 0
    out = capsys.readouterr().out
    assert "metrics.acc" in out and "0.625" in out and "config.lr" in out
    assert main(["runs", "compare", a, b, "--out", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ["metrics.acc", 0.5, 0.625] in data["rows"]


@pytest.mark.parametrize("command", ["show", "compare"])
def test_cli_unknown_id_exits_2_with_one_line(two_runs, capsys, command):
    root, a, _ = two_runs
    args = ["runs", command, "nope"] + ([a] if command == "compare" else []) + ["--out", str(root)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"error: no run 'nope' under {root}\n"




def _sigterm_is_default(_: int) -> bool:
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_pool_workers_forked_inside_a_run_keep_the_default_sigterm(tmp_path):
    """Decoding pools fork inside a run and stop their idle workers with SIGTERM: workers that
    inherited the run's SIGTERM→KeyboardInterrupt handler printed tracebacks (seen on a CIFAR-10
    load) and could hang the pool's shutdown."""
    from poisonlab.data.image_folder import run_chunks

    with Run.create("demo", DemoConfig(), root=tmp_path):
        assert run_chunks(_sigterm_is_default, [0, 1, 2, 3], workers=2) == [True] * 4


@pytest.mark.parametrize("damage", [b"", b"this is not an sqlite database" * 40, "dangling"],
                         ids=["empty", "not a database", "dangling symlink"])
def test_an_unusable_index_is_set_aside_and_rebuilt(tmp_path, capsys, damage):
    from poisonlab.runs import list_runs
    from poisonlab.runs.index import index_path

    class Cfg(BaseConfig):
        pass

    ids = []
    for _ in range(2):
        with Run.create("demo", Cfg(), root=tmp_path) as run:
            run.write_metrics({"accuracy": 0.5})
            ids.append(run.id)
    for side in ("-wal", "-shm"):
        index_path(tmp_path).with_name("index.sqlite" + side).unlink(missing_ok=True)
    if damage == "dangling":  # `runs list` listed nothing, each run index write warned
        index_path(tmp_path).unlink()
        index_path(tmp_path).symlink_to(tmp_path / "gone" / "index.sqlite")
    else:
        index_path(tmp_path).write_bytes(damage)
    assert sorted(r["run_id"] for r in list_runs(tmp_path)) == sorted(ids)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rebuilt" in err
    assert len(list(tmp_path.glob("index.sqlite.bad-*"))) == (1 if damage else 0)
    with Run.create("demo", Cfg(), root=tmp_path) as run:  # and new runs are indexed again
        run.write_metrics({"accuracy": 0.7})
    assert len(list_runs(tmp_path)) == 3


@pytest.mark.parametrize("headline", ["{not json", "[1, 2]"])
def test_a_damaged_index_row_is_rebuilt_from_the_directories(tmp_path, capsys, headline):
    from poisonlab.runs import list_runs

    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    with sqlite3.connect(index_path(tmp_path)) as conn:
        conn.execute("UPDATE runs SET headline = ?", (headline,))
    rows = list_runs(tmp_path)
    assert [r["run_id"] for r in rows] == [run.id] and isinstance(rows[0]["headline"], dict)
    assert "damaged row" in capsys.readouterr().err


@pytest.mark.parametrize("skeleton", ["{{{", '{"__tensor__": "nonexistent"}', "5"])
def test_a_damaged_saved_state_is_a_run_error_naming_the_file(tmp_path, skeleton):
    from poisonlab.runs.checkpoints import load_weights, save_weights

    run = Run.create("demo", DemoConfig(), root=tmp_path)
    path = run.save_state("train-x", {"epoch": 3, "w": torch.ones(2)})
    tensors, header = load_weights(path)
    header["poisonlab.state"] = skeleton
    del header["poisonlab.sha256"]  # as a file of an older version: no checksum to catch it
    save_weights(path, tensors, header)
    if skeleton == "5":  # a plain number is a valid skeleton: read back as itself
        assert run.load_state("train-x") == 5
        return
    with pytest.raises(RunError, match=r"train-x\.safetensors is damaged"):
        run.load_state("train-x")


@pytest.mark.parametrize("damage", ["shape", "dtype", "value", "header"])
def test_a_checkpoint_changed_after_it_was_written_is_refused(tmp_path, damage):
    """Weights of another shape or type, a changed value or header in a saved state or
    checkpoint: a RunError naming the file (resuming would otherwise crash inside torch or
    silently go on from wrong numbers); an untouched file still loads."""
    from poisonlab.runs.checkpoints import load_weights, save_weights

    run = Run.create("demo", DemoConfig(), root=tmp_path)
    paths = [run.save_state("train-x", {"epoch": 3, "w": torch.ones(2, 3)}),
             run.save_checkpoint("model-x", {"w": torch.ones(2, 3)}, {"accuracy": 0.5})]
    assert run.load_state("train-x")["epoch"] == 3 and run.load_checkpoint("model-x")
    for path in paths:
        tensors, header = load_weights(path)
        key = next(iter(tensors))
        if damage == "shape":
            tensors[key] = torch.ones(3, 2)
        elif damage == "dtype":
            tensors[key] = torch.ones(2, 3, dtype=torch.int8)
        elif damage == "value":
            tensors[key] = tensors[key].clone().fill_(2.0)
        else:
            header = {k: v + " " if k != "poisonlab.sha256" else v
                      for k, v in header.items()}
        save_weights(path, tensors, header)
    for load, name in ((run.load_state, "train-x"), (run.load_checkpoint, "model-x")):
        with pytest.raises(RunError, match=rf"{name}\.safetensors is damaged .*checksum"):
            load(name)


def test_an_unreadable_run_json_is_named_in_one_line(tmp_path, capsys):
    from poisonlab.runs import list_runs

    with Run.create("demo", DemoConfig(), root=tmp_path) as good:
        good.write_metrics({"accuracy": 0.5})
    bad = Run.create("demo", DemoConfig(), root=tmp_path)
    (bad.path / "run.json").write_text('{"id": "x", "status": ')
    rebuild_index(tmp_path)  # the index no longer lists it: it cannot be read
    for said_before in (False, True, False):  # once per command (process), not per listing
        if not said_before:
            index_module._SAID.clear()  # what a new process starts with
        assert [r["run_id"] for r in list_runs(tmp_path)] == [good.id]
        err = capsys.readouterr().err
        if said_before:
            assert err == ""
        else:
            assert err.count("\n") == 1 and bad.id in err and "unreadable run.json" in err


@pytest.mark.parametrize(("truth", "indexed"), [("completed", "running"),
                                                ("interrupted", "completed"),
                                                ("failed", "created")])
def test_runs_list_rewrites_an_index_row_that_contradicts_run_json(tmp_path, truth, indexed):
    """The index is a mirror of the run directories: a row whose status is not its run.json's
    (a failed index write, a directory copied in) is rewritten from run.json, headline too."""
    from poisonlab.runs import index
    from poisonlab.runs.record import mark_stale

    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        run.write_metrics({"acc": 0.5})
    run.finish(truth)
    index.record_run(tmp_path, {**run.info, "status": indexed}, {}, run.path)
    assert index_status(tmp_path, run.id) == indexed
    assert mark_stale(tmp_path) == []
    assert index_status(tmp_path, run.id) == truth
    assert list_runs(tmp_path)[0]["headline"] == {"acc": 0.5}


_DEEP = "[" * 5000 + "1" + "]" * 5000


@pytest.mark.parametrize("damage", [
    {"status": ["x"]}, {"experiment": {"a": 1}}, {"started": 3}, {"sweep": "s"}, "deep",
], ids=["status-list", "experiment-dict", "started-int", "sweep-str", "nested-5000"])
def test_one_damaged_run_json_does_not_break_the_listing_of_the_others(tmp_path, capsys, damage):
    """run.json is read as untrusted input: a field of the wrong type or absurd nesting makes
    that run unlisted (one warning line naming it), never an internal error, and the index is
    not set aside over and over (a binding error is not a damaged database)."""
    from poisonlab.runs import list_runs

    with Run.create("demo", DemoConfig(), root=tmp_path) as good:
        good.write_metrics({"accuracy": 0.5})
    with Run.create("demo", DemoConfig(), root=tmp_path) as bad:
        pass
    record = json.loads((bad.path / "run.json").read_text())
    text = (json.dumps(record)[:-1] + f', "x": {_DEEP}}}' if damage == "deep"
            else json.dumps({**record, **damage}))
    (bad.path / "run.json").write_text(text)
    (tmp_path / "index.sqlite").unlink()  # the next listing rebuilds from the directories
    assert main(["runs", "list", "--out", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [good.id]
    assert err.count("\n") == 1 and bad.id in err and "Traceback" not in err
    assert not list(tmp_path.glob("index.sqlite.bad-*"))
    assert [r["run_id"] for r in list_runs(tmp_path)] == [good.id]


def test_a_metrics_json_nested_thousands_deep_is_one_line_exit_2(tmp_path, capsys):
    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    (run.path / "metrics.json").write_text('{"deep": ' + _DEEP + "}")
    assert main(["runs", "show", run.id, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err and "nested too deeply" in err


def test_runs_show_marks_a_run_whose_process_is_gone_as_interrupted(tmp_path, capsys):
    """SIGKILL leaves run.json saying running with its lock free: `runs show` says interrupted
    (as `runs list` does), not running for ever."""
    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        pass
    record = json.loads((run.path / "run.json").read_text())
    (run.path / "run.json").write_text(json.dumps({**record, "status": "running", "pid": 999999}))
    assert main(["runs", "show", run.id, "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "interrupted"
    assert json.loads((run.path / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "- a\n- b\n"], ids=["deep", "list"])
def test_a_damaged_config_yaml_of_a_run_is_one_line_exit_2(tmp_path, capsys, text):
    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        pass
    (run.path / "config.yaml").write_text(text)
    assert main(["runs", "show", run.id, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.yaml" in err


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_metrics_json_that_is_no_small_regular_file_is_one_line_exit_2(tmp_path, capsys, kind):
    """A run's files are read as untrusted input: a FIFO in place of metrics.json would block
    `runs show` for ever and /dev/zero or a huge file would fill memory; each is refused by
    name before it is read."""
    import os

    from poisonlab.config import TEXT_FILE_LIMIT

    with Run.create("demo", DemoConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    metrics = run.path / "metrics.json"
    metrics.unlink()
    if kind == "fifo":
        os.mkfifo(metrics)
    elif kind == "device":
        metrics.symlink_to("/dev/zero")
    else:
        with open(metrics, "wb") as f:
            f.truncate(TEXT_FILE_LIMIT + 1)  # sparse: no disk used
    assert main(["runs", "show", run.id, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "metrics.json" in err
    assert ("too large" if kind == "huge" else "not a regular file") in err
