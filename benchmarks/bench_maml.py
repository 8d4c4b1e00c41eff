"""Benchmark: task-batched MAML and support-set attack vs a plain per-task Python loop.

Measures, for the 5-way 5-shot default (meta-batch 32, second order, 1 adaptation step):
- meta-training seconds per iteration, batched (poisonlab) vs per-task loop (the learn2learn way:
  one functional forward, inner gradient and query loss per task, summed);
- support-backdoor attack seconds per task, batched vs per-task loop;
- that both give the same meta-gradients and the same poisoned supports up to float error;
- the estimated FLOP rate of meta-training against the machine's measured matmul peak.

Run: `make bench` or `.venv/bin/python benchmarks/bench_maml.py [--repeats N] [--json]`; with
`--compiled [--compiled-bn batch_norm|var_mean]` also the compiled meta-gradient.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from poisonlab.attacks.support_backdoor import SupportBackdoor
from poisonlab.models import build_model
from poisonlab.models.cnn4 import cnn4_forward_tasks, cnn4_forward_tasks_matmul
from poisonlab.training.compiled_maml import compiled_meta_gradient
from poisonlab.training.maml import default_workers, map_task_chunks, meta_gradient

WAYS, SHOTS, BATCH = 5, 5, 32


def make_tasks(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(batch, WAYS * SHOTS, 1, 28, 28, generator=g)
    qx = torch.rand(batch, WAYS * SHOTS, 1, 28, 28, generator=g)
    y = torch.arange(WAYS).repeat_interleave(SHOTS).expand(batch, -1)
    return sx, y, qx, y


def loop_meta_loss(module, theta, sx, sy, qx, qy, lr):
    """Reference: the same MAML math with a Python loop over tasks."""
    total = 0.0
    for t in range(sx.shape[0]):
        loss = F.cross_entropy(functional_call(module, theta, (sx[t],)), sy[t])
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
        adapted = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
        total = total + F.cross_entropy(functional_call(module, adapted, (qx[t],)), qy[t])
    return total / sx.shape[0]


def loop_attack(module, theta, sx, sy, trigger, target, eps, gamma, iters, lr, start):
    """Reference: Algorithm 1 for one task at a time (same random start as the batched run)."""
    theta = {k: v.detach().requires_grad_() for k, v in theta.items()}
    out = []
    for t in range(sx.shape[0]):
        x = (sx[t] + start[t]).clamp(0, 1)
        for _ in range(iters):
            x = x.detach().requires_grad_()
            loss = F.cross_entropy(functional_call(module, theta, (x,)), sy[t])
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
            adapted = {k: v - lr * g for (k, v), g in zip(theta.items(), grads, strict=True)}
            joint = torch.cat([sx[t], trigger[t]])  # the clean support set as the BN batch
            logit = functional_call(module, adapted, (joint,))[-1:]
            adv = F.cross_entropy(logit, target[t : t + 1])
            (gx,) = torch.autograd.grad(adv, x)
            x = x - gamma * gx.sign()
            x = (sx[t] + (x - sx[t]).clamp(-eps, eps)).clamp(0, 1)
        out.append(x.detach())
    return torch.stack(out)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, _ = timed(lambda: a @ b, repeats)
    return 2 * n**3 / best


def bench_compiled(rounds: int, chunk: int | None, workers: int, bn: str) -> dict:
    """Loop, today's batched path and the compiled graph side by side: interleaved rounds, medians
    (so a change of load hits all three alike); the compile time of the first call."""
    torch.manual_seed(0)
    module = build_model("cnn4", WAYS, 1)
    theta = {k: v.detach().clone().requires_grad_() for k, v in module.state_dict().items()}
    plain = {k: v.detach() for k, v in theta.items()}
    sx, sy, qx, qy = make_tasks(BATCH)
    compiled = compiled_meta_gradient(functools.partial(cnn4_forward_tasks_matmul, bn=bn))
    t0 = time.perf_counter()
    compiled(plain, sx, sy, qx, qy, 0.5)
    first = time.perf_counter() - t0
    variants = {
        "loop": lambda: torch.autograd.grad(loop_meta_loss(module, theta, sx, sy, qx, qy, 0.5),
                                            list(theta.values())),
        "batched": lambda: meta_gradient(cnn4_forward_tasks, theta, sx, sy, qx, qy, 0.5,
                                         chunk=chunk, workers=workers),
        "compiled": lambda: compiled(plain, sx, sy, qx, qy, 0.5),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"compile_first_call_s": first, "compiled_meta_iteration_s": med["compiled"],
            "compiled_vs_loop": med["loop"] / med["compiled"],
            "batched_vs_loop_same_rounds": med["loop"] / med["batched"],
            "compile_break_even_iterations": first / max(med["batched"] - med["compiled"], 1e-9)}


def compiled_accuracy(seeds: int, bn: str) -> dict:
    """Max relative meta-gradient difference from a float64 loop, per seed: the float32 loop's and
    the compiled graph's (float32 rounding alone moves this computation by 1e-3 to 1e-2)."""
    compiled = compiled_meta_gradient(functools.partial(cnn4_forward_tasks_matmul, bn=bn))
    loop_err, comp_err = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        module = build_model("cnn4", WAYS, 1)
        theta = {k: v.detach().clone().requires_grad_() for k, v in module.state_dict().items()}
        sx, sy, qx, qy = make_tasks(BATCH, seed=seed)
        ref = torch.autograd.grad(
            loop_meta_loss(module.double(), {k: v.double() for k, v in theta.items()},
                           sx.double(), sy, qx.double(), qy, 0.5), list(theta.values()))
        module.float()
        loop = torch.autograd.grad(loop_meta_loss(module, theta, sx, sy, qx, qy, 0.5),
                                   list(theta.values()))
        comp = list(compiled({k: v.detach() for k, v in theta.items()}, sx, sy, qx, qy, 0.5)[2]
                    .values())
        loop_err.append(_max_rel(loop, ref))
        comp_err.append(_max_rel(comp, ref))
    return {"loop_f32_rel_err_per_seed": loop_err, "compiled_f32_rel_err_per_seed": comp_err}


