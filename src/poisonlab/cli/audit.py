"""`poisonlab scan` and `poisonlab purify`: audit a model you did not train.

scan MODEL --arch NAME [--data DIR | --dataset NAME] [--members R --non-members R]
    Loads the weights safely (safetensors, or torch.load(weights_only=True)), runs each check and
    prints a verdict; writes a report folder (report.html, scan.json, figures). Exit code 0
    whatever the verdict; --json prints the result as one JSON object on the last line. Checks are
    listed in CHECKS: each takes the loaded context and returns (summary dict, report section,
    verdict line); more checks plug in there. "backdoor" (Neural Cleanse) needs clean images
    (--data or --dataset); "membership" (cli/scan_membership.py) needs a member and a non-member
    record set (record files, see poisonlab.data.records, or splits of --dataset). By default
    every check whose inputs are given runs; --check picks some.

purify MODEL --arch NAME (--clean-data DIR | --dataset NAME) --out NEW_MODEL [--target L]
    MCL purification with the clean data (target from a Neural Cleanse scan when not given);
    writes the purified weights as safetensors and prints BA / ASR before and after when a
    test set (and, for ASR, a known trigger) is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from poisonlab.cli.scan_membership import (
    SPLITS,
    check_record_sets,
    load_record_sets,
    membership_check,
)
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError

# Input shape the architectures are built for, when the model file does not say.
DEFAULT_INPUT = {"resnet": (3, 32, 32), "small_cnn": (1, 28, 28), "tiny_cnn": (1, 28, 28)}

ArchOpt = Annotated[str, typer.Option("--arch", "-a", help="Architecture name (e.g. resnet20).")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="A named data set (cifar10, mnist, glyphs) instead of a folder.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Where the named data set lives (default: $POISONLAB_DATA/NAME).")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", help="Input height/width the model expects (default: from the file or arch).")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="Clean images used by the scan.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Neural Cleanse steps per label.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Also print one JSON object (last line).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
RecordsHelp = ("a .safetensors record file ('images' uint8 or float in [0, 1] [N, C, H, W], "
               "'labels' int64 [N]) or an image folder with one sub-folder per class (folders "
               "named 0, 1, ... give the labels)")
MembersOpt = Annotated[Path | None, typer.Option(
    "--members", help=f"Records the model was trained on: {RecordsHelp}.")]
NonMembersOpt = Annotated[Path | None, typer.Option(
    "--non-members", help="Records from the same distribution the model never saw (same format).")]
MembersSplitOpt = Annotated[str | None, typer.Option(
    "--members-split", help=f"Instead of --members: a split of --dataset ({', '.join(SPLITS)}).")]
NonMembersSplitOpt = Annotated[str | None, typer.Option(
    "--non-members-split", help=f"Instead of --non-members: a split of --dataset "
    f"({', '.join(SPLITS)}).")]
RecordsOpt = Annotated[int | None, typer.Option(
    "--records", help="At most N records from each set, drawn with --seed (default: all of a file "
    "or folder, 1000 of a split).")]
LabelOnlyOpt = Annotated[bool, typer.Option(
    "--label-only", help="Also run the label-only membership attack (predicted labels only).")]


@dataclass
class AuditContext:
    """What every check gets: the model, its name, the clean sample (None when no check needs
    it) and options (the membership record sets are options["records"])."""

    model: torch.nn.Module
    model_path: Path
    arch: str
    clean: ImageSet | None
    classes: list[str]
    report_dir: Path
    options: dict[str, Any] = field(default_factory=dict)


# --- loading -----------------------------------------------------------------------------------


def input_shape(arch: str, meta: dict[str, str], image_size: int | None, channels: int) -> tuple:
    """(C, H, W) the model expects: --image-size, else the file's metadata, else the arch's."""
    if image_size is not None:
        return (channels, image_size, image_size)
    if "input_shape" in meta:
        try:
            return tuple(int(v) for v in json.loads(meta["input_shape"]))
        except (ValueError, TypeError):
            pass
    for prefix, shape in DEFAULT_INPUT.items():
        if arch.startswith(prefix):
            return shape
    return (channels, 0, 0)  # unknown: accept the data's size


def load_model_file(path: Path, arch: str, num_classes: int | None, in_channels: int | None):
    """Build `arch` and load `path` into it; (model, metadata). Never unpickles arbitrary code."""
    from poisonlab.models import build_model
    from poisonlab.runs.checkpoints import load_into, load_weights

    state, meta = load_weights(path)
    head = state.get("head.weight")
    if num_classes is None:
        if head is None or head.dim() != 2:
            raise ConfigError(f"cannot tell the number of classes from {path}: pass --num-classes")
        num_classes = int(head.shape[0])
    if in_channels is None:
        first = next((v for k, v in state.items() if v.dim() == 4), None)
        in_channels = int(first.shape[1]) if first is not None else 3
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    load_into(model, state, name=arch)
    return model.eval(), meta


def load_clean(data: Path | None, dataset: str | None, data_dir: Path | None, split: str,
               seed: int) -> tuple[ImageSet, list[str]]:
    """Clean labelled images from an image folder or a named data set's `split`."""
    if (data is None) == (dataset is None):
        raise ConfigError("give exactly one of a data folder (--data/--clean-data) or --dataset")
    if data is not None:
        from poisonlab.data.image_folder import load_image_folder

        return load_image_folder(data)
    if dataset == "glyphs":
        from poisonlab.data.glyphs import load_glyph_supervised

        sup = load_glyph_supervised(seed=seed)
    else:
        from poisonlab.data.registry import check_name, load_dataset

        sup = load_dataset(check_name(dataset, ("cifar10", "mnist")), data_dir)
    return (sup.train if split == "train" else sup.test), sup.classes


