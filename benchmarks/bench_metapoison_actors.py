"""Benchmark: MetaPoison's craft steps with the ensemble in slices on Ray actors, against one slice
in this process.

The crafting is MetaPoison's own (poisonlab.attacks.metapoison, Huang et al. NeurIPS 2020) on
CIFAR-sized random images: `--images` 32×32 training images, `--poisons` poisons, M = `--members`
ConvNetBN surrogates (stagger 1), `--steps` craft steps. `local` runs one slice (all M) in this
process with `--threads` torch threads; `ray` starts a local instance of `--slices` CPUs and
splits the ensemble over `--slices` actors of 1 CPU (one torch thread) each. Ray's start-up is
reported apart; each run's time includes building the slices (for Ray: the actors' processes,
their imports, the crafting problem put into the object store once and fetched by each actor).

Printed: the seconds of every craft step (from the progress callback) and of the whole crafting
for each, their ratio, the bytes that cross to and from the actors per step (δ and the grid once
into the object store, each slice's shuffles, each slice's summed meta-gradients back, the
weights gathered for the checkpoint), the crafting problem's bytes (once per crafting), the
largest differences of δ, the grid and the loss history between the two (float rounding), and
the load average before and after (the machine may be shared).

Run: `nice -n 10 OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python
benchmarks/bench_metapoison_actors.py [--members 4] [--slices 2] [--images 500] [--poisons 50]
[--batch-size 125] [--steps 3] [--threads 1]`. Not a test.
"""

from __future__ import annotations

import argparse
import os
import pickle
import time

import torch

from poisonlab.attacks.metapoison import MetaPoison
from poisonlab.data.types import ImageSet
from poisonlab.executors import Executor
from poisonlab.models import build_model


def _bytes(obj: object) -> int:
    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def craft(args: argparse.Namespace, train: ImageSet, slices: int,
          executor: Executor | None) -> tuple[object, list[float], float, object]:
    """(poisons, seconds per step, total seconds, last checkpoint) of one crafting."""
    attack = MetaPoison(lambda: build_model("convnet_bn", 10), ensemble=args.members,
                        slices=slices, craft_steps=args.steps, budget=args.poisons,
                        batch_size=args.batch_size, seed=0)
    idx = attack.choose_poisons(train, 1)
    marks, states = [time.perf_counter()], []
    t0 = marks[0]
    poisons = attack.craft(train, idx, train.x[-1], 1, executor=executor,
                           progress=lambda _: marks.append(time.perf_counter()),
                           checkpoint=states.append)
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return poisons, steps, time.perf_counter() - t0, states[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--poisons", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=125)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    g = torch.Generator().manual_seed(0)
    train = ImageSet(torch.rand(args.images, 3, 32, 32, generator=g),
                     torch.randint(0, 10, (args.images,), generator=g))
    train.y[: args.poisons] = 1
    train.y[-1] = 0  # the target's own class is not the poison class
    local, local_steps, local_total, state = craft(args, train, 1, None)

    from poisonlab.executors.ray_backend import RayExecutor

    t0 = time.perf_counter()
    with RayExecutor(num_cpus=args.slices) as executor:
        start = time.perf_counter() - t0
        on_ray, ray_steps, ray_total, _ = craft(args, train, args.slices, executor)
    n_batches = args.images // args.batch_size
    perms = torch.zeros(args.members, n_batches, args.batch_size, dtype=torch.long)
    out = _bytes(local.delta) + _bytes(local.grid)
    back = args.slices * (_bytes(local.delta) + _bytes(local.grid))
    print(f"settings: M={args.members} slices={args.slices} images={args.images} (32x32) "
          f"poisons={args.poisons} batch={args.batch_size} steps={args.steps} "
          f"local threads={args.threads}; load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"local (1 slice): {local_total:.1f}s, steps {' '.join(f'{s:.1f}' for s in local_steps)}")
    print(f"ray ({args.slices} actors): {ray_total:.1f}s, steps "
          f"{' '.join(f'{s:.1f}' for s in ray_steps)} (Ray start-up {start:.1f}s apart); "
          f"local/ray {local_total / ray_total:.2f}x")
    print(f"per step: δ + grid out {out / 1e6:.2f} MB (once), shuffles {_bytes(perms) / 1e6:.3f} MB, "
          f"meta-gradients back {back / 1e6:.2f} MB, weights for the checkpoint "
          f"{_bytes(state.params) / 1e6:.2f} MB; once per crafting: the problem "
          f"{_bytes(train.x) / 1e6:.1f} MB")
    print(f"largest difference ray - local: δ {float((on_ray.delta - local.delta).abs().max()):.1e} "
          f"grid {float((on_ray.grid - local.grid).abs().max()):.1e} "
          f"history {float((on_ray.history - local.history).nan_to_num(0).abs().max()):.1e}")


if __name__ == "__main__":
    main()
