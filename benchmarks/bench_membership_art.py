"""Benchmark: ART's black-box membership attack vs poisonlab's ShadowModelAttack, same models.

Adversarial Robustness Toolbox (Nicolae et al. 2018), `MembershipInferenceBlackBox`, and
poisonlab.attacks.membership.ShadowModelAttack both implement the shadow-model attack of Shokri,
Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine Learning Models", S&P
2017. Here both learn from the SAME shadow models (trained like the target on disjoint records of
the same data set: N "in" records each, plus N held-out "out" records) and attack the SAME target,
whose N training records and N unseen records form the balanced evaluation set. ART queries the
target through its PyTorchClassifier wrapper (softmax appended, so both attacks see the same
probability vectors); its shadow features are passed as `pred`/`test_pred`.

Reported per attack: AUC (with its Hanley–McNeil standard error), attack accuracy (balanced, best threshold), accuracy at the attack's own
0.5 decision, TPR at 0.1% and 1% FPR, and the wall time of fitting plus inference (models already
trained). ART attack models: nn (its default), rf, gb. poisonlab: the default class-agnostic MLP,
and one attack model per class. The loss-threshold attack (Yeom et al. 2018, no shadow models) is
a reference row.

Run: `.venv/bin/pip install 'adversarial-robustness-toolbox>=1.17'` (the `bench` extra), then
`nice -n 10 .venv/bin/python benchmarks/bench_membership_art.py [--dataset mnist|cifar10]
[--data-dir DIR] [--records N] [--epochs E] [--arch NAME] [--shadows S] [--seed S] [--json]`.
With `--run RUN_DIR` (a finished or interrupted `poisonlab run membership`), nothing is trained:
the run's target and its first shadow model of the target's architecture are attacked on the
run's own four-part split (e.g. the `cpu` preset's ResNet-20 on 12,500 CIFAR-10 records each).
Not a test: numbers depend on the machine, its load and the seed.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from poisonlab.attacks.membership import Queried, Reference, ShadowModelAttack, logit_confidence
from poisonlab.data.registry import load_dataset
from poisonlab.data.types import ImageSet
from poisonlab.evaluation.membership_study import build, load_data, split_parts
from poisonlab.experiments.membership import Config
from poisonlab.metrics import membership_metrics
from poisonlab.models import build_model
from poisonlab.runs.checkpoints import load_weights
from poisonlab.training.supervised import (
    TrainConfig,
    evaluate,
    predict_logits,
    predict_proba,
    train_classifier,
)

DEFAULTS = {"mnist": ("small_cnn", 1000, 30), "cifar10": ("small_cnn", 2000, 25)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(DEFAULTS), default="mnist")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data set folder (default: $POISONLAB_DATA/NAME, else ../shared/data/NAME)")
    p.add_argument("--records", type=int, default=None,
                   help="training records of the target and of each shadow model (as many "
                        "held out); default 1000 (mnist) / 2000 (cifar10)")
    p.add_argument("--epochs", type=int, default=None, help="default 30 (mnist) / 25 (cifar10)")
    p.add_argument("--arch", default=None, help="default small_cnn (e.g. resnet20 for cifar10 "
                   "with time to spare)")
    p.add_argument("--shadows", type=int, default=2, help="shadow models (default 2)")
    p.add_argument("--art-models", default="nn,rf,gb",
                   help="ART attack model types, comma-separated (its default is nn)")
    p.add_argument("--run", type=Path, default=None, help="a membership run directory: use its "
                   "target and shadow models and split instead of training")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    return p.parse_args()


def data_dir(args: argparse.Namespace, dataset: str | None = None) -> Path | None:
    if args.data_dir is not None:
        return args.data_dir
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / (dataset or args.dataset)
    return None if os.environ.get("POISONLAB_DATA") or not shared.is_dir() else shared


def split_pool(pool: ImageSet, n: int, shadows: int, gen: torch.Generator) -> dict:
    """Disjoint subsets of the pool: target in/out, then in/out for each shadow model."""
    need = 2 * n * (shadows + 1)
    if need > len(pool):
        raise SystemExit(f"--records {n} with {shadows} shadows needs {need} records, the "
                         f"training split has {len(pool)}")
    order = torch.randperm(len(pool), generator=gen)[:need].view(shadows + 1, 2, n)
    return {"target": (pool.subset(order[0, 0]), pool.subset(order[0, 1])),
            "shadows": [(pool.subset(o[0]), pool.subset(o[1])) for o in order[1:]]}


def train(arch: str, data: ImageSet, channels: int, epochs: int, seed: int, classes: int):
    """One model trained to overfit: Adam, no weight decay, no augmentation."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, channels)
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=1e-3, optimizer="adam", weight_decay=0.0,
                      schedule="cosine")
    train_classifier(model, data, cfg, progress=False, seed=seed)
    return model.eval()


