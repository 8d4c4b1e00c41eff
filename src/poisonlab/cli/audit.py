"""`poisonlab scan` and `poisonlab purify`: audit a model you did not train.

scan MODEL --arch NAME [--data DIR | --dataset NAME] [--members R --non-members R]
     [--trigger NAME|FILE [--trigger-mask FILE] --target L]
    Loads the weights safely (safetensors, or torch.load(weights_only=True)), runs each check of
    poisonlab.audit.CHECKS and prints a verdict; writes a report folder (report.html, scan.json,
    figures). Exit code 0 whatever the verdict; --json prints the result as one JSON object on
    the last line. "backdoor" (Neural Cleanse and MM-BD, --detectors) needs clean images (--data
    or --dataset; MM-BD takes only their shape);
    "membership" needs a member and a non-member record set (record files, see
    poisonlab.data.records, or splits of --dataset). By default every check whose inputs are
    given runs; --check picks some. "trigger" needs clean images and --trigger (a named trigger
    or a file: poisonlab.audit.trigger) with --target L. With --encoder, MODEL is a pre-trained
    image encoder and the scan is the label-free encoder scan of cli/encoder.py instead.

purify MODEL --arch NAME (--clean-data DIR | --dataset NAME) --out NEW_MODEL [--target L]
       [--test-data DIR] [--trigger NAME|FILE [--trigger-mask FILE]]
    MCL purification with the clean data (target from a Neural Cleanse scan when not given);
    writes the purified weights as safetensors and prints BA / ASR before and after when a
    test set (and, for ASR, a --trigger: named, or a file as for scan) is given.

--data and --clean-data are one option, spelled either way, in both commands.

The work is poisonlab.audit's; this module parses options into its settings (a bad value is
one line naming the option, before any work), calls it, prints and writes files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from poisonlab.attacks.triggers import TRIGGERS
from poisonlab.audit import (
    CHECKS,
    BackdoorResult,
    CleanSubset,
    EncoderAuditConfig,
    ScanConfig,
    find_target,
    known_trigger,
    load_clean,
    load_model,
    load_record_sets,
    purify,
    scan,
    select_checks,
)
from poisonlab.audit.checks import CheckResult
from poisonlab.audit.data import check_images, class_names, load_clean_for
from poisonlab.audit.membership import SPLITS
from poisonlab.audit.model import DEFAULT_SIZE
from poisonlab.audit.purify import target_of
from poisonlab.audit.scan import ON_CLEAN
from poisonlab.audit.trigger import TriggerSource
from poisonlab.cli.encoder import (
    ENCODER_ONLY,
    ENCODER_OPTIONS,
    encoder_settings,
    refuse_options,
    run_encoder_scan,
)
from poisonlab.config import check_seed
from poisonlab.data.cache import CACHE_LOCATION
from poisonlab.data.registry import DATA_LOCATION
from poisonlab.data.types import ImageSet
from poisonlab.defenses.mcl import MCL
from poisonlab.errors import ConfigError, printable
from poisonlab.progress import terminal
from poisonlab.report.html import rich_table
from poisonlab.runs.checkpoints import save_weights
from poisonlab.runs.layout import prepare_output, report_folder

S = TypeVar("S", bound=BaseModel)

ArchOpt = Annotated[str, typer.Option("--arch", "-a", help="Architecture name (e.g. resnet20).")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="A named data set (cifar10, mnist, glyphs) instead of a folder; its "
    f"decoded arrays are cached in {CACHE_LOCATION}.")]
CleanDataOpt = Annotated[Path | None, typer.Option(
    "--data", "--clean-data", help="Folder of clean labelled images, one sub-folder per class "
    "(either spelling, in scan and purify alike); decoded on every run, nothing is cached.")]
CleanFractionOpt = Annotated[float | None, typer.Option(
    "--clean-fraction", help="Share of the clean images used, drawn with --seed (default: all "
    f"of a --clean-data folder, {CleanSubset.DATASET_FRACTION:.0%} of the --dataset training "
    "split).")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help=f"Where the files of the --dataset are (default: {DATA_LOCATION}).")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", help="Input height/width the model expects (default: the model file's "
    "input_shape metadata, else the size its weights fix, else the architecture's usual size: "
    + ", ".join(f"{size} for {arch}" for arch, size in DEFAULT_SIZE.items()) + ").")]
TriggerOpt = Annotated[str | None, typer.Option(
    "--trigger", help=f"A trigger to measure: one of {', '.join(sorted(TRIGGERS))}, or a file "
    "of the model's input size: an image (PNG, ...) added to the images (x + pixels/255, "
    "clipped) or, with --trigger-mask, blended in, (1 - m)x + m·p; or a .safetensors file "
    "with 'pattern' [C, H, W] and optionally 'mask' [1, H, W] or [H, W] in [0, 1] (without a "
    "mask the pattern, in [-1, 1], is added).")]
TriggerMaskOpt = Annotated[Path | None, typer.Option(
    "--trigger-mask", help="With an image --trigger file: a grayscale image of the same size, "
    "m = pixels/255, where the trigger replaces the image.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Neural Cleanse steps per label.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.", callback=check_seed)]
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


def scan_command(
    model: Annotated[Path, typer.Argument(help="Weights file (.safetensors, or .pt/.pth).")],
    arch: ArchOpt,
    data: CleanDataOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    members: MembersOpt = None,
    non_members: NonMembersOpt = None,
    members_split: MembersSplitOpt = None,
    non_members_split: NonMembersSplitOpt = None,
    records: RecordsOpt = None,
    label_only: LabelOnlyOpt = False,
    samples: Annotated[int | None, typer.Option("--samples", help="Clean images used by the "
                                                "scan (default 200; --encoder: 50).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Neural Cleanse steps per label "
                                              "(default 40; --encoder: inversion passes, "
                                              "200).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Mini-batch size "
                                                   "(default 50; --encoder: 256).")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Anomaly index cut-off "
                                                    "(default 2; --encoder: the normalised "
                                                    "trigger size, 0.1).")] = None,
    encoder: Annotated[bool, typer.Option("--encoder", help="MODEL is a pre-trained image "
                                          "encoder: scan it for a backdoor without labels "
                                          "(DECREE-style trigger inversion).")] = False,
    restarts: Annotated[int | None, typer.Option("--restarts", help="Independent random starts "
                                                 "per label, the smallest trigger kept and the "
                                                 "index's spread shown (default 3; --encoder: "
                                                 "independent inversions, 2).")] = None,
    band: Annotated[float | None, typer.Option("--band", help="A largest anomaly index within "
                                               "threshold ± band is reported as inconclusive "
                                               "(default 0.5; 0: a flat yes/no).")] = None,
    detectors: Annotated[str | None, typer.Option("--detectors", help="The backdoor check's "
                                                  "detectors, comma-separated: nc (Neural "
                                                  "Cleanse, on the clean images), mmbd (MM-BD: "
                                                  "each class's maximum logit margin, no clean "
                                                  "data) (default: nc,mmbd).")] = None,
    similarity: Annotated[float | None, typer.Option("--similarity", help="--encoder: mean "
                                                     "pairwise cosine a trigger must reach "
                                                     "(default 0.99).")] = None,
    trigger: TriggerOpt = None,
    trigger_mask: TriggerMaskOpt = None,
    target: Annotated[int | None, typer.Option("--target", help="With --trigger: the label it "
                                               "should send images to (the trigger check "
                                               "reports the share of clean images of other "
                                               "labels it sends there).")] = None,
    image_size: ImageSizeOpt = None,
    report: Annotated[Path | None, typer.Option("--report", help="Report folder (default: "
                                                "./scan-<model name>); one that holds an "
                                                "earlier report needs --overwrite.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the report files of "
                                            "an earlier scan in the --report folder.")] = False,
    check: Annotated[list[str] | None, typer.Option("--check", help=f"Checks to run: "
                                                    f"{', '.join(CHECKS)} (default: every check "
                                                    "whose inputs are given).")] = None,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Scan a model for a backdoor and for membership leakage; print a verdict per check.

    Each check runs when its inputs are given (--check picks some):

    backdoor: Neural Cleanse on clean images (--data DIR, or the test split of --dataset NAME)
    and MM-BD (each class's maximum margin, no clean data); --detectors picks them.

    membership: can a loss-threshold attack tell --members (training records) from --non-members?
    Record sets are .safetensors files or image folders, or splits of --dataset
    (--members-split train --non-members-split test).

    A quick leakage audit without Neural Cleanse: --check membership.

    trigger: with --trigger (a named trigger or a file) and --target L, the share of the clean
    images of other labels that the trigger sends to L (its attack success rate).

    encoder (--encoder): MODEL is an image encoder; invert the smallest trigger that maps the
    clean images to one cluster and flag a small one (no labels, no trigger knowledge).
    """
    if encoder:
        refuse_options({"--members": members, "--non-members": non_members, "--members-split":
                        members_split, "--non-members-split": non_members_split, "--records":
                        records, "--label-only": label_only, "--check": check, "--trigger":
                        trigger, "--trigger-mask": trigger_mask, "--target": target,
                        "--band": band, "--detectors": detectors})
        enc_config = settings(EncoderAuditConfig, encoder_settings(
            samples=samples, steps=steps, batch_size=batch_size, threshold=threshold,
            restarts=restarts, similarity=similarity), ENCODER_OPTIONS)
        run_encoder_scan(model, arch, enc_config, data=data, dataset=dataset, data_dir=data_dir,
                         image_size=image_size, report=report, overwrite=overwrite, seed=seed,
                         as_json=as_json,
                         quiet=quiet)
        return
    refuse_options({"--similarity": similarity}, ENCODER_ONLY)
    given = {"samples": samples, "steps": steps, "batch_size": batch_size, "threshold": threshold,
             "restarts": restarts, "band": band, "detectors": detectors}
    config = settings(ScanConfig, {
        **{k: v for k, v in given.items() if v is not None},
        "records": records, "label_only": label_only}, SCAN_OPTIONS)
    suspect = TriggerSource.parse(trigger, trigger_mask)
    if (suspect is None) != (target is None):
        raise ConfigError("--trigger needs --target L" if target is None else
                          "--target applies only with --trigger (the label the trigger should "
                          "send images to)")
    given_sets = any(g is not None for g in (members, non_members, members_split,
                                             non_members_split))
    checks = select_checks(check, data is not None or dataset is not None, given_sets,
                           suspect is not None)
    if "backdoor" not in checks:
        refuse_options({"--detectors": detectors, "--steps": steps, "--threshold": threshold,
                        "--band": band, "--restarts": restarts},
                       "applies only to the backdoor check (give clean images: --data DIR or "
                       "--dataset NAME)")
    if not any(c in ON_CLEAN for c in checks):
        refuse_options({"--samples": samples}, "applies only to the checks on clean images "
                       "(backdoor, trigger)")
    if "membership" not in checks:  # as --similarity without --encoder: never silently unused
        refuse_options({"--records": records, "--label-only": label_only},
                       "applies only to the membership check (give --members and --non-members)")
    sets = load_record_sets(members, non_members, members_split, non_members_split, dataset,
                            data_dir, config.records, seed)
    def load(channels: int | None):
        return load_model(model, arch, in_channels=channels, image_size=image_size)

    images, classes = None, []
    if any(c in ON_CLEAN for c in checks):
        images, classes, net, shape = load_clean_for(load, data, dataset, data_dir, "test", seed)
    else:
        net, shape = load(None)
    clean_source = str(data or dataset)
    built = None
    if suspect is not None and images is not None:
        check_images(images, shape, clean_source)  # the images' shape is the model's
        built = suspect.build(tuple(images.x.shape[1:]), seed)
    report_dir = report_folder(report or Path(f"scan-{model.stem}"), overwrite)
    result = scan(net, clean=images, records=sets, checks=checks, classes=classes,
                  config=config, seed=seed, progress=not quiet, report_dir=report_dir,
                  input_shape=shape, name=str(model), arch=arch, clean_source=clean_source,
                  trigger=built, target=target if built is not None else None)
    for check_result in result.checks.values():
        _print_check(check_result)
    terminal().print(f"report: {printable(str(report_dir / 'report.html'))}")
    if as_json:
        print(json.dumps(result.to_dict()))


