"""Benchmark: one MetaPoison craft step with the batched surrogate ensemble vs a Python loop.

One craft step (Huang et al., NeurIPS 2020, Algorithm 1; attacks/metapoison.py) is, for each of
the M surrogates, one clean epoch in which every batch holding poisons first gets the K-step
unrolled meta-gradient. Both methods below run the same M surrogates (same weights, same shuffles,
same poisons) on CIFAR-sized random tensors:

  batched   SurrogateEnsemble.adversarial_losses / train_step: one vmap over the M surrogates
  loop      the same per-surrogate functions called one surrogate after another

and must give the same meta-gradient and the same trained weights up to float error; the ratio of
their wall times is printed. Not a test: numbers depend on the machine and its load.

Run: `OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_metapoison.py
[--members 8] [--images 500] [--poisons 50] [--unroll 2] [--batch-size 125]`.
"""

from __future__ import annotations

import argparse
import time

import torch

from poisonlab.attacks.metapoison import poison_images
from poisonlab.attacks.recolor import Recolor
from poisonlab.attacks.unrolled_ensemble import SurrogateEnsemble, _train_grad
from poisonlab.models import build_model


def craft_step(ens, x, y, base, slot_of, target, perms, lrs, recolor, unroll, batched):
    """Meta-gradient (δ, grid) summed over poison batches, and each surrogate's clean epoch."""
    members, n_batches, _ = perms.shape
    delta = torch.zeros_like(base, requires_grad=True)
    grid = recolor.identity(len(base)).requires_grad_(True)
    g_delta, g_grid = torch.zeros_like(delta), torch.zeros_like(grid)
    who = torch.arange(members)
    for b in range(n_batches):
        slots = slot_of[perms[:, b]]
        rows = torch.nonzero((slots >= 0).any(1)).flatten()
        if len(rows):
            stage = torch.stack([perms[rows, (b + k) % n_batches] for k in range(unroll + 1)], 1)
            xs, ys, slot = x[stage], y[stage], slots[rows]
            poisons = poison_images(base, delta, grid, recolor)
            x0 = torch.where((slot >= 0).view(*slot.shape, 1, 1, 1), poisons[slot.clamp(min=0)],
                             xs[:, 0])
            xs = torch.cat([x0.unsqueeze(1), xs[:, 1:]], 1)
            loss = ens.adversarial_losses(who[rows], xs, ys, target, lrs[rows], 1, batched).sum()
            gd, gg = torch.autograd.grad(loss + len(rows) * recolor.smoothness(grid), [delta, grid])
            g_delta += gd
            g_grid += gg
        ids = perms[:, b]
        if batched:
            ens.train_step(who, x[ids], y[ids], target, lrs)
        else:
            for m in range(members):
                p = {n: v[m] for n, v in ens.params.items()}
                g = _train_grad(ens.fmodel, p, x[ids[m]], y[ids[m]], target)
                for n in ens.params:
                    ens.params[n][m] = p[n] - lrs[m] * g[n]
    return g_delta / members, g_grid / members


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--poisons", type=int, default=50)
    ap.add_argument("--unroll", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=125)
    args = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.rand(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    target = torch.rand(1, 3, 32, 32)
    slot_of = torch.full((args.images,), -1, dtype=torch.long)
    slot_of[: args.poisons] = torch.arange(args.poisons)
    base = x[: args.poisons]
    n_batches = args.images // args.batch_size
    gen = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(args.images, generator=gen)[: n_batches * args.batch_size]
                         for _ in range(args.members)]).view(args.members, n_batches, -1)
    lrs = torch.linspace(0.02, 0.1, args.members)
    recolor = Recolor()
    factory = lambda: build_model("convnet_bn", 10)  # noqa: E731
    results, seconds, weights = {}, {}, {}
    for batched in (True, False):
        ens = SurrogateEnsemble(factory, args.members)
        ens.reinitialise(range(args.members), range(args.members))
        craft_step(ens, x, y, base, slot_of, target, perms[:, :1], lrs, recolor, args.unroll,
                   batched)  # first-call costs, untimed
        ens.reinitialise(range(args.members), range(args.members))
        t0 = time.perf_counter()
        results[batched] = craft_step(ens, x, y, base, slot_of, target, perms, lrs, recolor,
                                      args.unroll, batched)
        seconds[batched] = time.perf_counter() - t0
        weights[batched] = ens.params
    gd = (results[True][0] - results[False][0]).abs().max() / results[False][0].abs().max()
    gg = (results[True][1] - results[False][1]).abs().max() / results[False][1].abs().max()
    gw = max(float((weights[True][n] - weights[False][n]).abs().max()) for n in weights[True])
    print(f"settings: M={args.members} images={args.images} (32x32) poisons={args.poisons} "
          f"K={args.unroll} batch={args.batch_size} threads={torch.get_num_threads()}")
    print(f"batched {seconds[True]:.2f}s  loop {seconds[False]:.2f}s  "
          f"ratio loop/batched {seconds[False] / seconds[True]:.2f}x")
    print(f"relative max difference: meta-gradient δ {gd:.2e}, grid {gg:.2e}; weights {gw:.2e}")


if __name__ == "__main__":
    main()
