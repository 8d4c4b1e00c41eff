"""`poisonlab scan`, `poisonlab purify` and `poisonlab run backdoor-defense` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from poisonlab.attacks.backdoor_injection import BackdoorInjection
from poisonlab.attacks.triggers import badnets_patch
from poisonlab.cli import main
from poisonlab.data.types import ImageSet
from poisonlab.experiments import backdoor_defense
from poisonlab.runs.checkpoints import save_weights
from poisonlab.sweeps.summary import metric_names, undeclared_metrics

TARGET = 3



def write_folder(root: Path, images: ImageSet) -> Path:
    """An image folder: one sub-folder per label, 8-bit grayscale PNGs."""
    for i, (x, y) in enumerate(zip(images.x, images.y.tolist(), strict=True)):
        folder = root / f"class{y}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A BadNets tiny CNN saved as safetensors, plus clean and test image folders (14×14)."""
    from poisonlab.data.glyphs import load_glyph_supervised
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit")
    data = load_glyph_supervised()
    pool = torch.nn.functional.avg_pool2d
    # Quantise like the PNG files, so folder images are exactly what the model sees.
    train = ImageSet((pool(data.train.x, 2) * 255).round() / 255, data.train.y)
    test = ImageSet((pool(data.test.x, 2) * 255).round() / 255, data.test.y)
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 10, 1)
    poisoned = BackdoorInjection(badnets_patch((1, 14, 14)), target=TARGET, poison_rate=0.1).poison(train).data
    train_classifier(model, poisoned, TrainConfig(epochs=4, batch_size=64, lr=0.05),
                     progress=False)
    weights = save_weights(root / "model.safetensors", model.state_dict(),
                           {"input_shape": "[1, 14, 14]"})
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    return {
        "model": weights,
        "clean": write_folder(root / "clean", train.subset(order[:250])),
        "test": write_folder(root / "test", test.subset(torch.arange(300))),
        "big": write_folder(root / "big", ImageSet(data.test.x[:20], data.test.y[:20])),
        "root": root,
    }


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_scan_flags_the_target_and_writes_a_report(files, capsys, tmp_path):
    report = tmp_path / "report"
    code = main(["scan", str(files["model"]), "--arch", "tiny_cnn", "--data", str(files["test"]),
                 "--samples", "64", "--steps", "60", "--batch-size", "16", "--report", str(report),
                 "--json", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backdoor"]["flagged"] == [TARGET]
    assert result["backdoor"]["labels"][TARGET]["anomaly_index"] > 2
    assert result["backdoor"]["mm_bd"]["target"] == TARGET
    assert result["backdoor"]["combined"]["detected_by"] == ["nc", "mmbd"]
    verdict = result["backdoor"]["combined"]["verdict"]
    assert verdict.startswith(f"backdoor: SUSPECTED by neural cleanse (label {TARGET}, "
                              f"class{TARGET}, index ")  # the folder names the classes
    assert f"MM-BD (label {TARGET}, class{TARGET}, p = " in verdict
    assert "SUSPECTED by neural cleanse" in out and "max margin" in out  # printed, with MM-BD's
    assert (report / "report.html").stat().st_size > 1000
    assert (report / "neural_cleanse_triggers.png").exists()
    assert (report / "mm_bd_inputs.png").exists()
    assert json.loads((report / "scan.json").read_text())["backdoor"]["flagged"] == [TARGET]


def test_purify_lowers_asr_and_writes_safetensors(files, capsys, tmp_path):
    out = tmp_path / "purified.safetensors"
    code = main(["purify", str(files["model"]), "--arch", "tiny_cnn", "--clean-data",
                 str(files["clean"]), "--target", str(TARGET), "--test-data", str(files["test"]),
                 "--trigger", "badnets", "--epochs", "10", "--inversion-steps", "30",
                 "--out", str(out), "--json", "--quiet"])
    assert code == 0
    result = last_json(capsys)
    assert result["before"]["attack_success_rate"] > 0.9
    assert result["after"]["attack_success_rate"] < 0.2
    assert result["after"]["benign_accuracy"] > result["before"]["benign_accuracy"] - 0.05
    from poisonlab.runs.checkpoints import load_weights

    state, meta = load_weights(out)
    assert "head.weight" in state and meta["purified_by"] == "mcl"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "resnet21", "--data", "{test}"], "unknown architecture 'resnet21'"),
        (["--arch", "resnet20", "--data", "{test}"], "do not fit resnet20"),
        (["--arch", "tiny_cnn", "--data", "{big}"], "model expects 1x14x14"),
        (["--arch", "tiny_cnn", "--data", "{root}/missing"], "does not exist"),
        (["--arch", "tiny_cnn", "--data", "{test}", "--check", "nope"], "unknown check 'nope'"),
    ],
)
def test_scan_bad_inputs_are_one_line_errors(files, capsys, args, message):
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert main(["scan", str(files["model"]), *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_model_files_are_never_unpickled(files, capsys, tmp_path):
    class Boom:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"head.weight": torch.zeros(10, 64), "x": Boom()}, evil)
    assert main(["scan", str(evil), "--arch", "tiny_cnn", "--data", str(files["test"])]) == 2
    captured = capsys.readouterr()
    assert "pickled code ran" not in captured.out and captured.err.startswith("error: ")
    out = tmp_path / "x.bin"
    assert main(["purify", str(files["model"]), "--arch", "tiny_cnn", "--clean-data",
                 str(files["clean"]), "--out", str(out)]) == 2
    assert "--out must be a .safetensors file" in capsys.readouterr().err


