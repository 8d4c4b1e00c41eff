"""Benchmark: backdoor detectors on a zoo of backdoored and clean models nobody here has seen.

Trains the zoo of poisonlab.audit.detection_zoo (by default 20 backdoored + 20 clean small
CNNs on mnist, cifar10 and the glyphs; patch, blend, sig and warp triggers; poison rates 0.05–0.2)
into --out, then runs every detector (Neural Cleanse and MM-BD at `scan`'s default settings) on
every model for every --seeds, and prints per detector TPR and FPR at its default threshold, the
ROC AUC of its statistic, the target-label accuracy on detected models, the verdict agreement
across seeds and the CPU seconds per model, overall and per trigger family and data set. Writes
summary.json and roc.png into --out. Every model and every result is saved as it completes: run
it again on the same --out to resume (nothing is recomputed).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_detection_zoo.py --out zoo \
        [--backdoored 20 --clean 20] [--seeds 0 1 2] [--data-root ../shared/data] \
        [--set recipes.cifar10.epochs=6 --set scan.restarts=1 ...] [--threads 1]
    ... --estimate     measure one model of each data set at a tiny size, extrapolate, stop
    ... --smoke        2 backdoored + 2 clean glyph models at a tiny size (about a minute)

Cost (measured with --estimate, see the printed numbers): training the default zoo takes well
under an hour of one core; the detectors at scan's defaults take several times that (Neural
Cleanse, 3 restarts × 10 labels × 40 steps over 200 images, dominates), so a full run is hours.
Not a test: numbers depend on the machine, its load and the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from poisonlab.audit.detection_zoo import estimate_costs, run_zoo, write_json
from poisonlab.audit.zoo_specs import ZooConfig
from poisonlab.audit.zoo_summary import roc_figure, summarize, summary_tables
from poisonlab.config import resolve_config
from poisonlab.progress import terminal
from poisonlab.report.html import Table, rich_table

PRESETS = {
    "smoke": {
        "backdoored": 2, "clean": 2, "datasets": ["glyphs"], "families": ["patch", "blend"],
        "seeds": [0],
        "recipes": {"glyphs": {"archs": ["tiny_cnn"], "train_size": 5000, "test_size": 500,
                               "epochs": 3}},
        "scan": {"samples": 50, "steps": 8, "restarts": 1, "mm_bd": {"steps": 60, "starts": 4}},
    },
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("detection-zoo"))
    p.add_argument("--backdoored", type=int)
    p.add_argument("--clean", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--zoo-seed", type=int, help="The generator's seed (default 0).")
    p.add_argument("--datasets", nargs="+")
    p.add_argument("--families", nargs="+")
    p.add_argument("--detectors", nargs="+", help="nc, mmbd (default both)")
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get(
        "POISONLAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")),
        help="Folder holding mnist/ and cifar10/ (default: $POISONLAB_SHARED_DATA, else "
             "../shared/data).")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="A ZooConfig key=value (dotted keys reach recipes and scan).")
    p.add_argument("--smoke", action="store_true", help="The tiny preset (see PRESETS).")
    p.add_argument("--estimate", action="store_true", help="Measure, extrapolate, stop.")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def config(args: argparse.Namespace) -> ZooConfig:
    given = {"backdoored": args.backdoored, "clean": args.clean, "seeds": args.seeds,
             "seed": args.zoo_seed, "datasets": args.datasets, "families": args.families,
             "detectors": args.detectors}
    overrides = [f"{k}={json.dumps(v)}" for k, v in given.items() if v is not None]
    return resolve_config(ZooConfig, PRESETS, "smoke" if args.smoke else None, None,
                          [*overrides, *args.overrides])


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    cfg = config(args)
    data_dirs = {"mnist": args.data_root / "mnist", "cifar10": args.data_root / "cifar10"}
    console = terminal()
    print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    if args.estimate:
        est = estimate_costs(cfg, data_dirs, log)
        train_h = est["train_cpu_seconds"] / 3600
        print(f"\n{est['models']} models: training ≈ {est['train_cpu_seconds']:.0f} CPU-s "
              f"({train_h:.2f} h on one core, the way this script trains them: one after "
              "another)")
        for d, sec in est["detect_cpu_seconds"].items():
            print(f"  {d} × {est['seeds']} seeds ≤ {sec:.0f} CPU-s ({sec / 3600:.2f} CPU-h)")
        write_json(args.out / "estimate.json", est)
        return
    wall, cpu = time.perf_counter(), time.process_time()
    done = run_zoo(args.out, cfg, data_dirs, log)
    print(f"\ntrained {done.trained} (found {done.reused_models}), ran {done.detected} "
          f"detections (found {done.reused_detections}) in {time.perf_counter() - wall:.0f} s "
          f"wall, {time.process_time() - cpu:.0f} CPU-s", flush=True)
    summary = summarize(args.out, cfg)
    write_json(args.out / "summary.json", summary)
    for title, columns, rows in summary_tables(summary):
        console.print(rich_table(Table(columns, rows), title=title))
    figure = roc_figure(args.out / "roc.png", args.out, cfg)
    print(f"summary: {args.out / 'summary.json'}" + (f", ROC: {figure}" if figure else ""))
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
