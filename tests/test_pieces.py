"""The experiments' pieces on an executor: the same metrics whatever the executor and order, and
a resumed run recomputes only the pieces it had not recorded.

`ReversedPickling` is a stand-in for Ray that needs no Ray: it runs the pieces in the reverse
order, each on its own pickled copy of the function, its input and the shared inputs, and hands
back a pickled copy of the result. A piece that depends on the pieces run before it (the global
random state they leave behind) or cannot be pickled fails here as it would on Ray.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import torch

from poisonlab.config import BaseConfig, resolve_config, validate_config
from poisonlab.evaluation.pieces import ThreadExecutor, run_pieces
from poisonlab.executors import LocalExecutor
from poisonlab.experiments import get_experiment
from poisonlab.runs import Run


class _Tiny(BaseConfig):
    pass


def _copy(obj: Any) -> Any:
    return pickle.loads(pickle.dumps(obj))


class ReversedPickling:
    """The pieces in reverse order, through a pickle round trip; logs the keys it ran."""

    name = "reversed-pickling"

    def __init__(self) -> None:
        self.ran: list[str] = []

    def map(self, fn: Callable, items: Mapping[str, Any], *, shared: Mapping[str, Any] | None = None,
            cpus: int = 1, description: str = "") -> Iterator[tuple[str, Any]]:
        for key, item in reversed(list(items.items())):
            self.ran.append(key)
            yield key, _copy(_copy(fn)(_copy(item), **_copy(dict(shared or {}))))

    def close(self) -> None:
        return None


class Recording(LocalExecutor):
    """The local executor, logging the keys it ran."""

    def __init__(self) -> None:
        self.ran: list[str] = []

    def map(self, fn, items, **kwargs):
        self.ran += list(items)
        return super().map(fn, items, **kwargs)


def _strip(metrics: Any) -> Any:
    if isinstance(metrics, dict):
        return {k: _strip(v) for k, v in metrics.items() if "seconds" not in k}
    if isinstance(metrics, list):
        return [_strip(v) for v in metrics]
    return metrics


def _assert_same(a: Any, b: Any, where: str = "metrics") -> None:
    """Equal up to float error (what different thread counts may change)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)), \
            f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# Each experiment's smoke preset, cut further: enough pieces to reorder, seconds to run.
CASES = {
    "fewshot-backdoor": (
        ["meta.iterations=4", "meta.eval_every=2", "meta.val_tasks=4", "attack.tasks=6",
         "attack.task_batch=2", "attack.iterations=2"],
        ["fewshot-attack-c2-e1"]),
    "backdoor-defense": (
        ["data.train_size=300", "data.test_size=100", "train.epochs=2", "nc.samples=16",
         "nc.inversion.steps=5", "defense.inversion.steps=5", "defense.finetune.epochs=2",
         "figures.points=50"],
        ["result-badnets", "model-badnets", "model-badnets-mcl"]),
    "metapoison": (
        ["victims.train.epochs=1", "data.test_size=50", "metapoison.craft_steps=1",
         "gradient_matching.iterations=2", "victims.trials=1"],
        ["victim-metapoison-convnet_bn-t1-tiny_cnn-0"]),
}


def _run(name: str, sets: list[str], executor, run: Run | None = None) -> tuple[Run, dict]:
    exp = get_experiment(name)
    if run is None:
        cfg = resolve_config(exp.Config, exp.PRESETS, "smoke", None, sets)
        run = Run.create(name, cfg)
    else:
        run = Run.open(run.path)
        cfg = validate_config(exp.Config, run.config)
    with run:
        metrics = exp.run(cfg, run, None, progress=False, executor=executor)
    return run, metrics


@pytest.mark.parametrize("name", list(CASES))
def test_reordered_pickled_pieces_give_the_local_metrics_and_a_resume_recomputes_one(name):
    sets, recorded_piece = CASES[name]
    local = Recording()
    _, expected = _run(name, sets, local)
    reordered = ReversedPickling()
    run, got = _run(name, sets, reordered)
    assert len(set(local.ran)) > 1 and reordered.ran != local.ran  # the order did change
    _assert_same(_strip(got), _strip(expected))

    for checkpoint in recorded_piece:
        path = run.checkpoint_path(checkpoint)
        assert path.exists(), checkpoint
        path.unlink()
    again = Recording()
    _, resumed = _run(name, sets, again, run)
    assert len(again.ran) == 1, again.ran  # only the piece whose record was deleted
    _assert_same(_strip(resumed), _strip(expected))


def _square(item: int, *, offset: int) -> int:
    return item * item + offset


def test_run_pieces_loads_what_is_recorded_and_records_the_rest_in_item_order():
    recorded = {"b": 100}
    saved, done = [], []
    out = run_pieces(ThreadExecutor(2), _square, {"a": 1, "b": 2, "c": 3, "d": 4},
                     load=recorded.get, save=lambda k, r: saved.append((k, r)),
                     done=lambda k, r: done.append(k), shared={"offset": 1})
    assert list(out.items()) == [("a", 2), ("b", 100), ("c", 10), ("d", 17)]
    assert sorted(saved) == [("a", 2), ("c", 10), ("d", 17)]  # the recorded piece is not rerun
    assert sorted(done) == ["a", "b", "c", "d"]


def test_a_state_file_survives_pickling_and_reads_what_the_run_saved(tmp_path):
    run = Run.create("pieces-test", _Tiny(), root=tmp_path)
    run.save_state("train-x", {"epoch": 3, "w": torch.ones(2)})
    handle = _copy(run.state_file("train-x"))
    state = handle.load()
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.ones(2))
    handle.discard()
    assert run.load_state("train-x") is None


@pytest.mark.parametrize("name", list(CASES))
def test_ray_gives_the_local_metrics(name, ray_local):
    """The same pieces as Ray tasks (the session's local Ray instance, 2 workers)."""
    from poisonlab.executors.ray_backend import RayExecutor

    sets, _ = CASES[name]
    _, expected = _run(name, sets, LocalExecutor())
    with RayExecutor() as ray_executor:
        _, got = _run(name, sets, ray_executor)
    _assert_same(_strip(got), _strip(expected))
