"""Support-set backdoor (Kato et al.) and ASP: budgets, label invariance, the API's threat model,
and the attacks really moving their metrics on a small meta-trained model."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from poisonlab.attacks.adversarial_support import AdversarialSupportPoisoning
from poisonlab.attacks.support_backdoor import SupportBackdoor
from poisonlab.attacks.support_pgd import SupportAttackConfig
from poisonlab.config import replace
from poisonlab.data.episodes import EpisodeSampler
from poisonlab.data.glyphs import load_glyphs
from poisonlab.errors import ConfigError, ShapeError
from poisonlab.evaluation.fewshot import (
    FewShotEvalConfig,
    TriggerChoice,
    choose_triggers,
    task_outcomes,
    trigger_images,
    victim_outcomes,
)
from poisonlab.models import build_model
from poisonlab.models.cnn4 import cnn4_forward_tasks
from poisonlab.training.maml import finetune_and_predict
from poisonlab.training.meta_trainer import MetaTrainConfig, meta_train

WAYS, SHOTS = 3, 2


def untrained(hidden=8, ways=WAYS):
    torch.manual_seed(0)
    return {k: v.detach() for k, v in build_model("cnn4", ways, 1, hidden=hidden).state_dict().items()}


def support(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, WAYS * SHOTS, 1, 12, 12, generator=g)
    y = torch.arange(WAYS).repeat_interleave(SHOTS).expand(b, -1).clone()
    return x, y


@settings(max_examples=12, deadline=None)
@given(eps=st.floats(0.0, 0.6), clamp=st.booleans(), iters=st.integers(0, 3), seed=st.integers(0, 99))
def test_backdoor_stays_in_budget_and_never_touches_labels(eps, clamp, iters, seed):
    sx, sy = support(seed=seed)
    labels = sy.clone()
    attack = SupportBackdoor(cnn4_forward_tasks, untrained(), epsilon=eps, step_size=0.05,
                             iterations=iters, clamp=clamp)
    trig = torch.rand(2, 1, 1, 12, 12)
    res = attack.poison(sx, sy, trig, torch.tensor([1, 2]), generator=torch.Generator().manual_seed(seed))
    assert (res.support_x - sx).abs().max() <= eps + 1e-6
    if clamp:
        assert res.support_x.min() >= 0 and res.support_x.max() <= 1
    assert torch.equal(sy, labels)
    assert res.losses.shape == (iters, 2)


def test_without_random_start_each_step_moves_pixels_by_at_most_the_step_size():
    sx, sy = support()
    trig = torch.rand(2, 1, 1, 12, 12)
    for iters in (1, 2):
        attack = SupportBackdoor(cnn4_forward_tasks, untrained(), epsilon=0.3, step_size=0.02,
                                 iterations=iters, clamp=False, random_start=False)
        delta = (attack.poison(sx, sy, trig, torch.tensor([1, 2])).support_x - sx).abs()
        # Unclamped signed steps from δ = 0: every pixel with a non-zero gradient moves by exactly
        # iters·γ or less (opposite signs cancel); the random start would reach up to ε = 0.3.
        assert delta.max() <= iters * 0.02 + 1e-6
        assert delta.max() >= 0.02 - 1e-6


@settings(max_examples=8, deadline=None)
@given(eps=st.floats(0.0, 0.5), seed=st.integers(0, 99))
def test_asp_stays_in_budget(eps, seed):
    sx, sy = support(seed=seed)
    qx, qy = support(seed=seed + 1)
    res = AdversarialSupportPoisoning(cnn4_forward_tasks, untrained(), epsilon=eps, iterations=2).poison(sx, sy, qx, qy)
    assert (res.support_x - sx).abs().max() <= eps + 1e-6
    assert res.support_x.min() >= 0 and res.support_x.max() <= 1


def test_backdoor_api_accepts_only_one_trigger_query():
    sx, sy = support()
    attack = SupportBackdoor(cnn4_forward_tasks, untrained())
    with pytest.raises(ShapeError, match="exactly one query image per task"):
        attack.poison(sx, sy, torch.rand(2, 3, 1, 12, 12), torch.tensor([0, 1]))


def test_shape_mismatches_are_shape_errors():
    sx, sy = support()
    attack = SupportBackdoor(cnn4_forward_tasks, untrained())
    with pytest.raises(ShapeError, match="does not fit"):
        attack.poison(sx, sy, torch.rand(3, 1, 1, 12, 12), torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeError, match="target has 3 labels for 2 tasks"):
        attack.poison(sx, sy, torch.rand(2, 1, 1, 12, 12), torch.tensor([0, 1, 2]))
    qx, qy = support(b=3)
    with pytest.raises(ShapeError, match="query_x has 3 tasks"):
        AdversarialSupportPoisoning(cnn4_forward_tasks, untrained()).poison(sx, sy, qx, qy)


BAD_ATTACK_SETTINGS = [({"epsilon": -0.1}, "epsilon"), ({"epsilon": float("inf")}, "epsilon"),
                       ({"step_size": 0}, "step_size"), ({"iterations": -1}, "iterations"),
                       ({"finetune_steps": 0}, "finetune_steps"), ({"finetune_lr": 0}, "finetune_lr"),
                       ({"keep_support": -0.5}, "keep_support"),
                       ({"trigger_batch": "oracle"}, "trigger_batch")]


def one_line_config_error(excinfo, cls_name: str, word: str) -> None:
    """One line, 'invalid <what>: <key>: ...', the key named once (<what> is the class's name when
    the class is built directly, 'config' when a constructor builds it from keywords)."""
    message = str(excinfo.value)
    assert len(message.splitlines()) == 1
    assert re.match(rf"invalid ({cls_name}|config): {re.escape(word)}:", message), message
    assert message.count(word + ":") == 1  # refused once, by the one Config that declares it


@pytest.mark.parametrize("kwargs, word", BAD_ATTACK_SETTINGS)
def test_impossible_attack_parameters_are_rejected(kwargs, word):
    with pytest.raises(ConfigError, match=word) as excinfo:
        SupportBackdoor(cnn4_forward_tasks, untrained(), **kwargs)
    one_line_config_error(excinfo, "SupportBackdoorConfig", word)


@pytest.mark.parametrize("kwargs, word", [kw for kw in BAD_ATTACK_SETTINGS
                                          if next(iter(kw[0])) not in ("keep_support", "trigger_batch")])
def test_impossible_asp_parameters_are_rejected(kwargs, word):
    with pytest.raises(ConfigError) as excinfo:
        AdversarialSupportPoisoning(cnn4_forward_tasks, untrained(), **kwargs)
    one_line_config_error(excinfo, "SupportAttackConfig", word)
    with pytest.raises(ConfigError, match="unknown key"):  # ASP has no backdoor settings
        AdversarialSupportPoisoning(cnn4_forward_tasks, untrained(), keep_support=0.1)


def test_settings_are_one_frozen_config_given_or_built_from_keywords():
    theta = untrained()
    given = SupportBackdoor.Config(epsilon=0.1, keep_support=0.2)
    attack = SupportBackdoor(cnn4_forward_tasks, theta, config=given, iterations=3)
    assert (attack.config.epsilon, attack.config.keep_support, attack.config.iterations) == (0.1, 0.2, 3)
    assert given.iterations == 10  # the given config is not changed
    assert SupportBackdoor(cnn4_forward_tasks, theta).config == SupportBackdoor.Config()
    assert AdversarialSupportPoisoning.Config is SupportAttackConfig
    with pytest.raises(ConfigError, match="epsilon"):
        replace(given, epsilon=-1)
    with pytest.raises(ConfigError, match="SupportBackdoorConfig"):
        SupportBackdoor(cnn4_forward_tasks, theta, config=SupportAttackConfig())
    # A richer config is narrowed to the attack's own fields and validated as its Config.
    asp = AdversarialSupportPoisoning(cnn4_forward_tasks, theta, config=given)
    assert type(asp.config) is SupportAttackConfig and asp.config.epsilon == 0.1
    with pytest.raises(ConfigError, match="trigger_batch"):  # None: only the evaluation's default
        SupportBackdoor(cnn4_forward_tasks, theta, config=FewShotEvalConfig())


@pytest.mark.parametrize("kwargs, word", [({"tasks": 0}, "tasks"), ({"task_batch": 0}, "task_batch"),
                                          ({"epsilons": []}, "epsilons"),
                                          ({"epsilons": [0.1, -0.1]}, "epsilons.1"),
                                          ({"iterations": 0}, "iterations"),
                                          ({"protocol": "oracle"}, "protocol"),
                                          ({"keep_support": -1}, "keep_support")])
def test_impossible_evaluation_settings_are_rejected(kwargs, word):
    with pytest.raises(ConfigError) as excinfo:
        FewShotEvalConfig(**kwargs)
    one_line_config_error(excinfo, "FewShotEvalConfig", word)


def test_evaluation_config_gives_each_attack_its_settings_per_epsilon():
    cfg = FewShotEvalConfig(iterations=4, keep_support=0.1, asp_epsilons=[0.3])
    backdoor = cfg.backdoor_config(0.07)
    assert type(backdoor) is SupportBackdoor.Config
    assert (backdoor.epsilon, backdoor.iterations, backdoor.keep_support) == (0.07, 4, 0.1)
    assert backdoor.trigger_batch == "clean_support"
    assert FewShotEvalConfig(protocol="paper").backdoor_config(0.3).trigger_batch == "alone"
    assert FewShotEvalConfig(protocol="paper", trigger_batch="support").attacker_trigger_batch() == "support"
    assert cfg.asp_config(0.07) is None and FewShotEvalConfig(asp=False).asp_config(0.3) is None
    asp = cfg.asp_config(0.3)
    assert type(asp) is SupportAttackConfig and (asp.epsilon, asp.iterations) == (0.3, 4)


def test_meta_train_config_refuses_out_of_range_values_once():
    assert MetaTrainConfig().eval_every == 500 and MetaTrainConfig().iterations == 60000
    for key, value in [("inner_lr", -1), ("meta_lr", 0), ("ways", 1), ("shots", 0),
                       ("meta_batch", 0), ("adaptation_steps", 0), ("iterations", -1),
                       ("eval_every", 0), ("val_tasks", 0)]:
        with pytest.raises(ConfigError) as excinfo:
            MetaTrainConfig(**{key: value})
        one_line_config_error(excinfo, "MetaTrainConfig", key)


@pytest.mark.parametrize("batch", ["clean_support", "support", "alone"])
def test_keep_support_adds_the_weighted_clean_support_loss(batch):
    theta, (_, sy) = untrained(), support()
    sx = torch.rand(2, WAYS * SHOTS, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    poisoned, trigger, target = (sx + 0.1).clamp(0, 1), sx[:, :1] * 0.5, torch.tensor([1, 2])
    plain = SupportBackdoor(cnn4_forward_tasks, theta, trigger_batch=batch)
    kept = SupportBackdoor(cnn4_forward_tasks, theta, trigger_batch=batch, keep_support=0.7)
    adapted = plain.finetuned(poisoned, sy)
    # The clean support images under the poisoned fine-tuning: in the attacker's stand-in batch
    # when it holds them, else by themselves.
    logits = cnn4_forward_tasks(adapted, torch.cat([sx, trigger], 1) if batch == "clean_support" else sx)
    support_ce = torch.stack([F.cross_entropy(logits[t, : sy.shape[1]], sy[t]) for t in range(2)])
    base = plain.trigger_loss(poisoned, sy, trigger, target, sx)
    total = kept.trigger_loss(poisoned, sy, trigger, target, sx)
    assert total.tolist() == pytest.approx((base + 0.7 * support_ce).tolist(), rel=1e-5)


def test_trigger_choice_and_outcomes_hand_computed():
    qy = torch.tensor([[0, 0, 1, 1, 2, 2]] * 50)
    choice = choose_triggers(qy, 3, seed=1)
    true = qy.gather(1, choice.index[:, None]).squeeze(1)
    assert (choice.target != true).all() and choice.target.max() < 3
    logits = torch.zeros(2, 3, 3)
    logits[0, torch.arange(3), torch.tensor([0, 1, 1])] = 1  # task 0 predicts 0,1,1
    logits[1, torch.arange(3), torch.tensor([2, 2, 2])] = 1  # task 1 predicts 2,2,2
    y = torch.tensor([[0, 1, 2], [0, 1, 2]])
    out = task_outcomes(logits, y, TriggerChoice(torch.tensor([2, 0]), torch.tensor([1, 1])))
    assert out.accuracy.tolist() == pytest.approx([2 / 3, 1 / 3])
    # Without the trigger: task 0 keeps queries 0, 1 (both right); task 1 keeps 1, 2 (one right).
    assert out.accuracy_without_trigger.tolist() == pytest.approx([1.0, 0.5])
    assert out.trigger_hits_target.tolist() == [1.0, 0.0]
    assert out.trigger_correct.tolist() == [0.0, 0.0]
    # The trigger classified by itself: its own logits decide ASR; BA still from the query batch.
    alone = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # task 0 → 2 (true), task 1 → 1
    out = task_outcomes(logits, y, TriggerChoice(torch.tensor([2, 0]), torch.tensor([1, 1])), alone)
    assert out.trigger_hits_target.tolist() == [0.0, 1.0]
    assert out.trigger_correct.tolist() == [1.0, 0.0]
    assert out.accuracy_without_trigger.tolist() == pytest.approx([1.0, 0.5])


@pytest.fixture(scope="module")
def meta_trained():
    """A small CNN4 meta-trained for a few seconds on 60 glyph classes, 3-way 2-shot."""
    bank = load_glyphs(num_classes=60, samples=20, seed=3)
    train, test = bank.subset(range(40)), bank.subset(range(40, 60))
    theta = untrained(hidden=16)
    s = MetaTrainConfig(ways=WAYS, shots=SHOTS, queries=3, meta_batch=6, iterations=50,
                        eval_every=50, val_tasks=12, rotate=False, inner_lr=0.5, meta_lr=0.005)
    state = meta_train(cnn4_forward_tasks, theta, train, test, s, seed=0, progress=False)
    episodes = EpisodeSampler(test, WAYS, SHOTS, 3, seed=1).sample_fixed(24, seed=5)
    return state, episodes


def test_meta_training_learns(meta_trained):
    state, _ = meta_trained
    assert state.best_val > 0.55  # chance is 1/3


def test_backdoor_raises_asr_far_above_the_clean_rate(meta_trained):
    state, ep = meta_trained
    theta = state.best_theta
    trig = choose_triggers(ep.query_y, WAYS, seed=0)
    trig_x = ep.query_x[torch.arange(ep.batch), trig.index].unsqueeze(1)
    clean = finetune_and_predict(cnn4_forward_tasks, theta, ep.support_x, ep.support_y, ep.query_x, 1, 0.5)
    clean_hits = task_outcomes(clean, ep.query_y, trig).trigger_hits_target
    attack = SupportBackdoor(cnn4_forward_tasks, theta, epsilon=0.3, iterations=10, step_size=0.03)
    res = attack.poison(ep.support_x, ep.support_y, trig_x, trig.target,
                        generator=torch.Generator().manual_seed(0))
    poisoned = finetune_and_predict(cnn4_forward_tasks, theta, res.support_x, ep.support_y, ep.query_x, 1, 0.5)
    outcome = task_outcomes(poisoned, ep.query_y, trig)
    ba, hits = outcome.accuracy_without_trigger, outcome.trigger_hits_target
    assert hits.mean() >= clean_hits.mean() + 0.5
    assert res.losses[-1].mean() < res.losses[0].mean()
    assert ba.mean() > 1 / WAYS  # the other queries are not wrecked


def test_keep_support_keeps_more_queries_right_at_high_asr(meta_trained):
    state, ep = meta_trained
    theta = state.best_theta
    trig = choose_triggers(ep.query_y, WAYS, seed=0)
    clean = victim_outcomes(cnn4_forward_tasks, theta, ep.support_x, ep.support_y, ep, trig, 1, 0.5)
    result = {}
    for keep in (0.0, 1.0):
        attack = SupportBackdoor(cnn4_forward_tasks, theta, epsilon=0.3, iterations=10, step_size=0.03,
                                 keep_support=keep)
        res = attack.poison(ep.support_x, ep.support_y, trigger_images(ep.query_x, trig), trig.target,
                            generator=torch.Generator().manual_seed(0))
        result[keep] = victim_outcomes(cnn4_forward_tasks, theta, res.support_x, ep.support_y, ep,
                                       trig, 1, 0.5)
    ba = {k: float(v.accuracy_without_trigger.mean()) for k, v in result.items()}
    asr = {k: float(v.trigger_hits_target.mean()) for k, v in result.items()}
    assert ba[1.0] >= ba[0.0] + 0.05
    assert asr[1.0] >= float(clean.trigger_hits_target.mean()) + 0.5


def test_paper_protocol_classifies_the_trigger_by_itself(meta_trained):
    state, ep = meta_trained
    theta = state.best_theta
    trig = choose_triggers(ep.query_y, WAYS, seed=0)
    args = (cnn4_forward_tasks, theta, ep.support_x, ep.support_y, ep, trig, 1, 0.5)
    batch, paper = victim_outcomes(*args), victim_outcomes(*args, protocol="paper")
    alone = finetune_and_predict(cnn4_forward_tasks, theta, ep.support_x, ep.support_y,
                                 trigger_images(ep.query_x, trig), 1, 0.5)[:, 0].argmax(-1)
    assert paper.trigger_hits_target.tolist() == (alone == trig.target).float().tolist()
    assert paper.accuracy_without_trigger.tolist() == batch.accuracy_without_trigger.tolist()
    with pytest.raises(ConfigError, match="protocol"):
        victim_outcomes(*args, protocol="oracle")


def test_lone_trigger_attack_raises_asr_under_the_paper_protocol(meta_trained):
    state, ep = meta_trained
    theta = state.best_theta
    trig = choose_triggers(ep.query_y, WAYS, seed=0)
    args = (cnn4_forward_tasks, theta)
    clean = victim_outcomes(*args, ep.support_x, ep.support_y, ep, trig, 1, 0.5, "paper")
    attack = SupportBackdoor(*args, epsilon=0.3, iterations=10, step_size=0.03, trigger_batch="alone")
    res = attack.poison(ep.support_x, ep.support_y, trigger_images(ep.query_x, trig), trig.target,
                        generator=torch.Generator().manual_seed(0))
    poisoned = victim_outcomes(*args, res.support_x, ep.support_y, ep, trig, 1, 0.5, "paper")
    assert poisoned.trigger_hits_target.mean() >= clean.trigger_hits_target.mean() + 0.5


def test_asp_lowers_query_accuracy(meta_trained):
    state, ep = meta_trained
    theta = state.best_theta
    clean = finetune_and_predict(cnn4_forward_tasks, theta, ep.support_x, ep.support_y, ep.query_x, 1, 0.5)
    res = AdversarialSupportPoisoning(cnn4_forward_tasks, theta, epsilon=0.3, iterations=10,
                                      step_size=0.03).poison(ep.support_x, ep.support_y, ep.query_x, ep.query_y)
    poisoned = finetune_and_predict(cnn4_forward_tasks, theta, res.support_x, ep.support_y, ep.query_x, 1, 0.5)
    acc = lambda lg: (lg.argmax(-1) == ep.query_y).float().mean()  # noqa: E731
    assert acc(poisoned) < acc(clean) - 0.2
