"""Membership attacks on a deliberately overfit target: better than chance on its training records,
near chance on records it never saw. The attack contract and registry, output-side defences,
settings and input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonlab.attacks.membership import (
    MEMBERSHIP_ATTACKS,
    LabelOnlyAttack,
    LiRA,
    MembershipAttack,
    Queried,
    Reference,
    ShadowModelAttack,
    ThresholdAttack,
    get_attack,
    label_oracle,
    logit_confidence,
    random_halves,
)
from poisonlab.attacks.membership.label_only import shift
from poisonlab.data.glyphs import load_glyph_supervised
from poisonlab.data.types import ImageSet
from poisonlab.defenses.membership_outputs import (
    OUTPUT_DEFENSES,
    LabelsOnly,
    NoDefense,
    Rounding,
    TopK,
    get_output_defense,
)
from poisonlab.errors import ConfigError, DataError, ShapeError
from poisonlab.metrics import roc_auc
from poisonlab.training.supervised import TrainConfig, predict_proba, train_classifier

POOL = 400  # records 0..399: target and LiRA pool; 400..599 shadow-in; 600..799 shadow-out
NUM_SHADOWS = 8


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    """A small MLP trained to overfit (it fits its training set; no regularisation)."""
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
    attack = ThresholdAttack(score=score)
    _check(*_auc_pair(setup, lambda m: attack.score(attack.query(m, setup["x"], setup["y"]))))


def _shadow_reference(setup) -> Reference:
    p = predict_proba(setup["shadow"], setup["shadow_x"])
    membership = torch.cat([torch.ones(200), torch.zeros(200)])
    return Reference(Queried(setup["shadow_y"], probs=p), membership)


@pytest.mark.parametrize("per_class,sort_probs,model", [
    (False, False, "mlp"), (False, True, "mlp"), (True, False, "mlp"),
    (False, False, "boosting"), (True, False, "boosting")])
def test_shadow_model_attack(setup, per_class, sort_probs, model):
    attack = ShadowModelAttack(per_class=per_class, sort_probs=sort_probs, epochs=150, batch_size=400,
                               model=model)
    attack.fit([_shadow_reference(setup)])
    _check(*_auc_pair(setup, lambda m: attack.score(attack.query(m, setup["x"], setup["y"]))))


@pytest.mark.parametrize(
    "online,global_variance,queries",
    [(True, False, 1), (True, True, 1), (False, False, 1), (False, True, 2)],
)
def test_lira(setup, online, global_variance, queries):
    augs = [lambda x: x, lambda x: shift(x, 0, 1)][:queries]
    lira = LiRA(augs, online=online, global_variance=global_variance)
    refs = [Reference(lira.query(m, setup["x"], setup["y"]), mask)
            for m, mask in zip(setup["lira_models"], setup["shadow_in"], strict=True)]
    shadow_stats = torch.stack([lira.confidences(r.queried) for r in refs])
    assert shadow_stats.shape == (NUM_SHADOWS, POOL, queries)
    lira.fit(refs)
    _check(*_auc_pair(setup, lambda m: lira.score(lira.query(m, setup["x"], setup["y"]))))


def test_label_only_attack(setup):
    attack = LabelOnlyAttack(max_shift=1, flip=False, noise_std=0.3, noise_samples=8)
    assert len(attack.augmentations) == 9
    _check(*_auc_pair(setup, lambda m: attack.score(
        attack.query(label_oracle(m), setup["x"], setup["y"]))))


# Settings that make each registered attack fast and strong enough on the small fixtures.
CONTRACT_SETTINGS = {"shadow": {"epochs": 150, "batch_size": 400},
                     "label_only": {"max_shift": 1, "flip": False, "noise_std": 0.3,
                                    "noise_samples": 8}}


@pytest.mark.parametrize("name", sorted(MEMBERSHIP_ATTACKS))
def test_every_registered_attack_keeps_the_contract(setup, name):
    """fit on reference models (the LiRA models, trained on known halves of the records) returns
    the attack; score gives one float per record, higher for the overfit target's members."""
    attack = get_attack(name, seed=0, **CONTRACT_SETTINGS.get(name, {}))
    assert isinstance(attack, MembershipAttack) and attack.name == name
    assert isinstance(attack.config, type(attack).Config)
    x, y = setup["x"], setup["y"]
    refs = [Reference(attack.query(m, x, y), mask)
            for m, mask in zip(setup["lira_models"], setup["shadow_in"], strict=True)]
    assert attack.fit(refs) is attack
    scores = attack.score(attack.query(setup["target"], x, y))
    assert scores.shape == (POOL,) and scores.dtype.is_floating_point
    assert bool(torch.isfinite(scores).all())
    assert roc_auc(scores, setup["member"]) > 0.6


def test_unknown_attack_name_is_a_one_line_error():
    with pytest.raises(ConfigError) as info:
        get_attack("lira_online")
    message = str(info.value)
    assert "\n" not in message and "unknown membership attack 'lira_online'" in message
    assert "label_only, lira, shadow, threshold" in message


@pytest.mark.parametrize(("cls", "key", "value"), [
    (ThresholdAttack, "score", "entropy"), (ThresholdAttack, "eps", 0.0),
    (ShadowModelAttack, "epochs", 0), (ShadowModelAttack, "lr", 0.0),
    (ShadowModelAttack, "batch_size", 0), (ShadowModelAttack, "model", "forest"),
    (ShadowModelAttack, "hidden", ()), (LiRA, "min_var", 0.0),
    (LabelOnlyAttack, "max_shift", -1), (LabelOnlyAttack, "noise_std", -0.1),
    (LabelOnlyAttack, "noise_samples", -1), (Rounding, "decimals", -1), (TopK, "k", 0)])
