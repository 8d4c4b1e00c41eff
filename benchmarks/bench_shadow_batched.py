"""Benchmark: training k shadow models batched vs one after another, on the same mini-batches.

Shadow models (Shokri et al., S&P 2017; Carlini et al., S&P 2022) are k networks of one
architecture trained on different subsets of one pool. Every method below trains the same k
models from the same initialisations (torch.manual_seed(seed + i)) on the same mini-batches
(poisonlab.training.batched_models.batch_indices) with the same optimiser (Adam, cosine schedule
per step), so their predictions must agree up to float error:

  sequential      plain loop, one model after another (the reference)
  vmap            poisonlab.training.batched_models.train_batched (torch.func.vmap over grad)
  grouped         one module holding the k models: convolutions with groups=k, linear layers as
                  a batched einsum; the loss is the sum of the k mean losses (separate gradients)
  2 procs seq     2 worker processes, 1 intra-op thread each, k/2 models each, sequential loop
  2 procs vmap    the same, each worker running train_batched on its k/2 models (train_batched
                  draws its batches from its own generator, so the second worker's models get
                  other batches: they are checked against a plain loop on those batches)
  2 threads seq   2 Python threads in one process, 1 intra-op thread, k/2 models each

Throughput is samples per second over all k models (k × steps × batch / wall time); CPU seconds
(this process plus its workers) tell how much work a method needs, apart from how many cores
were free while it ran. Worker pools are started before timing (their start-up is reported
apart); the timed part includes sending the work and receiving the k trained weight sets. Each
method first runs once on a short schedule, untimed (first-call costs). Models: an MLP, and tiny_cnn / small_cnn without
their batch norm (train_batched cannot update running statistics inside vmap).

Run: `nice -n 10 .venv/bin/python benchmarks/bench_shadow_batched.py [--models mlp,tiny_cnn]
[--k 8] [--records N] [--epochs E] [--batch-size B] [--threads 1,2] [--repeats R] [--json]`.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.config import replace
from poisonlab.data.mnist import load_mnist
from poisonlab.models import build_model
from poisonlab.training.batched_models import batch_indices, train_batched
from poisonlab.training.supervised import TrainConfig, lr_at

CLASSES = 10


# --- models ------------------------------------------------------------------------------------


def build(name: str) -> nn.Module:
    """A fresh model `name`: "mlp" (784-128-10) or a small CNN with batch norm removed."""
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, CLASSES))
    model = build_model(name, CLASSES, 1)
    for i, layer in enumerate(model.conv):
        if isinstance(layer, nn.BatchNorm2d):
            model.conv[i] = nn.Identity()
    return model


class Builder:
    """Picklable `build()` for train_batched in worker processes."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self) -> nn.Module:
        return build(self.name)


