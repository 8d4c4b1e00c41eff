"""The metapoison experiment end to end (smoke preset through the CLI, --resume; the ensemble in
slices on Ray actors) and `poisonlab craft` (lossless PNG folder, safetensors poisons, one-line
errors)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.attacks.poisons import Poisons
from poisonlab.cli import main
from poisonlab.data.image_folder import load_image_folder
from poisonlab.experiments import metapoison
from poisonlab.runs import StateFile
from poisonlab.sweeps.summary import metric_names, undeclared_metrics

KEYS = {"success_rate", "ci95", "baseline_success_rate", "victim_clean_accuracy", "per_target",
        "transfer", "gradient_matching"}


def _strip(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", "metapoison", "-p", "smoke", "--out", str(root), "-q"]) == 0
    (path,) = [p for p in root.iterdir() if p.is_dir()]
    return root, path


def test_smoke_writes_metrics_and_report(smoke_run):
    _, path = smoke_run
    metrics = json.loads((path / "metrics.json").read_text())
    assert KEYS <= metrics.keys()
    # every number it writes is one `sweep --metric` accepts before a run
    assert undeclared_metrics(metric_names(metrics), metapoison.METRICS) == []
    assert {"success_rate", "ci95", "baseline_success_rate", "victim_clean_accuracy",
            "per_target", "transfer"} <= metrics["gradient_matching"].keys()
    assert set(metrics["per_target"]) == {"0", "1"}
    assert metrics["transfer"]["victims"] == ["convnet_bn", "tiny_cnn"]
    assert (path / "report.html").exists() and (path / "figures" / "craft_loss.png").exists()
    loaded = Poisons.load(path / "checkpoints" / "poisons-metapoison-convnet_bn-t0.safetensors")
    assert len(loaded) == 4 and loaded.grid is not None


def test_resume_of_an_interrupted_smoke_run_gives_the_same_metrics(smoke_run, tmp_path,
                                                                    monkeypatch):
    root, done = smoke_run
    calls = {"n": 0}
    save_state = StateFile.save  # a piece keeps its own state (the craft's steps) in the run

    def interrupt(self, state):
        out = save_state(self, state)
        if self.path.name.startswith("craft-metapoison"):
            calls["n"] += 1
            if calls["n"] == 1:  # after the first craft step of the first target
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(StateFile, "save", interrupt)
    # click turns the interrupt into "Aborted!" and exit code 130
    assert main(["run", "metapoison", "-p", "smoke", "--out", str(tmp_path), "-q"]) == 130
    (path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((path / "run.json").read_text())["status"] == "interrupted"
    assert (path / "checkpoints" / "craft-metapoison-convnet_bn-t0.safetensors").exists()
    assert main(["run", "metapoison", "--resume", path.name, "--out", str(tmp_path), "-q"]) == 0
    resumed = json.loads((path / "metrics.json").read_text())
    assert _strip(resumed) == _strip(json.loads((done / "metrics.json").read_text()))


# The smoke preset cut further (one victim per architecture, one epoch), its ensemble in 2 slices.
SLICED = ["-p", "smoke", "-q", "--set", "metapoison.slices=2", "--set", "victims.trials=1",
          "--set", "victims.train.epochs=1", "--set", "data.test_size=50"]


def test_ray_slices_interrupted_and_resumed_give_the_local_slices_poisons_and_metrics(
        ray_local, tmp_path, monkeypatch):
    """metapoison.slices=2 on Ray: every MetaPoison crafting runs on the driver with two Ray
    actors (one surrogate each), none as a piece; interrupted after its first craft step and
    resumed, the run crafts exactly the poisons of the same slices in this process and measures
    the same metrics. (Not compared with one slice: the smoke crafting amplifies float rounding,
    1 or 2 torch threads already move a surrogate's step-0 loss from 5.78 to 5.71; the slices'
    agreement with the undivided ensemble is tests/test_metapoison_slices.py's.)"""
    from poisonlab.executors.ray_backend import RayExecutor

    local_root, ray_root = tmp_path / "local", tmp_path / "ray"
    assert main(["run", "metapoison", *SLICED, "--out", str(local_root)]) == 0
    (done,) = [p for p in local_root.iterdir() if p.is_dir()]
    calls = {"n": 0}
    save_state = StateFile.save

    def interrupt(self, state):
        out = save_state(self, state)
        if self.path.name.startswith("craft-metapoison"):
            calls["n"] += 1
            if calls["n"] == 1:  # on the driver: the sliced crafting is not a piece
                raise KeyboardInterrupt
        return out

    monkeypatch.setattr(StateFile, "save", interrupt)
    assert main(["run", "metapoison", *SLICED, "--out", str(ray_root), "--backend", "ray"]) == 130
    (path,) = [p for p in ray_root.iterdir() if p.is_dir()]
    assert (path / "checkpoints" / "craft-metapoison-convnet_bn-t0.safetensors").exists()

    started, mapped, bars = [], [], []
    start_actors, map_pieces = RayExecutor.start_actors, RayExecutor.map
    monkeypatch.setattr(RayExecutor, "start_actors", lambda self, cls, inits, **kw: (
        started.append([list(i["members"]) for i in inits]) or start_actors(self, cls, inits, **kw)))
    monkeypatch.setattr(RayExecutor, "map", lambda self, fn, items, **kw: (
        mapped.extend(items) or bars.append(kw.get("description", "")) or
        map_pieces(self, fn, items, **kw)))
    assert main(["run", "metapoison", "--resume", path.name, "--out", str(ray_root), "-q",
                 "--backend", "ray"]) == 0
    assert started == [[[0], [1]], [[0], [1]]]  # targets 0 (resumed) and 1, two actors each
    assert mapped and not [key for key in mapped if key.startswith("metapoison-")]
    assert set(bars) == {""}  # -q: no progress bar from the Ray backend either (it drew three)
    for target in (0, 1):
        name = f"poisons-metapoison-convnet_bn-t{target}.safetensors"
        got, want = Poisons.load(path / "checkpoints" / name), Poisons.load(done / "checkpoints" / name)
        assert torch.equal(got.delta, want.delta) and torch.equal(got.grid, want.grid), name
        assert torch.equal(got.history.nan_to_num(-1.0), want.history.nan_to_num(-1.0)), name
    assert _strip(json.loads((path / "metrics.json").read_text())) == \
        _strip(json.loads((done / "metrics.json").read_text()))


# ---- poisonlab craft ---------------------------------------------------------------------------
def _folder(root: Path, size: int = 32, per_class: int = 8, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.full((size, size, 3), 60 * c + 40, dtype=np.int16)
            img = (base + rng.integers(-40, 40, (size, size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{c}" / f"img{i:02d}.png")
    return root


FAST = {"metapoison": ["--surrogate", "tiny_cnn", "--set", "ensemble=1", "--set",
                       "craft_steps=1", "--set", "batch_size=8", "--set", "grid_size=4"],
        "gradient-matching": ["--surrogate", "tiny_cnn", "--surrogate-epochs", "1", "--set",
                              "iterations=2", "--set", "restarts=1"]}


@pytest.mark.parametrize("attack", ["metapoison", "gradient-matching"])
def test_craft_writes_a_lossless_png_folder_and_a_poisons_file(attack, tmp_path):
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["craft", attack, "--data", str(data), "--target",
                 str(data / "class0" / "img00.png"), "--adv-class", "1", "--budget", "3",
                 "--out", str(out), "-q", *FAST[attack]])
    assert code == 0
    poisons = Poisons.load(out / "poisons.safetensors")
    train, classes = load_image_folder(data)
    assert len(poisons) == 3 and (train.y[poisons.indices] == 1).all()
    expected = (poisons.apply(train).x * 255).round().to(torch.uint8)
    back, back_classes = load_image_folder(out / "poisoned")
    assert back_classes == classes
    assert torch.equal((back.x * 255).round().to(torch.uint8), expected)  # PNG is lossless
    assert torch.equal(back.y, train.y)
    changed = (expected != (train.x * 255).round().to(torch.uint8)).flatten(1).any(1)
    assert set(changed.nonzero().flatten().tolist()) <= set(poisons.indices.tolist())
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["poisons"]) == 3 and manifest["images"] == len(train)


def test_craft_replaces_an_earlier_craft_only_when_told_and_leaves_none_of_it(tmp_path, capsys):
    """A second craft into the same --out is refused (exit 2, nothing computed) unless
    --overwrite; then the old poisoned folder goes as a whole, so a class the new data set
    lacks leaves no stale folder behind. A folder with other files is never written into."""
    three, two = _folder(tmp_path / "three"), _folder(tmp_path / "two", classes=2)
    out = tmp_path / "out"

    def craft(data: Path, *extra: str) -> int:
        return main(["craft", "gradient-matching", "--data", str(data), "--target",
                     str(data / "class0" / "img00.png"), "--adv-class", "1", "--budget", "2",
                     "--out", str(out), "-q", *FAST["gradient-matching"], *extra])

    assert craft(three) == 0 and (out / "poisoned" / "class2").is_dir()
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert craft(two) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {out} holds an earlier craft: pass --overwrite to replace it, or pick another folder"
    assert (out / "manifest.json").read_text() == before
    assert craft(two, "--overwrite") == 0
    assert sorted(p.name for p in (out / "poisoned").iterdir()) == ["class0", "class1"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "poisoned",
                                                     "poisons.safetensors"]
    (out / "notes.txt").write_text("mine")
    assert craft(two, "--overwrite") == 2
    assert "is not empty (it holds notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def _bad_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    data = _folder(tmp / "data")
    small = _folder(tmp / "small", size=20)
    (tmp / "empty").mkdir()
    broken = _folder(tmp / "broken", classes=2)
    (broken / "class1" / "img00.png").write_bytes(b"not an image")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp / "tiny_target.png")
    target = str(data / "class0" / "img00.png")
    base = ["--target", target, "--adv-class", "1", "--out", str(tmp / "out"), "-q"]
    return {
        "budget": (["--data", str(data), *base, "--budget", "9"], "budget 9 is larger"),
        "epsilon<0": (["--data", str(data), *base, "--epsilon", "-0.1"], "epsilon"),
        "epsilon>1": (["--data", str(data), *base, "--epsilon", "1.5"], "epsilon"),
        "target in poison class": (["--data", str(data), "--target",
                                    str(data / "class1" / "img00.png"), "--adv-class", "1",
                                    "--out", str(tmp / "out")], "poison class"),
        "adv class": (["--data", str(data), *base[:2], "--adv-class", "7", "--out",
                       str(tmp / "out")], "out of range"),
        "target size": (["--data", str(data), "--target", str(tmp / "tiny_target.png"),
                         "--adv-class", "1", "--out", str(tmp / "out")], "16x16"),
        "surrogate size": (["--data", str(small), "--target", str(small / "class0" / "img00.png"),
                            "--adv-class", "1", "--budget", "2", "--out", str(tmp / "out")],
                           "do not fit the surrogate"),
        "empty folder": (["--data", str(tmp / "empty"), *base], "no class sub-folders"),
        "unreadable": (["--data", str(broken), *base], "cannot decode image"),
        "target class 10": (["--data", str(data), *base, "--target-class", "10"],
                            "--target-class 10 is out of range"),
        "target class -2": (["--data", str(data), *base, "--target-class", "-2"],
                            "--target-class -2 is out of range"),
        "target class not its folder's": (["--data", str(data), *base, "--target-class", "2"],
                                          "contradicts the target's class folder class0"),
    }


def test_craft_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for name, (args, match) in _bad_cases(tmp_path).items():
        code = main(["craft", "metapoison", *args])
        err = capsys.readouterr().err.strip()
        assert code == 2, (name, err)
        assert err.startswith("error: ") and "\n" not in err, (name, err)
        assert match in err, (name, err)
