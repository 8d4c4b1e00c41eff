"""Benchmark: poisonlab's GradientMatching vs ART's GradientMatchingAttack, same everything.

Both implement Witches' Brew (Geiping et al., "Witches' Brew: Industrial Scale Data Poisoning via
Gradient Matching", ICLR 2021). Here both craft on the SAME surrogate, for the SAME targets, on
the SAME poison images (budget, ε, restarts and iterations equal), and the SAME victims (one seed
per trial, shared by every arm) are trained from scratch on each poisoned set. ART is given the
poison images themselves as its training set with percent_poison = 1, so it perturbs exactly
poisonlab's poisons; its learning-rate milestones (100/150/200/220 of 250 epochs) are scaled to
the iteration count. ART's method differs in its parametrisation (δ = ε·tanh(w), Adam on w with
signed gradients) and has no augmentation; poisonlab is run with its differentiable augmentation
on (its default, the paper's) and off (as ART).

Data (CIFAR-10, the MetaPoison quick start's shape at a smaller scale): the first `--per-class`
training images of each class in file order; poisons are the first `budget` images of the poison
class (default dog), targets the first `--targets` test images of the target class (default
bird) that the surrogate classifies correctly, the adversarial label is the poison class.
Reported per arm: success (target classified as the adversarial class by a victim trained from
scratch) over targets × trials, the victims' clean test accuracy, crafting seconds, and the final
matching loss 1 − cos(g_t, g_p) of the returned poisons on the surrogate (no augmentation), so
the two optimisers are compared on the objective they share. Arm "unperturbed": the same poison
images without perturbation (the baseline).

Run: `.venv/bin/pip install 'adversarial-robustness-toolbox>=1.17'` (the `bench` extra), then
`nice -n 10 .venv/bin/python benchmarks/bench_gradient_matching_art.py [--data-dir DIR]
[--per-class N] [--budget N] [--targets T] [--trials V] [--restarts R] [--iterations I]
[--epochs E] [--arch NAME] [--json]`. Not a test: numbers depend on the machine, its load and
the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.attacks.gradient_matching import GradientMatching, matching_loss
from poisonlab.attacks.poisons import Poisons, select_poisons
from poisonlab.data.registry import load_supervised
from poisonlab.data.types import ImageSet
from poisonlab.models import build_model
from poisonlab.training.supervised import TrainConfig, evaluate, predict_logits, train_classifier

ARMS = ("unperturbed", "poisonlab", "poisonlab_noaug", "art")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None,
                   help="CIFAR-10 folder (default: $POISONLAB_DATA/cifar10, else "
                   "$POISONLAB_SHARED_DATA/cifar10 or ../shared/data/cifar10)")
    p.add_argument("--per-class", type=int, default=100, help="training images per class")
    p.add_argument("--test-images", type=int, default=1000, help="test images for accuracy (the first tenth of each class)")
    p.add_argument("--budget", type=int, default=20, help="poisons (default 20 = 2%% of 1,000)")
    p.add_argument("--poison-class", type=int, default=5, help="poison = adversarial class (dog)")
    p.add_argument("--target-class", type=int, default=2, help="class of the targets (bird)")
    p.add_argument("--targets", type=int, default=2)
    p.add_argument("--trials", type=int, default=2, help="victim seeds per target")
    p.add_argument("--epsilon", type=float, default=16.0, help="L∞ bound, of 255")
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--arch", default="tiny_cnn", help="surrogate and victim architecture")
    p.add_argument("--epochs", type=int, default=12, help="surrogate and victim epochs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    return p.parse_args()


def data_dir(args: argparse.Namespace) -> Path | None:
    if args.data_dir is not None:
        return args.data_dir
    root = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("POISONLAB_SHARED_DATA", root / "shared" / "data")) / "cifar10"
    return None if os.environ.get("POISONLAB_DATA") or not shared.is_dir() else shared


def subset(data: ImageSet, per_class: int) -> ImageSet:
    """The first `per_class` images of each class, in file order."""
    keep = torch.cat([(data.y == c).nonzero().reshape(-1)[:per_class]
                      for c in range(int(data.y.max()) + 1)]).sort().values
    return data.subset(keep)


def recipe(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment=True)


def fit(args, data: ImageSet, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(args.arch, 10, 3)
    train_classifier(model, data, recipe(args), progress=False, seed=seed, device="cpu")
    return model


def final_loss(model: nn.Module, x_poisoned: torch.Tensor, y: torch.Tensor,
               target: torch.Tensor, adv: int) -> float:
    """1 − cos(g_t, g_p) of the poisoned images on the surrogate (eval mode, no augmentation)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(x, labels):
        return torch.autograd.grad(F.cross_entropy(model(x), labels), params)

    g_t = grads(target[None], torch.tensor([adv]))
    return float(matching_loss(list(g_t), list(grads(x_poisoned, y))))


