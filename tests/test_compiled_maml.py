"""The compiled MAML path: its math equals the eager reference (float64), and compiled it stays
as close to a float64 reference as float32 eager is."""

from __future__ import annotations

import functools

import pytest
import torch

from poisonlab.models import build_model
from poisonlab.models.cnn4 import cnn4_forward_tasks, cnn4_forward_tasks_matmul
from poisonlab.training.compiled_maml import compiled_meta_gradient, functional_meta_gradient
from poisonlab.training.maml import expand_params, meta_gradient


def _tasks(tasks: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, 10, 1, 28, 28, generator=g, dtype=dtype)
    qx = torch.rand(tasks, 10, 1, 28, 28, generator=g, dtype=dtype)
    y = torch.arange(5).repeat_interleave(2).expand(tasks, -1).contiguous()
    return sx, y, qx, y


def _theta(seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    return {k: v.detach().to(dtype) for k, v in build_model("cnn4", 5, 1).state_dict().items()}


@pytest.mark.parametrize("bn", ["batch_norm", "var_mean"])
def test_matmul_forward_equals_grouped_convolution_forward(bn):
    theta = expand_params(_theta(0), 3)
    x = _tasks(3, 1)[0]
    assert torch.allclose(cnn4_forward_tasks_matmul(theta, x, bn), cnn4_forward_tasks(theta, x),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize(("steps", "first_order", "bn"), [
    (1, False, "batch_norm"), (2, False, "batch_norm"), (1, True, "batch_norm"),
    (1, False, "var_mean"), (2, False, "var_mean")])
def test_functional_meta_gradient_equals_eager_reference(steps, first_order, bn):
    theta, batch = _theta(0), _tasks(3, 0)
    loss, acc, grads = meta_gradient(cnn4_forward_tasks, theta, *batch, 0.4, steps, first_order)
    f_loss, f_acc, f_grads = functional_meta_gradient(
        functools.partial(cnn4_forward_tasks_matmul, bn=bn), theta, *batch, 0.4, steps,
        first_order)
    assert abs(loss - float(f_loss)) < 1e-12
    assert torch.equal(acc, f_acc)
    for a, b in zip(grads, f_grads.values(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-11)


@pytest.mark.slow
def test_compiled_meta_gradient_is_as_close_to_float64_as_eager_float32():
    """Compiles (minutes on a CPU). float32 rounding alone moves this meta-gradient's largest
    relative entry by 1e-3..1e-2 depending on the seed; the compiled graph may reorder sums but
    must stay within 4× the eager float32 error over the same seeds."""
    compiled = compiled_meta_gradient(cnn4_forward_tasks_matmul)
    eager_err, comp_err = [], []
    for seed in range(3):
        theta64, batch64 = _theta(seed), _tasks(8, seed)
        ref = meta_gradient(cnn4_forward_tasks, theta64, *batch64, 0.5)[2]
        theta = {k: v.float() for k, v in theta64.items()}
        batch = tuple(t.float() if t.is_floating_point() else t for t in batch64)
        eager = meta_gradient(cnn4_forward_tasks, theta, *batch, 0.5)[2]
        comp = list(compiled(theta, *batch, 0.5)[2].values())
        scale = [r.abs().max() for r in ref]
        eager_err.append(max(float((e.double() - r).abs().max() / s)
                             for e, r, s in zip(eager, ref, scale, strict=True) if s > 1e-4))
        comp_err.append(max(float((c.double() - r).abs().max() / s)
                            for c, r, s in zip(comp, ref, scale, strict=True) if s > 1e-4))
    assert max(comp_err) <= 4 * max(eager_err), (comp_err, eager_err)


def _meta_run(compile_mode: str, iterations: int = 4):
    import dataclasses

    from poisonlab.data.glyphs import load_glyphs
    from poisonlab.training.meta_trainer import MetaTrainConfig, meta_train

    bank = load_glyphs(num_classes=30, samples=10, seed=0)
    bank = dataclasses.replace(bank, images=bank.images.double())
    train, val = bank.subset(range(20)), bank.subset(range(20, 30))
    torch.manual_seed(0)
    theta = {k: v.detach().double()
             for k, v in build_model("cnn4", 3, 1, hidden=8).state_dict().items()}
    s = MetaTrainConfig(ways=3, shots=2, queries=2, meta_batch=4, iterations=iterations,
                        eval_every=iterations, val_tasks=4, compile=compile_mode)
    logged: list[str] = []
    state = meta_train(cnn4_forward_tasks, theta, train, val, s, progress=False,
                       log=logged.append, compiled_forward=cnn4_forward_tasks_matmul)
    return theta, state, logged


def test_meta_train_with_compile_on_takes_the_graph_path_and_trains_as_eager(monkeypatch):
    """The wiring, without paying for a compile: the graph is the functional meta-gradient run
    uncompiled, which must train θ as the eager path does (the same sampled tasks). In float64:
    the convolution biases before BatchNorm have a zero gradient up to rounding, and Adam turns
    float32 rounding noise (near its ε) into full-size steps; θ moves by ~1e-2, so 1e-8 is agreement."""
    from poisonlab.training import compiled_maml

    calls = []

    def uncompiled(forward):
        def graph(*args):
            calls.append(1)
            return functional_meta_gradient(forward, *args)
        return graph

    monkeypatch.setattr(compiled_maml, "compiled_meta_gradient", uncompiled)
    start, eager, eager_log = _meta_run("off")
    _, graph, graph_log = _meta_run("on")
    assert len(calls) == 4 and any("compiled graph" in m for m in graph_log)
    assert not any("compiled graph" in m for m in eager_log)
    for k in start:
        assert not torch.equal(graph.theta[k], start[k])
        assert torch.allclose(graph.theta[k], eager.theta[k], rtol=0, atol=1e-8), k


def test_compile_auto_compiles_only_long_cpu_runs_and_on_needs_a_compiled_form():
    from poisonlab.errors import ConfigError
    from poisonlab.training.meta_trainer import COMPILE_BREAK_EVEN, MetaTrainConfig, use_compiled

    assert MetaTrainConfig().compile == "off"  # the default until an idle measurement settles it
    auto, on, off = (MetaTrainConfig(compile=c) for c in ("auto", "on", "off"))
    assert use_compiled(auto, COMPILE_BREAK_EVEN, "cpu", True)
    assert not use_compiled(auto, COMPILE_BREAK_EVEN - 1, "cpu", True)
    assert not use_compiled(auto, COMPILE_BREAK_EVEN, "cpu", False)
    assert not use_compiled(auto, COMPILE_BREAK_EVEN, "cuda", True)
    assert use_compiled(on, 1, "cpu", True) and not use_compiled(off, 10**6, "cpu", True)
    with pytest.raises(ConfigError, match="meta.compile=on"):
        use_compiled(on, 1, "cpu", False)
    with pytest.raises(ConfigError, match="compile"):
        MetaTrainConfig(compile="yes")


def test_a_failing_compile_falls_back_to_eager_under_auto_and_raises_under_on(monkeypatch):
    from poisonlab.training import compiled_maml, meta_trainer

    def broken(forward):
        def graph(*args):
            raise RuntimeError("no C++ compiler")
        return graph

    monkeypatch.setattr(compiled_maml, "compiled_meta_gradient", broken)
    monkeypatch.setattr(meta_trainer, "COMPILE_BREAK_EVEN", 1)
    start, eager, _ = _meta_run("off")
    _, auto, log = _meta_run("auto")
    assert any("compiling failed (RuntimeError)" in m for m in log)
    for k in start:
        assert torch.equal(auto.theta[k], eager.theta[k])
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _meta_run("on")