class GroupedModels(nn.Module):
    """k models of one architecture as one module: forward(x [k, B, ...]) -> logits [k, B, C]."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.k = len(models)
        self.convs = nn.ModuleList()
        first = models[0]
        if not isinstance(first, nn.Sequential):  # SmallCNN without batch norm
            conv_layers = [i for i, m in enumerate(first.conv) if isinstance(m, nn.Conv2d)]
            for i in conv_layers:
                ref = first.conv[i]
                conv = nn.Conv2d(self.k * ref.in_channels, self.k * ref.out_channels,
                                 ref.kernel_size, padding=ref.padding, groups=self.k)
                conv.weight = nn.Parameter(torch.cat([m.conv[i].weight.detach() for m in models]))
                conv.bias = nn.Parameter(torch.cat([m.conv[i].bias.detach() for m in models]))
                self.convs.append(conv)
            self.pool = first.conv[-1]
            linears = [[m.fc[1], m.head] for m in models]
        else:
            linears = [[m[1], m[3]] for m in models]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].weight.detach() for ls in linears])) for j in range(2))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[j].bias.detach() for ls in linears])) for j in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]
        if len(self.convs):
            h = x.transpose(0, 1).reshape(b, -1, *x.shape[3:])  # [B, k*C, H, W]
            for conv in self.convs:
                h = F.max_pool2d(F.relu(conv(h)), 2)
            h = self.pool(h).reshape(b, k, -1).transpose(0, 1)  # [k, B, features]
        else:
            h = x.reshape(k, b, -1)
        h = F.relu(torch.baddbmm(self.biases[0][:, None], h, self.weights[0].transpose(1, 2)))
        return torch.baddbmm(self.biases[1][:, None], h, self.weights[1].transpose(1, 2))

    def unstack(self, models: list[nn.Module]) -> list[nn.Module]:
        """Copy the trained weights back into `models` (same order)."""
        with torch.no_grad():
            for i, m in enumerate(models):
                if len(self.convs):
                    convs = [layer for layer in m.conv if isinstance(layer, nn.Conv2d)]
                    for conv, grouped in zip(convs, self.convs, strict=True):
                        n = conv.out_channels
                        conv.weight.copy_(grouped.weight[i * n:(i + 1) * n])
                        conv.bias.copy_(grouped.bias[i * n:(i + 1) * n])
                    linears = [m.fc[1], m.head]
                else:
                    linears = [m[1], m[3]]
                for j, lin in enumerate(linears):
                    lin.weight.copy_(self.weights[j][i])
                    lin.bias.copy_(self.biases[j][i])
        return [m.eval() for m in models]


# --- training methods ----------------------------------------------------------------------------


def _adam(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def seeded_models(name: str, rows: list[int], seed: int) -> list[nn.Module]:
    """Model i built right after torch.manual_seed(seed + i), as train_batched does."""
    models = []
    for i in rows:
        torch.manual_seed(seed + i)
        models.append(build(name))
    return models


def train_loop(model: nn.Module, x, y, batches: torch.Tensor, cfg: TrainConfig) -> dict:
    """The plain training loop on batches [steps, B] of record indices; the state dict."""
    per_epoch = batches.shape[0] // cfg.epochs
    opt = _adam(model.parameters(), cfg)
    for step in range(batches.shape[0]):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, per_epoch)
        batch = batches[step]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.state_dict()


def train_sequential(name: str, x, y, idx, cfg: TrainConfig, rows: list[int],
                     seed: int) -> list[dict]:
    """Models `rows` trained one after another on their rows of `idx`; their state dicts."""
    return [train_loop(m, x, y, idx[i], cfg)
            for i, m in zip(rows, seeded_models(name, rows, seed), strict=True)]


def train_grouped(name: str, x, y, idx, cfg: TrainConfig, seed: int) -> list[dict]:
    models = []
    for i in range(idx.shape[0]):
        torch.manual_seed(seed + i)
        models.append(build(name))
    grouped = GroupedModels(models)
    opt = _adam(grouped.parameters(), cfg)
    per_epoch = idx.shape[1] // cfg.epochs
    for step in range(idx.shape[1]):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, per_epoch)
        batch = idx[:, step]  # [k, B]
        logits = grouped(x[batch])
        loss = F.cross_entropy(logits.flatten(0, 1), y[batch].flatten(), reduction="sum")
        loss = loss / batch.shape[1]  # sum over models of each model's mean loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [m.state_dict() for m in grouped.unstack(models)]


def _worker_init() -> None:
    torch.set_num_threads(1)


def _worker_sequential(job) -> tuple[list[dict], float]:
    """The worker's states and the CPU seconds it spent (summed into WORKER_CPU)."""
    t0 = time.process_time()
    return train_sequential(*job), time.process_time() - t0


def _worker_vmap(job) -> tuple[list[dict], float]:
    name, x, y, masks, cfg, seed = job
    t0 = time.process_time()
    states = [m.state_dict() for m in train_batched(Builder(name), x, y, masks, cfg, seed=seed)]
    return states, time.process_time() - t0


WORKER_CPU = [0.0]  # CPU seconds reported by worker processes


def _collect(results) -> list[list[dict]]:
    results = list(results)
    WORKER_CPU[0] += sum(cpu for _, cpu in results)
    return [states for states, _ in results]


def _vmap_jobs(name, x, y, masks, cfg: TrainConfig, seed: int, parts: list[list[int]]):
    """One train_batched job per worker: its models' masks, the seed shifted so model j of part
    `rows` is seeded seed + rows[j] as in the full run (parts are contiguous ranges)."""
    return [(name, x, y, masks[rows], cfg, seed + rows[0]) for rows in parts]


def train_threads(name: str, x, y, idx, cfg: TrainConfig, seed: int,
                  workers: int = 2) -> list[dict]:
    """`workers` Python threads, each training every workers-th model with the plain loop (the
    models are built first, in order, since torch.manual_seed is global)."""
    k = idx.shape[0]
    models = seeded_models(name, list(range(k)), seed)
    states: list[dict | None] = [None] * k

    def run(w: int) -> None:
        for i in range(w, k, workers):
            states[i] = train_loop(models[i], x, y, idx[i], cfg)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return states  # type: ignore[return-value]


