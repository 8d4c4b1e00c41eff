"""The compiled MAML path: its math equals the eager reference (float64), and compiled it stays
as close to a float64 reference as float32 eager is."""

from __future__ import annotations

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


def test_matmul_forward_equals_grouped_convolution_forward():
    theta = expand_params(_theta(0), 3)
    x = _tasks(3, 1)[0]
    assert torch.allclose(cnn4_forward_tasks_matmul(theta, x), cnn4_forward_tasks(theta, x),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize(("steps", "first_order"), [(1, False), (2, False), (1, True)])
def test_functional_meta_gradient_equals_eager_reference(steps, first_order):
    theta, batch = _theta(0), _tasks(3, 0)
    loss, acc, grads = meta_gradient(cnn4_forward_tasks, theta, *batch, 0.4, steps, first_order)
    f_loss, f_acc, f_grads = functional_meta_gradient(cnn4_forward_tasks_matmul, theta, *batch,
                                                      0.4, steps, first_order)
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