def auc_standard_error(auc: float, members: int, non_members: int) -> float:
    """Hanley & McNeil (Radiology 1982) standard error of an AUC: differences between attacks
    smaller than about twice this are noise."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (members - 1) * (q1 - auc**2)
           + (non_members - 1) * (q2 - auc**2)) / (members * non_members)
    return max(var, 0.0) ** 0.5


def attack_row(name: str, scores: torch.Tensor, truth: torch.Tensor, seconds: float,
               decision: bool = True) -> dict:
    row = {"attack": name, **membership_metrics(scores, truth), "seconds": seconds}
    row["auc_se"] = auc_standard_error(row["auc"], int(truth.sum()), int((1 - truth).sum()))
    row["accuracy_at_0.5"] = float(((scores > 0.5).float() == truth).float().mean()) if decision \
        else None
    return row


def run_art(kind: str, target, shape, classes, shadow_feats, eval_set, truth, seed) -> dict:
    """ART's MembershipInferenceBlackBox with attack model `kind`, fitted on the shadows."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import PyTorchClassifier

    wrapped = PyTorchClassifier(model=nn.Sequential(target, nn.Softmax(dim=1)),
                                loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=classes,
                                clip_values=(0.0, 1.0), device_type="cpu")
    p_in, y_in, p_out, y_out = shadow_feats
    torch.manual_seed(seed)
    np.random.seed(seed)  # rf / gb draw from NumPy's global generator
    t0 = time.perf_counter()
    attack = MembershipInferenceBlackBox(wrapped, attack_model_type=kind)
    attack.fit(y=y_in.numpy(), test_y=y_out.numpy(), pred=p_in.numpy(), test_pred=p_out.numpy())
    scores = attack.infer(eval_set.x.numpy(), eval_set.y.numpy(), probabilities=True)
    seconds = time.perf_counter() - t0
    return attack_row(f"ART black-box ({kind})", torch.from_numpy(np.asarray(scores)).flatten()
                      .float(), truth, seconds)


OURS = {"poisonlab ShadowModelAttack": {},
        "poisonlab ShadowModelAttack (per class)": {"per_class": True},
        "poisonlab ShadowModelAttack (boosting)": {"model": "boosting"}}


def run_ours(name: str, target, shadow_probs, eval_set, truth, seed) -> dict:
    references = [Reference(Queried(y, probs=p), m) for p, y, m in zip(*shadow_probs, strict=True)]
    t0 = time.perf_counter()
    attack = ShadowModelAttack(**OURS[name], seed=seed).fit(references)
    scores = attack.score(attack.query(target, eval_set.x, eval_set.y))
    seconds = time.perf_counter() - t0
    return attack_row(name, scores, truth, seconds)


def print_table(result: dict) -> None:
    t = result["target"]
    print(f"\n{result['dataset']} / {result['arch']}: {result['records']} records per model, "
          f"{result['shadows']} shadow models, {result['epochs']} epochs; target train acc "
          f"{t['train_accuracy']:.3f}, held-out acc {t['test_accuracy']:.3f}; models trained in "
          f"{result['training_seconds']:.0f} s")
    cols = ["auc", "auc_se", "attack_accuracy", "accuracy_at_0.5", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01",
            "seconds"]
    heads = ["AUC", "±SE", "att.acc", "acc@0.5", "TPR@0.1%", "TPR@1%", "time s"]
    print(f"{'attack':40s}" + "".join(f"{h:>10s}" for h in heads))
    for row in result["attacks"]:
        cells = "".join("       n/a" if row[c] is None else f"{row[c]:10.4f}" for c in cols)
        print(f"{row['attack']:40s}{cells}")


