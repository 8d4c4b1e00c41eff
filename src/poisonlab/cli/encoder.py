"""`poisonlab scan ENCODER --encoder --arch NAME (--data DIR | --dataset NAME)`.

Loads the encoder's weights safely (safetensors, or torch.load(weights_only=True)), draws
--samples clean images (labels unused) and runs poisonlab.audit.scan_encoder: a DECREE-style
inversion of the smallest trigger that collapses the encoder's embeddings. Prints the verdict,
the inverted trigger's L1 and its normalised size (PL1), and writes the report folder
(encoder_trigger.png, encoder_trigger.safetensors, encoder_scan.json, report.html). Exit code
0 whatever the verdict; --json prints the summary as one JSON object on the last line.

The `scan` command (cli/audit.py) owns the options; this module turns the ones that apply into
EncoderAuditConfig values, refuses the ones that do not, and does the work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from poisonlab.audit.data import load_clean_for
from poisonlab.audit.encoder import EncoderAuditConfig, load_encoder, scan_encoder
from poisonlab.errors import ConfigError, printable
from poisonlab.progress import terminal
from poisonlab.report.html import rich_table
from poisonlab.runs.layout import report_folder

# Settings key → the scan command's option, for one-line errors naming the option.
ENCODER_OPTIONS = {"samples": "--samples", "scan.steps": "--steps",
                   "scan.batch_size": "--batch-size", "scan.threshold": "--threshold",
                   "scan.restarts": "--restarts", "scan.similarity_threshold": "--similarity"}


def encoder_settings(**given: Any) -> dict[str, Any]:
    """EncoderAuditConfig values from the options given (None: the audit's default):
    samples, steps, batch_size, threshold, restarts, similarity."""
    scan = EncoderAuditConfig().scan.model_dump()
    keys = {"steps": "steps", "batch_size": "batch_size", "threshold": "threshold",
            "restarts": "restarts", "similarity": "similarity_threshold"}
    scan.update({keys[k]: v for k, v in given.items() if k in keys and v is not None})
    out: dict[str, Any] = {"scan": scan}
    if given.get("samples") is not None:
        out["samples"] = given["samples"]
    return out


NOT_FOR_ENCODERS = ("does not apply to --encoder (an encoder scan takes clean images only: "
                    "--data DIR or --dataset NAME)")
ENCODER_ONLY = "applies only with --encoder"


def refuse_options(given: Mapping[str, Any], why: str = NOT_FOR_ENCODERS) -> None:
    """ConfigError "<option> <why>" for the first option (of option → value) that was given."""
    for option, value in given.items():
        if value not in (None, False, [], ()):
            raise ConfigError(f"{option} {why}")


def run_encoder_scan(model: Path, arch: str, config: EncoderAuditConfig, *, data: Path | None,
                     dataset: str | None, data_dir: Path | None, image_size: int | None,
                     report: Path | None, overwrite: bool, seed: int, as_json: bool,
                     quiet: bool) -> None:
    """Load the clean images and the encoder, scan it, print and write the report."""
    if data is None and dataset is None:
        raise ConfigError("an encoder scan needs clean images: give --data DIR or --dataset NAME")
    images, _, net, shape = load_clean_for(
        lambda channels: load_encoder(model, arch, in_channels=channels, image_size=image_size),
        data, dataset, data_dir, "test", seed)
    report_dir = report_folder(report or Path(f"scan-{model.stem}"), overwrite)
    result = scan_encoder(net, images, config=config, seed=seed, progress=not quiet,
                          report_dir=report_dir, input_shape=shape, name=str(model), arch=arch,
                          source=str(data or dataset))
    console = terminal()
    section = result.section()
    for table in section.tables:
        console.print(rich_table(table, title=section.heading))
    console.print(result.text())
    console.print(f"inverted trigger: {printable(str(result.figure))}")
    console.print(f"report: {printable(str(report_dir / 'report.html'))}")
    if as_json:
        print(json.dumps(result.to_dict()))
