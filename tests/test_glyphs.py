"""The embedded glyph set: shape, range, determinism, distinct classes, learnable but not trivial."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from poisonlab.data import glyphs
from poisonlab.errors import ConfigError, DataError

NAME = re.compile(r"^[A-Za-z ]+/U\+[0-9A-F]{4,5}$")


@pytest.fixture(scope="module")
def default_bank():
    """The default bank (generated once per test session, then read from the cache)."""
    return glyphs.load_glyphs()


def test_small_bank_shape_range_and_names():
    data = glyphs.load_glyphs(num_classes=40, samples=5, seed=3)
    assert data.images.shape == (40, 5, 1, 28, 28)
    assert data.images.dtype == torch.float32
    assert data.images.min() == 0.0 and data.images.max() == 1.0
    assert len(data.class_names) == len(set(data.class_names)) == 40
    assert all(NAME.match(n) for n in data.class_names)
    assert [n.split("/")[0] for n in data.class_names] == data.groups


def test_same_seed_same_bank_different_seed_different(tmp_path, monkeypatch):
    first = glyphs.load_glyphs(num_classes=30, samples=4, seed=7)
    cached = glyphs.load_glyphs(num_classes=30, samples=4, seed=7)
    monkeypatch.setenv("POISONLAB_CACHE", str(tmp_path / "fresh"))
    regenerated = glyphs.load_glyphs(num_classes=30, samples=4, seed=7)
    other = glyphs.load_glyphs(num_classes=30, samples=4, seed=8)
    assert torch.equal(first.images, cached.images)
    assert torch.equal(first.images, regenerated.images)
    assert first.class_names == regenerated.class_names
    assert not torch.equal(first.images, other.images)


def test_output_size_option():
    data = glyphs.load_glyphs(num_classes=5, samples=2, size=20)
    assert data.images.shape == (5, 2, 1, 20, 20)


def test_default_bank_has_many_classes_from_many_scripts(default_bank):
    assert default_bank.images.shape == (1200, 20, 1, 28, 28)
    counts = {g: default_bank.groups.count(g) for g in set(default_bank.groups)}
    assert sum(n >= 20 for n in counts.values()) >= 6
    assert {"Latin", "Greek", "Cyrillic", "Armenian", "Georgian", "Hebrew", "Arabic"} <= set(counts)
    assert len(set(default_bank.class_names)) == 1200


def test_samples_of_a_class_differ(default_bank):
    flat = default_bank.images.flatten(2)  # [C, S, 784]
    dist = torch.cdist(flat, flat)
    off_diagonal = dist[:, ~torch.eye(flat.shape[1], dtype=torch.bool)]
    assert off_diagonal.min() > 0.5


def test_classes_learnable_but_not_trivial(default_bank):
    """Nearest class mean on raw pixels, 20-way with 10 training drawings per class."""
    gen = torch.Generator().manual_seed(0)
    accuracies = []
    for _ in range(5):
        classes = torch.randperm(default_bank.num_classes, generator=gen)[:20]
        x = default_bank.images[classes].flatten(2)
        means = x[:, :10].mean(1)
        predicted = torch.cdist(x[:, 10:].reshape(-1, x.shape[-1]), means).argmin(1)
        truth = torch.arange(20).repeat_interleave(10)
        accuracies.append((predicted == truth).float().mean().item())
    accuracy = sum(accuracies) / len(accuracies)
    assert 0.25 < accuracy < 0.98  # chance is 0.05


def test_distinct_indices_drops_duplicates_and_empty_glyphs():
    a = torch.zeros(64, 64)
    a[10:50, 30:34] = 1.0
    b = torch.zeros(64, 64)
    b[30:34, 10:50] = 1.0
    templates = torch.stack([a, a.clone(), torch.zeros(64, 64), b])
    assert glyphs.distinct_indices(templates) == [0, 3]


def test_candidates_are_mapped_letters_of_known_scripts():
    letters = glyphs.candidate_letters(glyphs.font_file())
    scripts = {s for s, _ in letters}
    assert scripts <= set(glyphs.SCRIPTS.values())
    codes = {c for _, c in letters}
    assert ord("A") in codes and 0x3B1 in codes and 0xC1 not in codes  # no precomposed Á
    assert ord("1") not in codes and ord("!") not in codes


def test_lanczos_matrix_matches_pillow():
    x = torch.rand(64, 64, generator=torch.Generator().manual_seed(0))
    m = glyphs._lanczos_matrix(64, 28)
    pil = Image.fromarray(x.numpy(), mode="F").resize((28, 28), Image.LANCZOS)
    assert np.allclose((m @ x @ m.T).numpy(), np.asarray(pil), atol=1e-5)


def test_supervised_set():
    data = glyphs.load_glyph_supervised(num_classes=6, train_per_class=40, test_per_class=20)
    assert data.train.x.shape == (240, 1, 28, 28) and data.test.x.shape == (120, 1, 28, 28)
    assert data.train.y.dtype == torch.int64
    assert torch.bincount(data.train.y).tolist() == [40] * 6
    assert torch.bincount(data.test.y).tolist() == [20] * 6
    assert data.classes[0] == "Latin/U+0041" and len(data.classes) == 6
    again = glyphs.load_glyph_supervised(num_classes=6, train_per_class=40, test_per_class=20)
    assert torch.equal(again.train.x, data.train.x) and torch.equal(again.test.y, data.test.y)
    means = torch.stack([data.train.x[data.train.y == c].mean(0) for c in range(6)]).flatten(1)
    predicted = torch.cdist(data.test.x.flatten(1), means).argmin(1)
    assert (predicted == data.test.y).float().mean() > 0.5  # chance is 1/6


@pytest.mark.parametrize(
    ("kwargs", "error", "word"),
    [
        ({"num_classes": 100_000}, DataError, "num_classes=100000"),
        ({"num_classes": 0}, ConfigError, "num_classes=0"),
        ({"samples": 0}, ConfigError, "samples=0"),
        ({"size": 4}, ConfigError, "size=4"),
    ],
)
def test_bad_bank_requests(kwargs, error, word):
    with pytest.raises(error, match=word):
        glyphs.load_glyphs(**kwargs)


def test_bad_supervised_requests():
    with pytest.raises(ConfigError, match="num_classes=50"):
        glyphs.load_glyph_supervised(num_classes=50)
    with pytest.raises(ConfigError, match="test_per_class=0"):
        glyphs.load_glyph_supervised(test_per_class=0)
