"""Odd files and values found by a bad-input sweep: each is a one-line error (or, where the
input is legitimate, works), never an internal error, and is caught before any work.

In-process and small: the subprocess contract (exit 2, one stderr line) is held by
test_bad_inputs.py; here each row pins the check that turns the input into a PoisonlabError.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from poisonlab.cli import main
from poisonlab.config import load_config_file, parse_override
from poisonlab.errors import ConfigError, DataError, ModelFileError


def _png(path, size=8, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size) if mode == "L" else (size, size, 3), 100, np.uint8)
                    ).save(path)
    return path


def test_a_class_folder_named_by_a_superscript_digit_is_a_name_not_a_label(tmp_path):
    """'²'.isdigit() is True but int('²') fails: folders are numbered labels only when every
    name is a decimal number."""
    from poisonlab.data.records import load_records

    _png(tmp_path / "1" / "x.png"), _png(tmp_path / "²" / "x.png")
    images, classes = load_records(tmp_path)
    assert classes == ["1", "²"] and images.y.tolist() == [0, 1]


def test_an_image_pil_cannot_convert_is_a_data_error_naming_it(tmp_path):
    from poisonlab.data.image_folder import load_image_folder

    _png(tmp_path / "a" / "0.png")
    (tmp_path / "b").mkdir()
    Image.new("LAB", (8, 8)).save(tmp_path / "b" / "1.tif")
    with pytest.raises(DataError, match=r"cannot convert image .*1\.tif from LAB to L"):
        load_image_folder(tmp_path)


def test_a_fifo_among_the_images_is_refused_not_read(tmp_path):
    """Reading a FIFO blocks for ever: it is refused by its kind before it is opened."""
    from poisonlab.data.image_folder import load_image_folder

    _png(tmp_path / "a" / "0.png")
    os.mkfifo(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match=r"1\.png: not a regular file"):
        load_image_folder(tmp_path)


def test_an_empty_trigger_pattern_is_refused(tmp_path):
    from poisonlab.audit.trigger import TriggerSource

    path = tmp_path / "t.safetensors"
    save_file({"pattern": torch.zeros(3, 0, 0)}, str(path))
    with pytest.raises(DataError, match=r"'pattern' of --trigger .* is empty \(shape \[3, 0, 0\]\)"):
        TriggerSource.parse(str(path))


def test_record_images_of_no_pixels_are_refused(tmp_path):
    from poisonlab.data.records import load_records

    path = tmp_path / "r.safetensors"
    save_file({"images": torch.zeros(2, 1, 0, 0), "labels": torch.zeros(2, dtype=torch.long)},
              str(path))
    with pytest.raises(DataError, match=r"'images' in .* are empty: shape \(2, 1, 0, 0\)"):
        load_records(path)


def test_a_meta_model_whose_first_weight_is_no_convolution_is_a_model_file_error(tmp_path):
    from poisonlab.experiments.fewshot_backdoor import PRESETS, Config, load_meta_model

    path = tmp_path / "m.safetensors"
    save_file({"body.0.weight": torch.zeros(5)}, str(path))
    cfg = Config(**PRESETS["smoke"])
    with pytest.raises(ModelFileError, match=r"body\.0\.weight has shape \[5\]"):
        load_meta_model(str(path), cfg, "cpu")


def test_a_yaml_key_that_is_a_list_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match="a mapping key must be a name, not a list"):
        load_config_file(path)
    with pytest.raises(ConfigError, match="a mapping key must be a name, not a list"):
        parse_override("attack={[1]: 2}")


def test_an_integer_of_thousands_of_digits_is_a_config_error():
    from poisonlab.sweeps.plan import parse_grid

    big = "9" * 5000  # Python refuses to convert more than 4300 digits
    with pytest.raises(ConfigError, match=r"bad override 'seed=999.*cannot parse value"):
        parse_override(f"seed={big}")
    with pytest.raises(ConfigError, match=r"bad --grid 'attack.tasks=1,999.*cannot parse"):
        parse_grid([f"attack.tasks=1,{big}"])


def test_grid_values_may_not_use_yaml_aliases():
    from poisonlab.sweeps.plan import parse_grid

    with pytest.raises(ConfigError, match="aliases"):
        parse_grid(["attack.tasks=&a [1, 2], *a"])


def test_a_metric_too_large_for_a_float_is_no_number():
    from poisonlab.sweeps.summary import metric_value

    assert metric_value({"headline": {"asr": 10**400, "ba": 0.5}}, "asr") is None
    assert metric_value({"headline": {"asr": 10**400, "ba": 0.5}}, "ba") == 0.5


def test_cifar10_class_names_that_are_no_list_are_a_data_error(tmp_path):
    from poisonlab.data import cifar10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": 5}, protocol=2))
    read = lambda name: (folder / name).read_bytes()  # noqa: E731
    with pytest.raises(DataError, match=r"lists classes \['5'\]"):
        cifar10._check_class_names(read, folder, binary=False)


def test_craft_refuses_two_images_of_one_stem_before_any_work(tmp_path, capsys):
    data = tmp_path / "data"
    _png(data / "a" / "0.png"), _png(data / "a" / "1.png"), _png(data / "b" / "2.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(data / "a" / "0.jpg")
    target = _png(tmp_path / "target.png")
    code = main(["craft", "metapoison", "--data", str(data), "--target", str(target),
                 "--adv-class", "1", "--budget", "1", "--out", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "0.jpg and" in err and "0.png would both be written as a/0.png" in err
    assert not (tmp_path / "out").exists()  # a refused craft leaves no empty --out behind


def test_symlink_loops_are_named_not_internal_errors(tmp_path, capsys):
    loop_a, loop_b = tmp_path / "loopA", tmp_path / "loopB"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    data = tmp_path / "data"
    _png(data / "a" / "0.png"), _png(data / "b" / "1.png")
    target = _png(tmp_path / "target.png")
    base = ["craft", "metapoison", "--data", str(data), "--adv-class", "1", "-q"]
    for args, needle in [([*base, "--target", str(target), "--out", str(loop_a)], "loopA"),
                         ([*base, "--target", str(loop_a), "--out", str(tmp_path / "o")],
                          "loopA"),
                         (["sweep", "membership", "--preset", "smoke", "--grid",
                           "train.epochs=5", "--data-dir", str(loop_a), "--out",
                           str(tmp_path / "sw"), "-q"], "--data-dir")]:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "sw").exists()


def test_purify_does_not_replace_an_existing_file_unless_told(tmp_path, capsys):
    out = tmp_path / "precious.safetensors"
    out.write_bytes(b"mine")
    code = main(["purify", str(tmp_path / "m.safetensors"), "--arch", "tiny_cnn", "--out",
                 str(out), "--clean-data", str(tmp_path), "--target", "0", "-q"])
    assert code == 2 and f"--out {out} exists: pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"mine"


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/null", "overwrite of a fifo"])
def test_purify_never_replaces_a_fifo_or_device_link(tmp_path, capsys, kind):
    """An existing FIFO or a symlink to /dev/null at --out was silently replaced by a file."""
    out = tmp_path / "out.safetensors"
    if kind == "symlink to /dev/null":
        out.symlink_to("/dev/null")
    else:
        os.mkfifo(out)
    extra = ["--overwrite"] if kind.startswith("overwrite") else []
    code = main(["purify", str(tmp_path / "m.safetensors"), "--arch", "tiny_cnn", "--out",
                 str(out), "--clean-data", str(tmp_path), "--target", "0", "-q", *extra])
    assert code == 2 and "is not a regular file" in capsys.readouterr().err
    assert out.is_symlink() or stat.S_ISFIFO(out.stat().st_mode)


@pytest.mark.parametrize("kind", ["fifo", "symlink to /dev/zero"])
def test_a_model_file_that_is_no_regular_file_is_named_so(tmp_path, kind):
    """A FIFO or a /dev/zero link as a model file (or a resumed checkpoint, read the same way)
    was reported as 'not found'; reading it would block or fill memory."""
    from poisonlab.runs import load_weights

    path = tmp_path / "m.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    with pytest.raises(ModelFileError, match=r"m\.safetensors is not a regular file"):
        load_weights(path)


def test_a_checkpoint_that_is_a_fifo_is_named_on_resume(tmp_path):
    from poisonlab.experiments.membership import PRESETS, Config
    from poisonlab.runs.record import Run

    run = Run.create("membership", Config(**PRESETS["smoke"]), tmp_path)
    os.mkfifo(run.checkpoint_path("target"))
    with pytest.raises(ModelFileError, match="is not a regular file"):
        run.load_checkpoint("target")


def test_a_resume_refuses_a_checkpoint_that_is_no_regular_file(tmp_path, capsys, monkeypatch):
    """A FIFO as checkpoints/model.safetensors: the resume finished from later checkpoints
    without reading it and left it where the run's weights belong."""
    from poisonlab.experiments.membership import PRESETS, Config
    from poisonlab.runs.record import Run

    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path))
    run = Run.create("membership", Config(**PRESETS["smoke"]), tmp_path)
    run.save_checkpoint("later", {"x": torch.zeros(1)})
    os.mkfifo(run.checkpoint_path("model"))
    assert main(["run", "membership", "--resume", run.id, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"run {run.id} cannot be resumed:" in err and "model.safetensors is not a regular" in err
    assert len(err.splitlines()) == 1, err


def test_input_shape_metadata_contradicting_the_weights_is_blamed(tmp_path):
    """1-channel weights with input_shape [3, 14, 14]: the file contradicts itself; the error
    blamed the images' channels against the first convolution."""
    from poisonlab.audit.model import load_model
    from poisonlab.models import build_model

    net = build_model("tiny_cnn", num_classes=2, in_channels=1)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"input_shape": "[3, 14, 14]"})
    with pytest.raises(ModelFileError, match=r"contradicts itself: its input_shape metadata is "
                                             r"\[3, 14, 14\], but its first convolution takes "
                                             r"1-channel"):
        load_model(path, "tiny_cnn")
    _, shape = load_model(path, "tiny_cnn", image_size=14)  # the override still works
    assert tuple(shape) == (1, 14, 14)