def trained_models(args: argparse.Namespace):
    """Train target and shadows on a fresh disjoint split: (setting, target, shadow probability
    lists (probs, labels, member), target in/out sets, classes, input shape)."""
    arch, records, epochs = DEFAULTS[args.dataset]
    arch, records, epochs = args.arch or arch, args.records or records, args.epochs or epochs
    data = load_dataset(args.dataset, data_dir(args))
    classes, shape = data.num_classes, tuple(data.train.x.shape[1:])
    parts = split_pool(data.train, records, args.shadows, torch.Generator().manual_seed(args.seed))
    t0 = time.perf_counter()
    target = train(arch, parts["target"][0], shape[0], epochs, args.seed, classes)
    shadows = [train(arch, s_in, shape[0], epochs, args.seed + 1 + i, classes)
               for i, (s_in, _) in enumerate(parts["shadows"])]
    training_seconds = time.perf_counter() - t0
    features = shadow_features(list(zip(shadows, parts["shadows"], strict=True)))
    setting = {"dataset": args.dataset, "arch": arch, "records": records, "epochs": epochs,
               "shadows": args.shadows, "training_seconds": training_seconds}
    return setting, target, features, parts["target"], classes, shape


def shadow_features(shadows) -> tuple[list, list, list]:
    """(probability vectors, labels, membership) of every (model, (in, out)) shadow pair."""
    probs, labels, member = [], [], []
    for model, (s_in, s_out) in shadows:
        for part, m in ((s_in, 1.0), (s_out, 0.0)):
            probs.append(predict_proba(model, part.x))
            labels.append(part.y)
            member.append(torch.full((len(part),), m))
    return probs, labels, member


def run_models(args: argparse.Namespace):
    """The same, taken from a membership run: its target, its first shadow of the target's
    architecture (trained on shadow-in, shadow-out held out) and its split."""
    cfg = Config.model_validate(yaml.safe_load((args.run / "config.yaml").read_text()))
    data, name = load_data(cfg, data_dir(args, cfg.data.dataset), cfg.seed)
    parts = split_parts(data.train, cfg.data.part_size, cfg.seed)
    arch = cfg.arch

    def model(key: str):
        path = args.run / "checkpoints" / f"model-{key}.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: the run has not trained that model yet")
        net = build(arch, data)
        net.load_state_dict(load_weights(path)[0])
        return net.eval()

    target, shadow = model(f"target-{arch}"), model(f"shadow-{arch}-0")
    features = shadow_features([(shadow, (parts["shadow_in"], parts["shadow_out"]))])
    setting = {"dataset": name, "arch": arch, "records": cfg.data.part_size,
               "epochs": cfg.train.epochs, "shadows": 1, "training_seconds": 0.0,
               "run": str(args.run)}
    classes, shape = data.num_classes, tuple(data.train.x.shape[1:])
    return (setting, target, features, (parts["target_in"], parts["target_out"]), classes, shape)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    prepare = run_models if args.run is not None else trained_models
    setting, target, (probs, labels, member), (t_in, t_out), classes, shape = prepare(args)
    p, y, m = torch.cat(probs), torch.cat(labels), torch.cat(member)
    art_feats = (p[m == 1], y[m == 1], p[m == 0], y[m == 0])
    eval_set = ImageSet(torch.cat([t_in.x, t_out.x]), torch.cat([t_in.y, t_out.y]))
    truth = torch.cat([torch.ones(len(t_in)), torch.zeros(len(t_out))])
    rows = [run_art(kind, target, shape, classes, art_feats, eval_set, truth, args.seed)
            for kind in args.art_models.split(",") if kind]
    rows += [run_ours(name, target, (probs, labels, member), eval_set, truth, args.seed)
             for name in OURS]
    t1 = time.perf_counter()
    loss_scores = logit_confidence(predict_logits(target, eval_set.x), eval_set.y)
    rows.append(attack_row("loss threshold (reference, no shadows)", loss_scores, truth,
                           time.perf_counter() - t1, decision=False))
    result = {
        **setting, "seed": args.seed, "threads": args.threads,
        "target": {"train_accuracy": evaluate(target, t_in), "test_accuracy": evaluate(target, t_out)},
        "attacks": rows,
    }
    print_table(result)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
