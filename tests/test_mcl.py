"""MCL purification and the fine-tuning baselines on a backdoored tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import badnets_patch
from poisonlab.config import replace
from poisonlab.data.types import ImageSet
from poisonlab.defenses.finetuning import FineTuneConfig, FineTuning, NCUnlearning
from poisonlab.defenses.mcl import (
    MCL,
    REFERENCE_INVERSION,
    model_contrastive_loss,
    recalibrate_batchnorm,
)
from poisonlab.defenses.neural_cleanse import InversionConfig, reverse_engineer_trigger
from poisonlab.errors import ConfigError, ShapeError

TARGET = 3



@pytest.fixture(scope="module")
def setting():
    """A BadNets small CNN on 14×14 glyphs, its trigger, test set and a 5% clean subset."""
    from poisonlab.data.glyphs import load_glyph_supervised
    from poisonlab.models import build_model
    from poisonlab.training.supervised import TrainConfig, train_classifier

    torch.set_num_threads(1)
    data = load_glyph_supervised()
    pool = torch.nn.functional.avg_pool2d
    train, test = ImageSet(pool(data.train.x, 2), data.train.y), ImageSet(pool(data.test.x, 2),
                                                                            data.test.y)
    trigger = badnets_patch((1, 14, 14))
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    train_classifier(model, BackdoorInjection(trigger, target=TARGET, poison_rate=0.1).poison(train).data,
                     TrainConfig(epochs=4, batch_size=64, lr=0.05), progress=False)
    clean = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:250])
    return model, trigger, test, clean


def _mcl_config(reference: bool = False, **changes) -> MCL.Config:
    inv = replace(REFERENCE_INVERSION, steps=30)
    make = MCL.Config.reference if reference else MCL.Config
    return make(inversion=inv, finetune=FineTuneConfig(epochs=10), **changes)


def test_mcl_config_defaults_are_the_reference_stage_1_and_schedule():
    cfg = MCL.Config()
    assert cfg.inversion == REFERENCE_INVERSION and cfg.inversion.parametrization == "additive"
    assert (cfg.inversion.steps, cfg.inversion.batch_size, cfg.inversion.success_threshold,
            cfg.inversion.patience, cfg.inversion.cost_multiplier) == (100, 64, 0.9, 10, 1.5)
    assert not cfg.inversion.early_stop
    assert cfg.finetune == FineTuneConfig() and cfg.finetune.lr_steps[0] == (0, 0.1)
    assert (cfg.temperature, cfg.ce_weight, cfg.distill_weight, cfg.recalibrate_bn) == (
        0.5, 0.0, 1.0, True)
    ref = MCL.Config.reference(temperature=0.3)
    assert (ref.distill_weight, ref.recalibrate_bn, ref.temperature) == (0.0, False, 0.3)
    # A partial stage-1 mapping changes the reference settings, not Neural Cleanse's defaults.
    partial = MCL(inversion={"steps": 7}).config.inversion
    assert partial == replace(REFERENCE_INVERSION, steps=7)
    assert MCL(seed=3).steps() == 100 + 20


@pytest.mark.parametrize(("make", "key"), [
    (lambda: MCL.Config(temperature=0), "temperature"),
    (lambda: MCL(ce_weight=-1), "ce_weight"),
    (lambda: MCL(distill_weight=-1), "distill_weight"),
    (lambda: MCL(inversion={"steps": 0}), "inversion.steps"),
    (lambda: MCL(finetune={"epochs": 0}), "finetune.epochs"),
    (lambda: FineTuneConfig(epochs=0), "epochs"),
    (lambda: FineTuneConfig(batch_size=0), "batch_size"),
    (lambda: FineTuneConfig(lr_steps=()), "lr_steps"),
    (lambda: FineTuneConfig(lr_steps=((1, 0.1),)), "lr_steps"),
    (lambda: FineTuneConfig(lr_steps=((0, 0.1), (5, 0.0))), "lr_steps"),
    (lambda: FineTuneConfig(momentum=-0.1), "momentum"),
    (lambda: FineTuneConfig(weight_decay=-1), "weight_decay"),
    (lambda: FineTuneConfig(crop_padding=-1), "crop_padding"),
    (lambda: FineTuning(epochs=0), "epochs"),
    (lambda: NCUnlearning(fraction=1.5), "fraction"),
    (lambda: NCUnlearning.Config(finetune={"batch_size": 0}), "finetune.batch_size"),
])
def test_out_of_range_settings_are_refused_once_with_the_key(make, key):
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert f"{key}: " in message and len(message.splitlines()) == 1 and message.count("; ") == 0


def test_contrastive_loss_matches_the_formula():
    z, zp, zn = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)
    cos = torch.nn.functional.cosine_similarity
    expected = -torch.log(torch.exp(cos(z, zp) / 0.5)
                          / (torch.exp(cos(z, zp) / 0.5) + torch.exp(cos(z, zn) / 0.5))).mean()
    assert torch.allclose(model_contrastive_loss(z, zp, zn, 0.5), expected)
    e1, e2 = torch.eye(2)[0:1], torch.eye(2)[1:2]
    best = model_contrastive_loss(e1, e1, -e1, 0.5)
    assert float(best) == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(-2))), rel=1e-5)
    assert float(model_contrastive_loss(e2, e1, e2, 0.5)) > float(best)
    with pytest.raises(ConfigError, match="temperature"):
        MCL.Config(temperature=0)
    with pytest.raises(ConfigError, match="distill_weight: .*got -1"):
        MCL.Config(distill_weight=-1)


def test_recalibrate_batchnorm_sets_the_statistics_of_the_given_images():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    weights = [p.clone() for p in model.parameters()]
    x = torch.rand(40, 3, 8, 8) * 2 + 1
    recalibrate_batchnorm(model, x, batch_size=len(x))
    with torch.no_grad():
        h = model[0](x)
    assert torch.allclose(bn.running_mean, h.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, h.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4)
    assert not model.training and bn.momentum == 0.1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


def test_mcl_removes_the_backdoor(setting):
    model, trigger, test, clean = setting
    before = backdoor_metrics(model, trigger, test, TARGET)
    assert before["attack_success_rate"] > 0.95
    weights = [p.clone() for p in model.parameters()]
    result = MCL(config=_mcl_config(reference=True)).purify(model, clean, TARGET)
    after = backdoor_metrics(result.model, trigger, test, TARGET)
    assert result.inversion.attack_success >= 0.9 and result.losses[-1] < result.losses[0]
    assert after["attack_success_rate"] < 0.1
    # The reference loss (no cross-entropy) costs this small model accuracy; it stays useful.
    assert after["benign_accuracy"] > 0.6
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))


@pytest.mark.parametrize("changes", [{}, {"ce_weight": 1.0, "distill_weight": 0.0}],
                         ids=["default", "cross-entropy"])
def test_mcl_variants_keep_accuracy(setting, changes):
    """The default (self-distillation on clean inputs + batch-norm re-estimation) and the
    cross-entropy variant remove the backdoor within 3 points of the backdoored model's BA."""
    model, trigger, test, clean = setting
    before = backdoor_metrics(model, trigger, test, TARGET)
    after = backdoor_metrics(MCL(config=_mcl_config(**changes)).purify(model, clean, TARGET).model,
                             trigger, test, TARGET)
    assert after["attack_success_rate"] < 0.1
    assert after["benign_accuracy"] > before["benign_accuracy"] - 0.03