def check_images(images: ImageSet, shape: tuple, source: str) -> None:
    """One-line DataError when the images do not have the shape the model expects."""
    got = tuple(images.x.shape[1:])
    if len(images) == 0:
        raise DataError(f"no images in {source}")
    if shape[1] and got != tuple(shape):
        raise DataError(f"images in {source} are {got[0]}x{got[1]}x{got[2]} (CxHxW), but the "
                        f"model expects {shape[0]}x{shape[1]}x{shape[2]}")


def sample(images: ImageSet, n: int, seed: int) -> ImageSet:
    if n < 1:
        raise ConfigError(f"--samples must be >= 1, got {n}")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return images.subset(order[:n])


# --- checks ------------------------------------------------------------------------------------


def backdoor_check(ctx: AuditContext) -> tuple[dict, Any, str]:
    """Neural Cleanse: reverse-engineer a trigger per label, flag anomalously small ones."""
    from poisonlab.defenses.neural_cleanse import InversionConfig, NeuralCleanse
    from poisonlab.progress import progress_bar
    from poisonlab.report.html import Section, Table

    opts = ctx.options
    cfg = InversionConfig(steps=opts["steps"], batch_size=opts["batch_size"], seed=opts["seed"],
                          early_stop_patience=max(5, opts["steps"] // 4))
    k = len(ctx.classes)
    with progress_bar(k, "neural cleanse", enabled=opts["progress"]) as bar:
        result = NeuralCleanse(cfg, opts["threshold"]).detect(
            ctx.model, ctx.clean.x, k, progress=lambda label: bar.advance(status=f"label {label}"))
    summary = result.to_dict()
    for row in summary["labels"]:
        row["class"] = ctx.classes[row["label"]]
    figure = _trigger_grid(ctx.report_dir / "neural_cleanse_triggers.png", result, ctx.classes)
    rows = [[r["label"], r["class"], r["mask_l1"], r["anomaly_index"], "FLAGGED" if r["flagged"]
             else ""] for r in summary["labels"]]
    section = Section("Backdoor (Neural Cleanse)", paragraphs=[_verdict(summary)],
                      tables=[Table(["label", "class", "mask L1", "anomaly index", ""], rows)],
                      figures=[figure])
    return summary, section, _verdict(summary)


def _verdict(summary: dict) -> str:
    if not summary["flagged"]:
        return f"backdoor: none detected (no label with anomaly index > {summary['threshold']})"
    parts = [f"{r['label']} ({r['class']}, index {r['anomaly_index']:.2f})"
             for r in summary["labels"] if r["flagged"]]
    return "backdoor: SUSPECTED, target label " + ", ".join(parts)


def _trigger_grid(path: Path, result, classes: list[str]) -> Path:
    from poisonlab.report.style import new_figure, save_figure

    k = len(result.results)
    fig, axes = new_figure(1.3 * k, 2.8, nrows=2, ncols=k, squeeze=False)
    for i, r in enumerate(result.results):
        trig = r.trigger
        for row, (img, name) in enumerate(((trig.mask.expand_as(trig.pattern), "mask"),
                                           (trig.pattern * trig.mask, "pattern"))):
            ax = axes[row, i]
            img = img.clamp(0, 1)
            ax.imshow(img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy(),
                      cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{i}{'*' if i in result.flagged else ''} {name}" if row == 0 else name,
                         fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
    return save_figure(fig, path)


CHECKS: dict[str, Callable[[AuditContext], tuple[dict, Any, str]]] = {
    "backdoor": backdoor_check, "membership": membership_check}
# What each check needs: clean images (--data/--dataset) or the membership record sets.
NEEDS = {"backdoor": ("clean", "clean images: give --data DIR or --dataset NAME"),
         "membership": ("records", "--members and --non-members (or their --*-split options)")}


# --- commands ----------------------------------------------------------------------------------


def scan_command(
    model: Annotated[Path, typer.Argument(help="Weights file (.safetensors, or .pt/.pth).")],
    arch: ArchOpt,
    data: Annotated[Path | None, typer.Option("--data", help="Folder of clean images, one "
                                              "sub-folder per class.")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    members: MembersOpt = None,
    non_members: NonMembersOpt = None,
    members_split: MembersSplitOpt = None,
    non_members_split: NonMembersSplitOpt = None,
    records: RecordsOpt = None,
    label_only: LabelOnlyOpt = False,
    samples: SamplesOpt = 200,
    steps: StepsOpt = 40,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 50,
    threshold: Annotated[float, typer.Option("--threshold", help="Anomaly index cut-off.")] = 2.0,
    image_size: ImageSizeOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Report folder (default: "
                                                "./scan-<model name>).")] = None,
    check: Annotated[list[str] | None, typer.Option("--check", help=f"Checks to run: "
                                                    f"{', '.join(CHECKS)} (default: every check "
                                                    "whose inputs are given).")] = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Scan a model for a backdoor and for membership leakage; print a verdict per check.

    Each check runs when its inputs are given (--check picks some):

    backdoor: Neural Cleanse on clean images (--data DIR, or the test split of --dataset NAME).

    membership: can a loss-threshold attack tell --members (training records) from --non-members?
    Record sets are .safetensors files or image folders, or splits of --dataset
    (--members-split train --non-members-split test).

    A quick leakage audit without Neural Cleanse: --check membership.
    """
    from poisonlab.report.html import Section, rich_table, write_html_report

    sets = load_record_sets(members, non_members, members_split, non_members_split, dataset,
                            data_dir, records, seed)
    checks = _select_checks(check, data is not None or dataset is not None, sets is not None)
    images, classes = (load_clean(data, dataset, data_dir, "test", seed) if "backdoor" in checks
                       else (None, []))
    channels = int(images.x.shape[1]) if images is not None else None
    net, meta = load_model_file(model, arch, None, channels)
    shape = input_shape(arch, meta, image_size, channels or _model_channels(net, sets))
    if images is not None:
        check_images(images, shape, str(data or dataset))
    classes = _class_names(classes, net)
    if sets is not None and "membership" in checks:
        check_record_sets(sets, net, shape, len(classes))
    report_dir = report or Path(f"scan-{model.stem}")
    report_dir.mkdir(parents=True, exist_ok=True)
    clean = sample(images, samples, seed) if images is not None else None
    ctx = AuditContext(net, model, arch, clean, classes, report_dir,
                       {"steps": steps, "batch_size": batch_size, "threshold": threshold,
                        "seed": seed, "progress": not quiet, "records": sets,
                        "label_only": label_only})
    result: dict[str, Any] = {"model": str(model), "arch": arch}
    about = f"{model} ({arch})"
    if clean is not None:
        result["samples"] = len(clean)
        about += f", {len(clean)} clean images"
    sections = [Section("Model", paragraphs=[about])]
    console = Console()
    for name in checks:
        summary, section, verdict = CHECKS[name](ctx)
        result[name] = summary
        sections.append(section)
        for table in section.tables:
            console.print(rich_table(table, title=section.heading))
        console.print(verdict)
    (report_dir / "scan.json").write_text(json.dumps(result, indent=2) + "\n")
    write_html_report(report_dir / "report.html", f"scan: {model.name}", sections)
    console.print(f"report: {report_dir / 'report.html'}")
    if as_json:
        print(json.dumps(result))


def _select_checks(check: list[str] | None, has_clean: bool, has_records: bool) -> list[str]:
    """The checks asked for (each must have its inputs), or every check whose inputs are given."""
    given = {"clean": has_clean, "records": has_records}
    if not check:
        checks = [name for name, (need, _) in NEEDS.items() if given[need]]
        if not checks:
            raise ConfigError("nothing to scan: give clean images (--data DIR or --dataset NAME) "
                              "and/or --members and --non-members")
        return checks
    unknown = [c for c in check if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown check '{unknown[0]}' (known: {', '.join(CHECKS)})")
    for name in check:
        need, what = NEEDS[name]
        if not given[need]:
            raise ConfigError(f"the {name} check needs {what}")
    return list(dict.fromkeys(check))


def _model_channels(net: torch.nn.Module, sets) -> int:
    """Input channels of the model's first convolution (else of the member records)."""
    conv = next((m for m in net.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if conv is not None:
        return int(conv.in_channels)
    return int(sets.members.x.shape[1]) if sets is not None else 3


def _class_names(classes: list[str], net: torch.nn.Module) -> list[str]:
    k = int(net.head.out_features) if hasattr(net, "head") else len(classes)
    if len(classes) > k:
        raise DataError(f"the data has {len(classes)} classes but the model only {k}")
    return list(classes) + [str(i) for i in range(len(classes), k)]


def purify_command(
    model: Annotated[Path, typer.Argument(help="Weights file of the suspect model.")],
    arch: ArchOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the purified weights "
                                      "(.safetensors).")],
    clean_data: Annotated[Path | None, typer.Option("--clean-data", help="Folder of clean "
                                                    "images, one sub-folder per class.")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    clean_fraction: Annotated[float, typer.Option("--clean-fraction", help="With --dataset: the "
                                                  "share of its training set used.")] = 0.05,
    target: Annotated[int | None, typer.Option("--target", help="Backdoor target label (default: "
                                               "the label a Neural Cleanse scan flags).")] = None,
    test_data: Annotated[Path | None, typer.Option("--test-data", help="Clean test images for "
                                                   "BA (with --dataset: its test split).")] = None,
    trigger: Annotated[str | None, typer.Option("--trigger", help="A known trigger (badnets, "
                                                "blend, grid, trojan) to measure ASR.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="MCL fine-tuning epochs.")] = 20,
    inversion_steps: Annotated[int, typer.Option("--inversion-steps")] = 100,
    ce_weight: Annotated[float, typer.Option("--ce-weight", help="Optional cross-entropy term "
                                             "(0 = the reference MCL loss).")] = 0.0,
    distill_weight: Annotated[float, typer.Option("--distill-weight", help="Self-distillation "
                                                  "term on clean inputs (0 = the reference "
                                                  "loss).")] = 1.0,
    bn_recalibration: Annotated[bool, typer.Option("--bn-recalibration/--no-bn-recalibration",
                                                   help="Re-estimate batch-norm statistics on "
                                                   "the clean images after MCL.")] = True,
    scan_steps: StepsOpt = 40,
    image_size: ImageSizeOpt = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove a backdoor with MCL on a little clean data; write the purified model."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {out}")
    clean, classes = load_clean(clean_data, dataset, data_dir, "train", seed)
    if dataset is not None:
        clean = sample(clean, max(1, round(clean_fraction * len(clean))), seed)
    channels = int(clean.x.shape[1])
    net, meta = load_model_file(model, arch, None, channels)
    shape = input_shape(arch, meta, image_size, channels)
    check_images(clean, shape, str(clean_data or dataset))
    test = _test_set(test_data, dataset, data_dir, seed, shape)
    known = _known_trigger(trigger, tuple(clean.x.shape[1:]), seed)
    target = _resolve_target(net, clean, target, len(_class_names(classes, net)), scan_steps,
                             seed, quiet)
    result = {"model": str(model), "arch": arch, "target": target, "clean_images": len(clean),
              "before": _metrics(net, test, known, target)}
    from poisonlab.defenses.finetuning import FineTuneConfig
    from poisonlab.defenses.mcl import MCL, MCLConfig, reference_inversion
    from poisonlab.progress import progress_bar

    inv = reference_inversion()
    inv.steps, inv.seed = inversion_steps, seed
    method = MCL(MCLConfig(inversion=inv, finetune=FineTuneConfig(epochs=epochs, seed=seed),
                           ce_weight=ce_weight, distill_weight=distill_weight,
                           recalibrate_bn=bn_recalibration))
    with progress_bar(method.steps(), "MCL", enabled=not quiet) as bar:
        purified = method.purify(net, clean, target,
                                 progress=lambda status: bar.advance(status=status)).model
    result["after"] = _metrics(purified, test, known, target)
    from poisonlab.runs.checkpoints import save_weights

    save_weights(out, purified.state_dict(), {"arch": arch, "input_shape": json.dumps(list(shape)),
                                              "purified_by": "mcl", "target": str(target)})
    result["out"] = str(out)
    _print_purify(result)
    if as_json:
        print(json.dumps(result))


def _test_set(test_data, dataset, data_dir, seed, shape) -> ImageSet | None:
    if test_data is None and dataset is None:
        return None
    images, _ = load_clean(test_data, None if test_data else dataset, data_dir, "test", seed)
    check_images(images, shape, str(test_data or dataset))
    return images


def _known_trigger(name: str | None, shape: tuple, seed: int):
    if name is None:
        return None
    from poisonlab.attacks.triggers import make_trigger

    return make_trigger(name, shape, **({"seed": seed} if name == "blend" else {}))


def _resolve_target(net, clean: ImageSet, target, classes: int, steps: int, seed: int,
                    quiet: bool) -> int:
    if target is not None:
        if not 0 <= target < classes:
            raise ConfigError(f"--target {target} is not a label of the model (0..{classes - 1})")
        return target
    from poisonlab.defenses.mcl import detect_target
    from poisonlab.defenses.neural_cleanse import InversionConfig

    cfg = InversionConfig(steps=steps, batch_size=50, seed=seed,
                          early_stop_patience=max(5, steps // 4))
    found, _ = detect_target(net, sample(clean, 200, seed).x, classes, cfg)
    if found is None:
        raise ConfigError("Neural Cleanse flags no label, so there is no target to purify: "
                          "pass --target L to purify anyway")
    if not quiet:
        Console(stderr=True).print(f"target label {found} (flagged by Neural Cleanse)")
    return found


def _metrics(net, test: ImageSet | None, trigger, target: int) -> dict:
    from poisonlab.attacks.backdoor_injection import attack_success_rate
    from poisonlab.training.supervised import evaluate

    if test is None:
        return {}
    out = {"benign_accuracy": evaluate(net, test)}
    if trigger is not None:
        out["attack_success_rate"] = attack_success_rate(net, trigger, test, target)
    return out


def _print_purify(result: dict) -> None:
    console = Console()
    console.print(f"purified for target label {result['target']} with "
                  f"{result['clean_images']} clean images -> {result['out']}")
    for key in ("benign_accuracy", "attack_success_rate"):
        if key in result["before"]:
            console.print(f"  {key.replace('_', ' ')}: {100 * result['before'][key]:.2f}% -> "
                          f"{100 * result['after'][key]:.2f}%")


def register(app: typer.Typer) -> None:
    """Add `scan` and `purify` to the main app."""
    app.command("scan")(scan_command)
    app.command("purify")(purify_command)