def _max_rel(grads, ref) -> float:
    return max(float((a.double() - b).abs().max() / b.abs().max())
               for a, b in zip(grads, ref, strict=True) if b.abs().max() > 1e-4)


def bench_meta(repeats: int, chunk: int | None, workers: int) -> dict:
    torch.manual_seed(0)
    module = build_model("cnn4", WAYS, 1)
    theta = {k: v.detach().clone().requires_grad_() for k, v in module.state_dict().items()}
    sx, sy, qx, qy = make_tasks(BATCH)

    def batched():
        loss, _, grads = meta_gradient(cnn4_forward_tasks, theta, sx, sy, qx, qy, 0.5, 1,
                                       chunk=chunk, workers=workers)
        return torch.tensor(loss), grads

    def looped():
        loss = loop_meta_loss(module, theta, sx, sy, qx, qy, 0.5)
        grads = torch.autograd.grad(loss, list(theta.values()))
        return loss.detach(), grads

    t_batched, (lb, gb) = timed(batched, repeats)
    t_loop, (ll, gl) = timed(looped, repeats)
    # Relative to each gradient's scale (conv biases before BatchNorm have ~0 gradients).
    max_rel = max(float((a - b).abs().max() / (b.abs().max() + 1e-12))
                  for a, b in zip(gb, gl, strict=True) if b.abs().max() > 1e-4)
    with FlopCounterMode(display=False) as counter:  # counted on the loop: the grouped
        looped()                                    # convolution is over-counted by the counter
    flops = counter.get_total_flops()
    return {
        "meta_iteration_s_batched": t_batched, "meta_iteration_s_loop": t_loop,
        "meta_speedup": t_loop / t_batched, "meta_loss_diff": float((lb - ll).abs()),
        "meta_grad_max_rel_diff": max_rel, "meta_iteration_gflop": flops / 1e9,
        "meta_gflops_per_s": flops / t_batched / 1e9,
    }


