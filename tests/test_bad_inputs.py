"""Bad inputs and faults, each through the real command in a subprocess (one case per row).

Every row is a hostile or careless input of one class of failure; the command must end with
exit 2 and exactly one line on stderr, `error: ...`, naming the problem — no traceback, no work
done. Faults in the middle of a run (a killed process, a parallel resume) must keep what was
computed and let `--resume` finish it.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.main

from poisonlab.models import build_model
from poisonlab.runs.checkpoints import save_weights

SMOKE = ["run", "membership", "--preset", "smoke", "-q"]


def poisonlab(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POISONLAB_RUNS": str(cwd / "runs")}
    return subprocess.run([sys.executable, "-m", "poisonlab.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def _evil_cifar(folder: Path) -> Path:
    """A CIFAR-10 python folder whose first batch is a 10,000-image view of one byte."""

    class ZeroStrides:
        def __reduce__(self):
            return (np.ndarray, ((10000, 3072), np.dtype("u1"), b"x", 0, (0, 0)))

    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": ZeroStrides(), b"labels": [0]}, 2))
    return root


def _model_file(tmp: Path, dtype: torch.dtype = torch.float32, nan: bool = False) -> Path:
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in build_model("tiny_cnn", 10, 1).state_dict().items()}
    if nan:  # one NaN bias: every output NaN, every anomaly test vacuously false
        key = next(k for k in state if k.endswith("bias"))
        state[key] = torch.full_like(state[key], float("nan"))
    return save_weights(tmp / f"model-{str(dtype)[6:]}{'-nan' * nan}.safetensors", state)


def _cifar_batches(folder: Path, name: str, batch: dict) -> Path:
    root = folder / name / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for part in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (root / part).write_bytes(pickle.dumps(batch, 2) if not isinstance(batch, bytes)
                                  else batch)
    return root


class _Hex:
    """_codecs.encode(bytes, "hex"): chained, each call doubles the bytes (a 1 kB file → GBs)."""

    def __reduce__(self):
        import _codecs

        return (_codecs.encode, (b"abc", "hex"))


def _cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    (tmp / "file").write_text("x")
    (tmp / "dangling").symlink_to(tmp / "nowhere")
    (tmp / "c.ini").write_text("[train]\nlr = 0.1\n")
    (tmp / "alias.yaml").write_text("train: &x {lr: *x}\n")
    (tmp / "bad.yaml").write_text("train: {lr: [unclosed\n")
    (tmp / "deep.json").write_text('{"train": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (tmp / "dup.yaml").write_text("train:\n  epochs: 5\ntrain:\n  lr: 0.5\n")
    (tmp / "dup.json").write_text('{"train": {"lr": 0.1, "lr": 0.2}}')
    (tmp / "data").mkdir(exist_ok=True)
    values = ",".join(str(v) for v in range(1, 31))
    glyph_scan = ["--arch", "tiny_cnn", "--dataset", "glyphs"]
    return {
        # 1. values that are not finite or not in range
        "threshold nan": (["scan", str(_model_file(tmp)), *glyph_scan, "--threshold", "nan"],
                          ("--threshold",)),
        "lr inf": ([*SMOKE, "--set", "train.lr=.inf"], ("train.lr",)),
        "epochs 10^23": ([*SMOKE, "--set", "train.epochs=1" + "0" * 23], ("train.epochs", "64 bits")),
        "seed 10^22": ([*SMOKE, "--seed", "10000000000000000000000"], ("seed",)),
        "budget nan": (["craft", "gradient-matching", "--budget", "nan", "--data", str(tmp),
                        "--target", str(tmp / "file"), "--adv-class", "1", "--out",
                        str(tmp / "o")], ("--budget", "not a finite number")),
        "band inf": (["scan", str(_model_file(tmp)), *glyph_scan, "--band", "inf"],
                     ("--band", "not a finite number")),
        "threads 10^6": ([*SMOKE, "--set", "threads=1000000"], ("threads",)),
        "unknown key": ([*SMOKE, "--set", "train.nope=1"], ("train.nope",)),
        # 2. unusable outputs, refused before any work
        "out under /proc": ([*SMOKE, "--out", "/proc/poisonlab/x"], ("--out",)),
        "out is a file": ([*SMOKE, "--out", str(tmp / "file")], ("--out",)),
        "out dangling": ([*SMOKE, "--out", str(tmp / "dangling")], ("--out",)),
        "out empty": ([*SMOKE, "--out", ""], ("--out '': an empty value",)),
        "runs list on a file": (["runs", "list", "--out", str(tmp / "file")],
                                ("is not a folder of runs",)),
        "ini config": ([*SMOKE, "--config", str(tmp / "c.ini")], ("c.ini: .ini is not a config",)),
        "folder as config": ([*SMOKE, "--config", str(tmp)], ("is a folder",)),
        "purify over its input": (["purify", str(_model_file(tmp)), "--arch", "tiny_cnn",
                                   "--dataset", "glyphs", "--out", str(_model_file(tmp))],
                                  ("is the suspect model itself",)),
        # 4. untrusted data cannot ask for unbounded resources
        "zero-stride batch": (["data", "info", "cifar10", "--data-dir", str(_evil_cifar(tmp))],
                              ("data_batch_1", "numpy.ndarray")),
        "hex-amplified batch": (["data", "info", "cifar10", "--data-dir",
                                 str(_cifar_batches(tmp, "hex", {b"data": _Hex(), b"labels": [0]}))], ("hex",)),
        "string labels": (["data", "info", "cifar10", "--data-dir", str(_cifar_batches(
            tmp, "str", {b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}))],
            ("labels must be integers",)),
        "ragged labels": (["data", "info", "cifar10", "--data-dir", str(_cifar_batches(
            tmp, "ragged", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, [2, 3]]}))],
            ("not a flat list of integers",)),
        "empty batch": (["data", "info", "cifar10", "--data-dir", str(_cifar_batches(
            tmp, "empty", {b"data": np.zeros((0, 3072), np.uint8), b"labels": []}))],
            ("data_batch_1 holds no records",)),
        "folder as model": (["scan", str(tmp), *glyph_scan], ("is a folder, not a weights file",)),
        # 6. one line for every kind of failure
        "circular yaml": ([*SMOKE, "--config", str(tmp / "alias.yaml")], ("alias.yaml",)),
        "malformed yaml": ([*SMOKE, "--config", str(tmp / "bad.yaml")], ("bad.yaml",)),
        "deep json": ([*SMOKE, "--config", str(tmp / "deep.json")], ("nested too deeply",)),
        "duplicate yaml key": ([*SMOKE, "--config", str(tmp / "dup.yaml")],
                               ("dup.yaml", "'train' appears twice")),
        "duplicate json key": ([*SMOKE, "--config", str(tmp / "dup.json")],
                               ("dup.json", "'lr' appears twice")),
        "craft into its data": (["craft", "gradient-matching", "--data", str(tmp / "data"),
                                 "--target", str(tmp / "file"), "--adv-class", "1", "--out",
                                 str(tmp / "data" / "poisons")], ("overlaps --data",)),
        "astronomical grid": (["sweep", "membership", "--preset", "smoke", "-q",
                               "--out", str(tmp / "sw"), "--grid", f"train.epochs={values}",
                               "--grid", f"train.batch_size={values}",
                               "--grid", f"shadow.count={values}", "--seeds", "0-9"],
                              ("the grid has 270000 points",)),
        "scan seed 10^22": (["scan", str(_model_file(tmp)), *glyph_scan, "--seed", "1" + "0" * 22],
                            ("--seed",)),
        "betas out of range": (["run", "backdoor-defense", "--preset", "smoke", "-q", "--set",
                                "nc.inversion.betas=[2,3]"], ("nc.inversion.betas",)),
        "unknown option": ([*SMOKE, "--frobnicate"], ("--frobnicate",)),
        "seed not a number": ([*SMOKE, "--seed", "abc"], ("--seed",)),
        "unknown experiment": (["run", "nope"], ("nope",)),
        # 8. quiet acceptance
        "int8 weights": (["scan", str(_model_file(tmp, torch.int8)), *glyph_scan],
                         ("dtype int8",)),
        "nan weights": (["scan", str(_model_file(tmp, nan=True)), *glyph_scan],
                        ("NaN or infinite",)),
        "ways 1000 (a late check)": (["run", "fewshot-backdoor", "--preset", "smoke", "-q", "--set",
                                      "meta.ways=1000"], ("meta.ways=1000",)),
        "top_k 1000 (a late check)": ([*SMOKE, "--set", "defense.top_k.k=1000", "--set",
                                       "defense.defenses=[top_k]"], ("defense.top_k.k=1000",)),
        "missing data dir": ([*SMOKE, "--data-dir", str(tmp / "absent")], ("absent",)),
    }


CASES = ["threshold nan", "lr inf", "epochs 10^23", "seed 10^22", "budget nan", "band inf", "threads 10^6",
         "unknown key", "out under /proc", "out is a file", "out dangling", "out empty", "runs list on a file",
         "ini config", "folder as config", "purify over its input",
         "zero-stride batch",
         "hex-amplified batch", "string labels", "ragged labels", "empty batch", "folder as model", "circular yaml", "malformed yaml", "deep json", "scan seed 10^22",
         "betas out of range", "unknown option", "seed not a number", "unknown experiment",
         "int8 weights", "nan weights", "missing data dir", "ways 1000 (a late check)",
         "top_k 1000 (a late check)", "duplicate yaml key", "duplicate json key",
         "craft into its data", "astronomical grid"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    args, needles = _cases(tmp_path)[case]
    one_line_error(poisonlab(*args, cwd=tmp_path), *needles)
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.is_dir() for p in runs.iterdir()), "work was started"


def _first_run(cwd: Path) -> Path:
    return next(p for p in (cwd / "runs").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict]:
    """One finished smoke run (the reference for the fault cases)."""
    cwd = tmp_path_factory.mktemp("finished")
    result = poisonlab(*SMOKE, "--json", cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return cwd, json.loads(result.stdout.strip().splitlines()[-1])


def test_resume_refuses_new_settings(finished):
    cwd, _ = finished
    run_id = _first_run(cwd).name
    for extra in (["--seed", "3"], ["--set", "train.lr=0.1"], ["--preset", "cpu"]):
        one_line_error(poisonlab("run", "membership", "--resume", run_id, *extra, cwd=cwd),
                       "--resume", extra[0])


def test_resume_refuses_another_data_dir(finished, tmp_path):
    """`--resume ID --data-dir X` used to read X silently, whatever the run had started on."""
    cwd, _ = finished
    one_line_error(poisonlab("run", "membership", "--resume", _first_run(cwd).name, "--data-dir",
                             str(tmp_path), cwd=cwd), "started without --data-dir",
                   "cannot change the data of a resumed run")


def test_a_resumed_run_reads_the_data_dir_it_started_on(tmp_path):
    from poisonlab.cli.run import _resumed_data_dir
    from poisonlab.errors import ConfigError, DataError
    from poisonlab.experiments import get_experiment
    from poisonlab.runs import Run

    exp = get_experiment("membership")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run = Run.create("membership", exp.Config(), root=tmp_path / "runs", data_dir=tmp_path / "a")
    assert _resumed_data_dir(run, None) == tmp_path / "a"
    assert _resumed_data_dir(run, tmp_path / "a") == tmp_path / "a"
    with pytest.raises(ConfigError, match="started on --data-dir .*/a: --data-dir .*/b cannot"):
        _resumed_data_dir(run, tmp_path / "b")
    (tmp_path / "a").rmdir()
    with pytest.raises(DataError, match="which no longer exists"):
        _resumed_data_dir(run, None)


def test_a_run_in_use_cannot_be_resumed_twice(finished):
    cwd, _ = finished
    run = _first_run(cwd)
    with open(run / ".lock", "a+") as held:  # what a live process working in the run holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(poisonlab("run", "membership", "--resume", run.name, "-q", cwd=cwd),
                       run.name, "in use by another process")


def _strip_seconds(value):
    if isinstance(value, dict):
        return {k: _strip_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_strip_seconds(v) for v in value]
    return value


def test_a_sigkilled_run_is_marked_interrupted_and_resumes(tmp_path, finished):
    """SIGKILL mid-run: `runs list` says interrupted (not running for ever); what was computed
    is kept; --resume finishes with the metrics of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POISONLAB_RUNS": str(tmp_path / "runs")}
    proc = subprocess.Popen([sys.executable, "-m", "poisonlab.cli", *SMOKE], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the first model is saved
        runs = list((tmp_path / "runs").glob("*/checkpoints/model-*.safetensors"))
        if runs:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert runs, "the run saved nothing within the deadline"
    run = _first_run(tmp_path)
    listed = poisonlab("runs", "list", "--json", cwd=tmp_path)
    status = {r["run_id"]: r["status"] for r in json.loads(listed.stdout)["runs"]}
    assert status[run.name] == "interrupted"
    assert all(p.exists() for p in runs)
    resumed = poisonlab("run", "membership", "--resume", run.name, "-q", "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert _strip_seconds(metrics) == _strip_seconds(finished[1])


def test_an_unexpected_exception_is_one_line_with_a_saved_traceback(tmp_path, monkeypatch,
                                                                    capsys):
    """A genuine bug is not silenced: one line naming it and where its traceback is, exit 1."""
    from poisonlab import cli
    from poisonlab.cli import run as run_cli

    def boom(*_args, **_kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(run_cli, "execute", boom)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    assert cli.main([*SMOKE]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error, RuntimeError: a bug" in err
    saved = Path(err.split("traceback saved to ")[1].split(" ")[0])
    assert saved.exists() and "RuntimeError: a bug" in saved.read_text()


@pytest.mark.parametrize("exc, needle", [
    (OSError(28, "No space left on device", "/runs/x/checkpoints/m.safetensors"),
     "/runs/x/checkpoints/m.safetensors: No space left on device"),
    (MemoryError(), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                  "allocate memory: you tried to allocate 3600000000000 bytes."), "out of memory"),
    (RuntimeError("unable to mmap 4752304 bytes from file <x.safetensors>: Cannot allocate "
                  "memory (12)"), "out of memory"),
], ids=["disk full", "memory", "torch allocation", "mmap"])
def test_environment_failures_are_one_line(monkeypatch, capsys, exc, needle):
    from poisonlab import cli
    from poisonlab.cli import run as run_cli

    def fail(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr(run_cli, "execute", fail)
    assert cli.main([*SMOKE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err


SLOW_DECODE = '''
import os, sys, time
from poisonlab.cli import _sigterm_as_interrupt
from poisonlab.data.image_folder import run_chunks

def slow(chunk):
    # each worker says who it is in ONE write (a print is two writes when stdout is unbuffered,
    # and two workers' lines then interleave), then decodes for a long time
    os.write(1, f"{os.getpid()}\\n".encode())
    time.sleep(60)
    return chunk

if __name__ == "__main__":
    with _sigterm_as_interrupt():
        try:
            run_chunks(slow, [1, 2], workers=2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
'''


def test_sigterm_during_a_parallel_decode_stops_the_workers(tmp_path):
    """SIGTERM while the data set decodes in worker processes: one line, exit 130, and the
    workers are stopped (they used to wait for ever as orphans, or finish a whole chunk)."""
    script = tmp_path / "decode.py"
    script.write_text(SLOW_DECODE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    workers = [int(proc.stdout.readline()) for _ in range(2)]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        time.sleep(0.1)
    assert alive == [], f"workers {alive} outlived their parent"


def test_a_downsample_factor_larger_than_the_images_is_refused():
    from poisonlab.data.types import ImageSet
    from poisonlab.errors import ShapeError

    images = ImageSet(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    assert images.downsampled(2).x.shape == (2, 1, 14, 14)
    with pytest.raises(ShapeError, match="downsample factor 1000 is larger than the 28x28"):
        images.downsampled(1000)


@pytest.mark.parametrize("pixels", [150, 250], ids=["past the limit (PIL warns)", "past twice"])
def test_an_image_past_the_decompression_bomb_limit_is_refused(monkeypatch, pixels):
    import io

    from PIL import Image

    from poisonlab.data.image_folder import open_image
    from poisonlab.errors import DataError

    buffer = io.BytesIO()
    Image.new("L", (pixels // 10, 10)).save(buffer, format="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="cannot decode image bomb.png"):
        open_image("bomb.png", buffer.getvalue())


def test_numeric_class_folders_are_labelled_by_their_number(tmp_path):
    """Folders 0..10 are labels 0..10 (the --members help promises it), not text order 0,1,10,2."""
    from PIL import Image

    from poisonlab.data.image_folder import class_order, scan_image_folder

    for name in map(str, range(11)):
        (tmp_path / name).mkdir()
        Image.new("L", (4, 4)).save(tmp_path / name / "a.png")
    classes, files = scan_image_folder(tmp_path)
    assert classes == [str(i) for i in range(11)]
    assert all(Path(path).parent.name == str(label) for path, label in files)
    assert class_order(["cat", "10", "2"]) == ["10", "2", "cat"]  # not all numbers: text order


def test_python_warnings_reach_the_terminal_as_one_line_each_once(capsys):
    """A warning (a run index that cannot be written, say) used to print the raising file, line
    and code line, once per call site: six raw lines for one problem."""
    import warnings

    from poisonlab.cli import _warnings_as_lines

    with _warnings_as_lines():
        for _ in range(3):
            warnings.warn("cannot update the run index\n  x.sqlite", stacklevel=1)
        warnings.warn("another problem", stacklevel=1)
    assert capsys.readouterr().err == ("warning: cannot update the run index x.sqlite\n"
                                       "warning: another problem\n")



def test_an_error_naming_a_path_with_control_characters_stays_one_printable_line(tmp_path):
    r = poisonlab("run", "membership", "--config", str(tmp_path / "a\x1b[2J\nb.yaml"), cwd=tmp_path)
    err = one_line_error(r, "a\\x1b[2J")
    assert "\x1b" not in err


def test_a_refused_setting_leaves_no_output_folder(tmp_path):
    one_line_error(poisonlab(*SMOKE, "--out", str(tmp_path / "new"), "--set", "train.lr=.inf",
                             cwd=tmp_path), "train.lr")
    assert not (tmp_path / "new").exists()


def test_sigterm_while_the_command_starts_is_one_line_and_exit_130(tmp_path):
    """SIGTERM while the CLI is still importing torch ended the process silently."""
    proc = subprocess.Popen([sys.executable, "-m", "poisonlab", *SMOKE], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "POISONLAB_RUNS": str(tmp_path / "runs")})
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", (proc.returncode, err)


def test_an_interrupt_while_the_cli_builds_its_commands_is_one_line_and_exit_130(
        monkeypatch, capsys):
    """A SIGTERM or Ctrl-C while typer builds the command tree (seconds under load) came out as
    a traceback: that step ran before the error boundary."""
    from poisonlab.cli import main

    def interrupted(app):
        raise KeyboardInterrupt("terminated by SIGTERM")

    monkeypatch.setattr(typer.main, "get_command", interrupted)
    assert main(["runs", "list"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
