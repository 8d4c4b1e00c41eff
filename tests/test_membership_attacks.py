"""Membership attacks on a deliberately overfit target: better than chance on its training records,
near chance on records it never saw. Output-side defences and input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonlab.attacks.membership import (
    LabelOnlyAttack,
    LiRA,
    ShadowModelAttack,
    ThresholdAttack,
    default_augmentations,
    logit_confidence,
    random_halves,
)
from poisonlab.attacks.membership.label_only import label_oracle, shift
from poisonlab.data.glyphs import load_glyph_supervised
from poisonlab.defenses.membership_outputs import (
    apply_output_defense,
    labels_only,
    round_scores,
    top_k,
)
from poisonlab.errors import ConfigError, DataError
from poisonlab.metrics import roc_auc
from poisonlab.training.supervised import TrainConfig, predict_proba, train_classifier

POOL = 400  # records 0..399: target and LiRA pool; 400..599 shadow-in; 600..799 shadow-out
NUM_SHADOWS = 8


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """A small MLP trained to overfit (100% train accuracy, no regularisation)."""
    from poisonlab.data.types import ImageSet

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    cfg = TrainConfig(
        epochs=80, batch_size=200, lr=1e-2, optimizer="adam", weight_decay=0.0,
        schedule="none",
    )
    train_classifier(model, ImageSet(x, y), cfg, progress=False, seed=seed)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the CPU is shared, and these models are too small to split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    data = load_glyph_supervised(num_classes=10, train_per_class=80, test_per_class=1, seed=3)
    x, y = data.train.x, data.train.y
    gen = torch.Generator().manual_seed(0)
    target_in = torch.zeros(POOL, dtype=torch.bool)
    target_in[torch.randperm(POOL, generator=gen)[: POOL // 2]] = True
    target = _train(x[:POOL][target_in], y[:POOL][target_in], seed=1)
    # The Shokri shadow model never sees the pool: it doubles as the target for the null check.
    shadow = _train(x[POOL:600], y[POOL:600], seed=2)
    shadow_in = random_halves(NUM_SHADOWS, POOL, gen)
    lira_models = [_train(x[:POOL][m], y[:POOL][m], seed=10 + i) for i, m in enumerate(shadow_in)]
    return {
        "x": x[:POOL], "y": y[:POOL], "member": target_in.float(), "target": target,
        "unseen": shadow, "shadow": shadow, "shadow_x": x[POOL:], "shadow_y": y[POOL:],
        "shadow_in": shadow_in, "lira_models": lira_models,
    }


def _auc_pair(setup, score_fn) -> tuple[float, float]:
    """AUC of score_fn(model) against the target's membership, for the target and the unseen model."""
    seen = roc_auc(score_fn(setup["target"]), setup["member"])
    unseen = roc_auc(score_fn(setup["unseen"]), setup["member"])
    print(f"AUC target {seen:.3f}, unseen {unseen:.3f}")
    return seen, unseen


def _check(seen: float, unseen: float) -> None:
    assert seen > 0.6
    assert abs(unseen - 0.5) < 0.1


@pytest.mark.parametrize("score", ["loss", "confidence", "max_confidence"])
def test_threshold_attack(setup, score):
    attack = ThresholdAttack(score)
    _check(*_auc_pair(setup, lambda m: attack.infer(predict_proba(m, setup["x"]), setup["y"])))


@pytest.mark.parametrize("per_class,sort_probs,model", [
    (False, False, "mlp"), (False, True, "mlp"), (True, False, "mlp"),
    (False, False, "boosting"), (True, False, "boosting")])
def test_shadow_model_attack(setup, per_class, sort_probs, model):
    p = predict_proba(setup["shadow"], setup["shadow_x"])
    membership = torch.cat([torch.ones(200), torch.zeros(200)])
    attack = ShadowModelAttack(per_class=per_class, sort_probs=sort_probs, epochs=150, batch_size=400,
                               model=model)
    attack.fit(p, setup["shadow_y"], membership)
    _check(*_auc_pair(setup, lambda m: attack.infer(predict_proba(m, setup["x"]), setup["y"])))


@pytest.mark.parametrize(
    "online,global_variance,queries",
    [(True, False, 1), (True, True, 1), (False, False, 1), (False, True, 2)],
)
def test_lira(setup, online, global_variance, queries):
    augs = [lambda x: x, lambda x: shift(x, 0, 1)][:queries]
    lira = LiRA(online=online, global_variance=global_variance, augmentations=augs)
    shadow_stats = torch.stack([lira.query(m, setup["x"], setup["y"]) for m in setup["lira_models"]])
    assert shadow_stats.shape == (NUM_SHADOWS, POOL, queries)
    _check(*_auc_pair(setup, lambda m: lira.infer(
        lira.query(m, setup["x"], setup["y"]), shadow_stats, setup["shadow_in"])))


