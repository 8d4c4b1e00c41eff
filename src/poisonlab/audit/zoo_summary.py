"""What the detection zoo measured (see poisonlab.audit.detection_zoo): per detector TPR and FPR
at its default threshold, ROC AUC of its statistic, target accuracy, seed agreement and CPU
seconds, overall, per trigger family and per data set; the tables and the ROC figure."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from poisonlab.audit.checks import DETECTORS
from poisonlab.audit.detection_zoo import (
    detection_path,
    model_paths,
    read_json,
)
from poisonlab.audit.zoo_specs import (
    STATISTICS,
    ZooConfig,
    generate_specs,
)
from poisonlab.metrics import roc_auc, roc_points


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _sd(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else None


def _rates(rows: list[dict], positives: set[str], negatives: set[str]) -> dict[str, Any]:
    """TPR, FPR, AUC and target accuracy of one detector and seed; rows: id → verdict."""
    pos = [r for r in rows if r["model"] in positives]
    neg = [r for r in rows if r["model"] in negatives]
    hits = [r for r in pos if r["detected"]]
    out: dict[str, Any] = {
        "positives": len(pos), "negatives": len(neg),
        "tpr": len(hits) / len(pos) if pos else None,
        "fpr": sum(r["detected"] for r in neg) / len(neg) if neg else None,
        "target_accuracy": (sum(r["target"] == r["true_target"] for r in hits) / len(hits)
                            if hits else None),
        "detected_backdoored": len(hits),
        "inconclusive": sum(r.get("status") == "inconclusive" for r in pos + neg),
        "auc": None,
    }
    if pos and neg and all("statistic" in r for r in pos + neg):
        scores = [r["statistic"] for r in pos + neg]
        labels = [1] * len(pos) + [0] * len(neg)
        out["auc"] = roc_auc(torch.tensor(scores, dtype=torch.float64), torch.tensor(labels))
    return out


def load_results(folder: Path | str, cfg: ZooConfig) -> tuple[list[dict], dict[str, list[dict]]]:
    """The model records found in the zoo folder and, per detector, the detection records found
    (each with the model's true target added as "true_target")."""
    folder = Path(folder)
    specs = generate_specs(cfg)
    models = []
    for spec in specs:
        path = model_paths(folder, spec)[1]
        if path.exists():
            models.append(read_json(path))
    found: dict[str, list[dict]] = {d: [] for d in cfg.detectors}
    for spec in specs:
        for d in cfg.detectors:
            for s in cfg.seeds:
                path = detection_path(folder, cfg, d, spec, s)
                if path.exists():
                    rec = read_json(path)
                    rec["true_target"] = spec.target
                    found[d].append(rec)
    return models, found


def _either(found: Mapping[str, list[dict]]) -> list[dict]:
    """scan's combined verdict per (model, seed) where every detector has a result: detected
    when any fired; the target Neural Cleanse's when it fired, else MM-BD's."""
    by_key: dict[tuple[str, int], dict[str, dict]] = {}
    for d, rows in found.items():
        for r in rows:
            by_key.setdefault((r["model"], r["seed"]), {})[d] = r
    out = []
    for (model, seed), got in by_key.items():
        if len(got) < len(found):
            continue
        fired = [d for d in DETECTORS if d in got and got[d]["detected"]]
        target = got[fired[0]]["target"] if fired else None
        any_row = next(iter(got.values()))
        out.append({"model": model, "seed": seed, "detected": bool(fired), "target": target,
                    "true_target": any_row["true_target"], "fired": fired,
                    "status": "detected" if fired else "none",
                    "cpu_seconds": sum(r["cpu_seconds"] for r in got.values())})
    return out


def _judge(rows: list[dict], seeds: Sequence[int], positives: set[str], negatives: set[str],
           groups: Mapping[str, set[str]]) -> dict[str, Any]:
    """One detector's numbers over the seeds: per seed, their mean and sd, the agreement, the
    CPU seconds, and the same rates per group of positives (trigger family, data set)."""
    per_seed = {s: _rates([r for r in rows if r["seed"] == s], positives, negatives)
                for s in seeds}
    out: dict[str, Any] = {"per_seed": {str(s): v for s, v in per_seed.items()}}
    for key in ("tpr", "fpr", "auc", "target_accuracy"):
        values = [v[key] for v in per_seed.values()]
        out[key] = _mean(values)
        out[f"{key}_sd"] = _sd(values)
    verdicts: dict[str, dict[int, bool]] = {}
    for r in rows:
        verdicts.setdefault(r["model"], {})[r["seed"]] = r["detected"]
    complete = [v for v in verdicts.values() if len(v) == len(seeds)]
    out["agreement"] = (sum(len(set(v.values())) == 1 for v in complete) / len(complete)
                        if complete else None)
    out["agreement_models"] = len(complete)
    cpu = [r["cpu_seconds"] for r in rows]
    out["cpu_seconds_mean"] = _mean(cpu)
    out["cpu_seconds_max"] = max(cpu) if cpu else None
    out["groups"] = {}
    for name, members in groups.items():
        rates = [_rates([r for r in rows if r["seed"] == s], positives & members, negatives)
                 for s in seeds]
        out["groups"][name] = {"positives": rates[0]["positives"],
                               "tpr": _mean([r["tpr"] for r in rates]),
                               "auc": _mean([r["auc"] for r in rates]),
                               "target_accuracy": _mean([r["target_accuracy"] for r in rates])}
    return out


def summarize(folder: Path | str, cfg: ZooConfig) -> dict[str, Any]:
    """Every number of the zoo from the records found in `folder` (a partial zoo gives partial
    numbers, with its counts)."""
    models, found = load_results(folder, cfg)
    positives = {m["spec"]["id"] for m in models if m["backdoor_took"]}
    failed = [m for m in models if m["backdoor_took"] is False]
    negatives = {m["spec"]["id"] for m in models if not m["spec"]["backdoored"]}
    groups = {f"family {f}": {m["spec"]["id"] for m in models if m["spec"]["family"] == f}
              for f in cfg.families}
    groups.update({f"data {d}": {m["spec"]["id"] for m in models if m["spec"]["dataset"] == d}
                   for d in cfg.datasets})
    judged = {d: _judge(rows, cfg.seeds, positives, negatives, groups)
              for d, rows in found.items()}
    if len(found) > 1:
        judged["either"] = _judge(_either(found), cfg.seeds, positives, negatives, groups)
        judged["either"]["auc"] = None  # a combined verdict has no single statistic
    verdict_of = {(d, r["model"]): [] for d, rows in found.items() for r in rows}
    for d, rows in found.items():
        for r in rows:
            verdict_of[(d, r["model"])].append(r["status"])
    train_cpu = {d: _mean([m["train_cpu_seconds"] for m in models if m["spec"]["dataset"] == d])
                 for d in cfg.datasets}
    return {
        "models": {
            "specs": cfg.backdoored + cfg.clean, "trained": len(models),
            "backdoored": sum(m["spec"]["backdoored"] for m in models),
            "backdoor_took": len(positives), "clean": len(negatives),
            "asr_threshold": cfg.asr_threshold,
        },
        "benign_accuracy": {d: _mean([m["benign_accuracy"] for m in models
                                      if m["spec"]["dataset"] == d]) for d in cfg.datasets},
        "training": {"cpu_seconds_total": sum(m["train_cpu_seconds"] for m in models),
                     "cpu_seconds_mean_by_dataset": train_cpu},
        "excluded": [{"id": m["spec"]["id"], "family": m["spec"]["family"],
                      "dataset": m["spec"]["dataset"], "asr": m["attack_success_rate"],
                      "verdicts": {d: verdict_of.get((d, m["spec"]["id"]), [])
                                   for d in found}} for m in failed],
        "seeds": list(cfg.seeds),
        "statistics": {d: STATISTICS[d] for d in found},
        "detectors": judged,
    }


def _fmt(value: Any, sd: Any = None, pct: bool = False) -> str:
    if value is None:
        return "–"
    text = f"{100 * value:.0f}%" if pct else f"{value:.2f}"
    if sd is not None:
        text += f" ± {100 * sd:.0f}" if pct else f" ± {sd:.2f}"
    return text


def summary_tables(summary: Mapping[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the summary: the detectors, then per group."""
    names = {"nc": "NC", "mmbd": "MM-BD", "either": "either"}
    judged = summary["detectors"]
    rows = []
    for d, v in judged.items():
        rows.append([names[d], _fmt(v["tpr"], v["tpr_sd"], True), _fmt(v["fpr"], v["fpr_sd"], True),
                     _fmt(v["auc"], v["auc_sd"]), _fmt(v["target_accuracy"], None, True),
                     _fmt(v["agreement"], None, True),
                     "–" if v["cpu_seconds_mean"] is None else f"{v['cpu_seconds_mean']:.1f}"])
    head = ["detector", "TPR", "FPR", "ROC AUC", "target acc.", "agreement", "CPU-s / model"]
    m = summary["models"]
    title = (f"{m['backdoor_took']} backdoored models whose backdoor took (ASR ≥ "
             f"{m['asr_threshold']:g}) vs {m['clean']} clean; mean ± sd over seeds "
             f"{', '.join(map(str, summary['seeds']))}; NC: Neural Cleanse, either: scan's "
             "verdict (any detector fired)")
    tables = [(title, head, rows)]
    groups = next(iter(judged.values()))["groups"] if judged else {}
    grows = []
    for g in groups:
        row = [g, str(next(iter(judged.values()))["groups"][g]["positives"])]
        for v in judged.values():
            row += [_fmt(v["groups"][g]["tpr"], None, True), _fmt(v["groups"][g]["auc"])]
        grows.append(row)
    ghead = ["group", "positives"] + [c for d in judged for c in (f"{names[d]} TPR",
                                                                  f"{names[d]} AUC")]
    tables.append(("per trigger family and data set (AUC against all clean models)", ghead,
                   grows))
    if summary["excluded"]:
        tables.append(("backdoors that did not take (excluded from TPR and AUC)",
                       ["model", "ASR", *(names[d] for d in summary["statistics"])],
                       [[e["id"], f"{e['asr']:.2f}",
                         *(",".join(e["verdicts"].get(d, [])) or "–"
                           for d in summary["statistics"])] for e in summary["excluded"]]))
    return tables


def roc_figure(path: Path | str, folder: Path | str, cfg: ZooConfig) -> Path | None:
    """The ROC curves of every detector's statistic, one line per seed (None: nothing to draw)."""
    from poisonlab.report.style import COLORS, new_figure, save_figure

    models, found = load_results(folder, cfg)
    positives = {m["spec"]["id"] for m in models if m["backdoor_took"]}
    negatives = {m["spec"]["id"] for m in models if not m["spec"]["backdoored"]}
    fig, ax = new_figure(4.5, 4.2)
    drawn = False
    styles = ["-", "--", ":", "-."]
    for i, (d, rows) in enumerate(found.items()):
        for j, seed in enumerate(cfg.seeds):
            use = [r for r in rows if r["seed"] == seed and r["model"] in positives | negatives]
            labels = [int(r["model"] in positives) for r in use]
            if len(set(labels)) < 2:
                continue
            scores = torch.tensor([r["statistic"] for r in use], dtype=torch.float64)
            fpr, tpr, _ = roc_points(scores, torch.tensor(labels))
            auc = roc_auc(scores, torch.tensor(labels))
            ax.plot(fpr.numpy(), tpr.numpy(), color=COLORS[i % len(COLORS)],
                    linestyle=styles[j % len(styles)], drawstyle="steps-post",
                    label=f"{DETECTORS[d]} seed {seed} (AUC {auc:.2f})")
            drawn = True
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("false-positive rate (clean models)")
    ax.set_ylabel("true-positive rate (backdoored models)")
    ax.set_title("backdoor detectors on the zoo")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


# --- cost estimate -----------------------------------------------------------------------------
