"""`poisonlab data`: inspect and download the data sets.

`data info NAME` loads a data set and summarises it (with --json: one JSON object on the last
line of stdout); `data download NAME` fetches the official files with checksums.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from poisonlab.data.cache import CACHE_LOCATION
from poisonlab.data.download import download_dataset
from poisonlab.data.registry import (
    DATA_LOCATION,
    check_name,
    default_data_dir,
    describe_dataset,
    load_dataset,
)
from poisonlab.errors import printable

data_app = typer.Typer(
    name="data", no_args_is_help=True,
    help=f"Inspect and download data sets. Their files are in --data-dir (default: "
    f"{DATA_LOCATION}); the decoded arrays loading them makes are cached in {CACHE_LOCATION}.")

DirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", "--dir", help=f"Data set folder (default: {DATA_LOCATION})."),
]


def _summary_lines(name: str, info: dict) -> list[str]:
    lines = [f"{name}: {info['kind']} data set, loaded in {info['load_seconds']:.2f} s"]
    low, high = info["value_range"]
    shape = "x".join(str(d) for d in info["image_shape"])
    if info["kind"] == "few-shot":
        group_word = "alphabets" if name == "omniglot" else "groups"
        lines += [
            f"  classes: {info['num_classes']} ({info['num_groups']} {group_word})",
            f"  images: {info['num_images']:,} ({info['samples_per_class']} per class)",
        ]
    else:
        lines += [
            f"  classes: {info['num_classes']} ({', '.join(info['classes'])})",
            *(
                f"  {split}: {count:,} images, per class {info['images_per_class'][split]}"
                for split, count in info["images"].items()
            ),
        ]
    lines += [f"  image shape: {shape} (C x H x W)", f"  value range: [{low:g}, {high:g}]"]
    return lines


@data_app.command("info", help="Load a data set and print its classes, split sizes, image "
                  "shape and value range; the first load decodes the files and caches the "
                  f"arrays in {CACHE_LOCATION}, later loads read the cache.")
def info_command(
    name: Annotated[str, typer.Argument(help="omniglot, cifar10, mnist or glyphs.")],
    data_dir: DirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Load a data set and print its classes, split sizes, image shape and value range."""
    check_name(name)
    start = time.perf_counter()
    data = load_dataset(name, data_dir)
    seconds = time.perf_counter() - start
    info = {"name": name, **describe_dataset(data), "load_seconds": round(seconds, 3)}
    if as_json:
        print(json.dumps(info))
        return
    print("\n".join(_summary_lines(name, info)))


@data_app.command("download")
def download_command(
    name: Annotated[str, typer.Argument(help="omniglot, cifar10 or mnist.")],
    data_dir: DirOption = None,
    mirror: Annotated[
        str | None, typer.Option("--mirror", help="Base URL serving the same file names.")
    ] = None,
) -> None:
    """Download the official files of a data set, verifying their checksums."""
    dest = data_dir if data_dir is not None else default_data_dir(name)
    for action in download_dataset(name, dest, base_url=mirror):
        print(action)
    print(f"{name}: files in {printable(str(dest))}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.add_typer(data_app, name="data")