def bench_attack(repeats: int, chunk: int | None, workers: int, tasks: int = 16) -> dict:
    torch.manual_seed(0)
    module = build_model("cnn4", WAYS, 1)
    theta = {k: v.detach() for k, v in module.state_dict().items()}
    sx, sy, qx, _ = make_tasks(tasks, seed=1)
    trigger, target = qx[:, :1], torch.randint(0, WAYS, (tasks,))
    eps, gamma, iters = 0.3, 0.01, 10
    start = (torch.rand_like(sx) * 2 - 1) * eps
    attack = SupportBackdoor(cnn4_forward_tasks, theta, epsilon=eps, step_size=gamma,
                             iterations=iters, finetune_steps=1, finetune_lr=0.5)
    def batched():
        def one(sl):
            return attack.poison(sx[sl], sy[sl], trigger[sl], target[sl], start=start[sl]).support_x

        return torch.cat(map_task_chunks(one, tasks, chunk, workers))

    t_batched, res = timed(batched, repeats)
    t_loop, ref = timed(
        lambda: loop_attack(module, theta, sx, sy, trigger, target, eps, gamma, iters, 0.5, start),
        max(1, repeats // 2),
    )
    agree = float((res - ref).abs().le(1e-4).float().mean())
    return {
        "attack_s_per_task_batched": t_batched / tasks, "attack_s_per_task_loop": t_loop / tasks,
        "attack_speedup": t_loop / t_batched, "attack_pixels_equal_fraction": agree,
        "attack_float64_max_diff": attack_float64_diff(),
    }


def attack_float64_diff(tasks: int = 2) -> float:
    """Largest pixel difference, batched vs loop, in float64. In float32 the sign() of PGD turns
    rounding differences of near-zero gradients into ±γ steps, so trajectories part; in float64
    the two must give the same poisoned supports."""
    torch.manual_seed(0)
    module = build_model("cnn4", WAYS, 1).double()
    theta = {k: v.detach() for k, v in module.state_dict().items()}
    sx, sy, qx, _ = make_tasks(tasks, seed=1)
    sx, qx = sx.double(), qx.double()
    trigger, target = qx[:, :1], torch.randint(0, WAYS, (tasks,))
    start = (torch.rand_like(sx) * 2 - 1) * 0.3
    attack = SupportBackdoor(cnn4_forward_tasks, theta, epsilon=0.3, step_size=0.01, iterations=10)
    res = attack.poison(sx, sy, trigger, target, start=start).support_x
    ref = loop_attack(module, theta, sx, sy, trigger, target, 0.3, 0.01, 10, 0.5, start)
    return float((res - ref).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=4, help="tasks per chunk (0: all at once)")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--compiled", action="store_true",
                        help="also the compiled meta-gradient (compiles for minutes at first)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the compiled accuracy study")
    parser.add_argument("--compiled-bn", choices=["batch_norm", "var_mean"], default="batch_norm",
                        help="the compiled graph's BatchNorm form (cnn4_forward_tasks_matmul)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chunk = args.chunk or None
    out = {"threads": torch.get_num_threads(), "workers": args.workers, "chunk": args.chunk,
           "matmul_peak_gflops": matmul_peak() / 1e9}
    out |= bench_meta(args.repeats, chunk, args.workers)
    out |= bench_attack(args.repeats, chunk, args.workers)
    if args.compiled:
        out |= bench_compiled(max(3, args.repeats), chunk, args.workers, args.compiled_bn)
        out |= compiled_accuracy(args.seeds, args.compiled_bn)
    out["meta_fraction_of_peak"] = out["meta_gflops_per_s"] / out["matmul_peak_gflops"]
    if args.json:
        print(json.dumps(out))
        return
    for k, v in out.items():
        if isinstance(v, list):
            v = " ".join(f"{x:.2g}" for x in v)
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}")
    print("speed target (meta-training >= 2x the loop):",
          "met" if out["meta_speedup"] >= 2 else "NOT met")
    # float32 meta-gradients differ by summation order only (tests/test_maml.py checks them to
    # 1e-8 in float64); the attack is compared exactly in float64 (see attack_float64_diff).
    same = out["meta_grad_max_rel_diff"] < 1e-2 and out["attack_float64_max_diff"] < 1e-9
    print("same results as the loop (float32 gradients, float64 attack):", "yes" if same else "NO")


if __name__ == "__main__":
    main()
