"""MAML as task-batched functions: the batched forward, chunked meta-gradients, gradients
through fine-tuning checked against finite differences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from poisonlab.attacks.support_backdoor import SupportBackdoor
from poisonlab.models import build_model
from poisonlab.models.cnn4 import cnn4_forward_tasks
from poisonlab.training.maml import expand_params, meta_gradient, meta_loss, vmap_forward


def tiny(hidden=8, ways=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = build_model("cnn4", ways, 1, hidden=hidden).to(dtype)
    return net, {k: v.detach().clone() for k, v in net.state_dict().items()}


def tasks(b, n, size=12, dtype=torch.float64, seed=1, ways=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, 1, size, size, generator=g, dtype=dtype)
    y = torch.arange(ways).repeat_interleave(n // ways).expand(b, -1)
    return x, y


def test_batched_forward_matches_module_per_task():
    net, theta = tiny(dtype=torch.float32)
    x, _ = tasks(4, 6, dtype=torch.float32)
    out = cnn4_forward_tasks(expand_params(theta, 4), x)
    ref = torch.stack([net(x[i]) for i in range(4)])
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(vmap_forward(net)(expand_params(theta, 4), x), ref, atol=1e-5)


def loop_meta_loss(net, theta, sx, sy, qx, qy, lr):
    total = 0
    for t in range(sx.shape[0]):
        loss = F.cross_entropy(functional_call(net, theta, (sx[t],)), sy[t])
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        adapted = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
        total = total + F.cross_entropy(functional_call(net, adapted, (qx[t],)), qy[t])
    return total / sx.shape[0]


def test_chunked_threaded_meta_gradient_equals_per_task_loop():
    net, theta = tiny()
    sx, sy = tasks(5, 6, seed=2)
    qx, qy = tasks(5, 6, seed=3)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    ref = torch.autograd.grad(loop_meta_loss(net, leaves, sx, sy, qx, qy, 0.4), list(leaves.values()))
    for chunk, workers in [(None, 1), (2, 1), (2, 2), (1, 2)]:
        loss, acc, grads = meta_gradient(cnn4_forward_tasks, theta, sx, sy, qx, qy, 0.4,
                                         chunk=chunk, workers=workers)
        assert acc.shape == (5,)
        for a, b in zip(grads, ref, strict=True):
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_first_order_differs_from_second_order():
    _, theta = tiny()
    sx, sy = tasks(2, 6, seed=4)
    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    g2 = torch.autograd.grad(meta_loss(cnn4_forward_tasks, leaves, sx, sy, sx, sy, 0.5)[0],
                             list(leaves.values()))
    g1 = torch.autograd.grad(meta_loss(cnn4_forward_tasks, leaves, sx, sy, sx, sy, 0.5,
                                       first_order=True)[0], list(leaves.values()))
    assert any(not torch.allclose(a, b) for a, b in zip(g1, g2, strict=True))


def test_trigger_loss_gradient_through_finetuning_matches_finite_differences():
    """d CE(F(trigger, g((X, Y), θ)), target) / dX, through two fine-tuning steps."""
    _, theta = tiny()
    sx, sy = tasks(1, 6, seed=5)
    trig, _ = tasks(1, 3, seed=6)
    attack = SupportBackdoor(cnn4_forward_tasks, theta, epsilon=0.1, finetune_steps=2,
                             finetune_lr=0.3)
    target = torch.tensor([2])
    x = sx.clone().requires_grad_()
    (grad,) = torch.autograd.grad(attack.trigger_loss(x, sy, trig[:, :1], target).sum(), x)
    g = torch.Generator().manual_seed(7)
    for _ in range(6):
        idx = tuple(int(torch.randint(0, s, (1,), generator=g)) for s in sx.shape)
        h = 1e-6
        plus, minus = sx.clone(), sx.clone()
        plus[idx] += h
        minus[idx] -= h
        numeric = (attack.trigger_loss(plus, sy, trig[:, :1], target)
                   - attack.trigger_loss(minus, sy, trig[:, :1], target)).item() / (2 * h)
        assert abs(numeric - grad[idx].item()) < 1e-6 + 1e-4 * abs(numeric)