def test_baselines_on_the_same_clean_subset(setting):
    model, trigger, test, clean = setting
    before = backdoor_metrics(model, trigger, test, TARGET)
    cfg = FineTuneConfig(epochs=10)
    weights = [p.clone() for p in model.parameters()]
    tuned = backdoor_metrics(FineTuning(config=cfg).purify(model, clean), trigger, test, TARGET)
    assert tuned["benign_accuracy"] > before["benign_accuracy"] - 0.03
    inverted = reverse_engineer_trigger(model, clean.x[:64], TARGET,
                                        InversionConfig(steps=30, batch_size=16))
    unlearning = NCUnlearning(finetune=cfg, fraction=0.2)
    unlearned = backdoor_metrics(unlearning.purify(model, clean, inverted.trigger), trigger,
                                 test, TARGET)
    assert unlearned["attack_success_rate"] < 0.2
    assert unlearned["benign_accuracy"] > before["benign_accuracy"] - 0.05
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    with pytest.raises(ConfigError, match="fraction"):
        NCUnlearning(finetune=cfg, fraction=1.5)


def test_shape_errors(setting):
    model, trigger, _, clean = setting
    empty = clean.subset(torch.arange(0))
    with pytest.raises(ShapeError, match="empty"):
        FineTuning(epochs=1).purify(model, empty)
    with pytest.raises(ShapeError, match="features"):
        MCL().purify(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(196, 10)), clean,
                     TARGET)
