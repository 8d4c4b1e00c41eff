"""`poisonlab craft metapoison|gradient-matching`: clean-label poisons for your own image folder.

craft ATTACK --data DIR --target IMAGE --adv-class C --budget 0.01 --out DIR
    DIR holds one sub-folder of images per class (poisonlab.data.image_folder). The poisons are
    `budget` images (a fraction of the training set when < 1, else a count) of the poison class
    (default: the adversarial class, as the MetaPoison reference), the first ones in file order
    (--random-poisons: a seeded choice); labels never change. MetaPoison crafts on an ensemble of
    --surrogate networks trained from scratch as it goes; gradient matching on one --surrogate
    trained first on DIR. Written losslessly to --out:
      poisoned/<class>/<name>.png   the whole poisoned training set, 8-bit PNG (every image,
                                    poisons in place), ready for any training pipeline;
      poisons.safetensors           indices, δ, colour grid and the settings (attacks.Poisons);
      manifest.json                 which files are poisons, the target, the classes.
    The PNG pixels are round(255 · Poisons.apply(x)): the crafted images quantised to 8 bits.
    --out must be empty or missing; one holding an earlier craft is replaced only with
    --overwrite (the new folder is written beside the old one and swapped in at the end, so no
    class folder of the old craft survives and a failed craft leaves the old one whole).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import typer
from PIL import Image

from poisonlab.attacks.gradient_matching import GradientMatching
from poisonlab.attacks.metapoison import MetaPoison
from poisonlab.attacks.poisons import Poisons, select_poisons
from poisonlab.config import check_seed, parse_override, read_small_text, replace, resolved
from poisonlab.data.image_folder import (
    load_image_folder,
    open_image,
    peek_image,
    scan_image_folder,
)
from poisonlab.data.types import ImageSet
from poisonlab.errors import ConfigError, DataError, ShapeError, printable
from poisonlab.models import build_model
from poisonlab.progress import progress_bar
from poisonlab.runs.layout import atomic_write_text, prepare_output
from poisonlab.training.supervised import TrainConfig, train_classifier

Attack = Literal["metapoison", "gradient-matching"]
PARTIAL = ".poisoned.partial"  # the poisoned folder while it is written
OUTPUTS = {"poisoned", "poisons.safetensors", "manifest.json", PARTIAL}
CRAFTS = get_args(Attack)


# Settings that craft's own options set, refused as a --set when the option is given (a --set
# would silently beat it), and those its options replace, always refused (the number of poisons
# and their choice are --budget and --random-poisons: a --set was recorded and not applied).
OPTION_KEYS = {"epsilon": "--epsilon", "craft_steps": "--steps", "iterations": "--steps",
               "ensemble": "--ensemble", "budget": "--budget", "poison_choice": "--random-poisons"}
NOT_SETTABLE = {"budget", "poison_choice"}


def budget_count(budget: float, n_train: int) -> int:
    """`budget` as a number of poisons: a fraction of the set when < 1, else a count."""
    if budget <= 0:
        raise ConfigError(f"--budget must be positive, got {budget}")
    if budget < 1:
        return max(1, round(budget * n_train))
    if budget != int(budget):
        raise ConfigError(f"--budget {budget}: give a fraction below 1 or a whole count")
    if budget > n_train:  # before int(): 1e23 would be echoed as 99999999999999991611392
        raise ConfigError(f"--budget {budget:g} is more than the {n_train} training images")
    return int(budget)


def load_target(path: Path, like: ImageSet) -> torch.Tensor:
    """The target image [C, H, W] in [0, 1], of the training images' channels and size."""
    if path.is_dir() or not path.exists():
        raise DataError(f"target image {path} " + (
            "is a folder, not an image" if path.is_dir() else "is a symlink that leads nowhere "
            "(dangling, or a loop)" if path.is_symlink() else "does not exist"))
    _, height, width = peek_image(str(path), path)  # its size from the header, before decoding
    if (height, width) != tuple(like.x.shape[2:]):
        raise ShapeError(f"target image {path} is {width}x{height}, the training "
                         f"images are {like.x.shape[3]}x{like.x.shape[2]}")
    image = open_image(str(path), path)
    channels = int(like.x.shape[1])
    image = image.convert("L" if channels == 1 else "RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).float().div(255)
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    return x.contiguous()


def target_class(path: Path, data_dir: Path, classes: list[str], given: int | None) -> int | None:
    """The target's true class: its class folder when it lies inside DIR, else `given`; a given
    class out of range or other than the folder's is refused."""
    if given is not None and not 0 <= given < len(classes):
        raise ConfigError(f"--target-class {given} is out of range: {data_dir} has "
                          f"{len(classes)} classes")
    try:
        rel = resolved(path, "--target").relative_to(resolved(data_dir, "--data"))
    except ValueError:
        return given
    if len(rel.parts) < 2 or rel.parts[0] not in classes:
        return given
    folder = classes.index(rel.parts[0])
    if given is not None and given != folder:
        raise ConfigError(f"--target-class {given} contradicts the target's class folder "
                          f"{rel.parts[0]} (class {folder})")
    return folder


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [0, 1] → [H, W] or [H, W, 3] uint8, rounded to the nearest level."""
    a = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return (a[0] if a.shape[0] == 1 else a.permute(1, 2, 0)).numpy()


def _apart(out: Path, data: Path) -> None:
    """--out must not be the --data folder, inside it, or hold it: the crafted files would be
    written into the user's data set (and read back as a class folder next time)."""
    o, d = resolved(out, "--out"), resolved(data, "--data")
    if o == d or d in o.parents or o in d.parents:
        raise ConfigError(f"--out {out} overlaps --data {data}: write the poisons to a folder "
                          "outside the data set")


def _fresh(out: Path, overwrite: bool) -> None:
    """--out is empty or missing, or holds only an earlier craft and `overwrite` is set."""
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    others = [name for name in entries if not _of_a_craft(out / name)]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise ConfigError(f"--out {out} is not empty (it holds {shown}): write the poisons to "
                          "an empty folder")
    if entries and not overwrite:
        raise ConfigError(f"--out {out} holds an earlier craft: pass --overwrite to replace it, "
                          "or pick another folder")


def _of_a_craft(path: Path) -> bool:
    """Whether `path` is what a craft writes, by its name and content: a user's own
    manifest.json or poisons.safetensors is not replaced as if it were an earlier craft's."""
    if path.name not in OUTPUTS or path.is_symlink():
        return False
    if path.name in ("poisoned", PARTIAL):
        return path.is_dir()
    if path.name == "manifest.json":
        try:
            manifest = json.loads(read_small_text(path))
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and manifest.get("attack") in CRAFTS and \
            isinstance(manifest.get("poisons"), list)
    try:
        Poisons.load(path)
    except DataError:
        return False
    return True


def png_names(files: list[tuple[Path, int]], classes: list[str]) -> list[str]:
    """<class>/<stem>.png of every image; a DataError naming two files of one class whose
    names differ only in the extension (a.png and a.jpg would both become a.png)."""
    names: dict[str, Path] = {}
    for path, label in files:
        name = f"{classes[label]}/{path.stem}.png"
        if name in names:
            raise DataError(f"{names[name]} and {path} would both be written as {name}: "
                            "rename one of them")
        names[name] = path
    return list(names)


def write_png_folder(out: Path, data: ImageSet, names: list[str], progress: bool) -> None:
    """Image i as out/names[i] (lossless PNG)."""
    with progress_bar(len(names), "writing PNGs", enabled=progress) as bar:
        for i, name in enumerate(names):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8(data.x[i])).save(out / name, format="PNG")
            bar.advance()