def test_label_only_attack(setup):
    attack = LabelOnlyAttack(default_augmentations(1, flip=False), noise_std=0.3, noise_samples=8)
    _check(*_auc_pair(setup, lambda m: attack.infer(label_oracle(m), setup["x"], setup["y"])))


def test_logit_confidence_matches_definition():
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    p = logits.softmax(1)
    p_y = p[torch.arange(5), y]
    assert torch.allclose(logit_confidence(logits, y), (p_y.log() - (1 - p_y).log()), atol=1e-5)


def test_random_halves_put_each_record_in_half_the_models():
    mask = random_halves(8, 50, torch.Generator().manual_seed(0))
    assert bool((mask.sum(0) == 4).all())
    assert torch.equal(mask, random_halves(8, 50, torch.Generator().manual_seed(0)))


def test_output_defenses():
    p = torch.tensor([[0.61, 0.27, 0.12], [0.05, 0.15, 0.80]])
    assert torch.equal(labels_only(p), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert torch.allclose(round_scores(p, 1), torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.2, 0.8]]))
    assert torch.allclose(top_k(p, 2), torch.tensor([[0.61, 0.27, 0.0], [0.0, 0.15, 0.80]]))
    assert torch.equal(apply_output_defense("none", p), p)
    with pytest.raises(ConfigError, match="unknown output defence 'blur'"):
        apply_output_defense("blur", p)
    with pytest.raises(ConfigError, match="k must be"):
        top_k(p, 4)


def test_bad_input_is_a_one_line_error():
    p = torch.full((4, 3), 1 / 3)
    with pytest.raises(DataError, match="differ in length"):
        ThresholdAttack().infer(p, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="one of"):
        ThresholdAttack("entropy")
    with pytest.raises(DataError, match="differ in length"):
        ShadowModelAttack(epochs=1).fit(p, torch.zeros(4, dtype=torch.long), torch.ones(3))
    with pytest.raises(ConfigError, match="fitted"):
        ShadowModelAttack().infer(p, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="unknown attack model 'forest'"):
        ShadowModelAttack(model="forest")
    with pytest.raises(DataError, match="all in or all out"):
        ShadowModelAttack(model="boosting").fit(p, torch.zeros(4, dtype=torch.long), torch.ones(4))
    with pytest.raises(DataError, match="shapes disagree"):
        LiRA().infer(torch.zeros(4), torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(DataError, match="differ in length"):
        LabelOnlyAttack().infer(lambda x: x.sum((1, 2, 3)), torch.zeros(4, 1, 8, 8), torch.zeros(3))


def test_shadow_attack_accepts_one_tensor_per_shadow_model(setup):
    p = predict_proba(setup["shadow"], setup["shadow_x"])
    y, member = setup["shadow_y"], torch.cat([torch.ones(200), torch.zeros(200)])
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    a, b = order[:200], order[200:]
    whole = ShadowModelAttack(epochs=5, batch_size=400).fit(p[order], y[order], member[order])
    parts = ShadowModelAttack(epochs=5, batch_size=400).fit([p[a], p[b]], [y[a], y[b]], [member[a], member[b]])
    target = predict_proba(setup["target"], setup["x"])
    assert torch.allclose(whole.infer(target, setup["y"]), parts.infer(target, setup["y"]))


def test_lira_scores_match_hand_computed_gaussians():
    # One record, four shadow models: IN φ = 2, 4 (mean 3, var 1), OUT φ = 0, 2 (mean 1, var 1).
    shadow = torch.tensor([[2.0], [4.0], [0.0], [2.0]])
    shadow_in = torch.tensor([[True], [True], [False], [False]])
    target = torch.tensor([3.0])
    # log N(3; 3, 1) − log N(3; 1, 1) = 0 − (−2) = 2; offline z = (3 − 1) / 1 = 2.
    assert LiRA(online=True).infer(target, shadow, shadow_in).item() == pytest.approx(2.0)
    assert LiRA(online=False).infer(target, shadow, shadow_in).item() == pytest.approx(2.0)
    with pytest.raises(DataError, match="at least one shadow model trained"):
        LiRA(online=True).infer(target, shadow, torch.zeros(4, 1, dtype=torch.bool))
