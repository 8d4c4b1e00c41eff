"""Benchmark: seconds per SimCLR epoch on a 10,000-image CIFAR-10 subset, per encoder and thread count.

For each encoder (CIFAR-stem ResNet-18 at base widths 16/32/64, ResNet-20) and each thread count,
and precision (float32, bf16 autocast; side by side), runs `SimCLR.train` for one epoch on `--steps` batches of the subset (0: the whole subset) and
scales the measured time to the subset's size; it also times the two views' augmentation alone
and feature extraction (what the kNN monitor costs per image), and estimates a 50,000-image epoch
with its kNN monitor (50,000-image bank + 10,000 test queries).

Run: `PYTHONPATH=src .venv/bin/python benchmarks/bench_simclr.py [--steps 4] [--threads 1 2]
[--json]`; CIFAR-10 from $POISONLAB_SHARED_DATA/cifar10 (default ../shared/data/cifar10).
Not a test: numbers depend on the machine and its load (reported beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from poisonlab.data.registry import load_supervised
from poisonlab.models.encoders import build_encoder
from poisonlab.training.augment import Augmentation
from poisonlab.training.knn import encode
from poisonlab.training.simclr import SimCLR

ENCODERS = {
    "resnet18-w16": ("resnet18", {"base_channels": 16}),
    "resnet18-w32": ("resnet18", {"base_channels": 32}),
    "resnet18-w64": ("resnet18", {"base_channels": 64}),
    "resnet20": ("resnet20", {}),
}


def data_dir() -> Path:
    root = os.environ.get("POISONLAB_SHARED_DATA")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "cifar10"


def time_epoch(name: str, x: torch.Tensor, batch: int, steps: int,
               channels_last: bool, bf16: bool = False) -> tuple[float, float]:
    """(wall, process CPU) seconds for one epoch over all of `x`, measured on `steps` batches
    (0: all of them). On a loaded machine CPU seconds / threads approximates an idle machine's
    wall time."""
    arch, kwargs = ENCODERS[name]
    used = x if steps == 0 else x[: steps * batch]
    torch.manual_seed(0)
    trainer = SimCLR(epochs=1, batch_size=batch, knn_every=0, channels_last=channels_last,
                     bf16=bf16, device="cpu")
    # Warm-up: the first backward pass of a process pays one-time set-up costs.
    trainer.train(build_encoder(arch, **kwargs), used[:batch], progress=False)
    encoder = build_encoder(arch, **kwargs)
    cpu0 = time.process_time()
    result = trainer.train(encoder, used, progress=False)
    cpu = time.process_time() - cpu0
    scale = (len(x) // batch) / (len(used) // batch)
    return result.history["epoch_seconds"][0] * scale, cpu * scale


def time_augment(x: torch.Tensor, batch: int, repeats: int = 5) -> float:
    """Seconds for both views of one batch."""
    aug, gen = Augmentation(), torch.Generator().manual_seed(0)
    aug(x[:batch], gen)
    t0 = time.perf_counter()
    for _ in range(repeats):
        aug(x[:batch], gen), aug(x[:batch], gen)
    return (time.perf_counter() - t0) / repeats


def time_encode(name: str, x: torch.Tensor, n: int = 1024) -> float:
    """Feature-extraction seconds per image (eval mode, batches of 512)."""
    arch, kwargs = ENCODERS[name]
    enc = build_encoder(arch, **kwargs)
    encode(enc, x[:256])
    t0 = time.perf_counter()
    encode(enc, x[:n])
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=4, help="batches measured per epoch (0: all)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", nargs="+", default=["float32", "bf16"],
                        choices=["float32", "bf16"], help="measured side by side")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    data = load_supervised("cifar10", data_dir())
    x = data.train.x[torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[: args.images]]
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        aug = time_augment(x, args.batch)
        for name, precision in ((n, p) for n in args.encoders for p in args.precision):
            load = os.getloadavg()[0]
            epoch, cpu = time_epoch(name, x, args.batch, args.steps, args.channels_last,
                                    precision == "bf16")
            per_image = time_encode(name, x)
            full = epoch * 50_000 / len(x) + per_image * 60_000
            idle = cpu / threads * 50_000 / len(x) + per_image * 60_000 * cpu / threads / epoch
            rows.append({
                "encoder": name, "precision": precision, "threads": threads, "batch": args.batch,
                "epoch_seconds_10k": round(epoch, 1), "epoch_cpu_seconds_10k": round(cpu, 1),
                "augment_seconds_per_step": round(aug, 3),
                "encode_ms_per_image": round(per_image * 1e3, 3),
                "epoch_plus_knn_seconds_50k": round(full, 1),
                "idle_estimate_epoch_plus_knn_seconds_50k": round(idle, 1), "load_avg_1min": round(load, 2),
            })
            if not args.json:
                r = rows[-1]
                print(f"{name:14s} {precision:7s} threads={threads} batch={args.batch}: {r['epoch_seconds_10k']:7.1f} s/epoch (10k, "
                      f"CPU {r['epoch_cpu_seconds_10k']:.1f} s), "
                      f"augment {r['augment_seconds_per_step']:.3f} s/step, encode {r['encode_ms_per_image']:.3f} ms/img, "
                      f"50k epoch + kNN {r['epoch_plus_knn_seconds_50k'] / 60:.1f} min "
                      f"(idle est. {r['idle_estimate_epoch_plus_knn_seconds_50k'] / 60:.1f}; load {r['load_avg_1min']})",
                      flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