def craft(attack: Attack, data_dir: Path, target: Path, adv_class: int, budget: float,
          out: Path, *, poison_class: int | None = None, target_label: int | None = None,
          surrogate: str = "convnet_bn", settings: dict | None = None, surrogate_epochs: int = 20,
          random_poisons: bool = False, seed: int = 0, overwrite: bool = False,
          progress: bool = True) -> Poisons:
    """Craft the poisons for the folder and write the poisoned set (see the module docstring)."""
    settings = dict(settings or {})
    config = (MetaPoison.Config(**settings) if attack == "metapoison"
              else GradientMatching.Config(**settings))  # bad settings before any work
    _apart(out, data_dir)
    prepare_output(out, directory=True)
    _fresh(out, overwrite)
    classes, files = scan_image_folder(data_dir)
    names = png_names(files, classes)
    train, _ = load_image_folder(data_dir)
    if len(classes) < 2:
        raise DataError(f"image folder {data_dir} has {len(classes)} class: poisoning needs a "
                        "target of one class and poisons of another")
    if not 0 <= adv_class < len(classes):
        raise ConfigError(f"--adv-class {adv_class} is out of range: {data_dir} has "
                          f"{len(classes)} classes")
    pc = adv_class if poison_class is None else poison_class
    if not 0 <= pc < len(classes):
        raise ConfigError(f"--poison-class {pc} is out of range: {data_dir} has "
                          f"{len(classes)} classes")
    label = target_class(target, data_dir, classes, target_label)
    if label is not None and label == pc:
        raise ConfigError(f"the target is of the poison class {pc} ({classes[pc]}): pick a "
                          "target of another class")
    x_target = load_target(target, train)
    n = budget_count(budget, len(train))
    gen = torch.Generator().manual_seed(seed) if random_poisons else None
    idx = select_poisons(train, pc, n, gen)
    idx = idx.sort().values if gen is not None else idx
    build = lambda: build_model(surrogate, len(classes), int(train.x.shape[1]))  # noqa: E731
    _fits(build(), train)
    if attack == "metapoison":
        if "batch_size" not in settings and config.batch_size > len(train):
            config = replace(config, batch_size=len(train))  # a folder smaller than one batch
        mp = MetaPoison(build, config=config, seed=seed)
        with progress_bar(mp.config.craft_steps, "MetaPoison", enabled=progress) as bar:
            poisons = mp.craft(train, idx, x_target, adv_class, target_label=label,
                               progress=lambda s: bar.advance(status=s))
    else:
        torch.manual_seed(seed)
        model = build()
        train_classifier(model, train, TrainConfig(epochs=surrogate_epochs), progress=progress,
                         seed=seed)
        gm = GradientMatching(model, config=config, seed=seed)
        c = gm.config
        with progress_bar(c.restarts * c.iterations, "gradient matching", enabled=progress) as bar:
            poisons = gm.craft(train, idx, x_target, adv_class, target_label=label,
                               progress=lambda s: bar.advance(status=s))
    shutil.rmtree(out / PARTIAL, ignore_errors=True)  # left by a craft that was killed
    write_png_folder(out / PARTIAL, poisons.apply(train), names, progress)
    shutil.rmtree(out / "poisoned", ignore_errors=True)
    (out / PARTIAL).rename(out / "poisoned")
    meta = {"attack": attack, "target": str(target), "adv_class": adv_class,
            "poison_class": pc, "classes": classes, "surrogate": surrogate,
            "settings": config.model_dump(mode="json")}
    poisons.save(out / "poisons.safetensors", meta)
    manifest = meta | {"poisons": [names[i] for i in poisons.indices.tolist()],
                       "images": len(names)}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return poisons