def test_an_out_of_range_setting_is_refused_once_naming_its_key(cls, key, value):
    for build in (lambda: cls.Config(**{key: value}), lambda: cls(**{key: value})):
        with pytest.raises(ConfigError) as info:
            build()
        message = str(info.value)
        assert "\n" not in message and message.count(f"{key}:") == 1, message


def test_label_only_noise_needs_a_standard_deviation():
    with pytest.raises(ConfigError, match="noise_samples > 0 needs noise_std > 0"):
        LabelOnlyAttack(noise_samples=3)


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
    assert torch.equal(LabelsOnly().release(p), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    assert torch.allclose(Rounding(decimals=1).release(p),
                          torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.2, 0.8]]))
    assert torch.allclose(TopK(k=2).release(p), torch.tensor([[0.61, 0.27, 0.0], [0.0, 0.15, 0.80]]))
    assert torch.equal(NoDefense().release(p), p)
    assert set(OUTPUT_DEFENSES) == {"none", "labels_only", "rounding", "top_k"}
    assert isinstance(get_output_defense("top_k", k=2), TopK)
    with pytest.raises(ConfigError, match="unknown output defence 'blur'"):
        get_output_defense("blur")
    with pytest.raises(ShapeError, match="k=4 exceeds the 3 classes"):
        TopK(k=4).release(p)
    with pytest.raises(ShapeError, match="records, classes"):
        LabelsOnly().release(p[0])


def test_bad_input_is_a_one_line_error():
    p = torch.full((4, 3), 1 / 3)
    with pytest.raises(ShapeError, match="differ in length"):
        ThresholdAttack().score(Queried(torch.zeros(3, dtype=torch.long), probs=p))
    with pytest.raises(ShapeError, match="differ in length"):
        ShadowModelAttack(epochs=1).fit([Reference(Queried(torch.zeros(4, dtype=torch.long),
                                                           probs=p), torch.ones(3))])
    with pytest.raises(ShapeError, match="fitted"):
        ShadowModelAttack().score(Queried(torch.zeros(4, dtype=torch.long), probs=p))
    with pytest.raises(DataError, match="all in or all out"):
        ShadowModelAttack(model="boosting").fit(
            [Reference(Queried(torch.zeros(4, dtype=torch.long), probs=p), torch.ones(4))])
    with pytest.raises(ShapeError, match="the threshold attack scores probs"):
        ThresholdAttack().score(Queried(torch.zeros(4, dtype=torch.long), logits=p[None]))
    logits = torch.zeros(1, 5, 2)
    refs = [Reference(Queried(torch.zeros(5), logits=logits), torch.tensor(m))
            for m in ([1, 0, 1, 0, 1], [0, 1, 0, 1, 0])]
    with pytest.raises(ShapeError, match="shapes disagree"):
        LiRA(online=False).fit(refs).score(Queried(torch.zeros(4), logits=torch.zeros(1, 4, 2)))
    with pytest.raises(ShapeError, match="differ in length"):
        LabelOnlyAttack().query(lambda x: x.sum((1, 2, 3)), torch.zeros(4, 1, 8, 8), torch.zeros(3))


def test_shadow_attack_accepts_one_reference_per_shadow_model(setup):
    p = predict_proba(setup["shadow"], setup["shadow_x"])
    y, member = setup["shadow_y"], torch.cat([torch.ones(200), torch.zeros(200)])
    order = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    a, b = order[:200], order[200:]
    whole = ShadowModelAttack(epochs=5, batch_size=400).fit(
        [Reference(Queried(y[order], probs=p[order]), member[order])])
    parts = ShadowModelAttack(epochs=5, batch_size=400).fit(
        [Reference(Queried(y[i], probs=p[i]), member[i]) for i in (a, b)])
    target = Queried(setup["y"], probs=predict_proba(setup["target"], setup["x"]))
    assert torch.allclose(whole.score(target), parts.score(target))


def _phi(values: list[float]) -> Queried:
    """Logits [1, N, 2] of label 0 whose logit-scaled confidence φ is exactly `values`."""
    z = torch.tensor(values)
    return Queried(torch.zeros(len(values)), logits=torch.stack([z, torch.zeros_like(z)], 1)[None])


def test_lira_scores_match_hand_computed_gaussians():
    # One record, four shadow models: IN φ = 2, 4 (mean 3, var 1), OUT φ = 0, 2 (mean 1, var 1).
    member = [True, True, False, False]
    refs = [Reference(_phi([v]), torch.tensor([m])) for v, m in zip([2.0, 4.0, 0.0, 2.0], member,
                                                                     strict=True)]
    target = _phi([3.0])
    # log N(3; 3, 1) − log N(3; 1, 1) = 0 − (−2) = 2; offline z = (3 − 1) / 1 = 2.
    assert LiRA(online=True).fit(refs).score(target).item() == pytest.approx(2.0)
    assert LiRA(online=False).fit(refs).score(target).item() == pytest.approx(2.0)
    out_only = [Reference(r.queried, torch.tensor([False])) for r in refs]
    with pytest.raises(DataError, match="at least one shadow model trained"):
        LiRA(online=True).fit(out_only)
