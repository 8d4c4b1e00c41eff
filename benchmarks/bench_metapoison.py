"""Benchmark: one MetaPoison craft step per surrogate-ensemble backend, in one run.

One craft step (Huang et al., NeurIPS 2020, Algorithm 1; attacks/metapoison.py) is, for each of
the M surrogates, one clean epoch in which every batch holding poisons first gets the K-step
unrolled meta-gradient. Every backend of attacks/unrolled_ensemble.py runs the same M surrogates
(same weights, same shuffles, same poisons) on CIFAR-sized random tensors:

  loop      the per-surrogate functions called one surrogate after another (the reference)
  grouped   ConvNetBN's M copies as one network of groups=M convolutions (models/convnet_bn.py)
  vmap      torch.func.vmap over functional_call of the stacked weights

Each must give the loop's meta-gradient and trained weights up to float error (printed as relative
differences; with --float64 they agree to rounding). The backends are interleaved, `--repeats`
times, and the median wall time of each is printed with its ratio loop / backend. Not a test:
numbers depend on the machine and its load.

--keep-freed-memory asks glibc (mallopt) to keep freed memory in the heap instead of returning it
to the system, so the large activations of every step reuse already-mapped pages instead of
page-faulting fresh ones; it is a process-wide allocator setting, off by default.

Run: `OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_metapoison.py
[--members 8] [--images 500] [--poisons 50] [--unroll 2] [--batch-size 125] [--repeats 3]
[--backends loop grouped vmap] [--float64] [--threads N] [--keep-freed-memory]`.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch

from poisonlab.attacks.poisons import poison_images
from poisonlab.attacks.recolor import Recolor
from poisonlab.attacks.unrolled_ensemble import BACKENDS, SurrogateEnsemble
from poisonlab.models import build_model


def craft_step(ens, x, y, base, slot_of, target, perms, lrs, recolor, unroll):
    """Meta-gradient (δ, grid) summed over poison batches, and each surrogate's clean epoch."""
    members, n_batches, _ = perms.shape
    delta = torch.zeros_like(base, requires_grad=True)
    grid = recolor.identity(len(base), dtype=base.dtype).requires_grad_(True)
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
            loss = ens.adversarial_losses(who[rows], xs, ys, target, lrs[rows], 1).sum()
            gd, gg = torch.autograd.grad(loss + len(rows) * recolor.smoothness(grid), [delta, grid])
            g_delta += gd
            g_grid += gg
        ids = perms[:, b]
        ens.train_step(who, x[ids], y[ids], target, lrs)
    return g_delta / members, g_grid / members


def keep_freed_memory() -> None:
    """glibc: no trimming of the heap top, and the largest mmap threshold glibc accepts."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_trim_threshold, 2**40)
    libc.mallopt(m_mmap_threshold, 32 * 2**20)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--poisons", type=int, default=50)
    ap.add_argument("--unroll", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=125)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--float64", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep-freed-memory", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    dtype = torch.float64 if args.float64 else torch.float32
    backends = ["loop"] + [b for b in args.backends if b != "loop"]
    torch.manual_seed(0)
    x = torch.rand(args.images, 3, 32, 32, dtype=dtype)
    y = torch.randint(0, 10, (args.images,))
    target = torch.rand(1, 3, 32, 32, dtype=dtype)
    slot_of = torch.full((args.images,), -1, dtype=torch.long)
    slot_of[: args.poisons] = torch.arange(args.poisons)
    base = x[: args.poisons]
    n_batches = args.images // args.batch_size
    gen = torch.Generator().manual_seed(1)
    perms = torch.stack([torch.randperm(args.images, generator=gen)[: n_batches * args.batch_size]
                         for _ in range(args.members)]).view(args.members, n_batches, -1)
    lrs = torch.linspace(0.02, 0.1, args.members, dtype=dtype)
    recolor = Recolor()
    factory = lambda: build_model("convnet_bn", 10).to(dtype)  # noqa: E731
    ensembles = {b: SurrogateEnsemble(factory, args.members, backend=b) for b in backends}
    for ens in ensembles.values():  # first-call costs, untimed
        ens.reinitialise(range(args.members), range(args.members))
        craft_step(ens, x, y, base, slot_of, target, perms[:, :1], lrs, recolor, args.unroll)
    seconds: dict[str, list[float]] = {b: [] for b in backends}
    results, weights = {}, {}
    for _ in range(args.repeats):
        for b, ens in ensembles.items():
            ens.reinitialise(range(args.members), range(args.members))
            t0 = time.perf_counter()
            results[b] = craft_step(ens, x, y, base, slot_of, target, perms, lrs, recolor,
                                    args.unroll)
            seconds[b].append(time.perf_counter() - t0)
            weights[b] = {n: p.clone() for n, p in ens.params.items()}
    print(f"settings: M={args.members} images={args.images} (32x32) poisons={args.poisons} "
          f"K={args.unroll} batch={args.batch_size} {str(dtype).removeprefix('torch.')} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} "
          f"keep-freed-memory={args.keep_freed_memory}")
    loop = statistics.median(seconds["loop"])
    for b in backends:
        med = statistics.median(seconds[b])
        line = (f"{b:8s} median {med:7.2f}s  (runs {' '.join(f'{s:.1f}' for s in seconds[b])})"
                f"  loop/{b} {loop / med:5.2f}x")
        if b != "loop":
            gd = _relative(results[b][0], results["loop"][0])
            gg = _relative(results[b][1], results["loop"][1])
            gw = max(_relative(weights[b][n], weights["loop"][n]) for n in weights[b])
            line += f"  rel. diff vs loop: meta-grad δ {gd:.1e} grid {gg:.1e} weights {gw:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