def _fits(model: torch.nn.Module, train: ImageSet) -> None:
    model.eval()
    try:
        with torch.no_grad():
            model(train.x[:2])
    except RuntimeError as exc:
        raise ShapeError(f"images of size {list(train.x.shape[1:])} do not fit the surrogate: "
                         f"{str(exc).splitlines()[0]}") from None


def register(app: typer.Typer) -> None:
    @app.command("craft")
    def craft_cmd(
        attack: str = typer.Argument(..., help="metapoison or gradient-matching."),
        data: Path = typer.Option(..., "--data", help="Image folder, one sub-folder per class."),
        target: Path = typer.Option(..., "--target", help="The target image file."),
        adv_class: int = typer.Option(..., "--adv-class", help="Class the target should get."),
        budget: float = typer.Option(0.01, "--budget", help="Poisons: fraction (<1) or count."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder."),
        poison_class: int = typer.Option(None, "--poison-class", help="Default: --adv-class."),
        target_label: int = typer.Option(None, "--target-class", help="The target's true class."),
        epsilon: float = typer.Option(8 / 255, "--epsilon", help="L-inf bound of δ in [0, 1]."),
        steps: int = typer.Option(None, "--steps", help="Craft steps / iterations."),
        ensemble: int = typer.Option(None, "--ensemble", help="MetaPoison: surrogates M."),
        surrogate: str = typer.Option("convnet_bn", "--surrogate", help="Surrogate architecture."),
        surrogate_epochs: int = typer.Option(None, "--surrogate-epochs", help="Gradient "
                                             "matching: the surrogate's training epochs "
                                             "(default 20)."),
        random_poisons: bool = typer.Option(False, "--random-poisons", help="Seeded choice."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier craft."),
        seed: int = typer.Option(0, "--seed", callback=check_seed),
        sets: list[str] = typer.Option(None, "--set", "-s",
                                       help="Attack setting key=value (its Config's fields)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    ) -> None:
        """Craft clean-label poisons for an image folder; write the poisoned set as PNGs."""
        if attack not in ("metapoison", "gradient-matching"):
            raise ConfigError(f"unknown attack '{attack}' (metapoison or gradient-matching)")
        settings: dict = {"epsilon": epsilon}
        if steps is not None:
            settings["craft_steps" if attack == "metapoison" else "iterations"] = steps
        if ensemble is not None:
            if attack != "metapoison":
                raise ConfigError("--ensemble is a MetaPoison option")
            settings["ensemble"] = ensemble
        if surrogate_epochs is not None and attack == "metapoison":
            raise ConfigError("--surrogate-epochs is a gradient-matching option (MetaPoison's "
                              "surrogates train inside the crafting)")
        if surrogate_epochs is not None and surrogate_epochs < 1:
            raise ConfigError(f"--surrogate-epochs must be at least 1, got {surrogate_epochs}")
        given = set(settings)  # the options given (--epsilon always is: it has a default)
        for key, value in (parse_override(item) for item in sets or []):
            if key.split(".")[0] in given | NOT_SETTABLE:
                raise ConfigError(f"--set {key}: {OPTION_KEYS[key.split('.')[0]]} sets it (an "
                                  "option and a --set of one key would silently disagree)")
            settings[key] = value
        poisons = craft(attack, data, target, adv_class, budget, out, poison_class=poison_class,
                        target_label=target_label, surrogate=surrogate, settings=settings,
                        random_poisons=random_poisons,
                        **({} if surrogate_epochs is None else
                           {"surrogate_epochs": surrogate_epochs}),
                        seed=seed, overwrite=overwrite, progress=not quiet)
        print(f"{len(poisons)} poisons crafted; poisoned training set: "
              f"{printable(str(out / 'poisoned'))}, "
              f"poisons: {printable(str(out / 'poisons.safetensors'))}")
