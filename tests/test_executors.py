"""Executors: `local` and `ray` give the same numbers, a lost worker costs only its piece, a
piece's poisonlab error reaches the driver as itself, and bad backend options are one line, exit 2.
Actors: the same results in actor order on both backends, state kept between calls, the shared
and common inputs put into Ray's object store once, errors as themselves, a dead actor one line.

The Ray tests share one local instance per session (fixture `ray_local` in conftest.py); the
piece functions live at module level here so Ray's workers can import them.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import sys
import uuid
from pathlib import Path

import pytest
import torch

from poisonlab.cli import main
from poisonlab.errors import ConfigError, RunError
from poisonlab.executors import LocalExecutor, get_executor, run_missing
from test_membership_experiment import run_cli

# The membership smoke preset cut down: shadow models of two architectures (the second through
# the architecture matrix) and four LiRA reference models, a few epochs on 100-record parts.
MEMBERSHIP = ["run", "membership", "--preset", "smoke", "--json", "-q",
              "--set", "data.part_size=100", "--set", "train.epochs=6", "--set", "shadow.count=2",
              "--set", "attacks=[shadow,lira_online,lira_offline,threshold]",
              "--set", "defense.defenses=[none]", "--set", "matrix.targets=[tiny_cnn]",
              "--set", "matrix.shadows=[small_cnn]", "--set", "matrix.dropout=false"]
PIECES = {"shadow-tiny_cnn-0", "shadow-tiny_cnn-1", "shadow-small_cnn-0", "shadow-small_cnn-1",
          "lira-00", "lira-01", "lira-02", "lira-03"}


def scale(item: int, *, factor: torch.Tensor) -> tuple[int, float]:
    return item, float(factor.sum()) * item


def fail_on(item: int, *, bad: int) -> int:
    if item == bad:
        raise ConfigError(f"piece {item} has a bad setting")
    return item


def die_once(item: tuple[str, str], *, victim: str) -> str:
    """Note every attempt; the victim's first attempt kills its own worker process (kill -9)."""
    key, folder = item
    Path(folder, f"attempt-{key}-{uuid.uuid4().hex}").touch()
    marker = Path(folder, "killed")
    if key == victim and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return key.upper()


class Tally:
    """An actor: a running total, scaled by a tensor every actor shares."""

    def __init__(self, start: float, *, scale: torch.Tensor) -> None:
        self.total, self.scale = start, scale

    def add(self, value: float, *, step: torch.Tensor) -> tuple[float, int]:
        self.total += value * float(self.scale.sum()) + float(step.sum())
        return self.total, torch.get_num_threads()

    def pid(self) -> int:
        return os.getpid()

    def refuse(self, *, why: str) -> None:
        raise ConfigError(f"actor at {self.total:g} refuses: {why}")

    def die(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class Picky(Tally):
    def __init__(self, start: float, *, scale: torch.Tensor) -> None:
        if start < 0:
            raise ConfigError(f"start {start:g} is negative")
        super().__init__(start, scale=scale)


def _tally_calls(actors) -> list:
    """Two rounds of `add` with per-actor values and one common tensor: the state carries over."""
    first = actors.call("add", [{"value": 1.0}, {"value": 2.0}, {"value": 3.0}],
                        step=torch.ones(2))
    second = actors.call("add", [{"value": 10.0}, {"value": 0.0}, {"value": 1.0}],
                         step=torch.zeros(2))
    return [total for total, _ in first + second]


# 100, 200, 300 plus value × 4 (the shared scale) plus 2 (the common step), then again
TALLY = [106.0, 210.0, 314.0, 146.0, 210.0, 318.0]
TALLY_INITS = [{"start": 100.0}, {"start": 200.0}, {"start": 300.0}]


# --- local --------------------------------------------------------------------------------

def test_local_executor_yields_in_the_given_order_with_the_shared_inputs():
    items = {k: i for i, k in enumerate(["c", "a", "b", "d"], start=1)}
    got = list(LocalExecutor().map(scale, items, shared={"factor": torch.ones(3)}))
    assert got == [("c", (1, 3.0)), ("a", (2, 6.0)), ("b", (3, 9.0)), ("d", (4, 12.0))]


def test_run_missing_records_every_piece_and_skips_an_empty_set():
    recorded: dict = {}
    run_missing(None, scale, {"x": 2, "y": 5}, recorded.__setitem__,
                shared={"factor": torch.tensor([0.5])})
    assert recorded == {"x": (2, 1.0), "y": (5, 2.5)}
    run_missing(None, fail_on, {}, recorded.__setitem__, shared={"bad": 0})
    assert len(recorded) == 2


def test_local_actors_are_objects_of_this_process_called_in_actor_order():
    with LocalExecutor().start_actors(Tally, TALLY_INITS, shared={"scale": torch.ones(4)}) as actors:
        assert len(actors) == 3
        assert _tally_calls(actors) == TALLY
        assert actors.call("pid") == [os.getpid()] * 3
        with pytest.raises(ValueError, match="2 entries for 3 actors"):
            actors.call("add", [{"value": 1.0}] * 2, step=torch.ones(1))
    assert len(actors) == 0


def test_ray_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(ConfigError, match=r"pip install poisonlab\[ray\]"):
        get_executor("ray")


def test_only_the_ray_backend_imports_ray():
    """The core imports and works without Ray: no other module imports it, anywhere in it."""
    src = Path(__file__).resolve().parents[1] / "src" / "poisonlab"
    importers = set()
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "ray" for n in names):
                importers.add(path.relative_to(src).as_posix())
    assert importers == {"executors/ray_backend.py"}