def test_run_backdoor_defense_smoke(capsys, tmp_path):
    sets = ["attack.attacks=[badnets]", "arch=tiny_cnn", "data.train_size=2000",
            "train.epochs=3", "nc.samples=32", "nc.inversion.steps=15", "defense.finetune.epochs=3",
            "defense.inversion.steps=10", "figures.points=60"]
    code = main(["run", "backdoor-defense", "--preset", "smoke", "--out", str(tmp_path), "--json",
                 "--quiet", *sum((["--set", s] for s in sets), [])])
    assert code == 0
    metrics = last_json(capsys)
    # every number it writes is one `sweep --metric` accepts before a run
    assert undeclared_metrics(metric_names(metrics), backdoor_defense.METRICS) == []
    entry = metrics["attacks"]["badnets"]
    for stage in ("backdoored", "mcl", "fine_tuning", "nc_unlearning"):
        assert set(entry[stage]) == {"benign_accuracy", "attack_success_rate"}
        assert 0 <= entry[stage]["attack_success_rate"] <= 1
    assert entry["backdoored"]["attack_success_rate"] > 0.9
    assert entry["mcl"]["attack_success_rate"] < entry["backdoored"]["attack_success_rate"]
    assert isinstance(entry["nc_anomaly_index"], float) and isinstance(entry["nc_flagged"], list)
    assert isinstance(metrics["clean_model"]["nc_flagged"], list)
    run_dir = next(tmp_path.glob("backdoor-defense-*"))
    assert json.loads((run_dir / "metrics.json").read_text())["attacks"]["badnets"] == entry
    assert (run_dir / "report.html").exists()
    assert (run_dir / "figures" / "triggers.png").exists()
    assert (run_dir / "figures" / "features.png").exists()
    # its classifiers carry their input size: `scan` of one ran on 28x28 glyphs without it
    from poisonlab.runs.checkpoints import load_weights

    for name in ("model-badnets", "model-badnets-mcl", "model-clean"):
        header = load_weights(run_dir / "checkpoints" / f"{name}.safetensors")[1]
        assert header["input_shape"] == "[1, 14, 14]", name
    # Resuming the finished run reloads the models and results instead of recomputing them.
    assert main(["run", "backdoor-defense", "--resume", run_dir.name, "--out", str(tmp_path),
                 "--json", "--quiet"]) == 0
    assert last_json(capsys)["attacks"]["badnets"] == entry
    log = (run_dir / "log.txt").read_text()
    assert f"badnets: model loaded from run {run_dir.name}" in log and "badnets: results loaded" in log

    # --model: a new run with another defence schedule reuses the trained models (no training)
    # and recomputes detection and defences; a run trained differently is refused in one line.
    reuse = [*sets, "defense.finetune.lr_steps=[[0,0.01]]"]
    assert main(["run", "backdoor-defense", "--preset", "smoke", "--out", str(tmp_path), "--json",
                 "--quiet", "--model", run_dir.name, *sum((["--set", s] for s in reuse), [])]) == 0
    again = last_json(capsys)
    assert again["models_from"] == [run_dir.name]
    assert again["attacks"]["badnets"]["backdoored"] == entry["backdoored"]
    assert again["attacks"]["badnets"]["mcl"] != entry["mcl"]
    new_dir = max(tmp_path.glob("backdoor-defense-*"), key=lambda p: p.stat().st_mtime)
    new_log = (new_dir / "log.txt").read_text()
    assert ": trained" not in new_log and f"clean: model loaded from run {run_dir.name}" in new_log
    # Another attack list pools what the source run holds (its models and, as the defence
    # settings are the same, its results) and trains and defends the rest.
    more = [*sets, "attack.attacks=[badnets,blend]", "attack.clean_control=false"]
    assert main(["run", "backdoor-defense", "--preset", "smoke", "--out", str(tmp_path), "--json",
                 "--quiet", "--model", f"{run_dir.name},", *sum((["--set", s] for s in more), [])]) == 0
    pooled = last_json(capsys)
    assert pooled["attacks"]["badnets"] == entry and "clean_model" not in pooled
    assert pooled["attacks"]["blend"]["backdoored"]["attack_success_rate"] > 0.9
    new_dir = max(tmp_path.glob("backdoor-defense-*"), key=lambda p: p.stat().st_mtime)
    new_log = (new_dir / "log.txt").read_text()
    assert f"badnets: results loaded from run {run_dir.name}" in new_log
    assert "blend: trained" in new_log and "clean:" not in new_log
    assert (new_dir / "checkpoints" / "result-badnets.safetensors").exists()
    # A reused model is copied too, so a run made of reused models can be a source in its turn.
    assert (new_dir / "checkpoints" / "model-badnets.safetensors").exists()
    other = [*sets, "train.epochs=4"]
    assert main(["run", "backdoor-defense", "--preset", "smoke", "--out", str(tmp_path), "--quiet",
                 "--model", run_dir.name, *sum((["--set", s] for s in other), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different 'train' settings" in err


def test_results_of_a_run_recorded_before_a_defence_setting_existed_are_not_reused():
    from types import SimpleNamespace

    from poisonlab.evaluation.backdoor import same_defence
    from poisonlab.experiments.backdoor_defense import Config

    cfg = Config()
    recorded = cfg.model_dump(mode="json")
    assert same_defence(cfg, SimpleNamespace(config=recorded))
    older = json.loads(json.dumps(recorded))
    del older["defense"]["distill_weight"]  # it ran the reference loss, whatever the default now
    assert not same_defence(cfg, SimpleNamespace(config=older))
    nested = json.loads(json.dumps(recorded))
    del nested["defense"]["finetune"]["freeze_bn"]  # a nested setting counts as well
    assert not same_defence(cfg, SimpleNamespace(config=nested))
    changed = json.loads(json.dumps(recorded))
    changed["defense"]["recalibrate_bn"] = False
    assert not same_defence(cfg, SimpleNamespace(config=changed))
    changed = json.loads(json.dumps(recorded))
    changed["nc"]["inversion"]["steps"] = 7
    assert not same_defence(cfg, SimpleNamespace(config=changed))


@pytest.mark.parametrize(("setting", "key"), [
    ("arch=", "arch"),
    ("nc.steps=0", "nc.steps: unknown key"),  # moved to nc.inversion.steps
    ("nc.samples=0", "nc.samples"),
    ("nc.threshold=0", "nc.threshold"),
    ("nc.inversion.steps=0", "nc.inversion.steps"),
    ("nc.inversion.cost_multiplier=1", "nc.inversion.cost_multiplier"),
    ("nc.inversion.parametrization=additive", "nc.inversion"),
    ("defense.inversion_steps=5", "defense.inversion_steps: unknown key"),
    ("defense.inversion.steps=0", "defense.inversion.steps"),
    ("defense.finetune.epochs=0", "defense.finetune.epochs"),
    ("defense.finetune.lr_steps=[[1,0.1]]", "defense.finetune.lr_steps"),
    ("defense.temperature=0", "defense.temperature"),
    ("defense.distill_weight=-1", "defense.distill_weight"),
    ("defense.unlearning_fraction=1.5", "defense.unlearning_fraction"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=0", "train.lr"),
    ("attack.poison_rate=1", "attack.poison_rate"),
    ("data.clean_fraction=0", "data.clean_fraction"),
    ("figures.points=1", "figures.points"),
])
def test_bad_settings_are_refused_once_with_the_key(capsys, tmp_path, setting, key):
    assert main(["run", "backdoor-defense", "--preset", "smoke", "--out", str(tmp_path),
                 "--quiet", "--set", setting]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert err.count("; ") == 0  # one problem, reported once
    if key is not None:
        assert f"{key}" in err
    assert not list(tmp_path.glob("backdoor-defense-*"))  # refused before a run is made
