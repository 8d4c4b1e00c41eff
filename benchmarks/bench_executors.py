"""Benchmark: k membership shadow models on `ray` (2 workers, 1 CPU each) against `local`.

The pieces are the membership study's own (poisonlab.evaluation.membership_pieces.train_piece):
k shadow models of the `cpu` preset's recipe (its architecture and optimiser, cut to a few
epochs) on `records` images each, drawn as in the study (Study.pool_masks) from a pool of
2·records CIFAR-10 training images (the glyph set when no CIFAR-10 folder is given). `local`
trains them one after another in this process, once per `--threads` value (torch threads; with
1, the pieces' own thread count, the weights must equal ray's exactly); `ray` starts a
local instance of `--workers` CPUs and runs one task of 1 CPU per model. Ray's start-up is
reported apart from the timed map; the map includes the workers' first imports, putting the
pool into the object store and fetching the k weight sets.

Printed: wall time and throughput (models per minute) of each, their ratio (ray / local), per
piece training seconds (inside the piece) and wall seconds, the bytes moved (the shared pool
once, each piece's inputs, each result), the largest weight difference between the two runs,
and the load average before and after (the machine may be shared).

Run: `nice -n 10 .venv/bin/python benchmarks/bench_executors.py [--data-dir DIR] [--k 8]
[--records 1000] [--epochs 2] [--workers 2] [--threads 2,1] [--json]`. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import time
from pathlib import Path

import torch

from poisonlab.config import replace, resolve_config
from poisonlab.data.registry import load_supervised
from poisonlab.evaluation.membership_pieces import ModelPiece, train_piece
from poisonlab.evaluation.membership_study import shadow_masks
from poisonlab.executors import Executor, LocalExecutor
from poisonlab.experiments.membership import PRESETS, Config


def pieces(args, data) -> tuple[dict[str, ModelPiece], dict]:
    cfg = resolve_config(Config, PRESETS, "cpu", None, [])
    recipe = replace(cfg.train, epochs=args.epochs)
    pool = data.train.subset(torch.arange(2 * args.records))
    masks = shadow_masks(args.k, args.records, seed=3)
    items = {f"shadow-{cfg.arch}-{i}": ModelPiece(
                 f"shadow-{cfg.arch}-{i}", cfg.arch, 100 + i, "pool", mask, recipe,
                 data.num_classes, int(pool.x.shape[1]))
             for i, mask in enumerate(masks)}
    return items, {"pool": pool}


def timed_map(executor: Executor, items, sets, cpus: int) -> dict:
    t0 = time.perf_counter()
    results, arrival = {}, {}
    for key, result in executor.map(train_piece, items, shared={"sets": sets}, cpus=cpus):
        results[key], arrival[key] = result, time.perf_counter() - t0
    return {"wall": time.perf_counter() - t0, "results": results, "arrival": arrival}


def nbytes(obj) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def summary(name: str, run: dict, k: int) -> dict:
    train = [r["seconds"] for r in run["results"].values()]
    return {"backend": name, "wall_s": run["wall"], "models_per_min": 60 * k / run["wall"],
            "piece_train_s_mean": statistics.mean(train), "piece_train_s_max": max(train),
            "piece_wall_s_mean": run["wall"] / k}


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[n]["state"][p].float() - b[n]["state"][p].float()).abs().max())
               for n in a for p in a[n]["state"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("POISONLAB_SHARED_DATA", "../shared/data")))
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", default="2,1",
                        help="torch threads of the local runs, one run per value")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    name = "cifar10" if (args.data_dir / "cifar10").is_dir() else "glyphs"
    data = load_supervised(name, args.data_dir / name if name == "cifar10" else None)
    items, sets = pieces(args, data)
    load_before = os.getloadavg()

    local = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        local[threads] = timed_map(LocalExecutor(), items, sets, cpus=threads)

    from poisonlab.executors.ray_backend import RayExecutor

    t0 = time.perf_counter()
    with RayExecutor(num_cpus=args.workers) as executor:
        start = time.perf_counter() - t0
        remote = timed_map(executor, items, sets, cpus=1)
    rows = [summary(f"local, {t} threads", r, args.k) for t, r in local.items()]
    rows.append(summary(f"ray, {args.workers} × 1 CPU", remote, args.k))
    out = {
        "data": name, "arch": next(iter(items.values())).arch, "k": args.k,
        "records": args.records, "epochs": args.epochs, "workers": args.workers,
        "rows": rows, "ray_start_s": start,
        "throughput_ratio": {t: r["wall"] / remote["wall"] for t, r in local.items()},
        "throughput_ratio_with_start": {t: r["wall"] / (remote["wall"] + start)
                                        for t, r in local.items()},
        "shared_bytes": nbytes(sets), "piece_input_bytes": nbytes(next(iter(items.values()))),
        "piece_result_bytes": nbytes(next(iter(remote["results"].values()))),
        "max_weight_diff": {t: max_weight_diff(r["results"], remote["results"])
                            for t, r in local.items()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(out) if args.json else render(out))


def render(out: dict) -> str:
    lines = [f"{out['k']} × {out['arch']} on {out['records']} {out['data']} images, "
             f"{out['epochs']} epochs; Ray start-up {out['ray_start_s']:.1f} s"]
    for r in out["rows"]:
        lines.append(f"  {r['backend']:18s} wall {r['wall_s']:7.1f} s  {r['models_per_min']:6.2f}"
                     f" models/min  per piece: train {r['piece_train_s_mean']:5.1f} s (max "
                     f"{r['piece_train_s_max']:5.1f}), wall share {r['piece_wall_s_mean']:5.1f} s")
    for t, ratio in out["throughput_ratio"].items():
        lines.append(f"  throughput ray / local {t} threads: {ratio:.3f} (with start-up "
                     f"{out['throughput_ratio_with_start'][t]:.3f}); largest weight "
                     f"difference {out['max_weight_diff'][t]:.3g}")
    lines.append(f"  bytes: shared pool {out['shared_bytes']:,} (once per map), per piece in "
                 f"{out['piece_input_bytes']:,}, out {out['piece_result_bytes']:,}")
    lines.append(f"  load average (1 min) before {out['loadavg_before'][0]:.2f}, after "
                 f"{out['loadavg_after'][0]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