@pytest.mark.parametrize(("args", "words"), [
    (["--backend", "nope"], ["unknown backend 'nope'", "local, ray"]),
    (["--ray-address", "127.0.0.1:6379"], ["--ray-address needs --backend ray"]),
    (["--ray-cpus", "2"], ["--ray-cpus needs --backend ray"]),
    # Ray took half a minute to fail to start a node of 10^11 CPUs: an internal error, exit 1
    (["--backend", "ray", "--ray-cpus", "99999999999"], ["--ray-cpus must be between 1 and"]),
])
def test_bad_backend_options_are_one_line_exit_2_without_a_run(tmp_path, capsys, args, words):
    code = main([*MEMBERSHIP, "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert all(w in err for w in words), err
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_unreachable_ray_address_is_one_line_exit_2_quickly(tmp_path, capsys):
    pytest.importorskip("ray")
    code = main([*MEMBERSHIP, "--out", str(tmp_path), "--backend", "ray",
                 "--ray-address", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "127.0.0.1:1" in err
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


# --- ray ----------------------------------------------------------------------------------

def test_ray_puts_the_shared_inputs_once_and_yields_every_piece(ray_local, monkeypatch):
    import ray

    from poisonlab.executors.ray_backend import RayExecutor

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    items = {f"p{i}": i for i in range(5)}
    with RayExecutor() as executor:
        got = dict(executor.map(scale, items, shared={"factor": torch.ones(1000)}))
    assert got == {f"p{i}": (i, 1000.0 * i) for i in range(5)}
    assert len(puts) == 1 and puts[0].shape == (1000,)


def test_a_pieces_config_error_arrives_as_config_error(ray_local):
    from poisonlab.executors.ray_backend import RayExecutor

    executor = RayExecutor()
    with pytest.raises(ConfigError) as info:
        list(executor.map(fail_on, {"a": 1, "b": 2}, shared={"bad": 2}))
    assert type(info.value) is ConfigError and str(info.value) == "piece 2 has a bad setting"


def test_a_piece_larger_than_the_local_instance_is_refused_not_left_waiting(ray_local):
    from poisonlab.executors.ray_backend import RayExecutor

    with pytest.raises(ConfigError, match="a piece needs 3 CPUs, the local Ray instance has 2"):
        list(RayExecutor().map(scale, {"a": 1}, shared={"factor": torch.ones(1)}, cpus=3))


def test_a_killed_worker_costs_only_its_piece(ray_local, tmp_path):
    from poisonlab.executors.ray_backend import RayExecutor

    keys = ["a", "b", "c", "d"]
    items = {k: (k, str(tmp_path)) for k in keys}
    got = list(RayExecutor().map(die_once, items, shared={"victim": "b"}))
    assert sorted(got) == [(k, k.upper()) for k in keys]  # every piece once, the victim too
    attempts = [p.name.split("-")[1] for p in tmp_path.glob("attempt-*")]
    assert (tmp_path / "killed").exists()
    assert sorted(attempts) == ["a", "b", "b", "c", "d"]  # only the victim ran again


def test_a_piece_lost_more_often_than_retried_is_one_line_naming_it(ray_local, tmp_path):
    from poisonlab.executors.ray_backend import RayExecutor

    with pytest.raises(RunError, match=r"^piece b: its Ray worker was lost \(\w+\) on each of 1 attempt"):
        list(RayExecutor(max_retries=0).map(die_once, {"b": ("b", str(tmp_path))},
                                            shared={"victim": "b"}))


def test_ray_actors_give_the_local_results_in_their_own_processes(ray_local, monkeypatch):
    import ray

    from poisonlab.executors.ray_backend import RayExecutor

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    with RayExecutor().start_actors(Tally, TALLY_INITS[:2], shared={"scale": torch.ones(4)}) as two:
        assert len(puts) == 1  # the shared scale, once for both constructors
        first = two.call("add", [{"value": 1.0}, {"value": 2.0}], step=torch.ones(2))
        assert len(puts) == 2  # the common step, once for both actors
        assert first == [(106.0, 1), (210.0, 1)]  # the actor's 1 CPU is its 1 torch thread
        assert two.call("add", [{"value": 10.0}, {"value": 0.0}], step=torch.zeros(2)) == \
            [(146.0, 1), (210.0, 1)]
        pids = two.call("pid")
        assert len(set(pids)) == 2 and os.getpid() not in pids
    with RayExecutor().start_actors(Tally, TALLY_INITS[:1], shared={"scale": torch.ones(4)},
                                    cpus=2) as one:
        assert one.call("add", [{"value": 1.0}], step=torch.ones(2)) == [(106.0, 2)]


def test_ray_actor_errors_arrive_as_themselves(ray_local):
    from poisonlab.executors.ray_backend import RayExecutor

    executor = RayExecutor()
    with pytest.raises(ConfigError) as info:
        executor.start_actors(Picky, [{"start": 1.0}, {"start": -2.0}],
                              shared={"scale": torch.ones(1)})
    assert type(info.value) is ConfigError and str(info.value) == "start -2 is negative"
    with executor.start_actors(Tally, [{"start": 5.0}], shared={"scale": torch.ones(1)}) as actors:
        with pytest.raises(ConfigError) as info:
            actors.call("refuse", why="no reason")
        assert type(info.value) is ConfigError
        assert str(info.value) == "actor at 5 refuses: no reason"
        assert actors.call("add", value=1.0, step=torch.zeros(1)) == [(6.0, 1)]  # still alive


def test_a_dead_ray_actor_is_one_line_naming_it(ray_local):
    from poisonlab.executors.ray_backend import RayExecutor

    with RayExecutor().start_actors(Tally, TALLY_INITS[:2], shared={"scale": torch.ones(1)}) as actors:
        with pytest.raises(RunError, match=r"^actor 0 of 2 \(Tally\) was lost \(\w+\) in die; "
                                           r"actors are not restarted") as info:
            actors.call("die", [{}, {}])
        assert "\n" not in str(info.value)


def test_ray_actors_larger_than_the_local_instance_are_refused(ray_local):
    from poisonlab.executors.ray_backend import RayExecutor

    with pytest.raises(ConfigError, match="3 actors of 1 CPUs need 3, the local Ray instance has 2"):
        RayExecutor().start_actors(Tally, TALLY_INITS, shared={"scale": torch.ones(1)})


def test_rays_token_authentication_notice_reaches_no_one(ray_local):
    """Starting a local instance, Ray enables token authentication and logs a WARNING line to
    stderr saying so; a run's stderr carries only poisonlab's own lines. Ray's own notice, emitted
    by Ray's own function, reaches none of its logger's handlers; its other warnings do."""
    import logging

    from ray._private.authentication import authentication_token_setup as setup

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    setup.logger.addHandler(handler)
    try:
        setup._warn_token_auth_enabled()
        setup.logger.warning("another warning")
    finally:
        setup.logger.removeHandler(handler)
    assert seen == ["another warning"]


@pytest.fixture(scope="module")
def membership_runs(ray_local, tmp_path_factory):
    """The cut-down membership study run locally, then on ray: (root, run dirs, metrics)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for backend in ("local", "ray"):
        code, stdout = run_cli([*MEMBERSHIP, "--out", str(root), "--backend", backend])
        assert code == 0, stdout
        metrics = json.loads(stdout.strip().splitlines()[-1])
        (run_dir,) = [p for p in root.iterdir() if p.is_dir() and p not in out.values()]
        out[backend] = run_dir
        out[f"{backend}-metrics"] = metrics
    return root, out


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-6), path
    else:
        assert a == b, path


def _model(line: str) -> str:
    """The model a log line `<time> <model>: ...` is about."""
    return line.split(" ", 1)[1].split(": ")[0]


def test_membership_gives_the_same_metrics_on_local_and_ray(membership_runs):
    _, out = membership_runs
    local, distributed = dict(out["local-metrics"]), dict(out["ray-metrics"])
    assert "pieces" in distributed.pop("seconds") and "pieces" not in local.pop("seconds")
    _close(local, distributed)
    # The local study trained the same models itself, one after the other.
    log = (out["local"] / "log.txt").read_text()
    assert {n for n in PIECES if f"{n}: trained" in log} == PIECES and "ray piece" not in log


def test_ray_trains_exactly_the_models_the_study_then_loads(membership_runs):
    _, out = membership_runs
    lines = (out["ray"] / "log.txt").read_text().splitlines()
    by_piece = {_model(line) for line in lines if line.endswith("(ray piece)")}
    trained_later = {_model(line) for line in lines
                     if ": trained" in line and not line.endswith("(ray piece)")}
    loaded = {_model(line) for line in lines if line.endswith("model loaded from the run")}
    assert by_piece == PIECES and not trained_later & PIECES
    assert PIECES <= loaded


def test_resumed_ray_run_trains_only_the_missing_pieces(membership_runs):
    root, out = membership_runs
    run_dir = out["ray"]
    (run_dir / "checkpoints" / "model-lira-02.safetensors").unlink()
    code, stdout = run_cli(["run", "membership", "--resume", run_dir.name, "--out", str(root),
                            "--json", "-q", "--backend", "ray"])
    assert code == 0, stdout
    log = (run_dir / "log.txt").read_text().split("resumed")[-1]
    assert [_model(line) for line in log.splitlines()
            if line.endswith("(ray piece)")] == ["lira-02"]
    again = json.loads(stdout.strip().splitlines()[-1])
    again.pop("seconds")
    _close({k: v for k, v in out["local-metrics"].items() if k != "seconds"}, again)
