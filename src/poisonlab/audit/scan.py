"""`scan`: run each check on a model you did not train and collect the verdicts.

Checks are listed in CHECKS: each takes a ScanContext and returns a CheckResult (verdict line,
report section, summary); more checks plug in there. "backdoor" (Neural Cleanse) needs clean
images; "membership" needs a member and a non-member record set; "trigger" needs clean images
and a trigger the user suspects, with its target label (poisonlab.audit.trigger). By default
every check whose inputs are given runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from poisonlab.attacks.triggers import Trigger
from poisonlab.audit.backdoor import BackdoorResult, backdoor_check
from poisonlab.audit.checks import CheckResult, RecordSets, ScanConfig, ScanContext
from poisonlab.audit.data import check_images, class_names, num_classes, sample
from poisonlab.audit.membership import (
    MembershipResult,
    check_output,
    check_record_sets,
    check_responsive,
    membership_check,
)
from poisonlab.audit.trigger import TriggerResult, TriggerScanContext, trigger_check
from poisonlab.config import make_settings
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError
from poisonlab.report.audit import model_section
from poisonlab.report.html import Section, write_html_report

CHECKS: dict[str, Callable[[ScanContext], CheckResult]] = {
    "backdoor": backdoor_check, "membership": membership_check, "trigger": trigger_check}
# What each check needs (clean images, the membership record sets, a trigger with its target)
# and how to give it.
NEEDS = {"backdoor": (("clean",), "clean images: give --data DIR or --dataset NAME"),
         "membership": (("records",), "--members and --non-members (or their --*-split "
                                      "options)"),
         "trigger": (("clean", "trigger"), "clean images (--data DIR or --dataset NAME) and "
                                           "--trigger with --target")}
# The checks that use the clean images.
ON_CLEAN = tuple(name for name, (needs, _) in NEEDS.items() if "clean" in needs)


@dataclass
class ScanReport:
    """Every check's result by name (in the order run), the model's name and architecture as
    given, and how many clean images the backdoor check used (None when it did not run)."""

    checks: dict[str, CheckResult]
    model: str | None = None
    arch: str | None = None
    samples: int | None = None

    @property
    def backdoor(self) -> BackdoorResult | None:
        return self.checks.get("backdoor")  # type: ignore[return-value]

    @property
    def membership(self) -> MembershipResult | None:
        return self.checks.get("membership")  # type: ignore[return-value]

    @property
    def trigger(self) -> TriggerResult | None:
        return self.checks.get("trigger")  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """scan.json: model, arch, samples (with clean images), then each check's summary."""
        out: dict[str, Any] = {"model": self.model, "arch": self.arch}
        if self.samples is not None:
            out["samples"] = self.samples
        out.update({name: result.to_dict() for name, result in self.checks.items()})
        return out

    def sections(self) -> list[Section]:
        about = f"{self.model or 'model'}" + (f" ({self.arch})" if self.arch else "")
        if self.samples is not None:
            about += f", {self.samples} clean images"
        return [model_section(about), *(r.section() for r in self.checks.values())]

    def write(self, report_dir: Path) -> Path:
        """scan.json and report.html in `report_dir`; returns the report's path."""
        (report_dir / "scan.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        title = f"scan: {Path(self.model).name}" if self.model else "scan"
        return write_html_report(report_dir / "report.html", title, self.sections())


def select_checks(check: Sequence[str] | None, has_clean: bool, has_records: bool,
                  has_trigger: bool = False) -> list[str]:
    """The checks asked for (each must have its inputs), or every check whose inputs are given.
    has_trigger: a trigger and its target label are given."""
    given = {"clean": has_clean, "records": has_records, "trigger": has_trigger}
    if not check:
        if has_trigger and not has_clean:
            raise ConfigError(f"the trigger check needs {NEEDS['trigger'][1]}")
        checks = [name for name, (needs, _) in NEEDS.items() if all(given[n] for n in needs)]
        if not checks:
            raise ConfigError("nothing to scan: give clean images (--data DIR or --dataset NAME) "
                              "and/or --members and --non-members")
        return checks
    unknown = [c for c in check if c not in CHECKS]
    if unknown:
        raise ConfigError(f"unknown check '{unknown[0]}' (known: {', '.join(CHECKS)})")
    for name in check:
        needs, what = NEEDS[name]
        if not all(given[n] for n in needs):
            raise ConfigError(f"the {name} check needs {what}")
    if has_trigger and "trigger" not in check:
        raise ConfigError("--trigger is measured by the trigger check: add --check trigger")
    return list(dict.fromkeys(check))


def scan(model: nn.Module, *, clean: ImageSet | None = None, records: RecordSets | None = None,
         checks: Sequence[str] | None = None, classes: Sequence[str] | None = None,
         config: ScanConfig | None = None, seed: int = 0, progress: bool = False,
         report_dir: Path | None = None, input_shape: Sequence[int] | None = None,
         name: str | None = None, arch: str | None = None,
         clean_source: str = "the clean images", trigger: Trigger | None = None,
         target: int | None = None) -> ScanReport:
    """Run `checks` (default: every check whose inputs are given) on `model`.

    clean: labelled clean images for the backdoor and trigger checks (`config.samples` of them
    are drawn with `seed`); records: members and non-members for the membership check; trigger,
    target: a trigger the user suspects and the label it should send images to, for the
    trigger check (its attack success rate on the clean sample); classes: the clean data's
    class names (the model's other labels are named by number); input_shape: the (C, H, W) the
    model expects, checked against the images (default: any); report_dir: where the figures,
    scan.json and report.html go (default: nowhere); name, arch: how the report names the
    model. Images or labels that do not fit the model raise ShapeError.
    """
    config = make_settings(ScanConfig, config)
    if (trigger is None) != (target is None):
        raise ConfigError("--trigger and --target go together: the trigger check measures how "
                          "often the trigger sends images to the target label")
    names = select_checks(checks, clean is not None, records is not None, trigger is not None)
    clean = clean if any(n in ON_CLEAN for n in names) else None
    records = records if "membership" in names else None
    shape = input_shape if input_shape is not None else (0, 0, 0)  # an InputShape explains itself
    if clean is not None:
        check_images(clean, shape, clean_source)
    some = clean if clean is not None else records.members
    k = num_classes(model, some.x)
    labels = class_names(classes or [], k)
    if clean is not None:
        check_output(model, clean, clean_source, k)
    if "trigger" in names and not 0 <= target < k:
        raise ConfigError(f"--target {target} is not a label of the model (0..{k - 1})")
    if records is not None:
        check_record_sets(records, model, shape, k)
    check_responsive(model, some, clean_source if clean is not None else records.members_source)
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
    if clean is not None:
        clean = sample(clean, config.samples, seed)
    ctx = TriggerScanContext(model, clean, records, labels, config, seed, progress, report_dir,
                             trigger, target)
    report = ScanReport({n: CHECKS[n](ctx) for n in names}, name, arch,
                        len(clean) if clean is not None else None)
    if report_dir is not None:
        report.write(report_dir)
    return report