def test_an_index_row_holding_a_blob_is_damage_and_rebuilt(tmp_path, capsys):
    from poisonlab.config import BaseConfig
    from poisonlab.runs import Run

    with Run.create("demo", BaseConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    assert main(["runs", "list", "--out", str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    with sqlite3.connect(tmp_path / "index.sqlite") as conn:
        conn.execute("INSERT INTO runs (run_id, experiment, status, path) VALUES "
                     "('ghost', 'demo', 'failed', X'2f746d70')")
    assert main(["runs", "list", "--out", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [run.id]
    assert "damaged row" in err


def test_written_files_are_ordinary_and_non_utf8_names_do_not_fail_the_write(tmp_path):
    from poisonlab.attacks.poisons import Poisons
    from poisonlab.runs.checkpoints import save_weights
    from poisonlab.runs.layout import atomic_write_text

    umask = os.umask(0o022)
    try:
        text, weights = tmp_path / "r.html", tmp_path / "w.safetensors"
        atomic_write_text(text, "model m\udcff.pt")  # a surrogate: a file name in Latin-1
        save_weights(weights, {"w": torch.zeros(2)})
        poisons = Poisons(torch.tensor([0]), torch.zeros(1, 1, 2, 2)).save(tmp_path / "p.st")
    finally:
        os.umask(umask)
    assert text.read_text() == "model m\\udcff.pt"
    assert stat.S_IMODE(text.stat().st_mode) == stat.S_IMODE(weights.stat().st_mode) == 0o644
    assert stat.S_IMODE(poisons.stat().st_mode) == 0o644  # a crafted poisons file was 0600


@pytest.mark.parametrize("text", ["a: &x [*x]\n",
                                  "a0: &a0 [x, x, x]\n" + "".join(
                                      f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]\n"
                                      for i in range(1, 30))],
                         ids=["cycle", "billion laughs"])
def test_a_run_config_with_yaml_aliases_is_named_not_expanded(tmp_path, capsys, text):
    """A cyclic alias in a run's config.yaml crashed `runs show --json` (exit 1); an alias
    bomb ran until killed. A run's config is read as a config is: aliases refused."""
    from poisonlab.config import BaseConfig
    from poisonlab.runs import Run

    with Run.create("demo", BaseConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    (run.path / "config.yaml").write_text(text)
    code = main(["runs", "show", run.id, "--out", str(tmp_path), "--json"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "config.yaml" in err and "aliases" in err, err
    assert len(err.splitlines()) == 1


def test_a_run_with_a_damaged_metrics_file_is_still_listed(tmp_path, capsys):
    """A truncated metrics.json hid a completed run, said to have 'an unreadable run.json'."""
    from poisonlab.config import BaseConfig
    from poisonlab.runs import Run

    with Run.create("demo", BaseConfig(), root=tmp_path) as run:
        run.write_metrics({"accuracy": 0.5})
    (run.path / "metrics.json").write_text('{"a":')
    (tmp_path / "index.sqlite").unlink()
    assert main(["runs", "list", "--out", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["run_id"] for r in json.loads(out)["runs"]] == [run.id]
    assert "run.json" not in err


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_broken_symlink_as_model_file_is_named_so(tmp_path, kind):
    """`run --model loop.safetensors` said "no run 'loop.safetensors'" and `scan` "not found"."""
    from poisonlab.experiments.fewshot_backdoor import PRESETS, Config, load_meta_model

    path = tmp_path / "m.safetensors"
    path.symlink_to(tmp_path / ("nothing" if kind == "dangling" else "m.safetensors"))
    with pytest.raises(ModelFileError, match=r"m\.safetensors is a symlink that leads nowhere"):
        load_meta_model(str(path), Config(**PRESETS["smoke"]), "cpu", root=tmp_path)


def test_a_file_given_as_image_folder_is_called_a_file(tmp_path):
    from poisonlab.data.image_folder import load_image_folder

    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(DataError, match=r"image folder .*f\.png is a file, not a folder"):
        load_image_folder(tmp_path / "f.png")


def test_input_sizes_past_the_largest_a_model_may_declare_are_refused():
    """[1, 10^23, 28] metadata blamed the images ("the model expects 1x100000...x28")."""
    from poisonlab.audit.model import input_shape

    with pytest.raises(ModelFileError, match=r"not \[C, H, W\] of integers 1 to 4096"):
        input_shape("small_cnn", {"input_shape": "[1, 100000000000000000000000, 28]"}, None, 1)
    with pytest.raises(ConfigError, match="--image-size must be 1 to 4096"):
        input_shape("small_cnn", {}, 10**23, 1)
    assert input_shape("small_cnn", {"input_shape": "[1, 4096, 28]"}, None, 1) == (1, 4096, 28)


def test_a_model_file_with_a_one_class_head_is_blamed_by_name(tmp_path):
    """It said "num_classes must be at least 2, got 1", naming neither the file nor its head."""
    from poisonlab.audit import load_model
    from poisonlab.audit.encoder import load_encoder
    from poisonlab.models import build_model

    state = build_model("tiny_cnn", 2, 1).state_dict()
    state = {k: (v[:1] if k.startswith("head.") else v) for k, v in state.items()}
    path = tmp_path / "one-class.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    for load in (load_model, load_encoder):
        with pytest.raises(ModelFileError, match=r"one-class\.safetensors: its 'head.weight' "
                                                 r"has 1 output\(s\)"):
            load(path, "tiny_cnn")


def test_a_huge_budget_is_echoed_as_given_not_as_a_rounded_integer():
    from poisonlab.cli.craft import budget_count

    with pytest.raises(ConfigError, match=r"--budget 1e\+23 is more than the 500 training"):
        budget_count(1e23, 500)
    assert budget_count(500, 500) == 500 and budget_count(0.01, 500) == 5


def test_a_data_dir_for_the_embedded_glyphs_is_refused_not_ignored(tmp_path, capsys,
                                                                    monkeypatch):
    """The few-shot smoke preset names the glyphs: --data-dir was silently ignored, and a user
    who meant their Omniglot got results on the glyphs."""
    monkeypatch.setenv("POISONLAB_RUNS", str(tmp_path / "runs"))
    for args in (["run", "fewshot-backdoor", "--preset", "smoke", "-q"],
                 ["scan", str(tmp_path / "m.safetensors"), "--arch", "tiny_cnn", "--dataset",
                  "glyphs"]):
        assert main([*args, "--data-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"--data-dir {tmp_path} is not used: the data set is the embedded glyphs" in err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.is_dir() for p in runs.iterdir()), "work was started"


@pytest.mark.parametrize("reader", ["records", "trigger", "poisons"])
def test_a_fifo_given_as_a_safetensors_input_is_refused_not_opened(tmp_path, reader):
    """`scan --members FIFO.safetensors` blocked in open() until someone wrote to the FIFO: every
    reader of a user's safetensors file refuses a FIFO by its kind (run in a thread, so a
    regression fails the test instead of hanging the suite)."""
    import threading

    from poisonlab.attacks.poisons import Poisons
    from poisonlab.audit.trigger import TriggerSource
    from poisonlab.data.records import load_records

    fifo = tmp_path / "input.safetensors"
    os.mkfifo(fifo)
    read = {"records": load_records, "trigger": TriggerSource.parse, "poisons": Poisons.load}
    raised: list[BaseException] = []

    def attempt() -> None:
        try:
            read[reader](str(fifo) if reader == "trigger" else fifo)
        except Exception as exc:  # noqa: BLE001 - the test looks at it below
            raised.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():  # unblock the reader so the thread can end
        with open(fifo, "wb"):
            pass
        pytest.fail(f"the {reader} reader blocked on a FIFO")
    assert raised and isinstance(raised[0], DataError), raised
    assert "not a regular file" in str(raised[0])
