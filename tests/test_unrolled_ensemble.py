"""The backends of the surrogate ensemble (attacks/unrolled_ensemble.py) compute the same thing:
the grouped-convolution ConvNetBN (models/convnet_bn.py) and vmap against the Python loop."""

from __future__ import annotations

import pytest
import torch

from poisonlab.attacks.unrolled_ensemble import BACKENDS, SurrogateEnsemble, default_backend
from poisonlab.errors import ConfigError
from poisonlab.models import build_model
from poisonlab.models.convnet_bn import grouped_logits


def factory(dtype, widths=(4, 6, 8), size=8):
    return lambda: build_model("convnet_bn", 3, widths=widths, image_size=size).to(dtype)


def _ensemble(backend, dtype, members=3, widths=(4, 6, 8), size=8):
    ens = SurrogateEnsemble(factory(dtype, widths, size), members, backend=backend)
    ens.reinitialise(range(members), range(1, members + 1))
    return ens


def _inputs(dtype, members=3, unroll=2, batch=6, size=8):
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(members, unroll + 1, batch, 3, size, size, generator=g, dtype=dtype)
    ys = torch.randint(0, 3, (members, unroll + 1, batch), generator=g)
    target = torch.rand(1, 3, size, size, generator=g, dtype=dtype)
    lrs = torch.linspace(0.05, 0.2, members, dtype=dtype)
    return xs, ys, target, lrs


def _run(backend, dtype, **kw):
    """Meta-gradient of Σ L_adv in the stages, then two train steps of two members."""
    ens = _ensemble(backend, dtype, **kw)
    xs, ys, target, lrs = _inputs(dtype, members=ens.size, size=kw.get("size", 8))
    xs.requires_grad_(True)
    losses = ens.adversarial_losses(torch.arange(ens.size), xs, ys, target, lrs, 1)
    (meta,) = torch.autograd.grad(losses.sum(), xs)
    who = torch.tensor([0, ens.size - 1])
    for k in range(2):
        ens.train_step(who, xs[who, k].detach(), ys[who, k], target, lrs[who])
    return losses.detach(), meta, ens.params, ens.logits(target)


def test_default_backend():
    assert default_backend(build_model("convnet_bn", 10)) == "grouped"
    assert default_backend(torch.nn.Linear(3, 2)) == "loop"
    assert SurrogateEnsemble(factory(torch.float32), 2).backend == "grouped"
    with pytest.raises(ConfigError, match="backend"):
        SurrogateEnsemble(factory(torch.float32), 2, backend="threads")
    with pytest.raises(ConfigError, match="ConvNetBN"):
        SurrogateEnsemble(lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)),
                          2, backend="grouped")


def test_grouped_logits_equal_separate_forwards():
    nets = [factory(torch.float64)() for _ in range(3)]
    params = {n: torch.stack([dict(net.named_parameters())[n].detach() for net in nets])
              for n, _ in nets[0].named_parameters()}
    x = torch.rand(3, 5, 3, 8, 8, dtype=torch.float64)
    z = grouped_logits(nets[0], params, x)
    for m, net in enumerate(nets):
        net.train()  # batch statistics
        assert torch.allclose(z[m], net(x[m]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "loop"])
def test_backend_equals_loop_float64(backend):
    got, ref = _run(backend, torch.float64), _run("loop", torch.float64)
    for a, b in zip(got[:2], ref[:2], strict=True):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))
    assert got[1].abs().sum() > 0
    for n in ref[2]:
        assert (got[2][n] - ref[2][n]).abs().max() <= 1e-10, n
    assert (got[3] - ref[3]).abs().max() <= 1e-10


def test_grouped_equals_loop_float32_cifar_sized():
    """Full ConvNetBN on 32×32 images: float error only (the meta-gradient passes max-pool and
    ReLU switches that float rounding can flip, so it is compared in norm)."""
    kw = dict(members=2, widths=(16, 32, 32, 64, 64), size=32)
    got, ref = _run("grouped", torch.float32, **kw), _run("loop", torch.float32, **kw)
    assert torch.allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
    assert (got[1] - ref[1]).norm() <= 1e-3 * ref[1].norm()
    for n in ref[2]:
        assert torch.allclose(got[2][n], ref[2][n], rtol=1e-4, atol=1e-5), n
    assert torch.allclose(got[3], ref[3], rtol=1e-4, atol=1e-4)
