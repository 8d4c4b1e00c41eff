"""Benchmark: Neural Cleanse's inversions one after another against all of them batched.

`scan`'s backdoor check inverts a trigger for every label and restart (defenses/neural_cleanse.py).
The same jobs run two ways, in one process, interleaved `--repeats` times:

  sequential  one reverse_engineer_triggers call per (restart, label) job (the original method's
              one-label-after-another loop)
  batched     one call for all jobs: every mini-batch stamped with every job's trigger goes
              through the model in groups of at most `max_images` stamped images (the jobs
              follow the same paths: results equal up to float error, printed), once per
              `--max-images` value

The model is a small CNN trained for `--epochs` on `--train` images of CIFAR-10 (from
--data-dir; random tensors without it) carrying a BadNets patch towards label 0, so the
inversions stop early as they do on a real backdoored model. Printed per way: median wall and CPU
seconds (CPU: this process, all threads), the ratio sequential / batched, the status and largest
anomaly index of the scan. Not a test: numbers depend on the machine and its load.

Run: `PYTHONPATH=src .venv/bin/python benchmarks/bench_neural_cleanse.py [--data-dir DIR]
[--samples 200] [--steps 40] [--batch-size 50] [--restarts 1 3] [--repeats 2] [--threads N]
[--max-images 256 4096]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from poisonlab.attacks.backdoor_injection import BackdoorInjection
from poisonlab.attacks.triggers import badnets_patch
from poisonlab.audit.checks import ScanConfig
from poisonlab.data.types import ImageSet
from poisonlab.defenses.neural_cleanse import DetectionResult, reverse_engineer_triggers
from poisonlab.models import build_model
from poisonlab.training.supervised import TrainConfig, train_classifier


def model_and_images(args) -> tuple[torch.nn.Module, torch.Tensor]:
    if args.data_dir is not None:
        from poisonlab.data.cifar10 import load_cifar10

        data = load_cifar10(args.data_dir)
        gen = torch.Generator().manual_seed(0)
        train = data.train.subset(torch.randperm(len(data.train), generator=gen)[: args.train])
        test = data.test.x[torch.randperm(len(data.test), generator=gen)[: args.samples]]
    else:
        gen = torch.Generator().manual_seed(0)
        train = ImageSet(torch.rand(args.train, 3, 32, 32, generator=gen),
                         torch.randint(0, 10, (args.train,), generator=gen))
        test = torch.rand(args.samples, 3, 32, 32, generator=gen)
    train = BackdoorInjection(badnets_patch((3, 32, 32)), target=0, poison_rate=0.1).poison(
        train).data
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3)
    train_classifier(model, train, TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05),
                     progress=False)
    return model.eval(), test


def run(way: str, model, x, cfg, restarts: int) -> tuple[float, float, list]:
    jobs = [(r, k) for r in range(restarts) for k in range(10)]
    wall, cpu = time.perf_counter(), time.process_time()
    if way.startswith("batched"):
        group = cfg.model_copy(update={"max_images": int(way.split("-")[1])})
        found = reverse_engineer_triggers(model, x, [k for _, k in jobs], group,
                                          restarts=[r for r, _ in jobs])
    else:
        found = [reverse_engineer_triggers(model, x, [k], cfg, restarts=[r])[0]
                 for r, k in jobs]
    return time.perf_counter() - wall, time.process_time() - cpu, found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--train", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--restarts", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-images", type=int, nargs="+", default=[256, 4096])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
    model, x = model_and_images(args)
    cfg = ScanConfig(steps=args.steps, batch_size=args.batch_size).detection().inversion
    for restarts in args.restarts:
        times: dict[str, list[tuple[float, float]]] = {"sequential": []}
        times.update({f"batched-{m}": [] for m in args.max_images})
        found: dict[str, list] = {}
        for _ in range(args.repeats):
            for way in times:
                wall, cpu, found[way] = run(way, model, x, cfg, restarts)
                times[way].append((wall, cpu))
        print(f"\n{restarts} restart(s) x 10 labels, {len(x)} images, {args.steps} steps, "
              f"batch {args.batch_size}")
        med = {w: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v))
               for w, v in times.items()}
        for way, (wall, cpu) in med.items():
            norms = torch.tensor([f.norm for f in found[way]]).view(restarts, 10)
            d = DetectionResult([], norms, threshold=2.0, band=0.5)
            steps = sum(f.steps_run for f in found[way])
            cand = d.candidate
            index = float(d.anomaly_index[cand]) if cand is not None else 0.0
            print(f"  {way:13s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  job-steps {steps:5d}  "
                  f"{d.status}, candidate label {cand} index {index:.2f}")
        for way in times:
            if way == "sequential":
                continue
            diff = max(float((a.trigger.mask - b.trigger.mask).abs().max())
                       for a, b in zip(found["sequential"], found[way], strict=True))
            print(f"  sequential / {way}: wall {med['sequential'][0] / med[way][0]:.2f}, cpu "
                  f"{med['sequential'][1] / med[way][1]:.2f}; largest mask difference {diff:.2e}")
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
