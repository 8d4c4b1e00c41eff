"""Inputs found by the seventh bad-input sweep: each was an internal error (exit 1), a silently
wrong result or an unbounded allocation, and is now a one-line error or read correctly.

In-process and small, as test_bad_files.py."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.cli import main
from poisonlab.config import load_yaml_tree, validate_config
from poisonlab.errors import ConfigError, DataError, ModelFileError, RunError


def _png(path, value=100, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_a_lone_surrogate_in_a_config_value_is_named():
    """JSON's "\\ud800" is a str no encoder can store: pydantic's core raised
    UnicodeEncodeError (exit 1)."""
    from poisonlab.experiments.membership import Config

    with pytest.raises(ConfigError, match=r"^arch holds a character that is not valid text"):
        validate_config(Config, {"arch": "\ud800"})
    with pytest.raises(ConfigError, match=r"^train\.optimizer holds"):
        validate_config(Config, {"train": {"optimizer": "x\udcff"}})


def test_a_float_setting_past_float32_is_refused():
    """train.lr=1e308 is finite in float64 and overflowed inside Adam's float32 step (exit 1)."""
    from poisonlab.experiments.membership import Config

    with pytest.raises(ConfigError, match="train.lr: expected a number that fits a float32"):
        validate_config(Config, {"train": {"lr": 1e308}})
    assert validate_config(Config, {"train": {"lr": 3e38}}).train.lr == 3e38


def test_yaml_numbers_are_read_as_yaml_1_2_reads_them():
    """PyYAML's YAML 1.1 read --set seed=1:30 as 90 (base 60) and 010 as 8 (octal)."""
    assert load_yaml_tree("010") == 10 and load_yaml_tree("0x1f") == 31
    assert load_yaml_tree("0o17") == 15 and load_yaml_tree("-3") == -3
    assert load_yaml_tree("1e-3") == 0.001 and load_yaml_tree("1.5") == 1.5
    assert load_yaml_tree("1:30") == "1:30" and load_yaml_tree("1:30.5") == "1:30.5"
    from poisonlab.experiments.membership import Config

    with pytest.raises(ConfigError, match="seed: expected a number, not text"):
        validate_config(Config, {"seed": load_yaml_tree("1:30")})


def test_a_runs_folder_whose_name_is_not_utf8_is_refused_before_any_work(tmp_path, capsys):
    """SQLite stores UTF-8 only: the index write raised UnicodeEncodeError (exit 1) and left
    the run at 'created'."""
    out = str(tmp_path) + "/" + b"\xffruns".decode("utf-8", "surrogateescape")
    assert main(["run", "membership", "--preset", "smoke", "-q", "--out", out]) == 2
    assert "its name is not valid UTF-8" in _one_line(capsys)
    assert list(tmp_path.iterdir()) == []  # the folder --out made is gone again


def test_float8_weights_are_named_not_an_internal_error(tmp_path):
    from poisonlab.audit import load_model
    from poisonlab.models import build_model
    from poisonlab.runs.checkpoints import save_weights

    state = {k: v.to(torch.float8_e4m3fn) for k, v in build_model("tiny_cnn", 10, 1)
             .state_dict().items()}
    path = save_weights(tmp_path / "f8.safetensors", state)
    with pytest.raises(ModelFileError, match="has dtype float8_e4m3fn, expected floating-point"):
        load_model(path, "tiny_cnn")


def test_a_deflated_pt_archive_is_refused_before_it_inflates(tmp_path):
    """torch writes tensors uncompressed; a re-zipped file with a deflated 64 MB zero tensor is
    a few hundred kB and made torch.load allocate it all (1.9 GB for a 1.6 MB file)."""
    from poisonlab.runs.checkpoints import load_weights

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(16 * 2**20)}, plain)
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(ModelFileError, match=r"bomb\.pt: its archive inflates to 67,"):
        load_weights(bomb)
    assert load_weights(plain)[0]["w"].shape == (16 * 2**20,)  # a real torch file still loads


def test_images_too_small_for_the_architecture_are_refused_before_training(tmp_path, capsys,
                                                                            monkeypatch):
    """data.downsample=28 shrank the glyphs to 1x1 and max-pool failed in training (exit 1)."""
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path))
    assert main(["run", "membership", "--preset", "smoke", "-q", "--set",
                 "data.downsample=28"]) == 2
    assert "cannot take images of 1x1x1 (CxHxW)" in _one_line(capsys)


def test_numbered_class_folders_are_their_labels_even_with_gaps(tmp_path):
    """Folders 3, 5, 7 were labelled 0, 1, 2: a scan's --target 3 meant folder 7."""
    from poisonlab.data.image_folder import load_image_folder

    for name in ("3", "5", "7"):
        _png(tmp_path / name / "a.png", value=int(name))
    images, classes = load_image_folder(tmp_path)
    assert images.y.tolist() == [3, 5, 7] and classes == [str(i) for i in range(8)]
    assert images.x[:, 0, 0, 0].mul(255).round().tolist() == [3, 5, 7]
    _png(tmp_path / "03" / "a.png")
    with pytest.raises(DataError, match="are the same label 3"):
        load_image_folder(tmp_path)


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_images_of_more_than_8_bits_are_refused_not_clipped(tmp_path, mode):
    """Pillow's convert("L") clips 16-bit and float pixels: every non-zero 16-bit pixel became
    white, every float pixel in [0, 1] black."""
    from poisonlab.data.image_folder import load_image_folder

    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    pixels = np.full((8, 8), 1000 if mode == "I;16" else 0.5,
                     np.uint16 if mode == "I;16" else np.float32)
    Image.fromarray(pixels).save(tmp_path / "b" / "1.tif")
    with pytest.raises(DataError, match=rf"1\.tif has {mode} pixels"):
        load_image_folder(tmp_path)


