"""Batched training of k models equals k separate training loops on the same mini-batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from poisonlab.errors import ConfigError, DataError
from poisonlab.models import build_model
from poisonlab.training.batched_models import batch_indices, train_batched
from poisonlab.training.supervised import TrainConfig, lr_at


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int = 60):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 6, 6, generator=gen), torch.randint(0, 4, (n,), generator=gen)


def _reference(x, y, idx, cfg, i) -> nn.Module:
    """Model i trained alone by a plain loop on its rows of the batch indices."""
    torch.manual_seed(5 + i)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = idx.shape[1] // cfg.epochs
    for step in range(idx.shape[1]):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, per_epoch)
        batch = idx[i, step]
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("sizes", [(20, 20, 20), (12, 30, 20)])
def test_batched_training_matches_separate_loops(sizes):
    x, y = _data()
    masks = torch.zeros(len(sizes), len(y), dtype=torch.bool)
    for i, s in enumerate(sizes):
        masks[i, torch.randperm(len(y), generator=torch.Generator().manual_seed(i))[:s]] = True
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, optimizer="adam", weight_decay=1e-4,
                      schedule="cosine")
    models = train_batched(_mlp, x, y, masks, cfg, seed=5)
    idx = batch_indices(masks, cfg, torch.Generator().manual_seed(5))
    assert bool(masks.gather(1, idx.flatten(1)).all())  # each model sees only its own records
    for i, model in enumerate(models):
        ref = _reference(x, y, idx, cfg, i)
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-5), name
    trained = torch.nn.utils.parameters_to_vector(models[0].parameters())
    torch.manual_seed(5)
    assert not torch.allclose(trained, torch.nn.utils.parameters_to_vector(_mlp().parameters()))


def test_bad_input_is_a_one_line_error():
    x, y = _data()
    cfg = TrainConfig(epochs=1, batch_size=8)
    with pytest.raises(DataError, match="masks must be"):
        train_batched(_mlp, x, y, torch.ones(2, 5, dtype=torch.bool), cfg)
    with pytest.raises(DataError, match="empty"):
        train_batched(_mlp, x, y, torch.zeros(2, len(y), dtype=torch.bool), cfg)
    with pytest.raises(ConfigError, match="batch norm"):
        train_batched(lambda: build_model("tiny_cnn", 4, 1), x, y, torch.ones(2, len(y), dtype=torch.bool), cfg)