SCAN_OPTIONS = {"samples": "--samples", "steps": "--steps", "batch_size": "--batch-size",
                "threshold": "--threshold", "records": "--records", "restarts": "--restarts",
                "band": "--band", "detectors": "--detectors"}
PURIFY_OPTIONS = {"inversion.steps": "--inversion-steps", "finetune.epochs": "--epochs",
                  "ce_weight": "--ce-weight", "distill_weight": "--distill-weight",
                  "fraction": "--clean-fraction", "steps": "--steps",
                  "restarts": "--restarts"}


def settings(cls: type[S], data: Mapping[str, Any], options: Mapping[str, str]) -> S:
    """`cls` validated from option values; a bad value is a one-line ConfigError naming the
    option (`options` maps a dotted settings key to its option) and the settings key."""
    try:
        return cls.model_validate(dict(data))
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            option = options.get(key, key)
            problems.append(f"{option} {err.get('input')}: {err['msg']} "
                            f"(setting {cls.__qualname__}.{key})")
        raise ConfigError("; ".join(problems)) from None


def purify_command(
    model: Annotated[Path, typer.Argument(help="Weights file of the suspect model.")],
    arch: ArchOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the purified weights "
                                      "(.safetensors).")],
    clean_data: CleanDataOpt = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    clean_fraction: CleanFractionOpt = None,
    target: Annotated[int | None, typer.Option("--target", help="Backdoor target label (default: "
                                               "the label a Neural Cleanse scan flags).")] = None,
    test_data: Annotated[Path | None, typer.Option("--test-data", help="Clean test images for "
                                                   "BA (with --dataset: its test split).")] = None,
    trigger: TriggerOpt = None,
    trigger_mask: TriggerMaskOpt = None,
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
    scan_restarts: Annotated[int | None, typer.Option("--restarts", help="Neural Cleanse random "
                                                      "starts per label when it finds the "
                                                      "target (default 3).")] = None,
    image_size: ImageSizeOpt = None,
    seed: SeedOpt = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out "
                                            "file.")] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove a backdoor with MCL on a little clean data; write the purified model.

    Without --target, a Neural Cleanse scan picks it first and prints its table and verdict as
    `scan` does (an inconclusive scan's candidate label is used, and said so)."""
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must be a .safetensors file, got {out}")
    if out.exists() and model.exists() and out.samefile(model):
        raise ConfigError(f"--out {out} is the suspect model itself: write the purified weights "
                          "to another file (the suspect is evidence)")
    if (out.exists() or out.is_symlink()) and not out.is_file():
        raise ConfigError(f"--out {out} exists and is not a regular file (a FIFO, device, folder "
                          "or dangling symlink): pick another file name")
    if out.is_file() and not overwrite:
        raise ConfigError(f"--out {out} exists: pass --overwrite to replace it, or pick another "
                          "file name")
    suspect = TriggerSource.parse(trigger, trigger_mask)
    if suspect is not None and test_data is None and dataset is None:
        raise ConfigError("--trigger is measured on a clean test set: give --test-data DIR (or "
                          "--dataset, whose test split is used)")
    prepare_output(out, directory=False)
    mcl = settings(MCL.Config, {
        "inversion": {**MCL.Config().inversion.model_dump(), "steps": inversion_steps},
        "finetune": {"epochs": epochs}, "ce_weight": ce_weight, "distill_weight": distill_weight,
        "recalibrate_bn": bn_recalibration}, PURIFY_OPTIONS)
    detect = settings(ScanConfig, {"steps": scan_steps, **({"restarts": scan_restarts}
                                                           if scan_restarts is not None else {})},
                      PURIFY_OPTIONS).detection()
    subset = settings(CleanSubset, {"fraction": clean_fraction}, PURIFY_OPTIONS)
    clean, classes, net, shape = load_clean_for(
        lambda channels: load_model(model, arch, in_channels=channels, image_size=image_size),
        clean_data, dataset, data_dir, "train", seed)
    clean = subset.draw(clean, seed, folder=clean_data is not None)
    check_images(clean, shape, str(clean_data or dataset))
    test = _test_set(test_data, dataset, data_dir, seed, shape)
    known = known_trigger(suspect, tuple(clean.x.shape[1:]), seed)
    found = None
    if target is None:
        detection = find_target(net, clean, config=detect, seed=seed, progress=not quiet)
        found = BackdoorResult(detection, class_names(classes, len(detection.results)))
        target = target_of(detection)
        _print_check(found)
        how = ("flagged by" if detection.status == "detected" else
               "the inconclusive candidate of")
        terminal().print(f"purifying for target label {target} ({how} Neural Cleanse)")
    report = purify(net, clean, target=target, config=mcl, detect=detect, seed=seed,
                    progress=not quiet, test=test, trigger=known, classes=classes)
    save_weights(out, report.model.state_dict(), {
        "arch": arch, "input_shape": json.dumps(list(shape)), "purified_by": "mcl",
        "target": str(report.target)})
    result = {"model": str(model), "arch": arch, **report.to_dict(), "out": str(out)}
    if found is not None:
        result["detection"] = found.to_dict()
    _print_purify(result)
    if as_json:
        print(json.dumps(result))


def _print_check(check_result: CheckResult) -> None:
    """A check's tables, verdict and notes, as `scan` prints them."""
    console = terminal()
    section = check_result.section()
    for table in section.tables:
        console.print(rich_table(table, title=table.caption or section.heading))
    console.print(check_result.text())


def _test_set(test_data, dataset, data_dir, seed, shape) -> ImageSet | None:
    if test_data is None and dataset is None:
        return None
    images, _ = load_clean(test_data, None if test_data else dataset, data_dir, "test", seed,
                           shape=shape)
    check_images(images, shape, str(test_data or dataset))
    return images


def _print_purify(result: dict) -> None:
    console = terminal()
    console.print(f"purified for target label {result['target']} with "
                  f"{result['clean_images']} clean images -> {printable(str(result['out']))}")
    for key in ("benign_accuracy", "attack_success_rate"):
        if key in result["before"]:
            console.print(f"  {key.replace('_', ' ')}: {100 * result['before'][key]:.2f}% -> "
                          f"{100 * result['after'][key]:.2f}%")


def register(app: typer.Typer) -> None:
    """Add `scan` and `purify` to the main app."""
    app.command("scan")(scan_command)
    app.command("purify")(purify_command)