def _interleave(parts, results, k) -> list[dict]:
    out: list[dict | None] = [None] * k
    for rows, states in zip(parts, results, strict=True):
        for i, state in zip(rows, states, strict=True):
            out[i] = state
    return out  # type: ignore[return-value]


# --- measurement -------------------------------------------------------------------------------


def timed(fn, repeats: int):
    """(result of the last call, fastest wall time, CPU seconds of that run in this process and
    its workers)."""
    best, cpu, out = float("inf"), 0.0, None
    for _ in range(repeats):
        c0, w0, t0 = time.process_time(), WORKER_CPU[0], time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        if wall < best:
            best, cpu = wall, time.process_time() - c0 + WORKER_CPU[0] - w0
    return out, best, cpu


def logits_of(name: str, states: list[dict], x: torch.Tensor) -> torch.Tensor:
    out = []
    for state in states:
        model = build(name)
        model.load_state_dict(state)
        with torch.no_grad():
            out.append(model.eval()(x))
    return torch.stack(out)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    """Largest logit difference and the share of equal predicted labels."""
    return {"max_abs_logit_diff": float((ref - got).abs().max()),
            "label_agreement": float((ref.argmax(-1) == got.argmax(-1)).float().mean())}


def methods(pool) -> dict:
    """method name -> fn(name, x, y, masks, cfg, seed) returning the k trained state dicts."""

    def idx_of(masks, cfg, seed):
        return batch_indices(masks, cfg, torch.Generator().manual_seed(seed))

    def halves(k):
        return [list(range(w * k // 2, (w + 1) * k // 2)) for w in range(2)]

    def procs_seq(name, x, y, masks, cfg, seed):
        idx, parts = idx_of(masks, cfg, seed), halves(len(masks))
        jobs = [(name, x, y, idx, cfg, rows, seed) for rows in parts]
        return _interleave(parts, _collect(pool.map(_worker_sequential, jobs)), len(masks))

    def procs_vmap(name, x, y, masks, cfg, seed):
        parts = halves(len(masks))
        states = _collect(pool.map(_worker_vmap, _vmap_jobs(name, x, y, masks, cfg, seed, parts)))
        return _interleave(parts, states, len(masks))

    return {
        "sequential": lambda n, x, y, m, c, s: train_sequential(n, x, y, idx_of(m, c, s), c,
                                                                list(range(len(m))), s),
        "vmap": lambda n, x, y, m, c, s: [mod.state_dict() for mod in
                                          train_batched(Builder(n), x, y, m, c, seed=s)],
        "grouped": lambda n, x, y, m, c, s: train_grouped(n, x, y, idx_of(m, c, s), c, s),
        "2 procs seq": procs_seq,
        "2 procs vmap": procs_vmap,
        "2 threads seq": lambda n, x, y, m, c, s: train_threads(n, x, y, idx_of(m, c, s), c, s),
    }


def bench_model(name: str, x, y, masks, cfg: TrainConfig, args, pool) -> dict:
    k, seed = masks.shape[0], args.seed
    steps = batch_indices(masks, cfg, torch.Generator().manual_seed(seed)).shape[1]
    samples = k * steps * cfg.batch_size
    probe = x[: args.probe]
    warm = (masks[:, : 4 * cfg.batch_size], replace(cfg, epochs=1), seed)
    runs = [(m, fn, 1 if m.startswith("2 ") else t) for t in args.threads
            for m, fn in methods(pool).items() if m in args.methods
            and (not m.startswith("2 ") or t == args.threads[0])]
    rows, ref = [], None
    for method, fn, threads in runs:
        torch.set_num_threads(threads)
        fn(name, x[: warm[0].shape[1]], y[: warm[0].shape[1]], *warm)  # first-call costs
        states, seconds, cpu = timed(lambda fn=fn: fn(name, x, y, masks, cfg, seed), args.repeats)
        logits = logits_of(name, states, probe)
        if ref is None and method == "sequential":
            ref = logits
        row = {"method": method, "intra_op_threads": threads, "seconds": seconds,
               "samples_per_s": samples / seconds, "cpu_seconds": cpu,
               "samples_per_cpu_s": samples / cpu}
        if ref is not None:
            expect = ref if method != "2 procs vmap" else _vmap_reference(name, x, y, masks, cfg,
                                                                        seed, probe, ref)
            row.update(compare(expect, logits))
        rows.append(row)
    base = next((r["seconds"] for r in rows if r["method"] == "sequential"), None)  # first thread count
    for r in rows:
        r["speedup"] = base / r["seconds"] if base else None
    return {"model": name, "k": k, "steps_per_model": steps, "samples": samples,
            "methods": rows}


def _vmap_reference(name, x, y, masks, cfg, seed, probe, ref) -> torch.Tensor:
    """Sequential logits on the batches the 2-process vmap workers drew (the first part draws
    the same batches as the full run; later parts restart the generator at their own seed)."""
    k = len(masks)
    halves = [list(range(w * k // 2, (w + 1) * k // 2)) for w in range(2)]
    out = [ref[halves[0]]]
    for rows in halves[1:]:
        _, _, _, m, _, sub_seed = _vmap_jobs(name, x, y, masks, cfg, seed, [rows])[0]
        idx = batch_indices(m, cfg, torch.Generator().manual_seed(sub_seed))
        shifted = torch.cat([torch.zeros(rows[0], *idx.shape[1:], dtype=idx.dtype), idx])
        out.append(logits_of(name, train_sequential(name, x, y, shifted, cfg, rows,
                                                     sub_seed - rows[0]), probe))
    return torch.cat(out)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mlp,tiny_cnn", help="mlp, tiny_cnn, small_cnn")
    p.add_argument("--methods", default="sequential,vmap,grouped,2 procs seq,2 procs vmap,"
                   "2 threads seq", help="comma-separated; sequential is the reference")
    p.add_argument("--k", type=int, default=8, help="shadow models (default 8)")
    p.add_argument("--records", type=int, default=1000, help="training records per model "
                   "(each model takes a random half of a pool of 2x that many)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", default="1,2", help="intra-op thread counts of the one-process "
                   "methods, comma-separated; the first is the baseline's (default 1,2)")
    p.add_argument("--repeats", type=int, default=1, help="best of R runs per method")
    p.add_argument("--probe", type=int, default=512, help="records whose predictions are compared")
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST folder (default: "
                   "../shared/data/mnist, else random images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    return args


def load_pool(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    n = 2 * args.records
    path = args.data_dir or Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
    gen = torch.Generator().manual_seed(args.seed)
    if path.is_dir():
        train = load_mnist(path).train
        order = torch.randperm(len(train), generator=gen)[:n]
        return train.x[order], train.y[order], f"MNIST ({path})"
    return torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen), \
        "random images (MNIST not found)"


def print_table(result: dict) -> None:
    print(f"{result['k']} models x {result['records']} records, {result['epochs']} epochs, batch "
          f"{result['batch_size']}, data: {result['data']}; worker start-up "
          f"{result['pool_startup_seconds']:.1f} s (not timed)")
    for entry in result["models"]:
        print(f"\n{entry['model']}: {entry['samples']} samples per method")
        print(f"{'method':16s}{'threads':>8s}{'seconds':>10s}{'samples/s':>11s}{'speedup':>9s}"
              f"{'CPU s':>8s}{'samples/CPU s':>15s}{'max|dlogit|':>13s}{'same label':>12s}")
        for r in entry["methods"]:
            diff = f"{r['max_abs_logit_diff']:13.2e}" if "max_abs_logit_diff" in r else " " * 13
            agree = f"{r['label_agreement']:12.4f}" if "label_agreement" in r else ""
            print(f"{r['method']:16s}{r['intra_op_threads']:8d}{r['seconds']:10.2f}"
                  f"{r['samples_per_s']:11.0f}{r['speedup']:9.2f}{r['cpu_seconds']:8.2f}"
                  f"{r['samples_per_cpu_s']:15.0f}{diff}{agree}")


def main() -> None:
    args = parse_args()
    x, y, source = load_pool(args)
    masks = torch.zeros(args.k, len(y), dtype=torch.bool)
    gen = torch.Generator().manual_seed(args.seed + 1)
    for i in range(args.k):
        masks[i, torch.randperm(len(y), generator=gen)[: args.records]] = True
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, optimizer="adam",
                      weight_decay=0.0, schedule="cosine")
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(2, mp_context=ctx, initializer=_worker_init) as pool:
        list(pool.map(_warm_up, range(2)))
        startup = time.perf_counter() - t0
        models = [bench_model(name, x, y, masks, cfg, args, pool)
                  for name in args.models.split(",")]
    result = {"k": args.k, "records": args.records, "epochs": args.epochs,
              "batch_size": args.batch_size, "threads": args.threads, "data": source,
              "pool_startup_seconds": startup, "models": models}
    print_table(result)
    if args.json:
        print(json.dumps(result))


def _warm_up(_: int) -> int:
    """Import everything a worker needs and run one tiny step (so timing excludes it)."""
    import poisonlab.training.batched_models  # noqa: F401

    return int(torch.get_num_threads())


if __name__ == "__main__":
    main()
