"""The `cpu`-preset reproductions and the targets their issues set (`make test-slow`; hours each).

Each test runs one experiment exactly as a user would (`poisonlab run NAME --preset cpu` on the
real data set in ../shared/data) and checks the published-number targets. They are slow by
design and excluded from the default suite; docs/results.md holds what each gave when last run,
including the targets that are not met.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from poisonlab.cli import main

# Hours each: the suite's 15-minute per-test timeout does not apply to them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(6 * 3600)]


@pytest.fixture(autouse=True)
def all_cores():
    """Reproductions run as a user's command would, on every core (the suite's tiny tests use
    one intra-op thread, and the experiments size their worker pools from that)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


def run_cpu_preset(experiment: str, data: str, tmp_path, capsys, *extra: str) -> dict:
    code = main(["run", experiment, "--preset", "cpu", "--data-dir", data,
                 "--out", str(tmp_path), "--json", "-q", *extra])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_fewshot_backdoor_on_omniglot(shared_data, tmp_path, capsys):
    """Kato et al. on Omniglot 5-way 5-shot, T = 500 tasks: CA ≥ 97%; at ε = 0.3 ASR ≥ 95% with
    BA ≥ 85%, under the paper's protocol (the trigger classified by itself, eq. 12 as written).
    Then the same model under the transductive protocol (the trigger inside the
    victim's query batch), where Algorithm 1 meets only CA and ASR (see docs/results.md),
    and our keep_support extension of its objective (λ = 0.1) meets all three."""
    data, eps = str(shared_data / "omniglot"), "attack.epsilons=[0.07, 0.3, 0.5]"
    m = run_cpu_preset("fewshot-backdoor", data, tmp_path, capsys, "--set", eps,
                       "--set", "attack.protocol=paper")
    assert m["clean_accuracy"] >= 0.97
    row = next(r for r in m["per_epsilon"] if r["epsilon"] == 0.3)
    assert row["attack_success_rate"] >= 0.95
    assert row["backdoor_accuracy"] >= 0.85
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    m = run_cpu_preset("fewshot-backdoor", data, tmp_path, capsys, "--set", eps,
                       "--model", run_dir.name)
    assert m["clean_accuracy"] >= 0.97 and m["protocol"] == "transductive"
    row = next(r for r in m["per_epsilon"] if r["epsilon"] == 0.3)
    assert row["attack_success_rate"] >= 0.95
    m = run_cpu_preset("fewshot-backdoor", data, tmp_path, capsys, "--set", "attack.epsilons=[0.3]",
                       "--set", "attack.asp=false", "--set", "attack.keep_support=0.1",
                       "--model", run_dir.name)
    (row,) = m["per_epsilon"]
    assert m["protocol"] == "transductive" and m["attacker_keep_support"] == 0.1
    assert row["attack_success_rate"] >= 0.95
    assert row["backdoor_accuracy"] >= 0.85


def test_backdoor_defense_on_cifar10(shared_data, tmp_path, capsys):
    """Backdoored ResNet-20: BA ≥ 75%, ASR ≥ 95%; MCL with 5% clean data: ASR ≤ 10% at most 3
    points of BA lost; Neural Cleanse flags the BadNets target and nothing on the clean model."""
    m = run_cpu_preset("backdoor-defense", str(shared_data / "cifar10"), tmp_path, capsys)
    target = 5  # the cpu preset's attack.target
    for name, entry in m["attacks"].items():
        before, after = entry["backdoored"], entry["mcl"]
        assert before["benign_accuracy"] >= 0.75, name
        assert before["attack_success_rate"] >= 0.95, name
        assert after["attack_success_rate"] <= 0.10, name
        assert after["benign_accuracy"] >= before["benign_accuracy"] - 0.03, name
    assert target in m["attacks"]["badnets"]["nc_flagged"]
    assert m["attacks"]["badnets"]["nc_anomaly_index"] > 2
    assert m["clean_model"]["nc_flagged"] == []


def test_membership_on_cifar10(shared_data, tmp_path, capsys):
    """Overfit ResNet-20 on 12,500 images: shadow attack accuracy ≥ 0.70 and AUC ≥ 0.75; dropout
    or the strongest cheap training-side defence (early stopping) brings it to ≤ 0.60; LiRA's TPR
    at 0.1% FPR above the shadow attack's."""
    m = run_cpu_preset("membership", str(shared_data / "cifar10"), tmp_path, capsys)
    shadow = m["attacks"]["shadow"]
    assert shadow["attack_accuracy"] >= 0.70 and shadow["auc"] >= 0.75
    cheap = min(m["defenses"][d]["attack_accuracy"] for d in ("dropout", "early_stopping"))
    assert cheap <= 0.60
    lira = max(m["attacks"]["lira_online"]["tpr_at_fpr_0.001"],
               m["attacks"]["lira_offline"]["tpr_at_fpr_0.001"])
    assert lira > shadow["tpr_at_fpr_0.001"]
