"""The detection zoo: its seeded specs, its triggers, its numbers (on hand-made records), and
(slow) a tiny zoo trained, judged and resumed end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from poisonlab.audit.detection_zoo import (
    detection_path,
    model_paths,
    prepare_zoo,
    run_zoo,
    write_json,
)
from poisonlab.audit.zoo_specs import FAMILIES, ModelSpec, ZooConfig, build_trigger, generate_specs
from poisonlab.audit.zoo_summary import summarize, summary_tables
from poisonlab.errors import ConfigError


def test_specs_are_seeded_balanced_and_complete():
    cfg = ZooConfig()
    specs = generate_specs(cfg)
    assert specs == generate_specs(ZooConfig())  # the seed reproduces the zoo
    assert specs != generate_specs(ZooConfig(seed=1))
    assert len(specs) == 40 and len({s.id for s in specs}) == 40
    bd = [s for s in specs if s.backdoored]
    clean = [s for s in specs if not s.backdoored]
    assert len(bd) == 20 and len(clean) == 20
    assert Counter(s.family for s in bd) == {f: 5 for f in FAMILIES}
    assert sorted(Counter(s.dataset for s in bd).values()) == [6, 7, 7]
    pairs = Counter((s.family, s.dataset) for s in bd)  # every family on every data set
    assert len(pairs) == 12 and set(pairs.values()) == {1, 2}
    for family in FAMILIES:
        assert sorted(n for (f, _), n in pairs.items() if f == family) == [1, 2, 2]
    assert sorted(Counter(s.dataset for s in clean).values()) == [6, 7, 7]
    for s in bd:
        assert 0 <= s.target < 10 and 0.05 <= s.poison_rate <= 0.2
        assert s.trigger["family"] == s.family and s.id.endswith(s.family)
    for s in clean:
        assert s.family is None and s.target is None and s.trigger == {}
    assert {s.arch for s in specs if s.dataset == "glyphs"} <= {"tiny_cnn", "small_cnn"}
    assert {s.arch for s in specs if s.dataset != "glyphs"} == {"small_cnn"}
    assert ModelSpec.from_dict(json.loads(json.dumps(specs[0].to_dict()))) == specs[0]
    # Another count is another zoo, drawn afresh (still balanced).
    few = generate_specs(ZooConfig(backdoored=4, clean=0, datasets=["glyphs"]))
    assert Counter(s.family for s in few) == {f: 1 for f in FAMILIES}


def test_every_family_builds_a_trigger_that_changes_images():
    cfg = ZooConfig(backdoored=8, clean=1)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    seen = set()
    for spec in generate_specs(cfg):
        if not spec.backdoored:
            with pytest.raises(ConfigError, match="clean"):
                build_trigger(spec, (3, 32, 32))
            continue
        trigger = build_trigger(spec, (3, 32, 32))
        out = trigger.apply(x)
        assert out.shape == x.shape and not torch.equal(out, x)
        assert torch.equal(out, build_trigger(spec, (3, 32, 32)).apply(x))  # from the spec alone
        seen.add(spec.family)
    assert seen == set(FAMILIES)


@pytest.mark.parametrize(("settings", "key"), [
    ({"datasets": ["imagenet"]}, "datasets"), ({"families": ["lira"]}, "families"),
    ({"detectors": ["strip"]}, "detectors"), ({"poison_rate": (0.3, 0.1)}, "poison_rate"),
    ({"seeds": []}, "seeds"), ({"backdoored": -1}, "backdoored"),
    ({"recipes": {"mnist": {"archs": ["vgg99"]}}}, "recipes.mnist.archs"),
])
def test_bad_zoo_settings_are_one_line_errors(settings, key):
    with pytest.raises(ConfigError) as info:
        ZooConfig(**settings)
    assert key in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_folder_holding_another_zoo_is_refused(tmp_path):
    cfg = ZooConfig(backdoored=2, clean=2, datasets=["glyphs"])
    prepare_zoo(tmp_path, cfg)
    assert prepare_zoo(tmp_path, cfg) == generate_specs(cfg)
    # Evaluation settings may change on the same zoo; what the models are may not.
    prepare_zoo(tmp_path, cfg.model_copy(update={"seeds": (5,)}))
    with pytest.raises(ConfigError, match="holds another zoo"):
        prepare_zoo(tmp_path, cfg.model_copy(update={"clean": 3}))


def _records(tmp_path: Path):
    """A zoo of 3 backdoored (one whose backdoor did not take) and 2 clean models, with
    hand-made detector results for seeds 0 and 1 (see the numbers in the test)."""
    cfg = ZooConfig(backdoored=3, clean=2, datasets=["glyphs"], families=["patch", "sig"],
                    seeds=[0, 1])
    specs = generate_specs(cfg)
    bd = [s for s in specs if s.backdoored]
    a = next(s for s in bd if s.family == "patch")
    b = next(s for s in bd if s.family == "sig")
    e = next(s for s in bd if s not in (a, b))
    c, d = [s for s in specs if not s.backdoored]
    for spec in specs:
        asr = None if not spec.backdoored else 0.3 if spec is e else 0.95
        write_json(model_paths(tmp_path, spec)[1], {
            "spec": spec.to_dict(), "input_shape": [1, 28, 28], "benign_accuracy": 0.9,
            "attack_success_rate": asr, "backdoor_took": None if asr is None else asr >= 0.8,
            "train_cpu_seconds": 2.0})
    wrong = lambda s: (s.target + 1) % 10  # noqa: E731
    # (model, seed) → (detected, target, statistic) for Neural Cleanse and MM-BD.
    nc = [(a, 0, True, a.target, 5.0), (b, 0, False, None, 1.0), (c, 0, True, 2, 3.0),
          (d, 0, False, None, 0.5), (e, 0, False, None, 0.2),
          (a, 1, True, wrong(a), 4.0), (b, 1, True, b.target, 3.0), (c, 1, False, None, 1.0),
          (d, 1, False, None, 2.0), (e, 1, False, None, 0.1)]
    mm = [(s, k, *((True, s.target, 20.0 + k) if s in (a, b) else (False, None, 1.0 + k)))
          for s in specs for k in (0, 1)]
    for name, table in (("nc", nc), ("mmbd", mm)):
        for spec, seed, hit, target, stat in table:
            write_json(detection_path(tmp_path, cfg, name, spec, seed), {
                "model": spec.id, "detector": name, "seed": seed, "detected": hit,
                "status": "detected" if hit else "none", "target": target, "statistic": stat,
                "cpu_seconds": 3.0 if name == "nc" else 1.0})
    return cfg, a, b, e


def test_summary_numbers_on_hand_made_records(tmp_path):
    cfg, a, b, e = _records(tmp_path)
    out = summarize(tmp_path, cfg)
    assert out["models"] == {"specs": 5, "trained": 5, "backdoored": 3, "backdoor_took": 2,
                             "clean": 2, "asr_threshold": 0.8}
    assert [x["id"] for x in out["excluded"]] == [e.id]  # ASR 0.3: reported, not a positive
    assert out["excluded"][0]["verdicts"]["nc"] == ["none", "none"]
    nc = out["detectors"]["nc"]
    s0, s1 = nc["per_seed"]["0"], nc["per_seed"]["1"]
    assert (s0["tpr"], s0["fpr"], s0["target_accuracy"]) == (0.5, 0.5, 1.0)
    assert (s1["tpr"], s1["fpr"], s1["target_accuracy"]) == (1.0, 0.0, 0.5)
    # Seed 0: A 5 > C 3 > B 1 > D 0.5 → 3 of 4 pairs ordered; seed 1: all 4.
    assert s0["auc"] == pytest.approx(0.75) and s1["auc"] == pytest.approx(1.0)
    assert nc["tpr"] == pytest.approx(0.75) and nc["fpr"] == pytest.approx(0.25)
    assert nc["auc"] == pytest.approx(0.875) and nc["target_accuracy"] == pytest.approx(0.75)
    # Same verdict under both seeds: A, D and E; not B, C.
    assert nc["agreement"] == pytest.approx(3 / 5) and nc["agreement_models"] == 5
    assert nc["cpu_seconds_mean"] == 3.0
    assert nc["groups"]["family patch"]["tpr"] == 1.0  # A, both seeds
    assert nc["groups"]["family sig"]["tpr"] == 0.5  # B, seed 1 only
    mm = out["detectors"]["mmbd"]
    assert (mm["tpr"], mm["fpr"], mm["auc"], mm["agreement"]) == (1.0, 0.0, 1.0, 1.0)
    either = out["detectors"]["either"]
    # Seed 0: A and B (MM-BD) and C (Neural Cleanse) → TPR 1, FPR 1/2; seed 1: FPR 0.
    assert either["per_seed"]["0"]["fpr"] == 0.5 and either["tpr"] == 1.0
    # Seed 1: A fired in both, and Neural Cleanse's (wrong) target is scan's.
    assert either["per_seed"]["1"]["target_accuracy"] == 0.5 and either["auc"] is None
    assert either["cpu_seconds_mean"] == 4.0
    titles = [t[0] for t in summary_tables(out)]
    assert len(titles) == 3 and "did not take" in titles[2]


@pytest.mark.slow
def test_a_tiny_zoo_trains_detects_and_resumes_without_recomputing(tmp_path):
    """2 backdoored (patch) + 2 clean tiny CNNs on the 28×28 glyphs, both detectors, two seeds,
    Neural Cleanse at a reduced size (50 images, 20 steps, 1 restart), MM-BD at its defaults."""
    cfg = ZooConfig(backdoored=2, clean=2, datasets=["glyphs"], families=["patch"],
                    seeds=[0, 1], recipes={"glyphs": {"archs": ["tiny_cnn"], "train_size": 5000,
                                                      "test_size": 500, "epochs": 4}},
                    scan={"samples": 50, "steps": 20, "restarts": 1})
    lines: list[str] = []
    first = run_zoo(tmp_path, cfg, log=lines.append)
    assert (first.trained, first.detected) == (4, 16)
    models = [json.loads(p.read_text()) for p in sorted((tmp_path / "models").glob("*.json"))]
    assert len(models) == 4 and all(m["benign_accuracy"] > 0.9 for m in models)
    specs = generate_specs(cfg)
    clear = [s for s, m in zip(specs, models, strict=True)
             if s.backdoored and m["attack_success_rate"] >= 0.95]
    assert clear, [m["attack_success_rate"] for m in models]  # some patch clearly took
    for spec in clear:
        verdicts = [json.loads(detection_path(tmp_path, cfg, d, spec, s).read_text())
                    for d in cfg.detectors for s in cfg.seeds]
        fired = [v for v in verdicts if v["detected"]]
        assert fired, verdicts  # a clearly backdoored patch model: some detector fires
        assert all(v["target"] == spec.target for v in fired)
    # Run again: nothing is recomputed, nothing rewritten.
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_zoo(tmp_path, cfg)
    assert (again.trained, again.detected) == (0, 0)
    assert (again.reused_models, again.reused_detections) == (4, 16)
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # A result lost (a run killed before it was written) is the only one recomputed, the same.
    lost = detection_path(tmp_path, cfg, "mmbd", specs[0], 1)
    before = json.loads(lost.read_text())
    lost.unlink()
    third = run_zoo(tmp_path, cfg)
    assert (third.trained, third.detected, third.reused_detections) == (0, 1, 15)
    after = json.loads(lost.read_text())
    assert after["statistic"] == pytest.approx(before["statistic"], rel=1e-6)
    assert after["status"] == before["status"]
    summary = summarize(tmp_path, cfg)
    assert summary["models"]["trained"] == 4 and summary["models"]["clean"] == 2
    for name in ("nc", "mmbd"):
        d = summary["detectors"][name]
        assert d["agreement_models"] == 4 and 0 <= d["agreement"] <= 1
        assert d["cpu_seconds_mean"] > 0