def test_overlapping_sweep_axes_are_refused():
    """attack.epochs=1,2 beside attack={epochs: 5}: every point ran epochs 5 under a false label."""
    from poisonlab.sweeps.plan import parse_grid

    with pytest.raises(ConfigError, match="--grid attack and --grid attack.epochs overlap"):
        parse_grid(["attack.epochs=1,2", "attack={epochs: 5},{epochs: 6}"])
    assert len(parse_grid(["attack.epochs=1,2", "attack.epochs_x=3"])) == 2


@pytest.mark.parametrize("item", ["epsilon=0.5", "craft_steps=2", "budget=7",
                                  "poison_choice=random"])
def test_craft_refuses_a_set_of_what_its_options_set(tmp_path, capsys, item):
    """--set epsilon=0.5 silently beat --epsilon 0.01, --set craft_steps=2 beat --steps 1;
    --set budget=7 was recorded while 3 poisons were made."""
    _png(tmp_path / "d" / "a" / "0.png"), _png(tmp_path / "d" / "b" / "1.png")
    assert main(["craft", "metapoison", "--data", str(tmp_path / "d"), "--target",
                 str(_png(tmp_path / "t.png")), "--adv-class", "1", "--budget", "1",
                 "--epsilon", "0.01", "--steps", "1", "--set", item, "--out",
                 str(tmp_path / "o"), "-q"]) == 2
    assert f"--set {item.split('=')[0]}: --" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_one_class_folder_is_named_by_craft(tmp_path, capsys):
    _png(tmp_path / "d" / "a" / "0.png")
    assert main(["craft", "gradient-matching", "--data", str(tmp_path / "d"), "--target",
                 str(_png(tmp_path / "t.png")), "--adv-class", "0", "--budget", "1",
                 "--out", str(tmp_path / "o"), "-q"]) == 2
    assert f"image folder {tmp_path / 'd'} has 1 class" in _one_line(capsys)


def test_listing_one_experiment_does_not_call_the_others_unreadable(tmp_path, capsys):
    """`runs list -e X` compared the directories with the rows of X only: every other run was
    "unreadable" and the index rebuilt on every call."""
    from poisonlab.experiments.membership import PRESETS, Config
    from poisonlab.runs.index import list_runs
    from poisonlab.runs.record import Run

    run = Run.create("membership", Config(**PRESETS["smoke"]), tmp_path)
    assert [r["run_id"] for r in list_runs(tmp_path)] == [run.id]
    capsys.readouterr()
    assert list_runs(tmp_path, experiment="badencoder") == []
    assert capsys.readouterr().err == ""


def test_compare_needs_two_different_runs(tmp_path):
    from poisonlab.experiments.membership import PRESETS, Config
    from poisonlab.runs.query import compare_runs
    from poisonlab.runs.record import Run

    run = Run.create("membership", Config(**PRESETS["smoke"]), tmp_path)
    with pytest.raises(RunError, match="compare needs two or more run ids"):
        compare_runs(tmp_path, [run.id])
    with pytest.raises(RunError, match=f"run {run.id} is named twice"):
        compare_runs(tmp_path, [run.id, run.id])


def test_a_bare_command_prints_the_help_and_succeeds(capsys):
    """It printed the help and exited 2 with nothing on stderr."""
    assert main([]) == 0
    assert "Usage" in capsys.readouterr().out


def test_a_diverged_training_is_named_by_its_learning_rate():
    """--set train.lr=1e30 ended as "membership scores contain NaN", naming no model or setting."""
    from poisonlab.data.types import ImageSet
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    torch.manual_seed(0)
    data = ImageSet(torch.rand(32, 1, 14, 14), torch.arange(32) % 4)
    with pytest.raises(ConfigError, match=r"training diverged: the loss is (nan|inf) in epoch 1 "
                                          r"of 2 \(lr 1e\+30 with sgd"):
        train_classifier(build_model("tiny_cnn", 4, 1), data,
                         TrainConfig(epochs=2, lr=1e30, batch_size=8), progress=False)


def _fail_fast_or_sleep(chunk):
    import time

    if chunk == "bad":
        raise DataError("cannot decode image bad.png")
    time.sleep(60)
    return chunk


def test_a_failing_decode_chunk_stops_the_other_workers_and_returns_at_once():
    """A chunk failing in one worker while another decodes: the error is raised within seconds
    and the other worker is stopped. (CI once hung 900 s in the pool's shutdown after such a
    failure, with Ray threads in the process and the cores loaded; that race is not reproduced
    here.)"""
    import time

    from poisonlab.data.image_folder import run_chunks

    start = time.monotonic()
    with pytest.raises(DataError, match="bad.png"):
        run_chunks(_fail_fast_or_sleep, ["bad", "slow"], workers=2)
    assert time.monotonic() - start < 30
