"""Output paths are checked before any work starts: one line, exit 2, nothing computed is lost."""

from __future__ import annotations

import pytest

from poisonlab.cli import main
from poisonlab.errors import ConfigError
from poisonlab.runs.layout import prepare_output


def _bad_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return {"under /proc": "/proc/poisonlab-x/out", "an existing file": str(tmp_path / "file"),
            "a dangling symlink": str(tmp_path / "dangling"), "a symlink loop": str(tmp_path / "loop")}


@pytest.mark.parametrize("case", ["under /proc", "an existing file", "a dangling symlink",
                                  "a symlink loop"])
def test_run_out_is_refused_before_any_work(tmp_path, capsys, case):
    out = _bad_paths(tmp_path)[case]
    assert main(["run", "membership", "--preset", "smoke", "--out", out, "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--out" in err and "Traceback" not in err


@pytest.mark.parametrize("case", ["under /proc", "a dangling symlink", "a symlink loop"])
def test_purify_out_is_refused_before_any_work(tmp_path, capsys, case):
    out = _bad_paths(tmp_path)[case] + ".safetensors"
    if case != "under /proc":  # the symlink itself must carry the suffix
        link = tmp_path / f"{case.split()[-1]}.safetensors"
        link.symlink_to(tmp_path / ("nowhere" if "dangling" in case else link.name))
        out = str(link)
    code = main(["purify", str(tmp_path / "missing.safetensors"), "--arch", "tiny_cnn",
                 "--dataset", "glyphs", "--target", "3", "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--out" in err


def test_a_writable_path_is_accepted_and_created(tmp_path):
    assert prepare_output(tmp_path / "a" / "b", directory=True).is_dir()
    assert prepare_output(tmp_path / "c" / "w.safetensors", directory=False).parent.is_dir()
    with pytest.raises(ConfigError, match="is a folder"):
        prepare_output(tmp_path / "a", directory=False)
