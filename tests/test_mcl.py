"""MCL purification and the fine-tuning baselines on a backdoored tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from poisonlab.attacks.backdoor_injection import BackdoorInjection, backdoor_metrics
from poisonlab.attacks.triggers import badnets_patch
from poisonlab.data.types import ImageSet
from poisonlab.defenses.finetuning import FineTuneConfig, fine_tune, nc_unlearning
from poisonlab.defenses.mcl import (
    MCL,
    MCLConfig,
    model_contrastive_loss,
    recalibrate_batchnorm,
    reference_inversion,
)
from poisonlab.defenses.neural_cleanse import InversionConfig, reverse_engineer_trigger
from poisonlab.errors import ConfigError

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
    train_classifier(model, BackdoorInjection(trigger, TARGET, 0.1).poison(train).data,
                     TrainConfig(epochs=4, batch_size=64, lr=0.05), progress=False)
    clean = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:250])
    return model, trigger, test, clean


def _mcl_config(reference: bool = False, **changes) -> MCLConfig:
    inv = reference_inversion()
    inv.steps = 30
    make = MCLConfig.reference if reference else MCLConfig
    return make(inversion=inv, finetune=FineTuneConfig(epochs=10), **changes)


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
        MCLConfig(temperature=0)
    with pytest.raises(ConfigError, match="distill_weight=-1"):
        MCLConfig(distill_weight=-1)


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
    result = MCL(_mcl_config(reference=True)).purify(model, clean, TARGET)
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
    after = backdoor_metrics(MCL(_mcl_config(**changes)).purify(model, clean, TARGET).model,
                             trigger, test, TARGET)
    assert after["attack_success_rate"] < 0.1
    assert after["benign_accuracy"] > before["benign_accuracy"] - 0.03


def test_baselines_on_the_same_clean_subset(setting):
    model, trigger, test, clean = setting
    before = backdoor_metrics(model, trigger, test, TARGET)
    cfg = FineTuneConfig(epochs=10)
    tuned = backdoor_metrics(fine_tune(model, clean, cfg), trigger, test, TARGET)
    assert tuned["benign_accuracy"] > before["benign_accuracy"] - 0.03
    inverted = reverse_engineer_trigger(model, clean.x[:64], TARGET,
                                        InversionConfig(steps=30, batch_size=16))
    unlearned = backdoor_metrics(nc_unlearning(model, clean, inverted.trigger, 0.2, cfg), trigger,
                                 test, TARGET)
    assert unlearned["attack_success_rate"] < 0.2
    assert unlearned["benign_accuracy"] > before["benign_accuracy"] - 0.05
    with pytest.raises(ConfigError, match="fraction"):
        nc_unlearning(model, clean, inverted.trigger, 1.5, cfg)
