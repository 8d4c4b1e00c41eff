"""The dropout option of the CIFAR ResNets and the small CNNs: off by default, same weights layout."""

from __future__ import annotations

import pytest
import torch

from poisonlab.errors import ConfigError
from poisonlab.models import build_model

CASES = [("resnet20", 3, 32), ("small_cnn", 1, 28), ("tiny_cnn", 1, 28)]


@pytest.mark.parametrize(("arch", "channels", "size"), CASES)
def test_default_has_no_dropout_and_same_output_as_before(arch, channels, size):
    torch.manual_seed(0)
    plain = build_model(arch, 10, channels)
    torch.manual_seed(0)
    zero = build_model(arch, 10, channels, dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())
    x = torch.rand(4, channels, size, size)
    plain.train()
    zero.train()
    assert torch.equal(plain(x), zero(x))


@pytest.mark.parametrize(("arch", "channels", "size"), CASES)
def test_dropout_acts_in_training_only_and_keeps_the_checkpoint_layout(arch, channels, size):
    torch.manual_seed(0)
    plain = build_model(arch, 10, channels)
    dropped = build_model(arch, 10, channels, dropout=0.5)
    # Weights saved without dropout load into a model with it, and back (dropout has no weights).
    dropped.load_state_dict(plain.state_dict())
    plain.load_state_dict(dropped.state_dict())
    x = torch.rand(8, channels, size, size)
    plain.eval()
    dropped.eval()
    assert torch.allclose(plain(x), dropped(x))
    dropped.train()
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, dropped(x))
    # Dropout acts on the penultimate features, right before the head.
    assert isinstance(dropped.dropout, torch.nn.Dropout) and dropped.dropout.p == 0.5


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_bad_dropout_rate_is_a_config_error(rate):
    with pytest.raises(ConfigError, match="dropout must be in"):
        build_model("resnet20", 10, 3, dropout=rate)
    with pytest.raises(ConfigError, match="dropout must be in"):
        build_model("small_cnn", 10, 1, dropout=rate)