def craft_art(args, model: nn.Module, train: ImageSet, idx: torch.Tensor, target, adv: int):
    from art.attacks.poisoning import GradientMatchingAttack
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, 32, 32),
                            nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    scale = args.iterations / 250
    schedule = ([1e-1, 1e-2, 1e-3, 1e-4], [max(1, round(m * scale)) for m in (100, 150, 200, 220)])
    attack = GradientMatchingAttack(
        clf, percent_poison=1.0, epsilon=args.epsilon / 255, max_trials=args.restarts,
        max_epochs=args.iterations, learning_rate_schedule=schedule, batch_size=len(idx),
        clip_values=(0.0, 1.0), verbose=0)
    x_p = train.x[idx].numpy()
    poisoned, _ = attack.poison(target[None].numpy(), np.array([adv]), x_p,
                                train.y[idx].numpy())
    delta = torch.from_numpy(poisoned) - train.x[idx]
    return Poisons(indices=idx, delta=delta)


def craft_all(args, surrogate, train, idx, target, adv) -> dict[str, tuple[Poisons, float]]:
    out = {"unperturbed": (Poisons(idx, torch.zeros_like(train.x[idx])), 0.0)}
    for arm, augment in (("poisonlab", True), ("poisonlab_noaug", False)):
        gm = GradientMatching(surrogate, seed=args.seed, device="cpu", epsilon=args.epsilon / 255,
                              restarts=args.restarts, iterations=args.iterations,
                              augment=augment)
        t0 = time.perf_counter()
        out[arm] = (gm.craft(train, idx, target, adv), time.perf_counter() - t0)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    t0 = time.perf_counter()
    out["art"] = (craft_art(args, surrogate, train, idx, target, adv), time.perf_counter() - t0)
    return out


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    data = load_supervised("cifar10", data_dir(args))
    train = subset(data.train, args.per_class)
    test = subset(data.test, args.test_images // 10)
    t0 = time.perf_counter()
    surrogate = fit(args, train, args.seed)
    surrogate_seconds = time.perf_counter() - t0
    idx = select_poisons(train, args.poison_class, args.budget)
    pred = predict_logits(surrogate, data.test.x).argmax(1)
    candidates = ((data.test.y == args.target_class) & (pred == args.target_class)).nonzero()
    target_ids = candidates.reshape(-1)[: args.targets].tolist()
    rows = {arm: {"hits": 0, "trials": 0, "acc": [], "seconds": [], "loss": []} for arm in ARMS}
    for tid in target_ids:
        target = data.test.x[tid]
        crafted = craft_all(args, surrogate, train, idx, target, args.poison_class)
        for arm, (poisons, seconds) in crafted.items():
            poisoned = poisons.apply(train)
            row = rows[arm]
            row["seconds"].append(seconds)
            row["loss"].append(final_loss(surrogate, poisoned.x[idx], train.y[idx], target,
                                          args.poison_class))
            row["linf"] = max(row.get("linf", 0.0), float(poisons.delta.abs().max()) * 255)
            for trial in range(args.trials):
                victim = fit(args, poisoned, 1000 + trial)
                hit = int(predict_logits(victim, target[None]).argmax(1)) == args.poison_class
                row["hits"] += hit
                row["trials"] += 1
                row["acc"].append(evaluate(victim, test))
        print(f"target {tid}: " + ", ".join(
            f"{arm} {rows[arm]['hits']}/{rows[arm]['trials']}" for arm in ARMS), flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "data_dir")}
    result = {"settings": settings, "train_images": len(train), "target_ids": target_ids,
              "surrogate_accuracy": evaluate(surrogate, test),
              "surrogate_seconds": surrogate_seconds, "arms": {}}
    for arm, row in rows.items():
        result["arms"][arm] = {
            "success_rate": row["hits"] / max(row["trials"], 1), "hits": row["hits"],
            "trials": row["trials"], "victim_clean_accuracy": float(np.mean(row["acc"])),
            "craft_seconds_per_target": float(np.mean(row["seconds"])),
            "final_matching_loss": float(np.mean(row["loss"])), "max_linf_255": row["linf"]}
    return result


def main() -> None:
    args = parse_args()
    result = run(args)
    print(f"{len(result['target_ids'])} targets x {args.trials} victims, {result['train_images']} "
          f"training images, {args.budget} poisons, eps {args.epsilon}/255, "
          f"surrogate accuracy {result['surrogate_accuracy']:.3f}")
    print(f"{'arm':<16}{'success':>9}{'victim acc':>12}{'craft s':>10}{'1-cos':>8}{'linf':>7}")
    for arm, r in result["arms"].items():
        print(f"{arm:<16}{r['hits']:>4}/{r['trials']:<4}{r['victim_clean_accuracy']:>12.3f}"
              f"{r['craft_seconds_per_target']:>10.1f}{r['final_matching_loss']:>8.3f}"
              f"{r['max_linf_255']:>7.1f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
