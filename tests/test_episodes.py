"""Few-shot episode sampler: shapes, layout, disjointness, rotation, determinism, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from poisonlab.data.episodes import Episodes, EpisodeSampler
from poisonlab.data.types import FewShotData
from poisonlab.errors import ConfigError, DataError


def id_bank(num_classes: int = 12, samples: int = 10, size: int = 4) -> FewShotData:
    """Constant images whose channel 0 holds the class index and channel 1 the sample index."""
    cls = torch.arange(num_classes, dtype=torch.float32).view(-1, 1, 1, 1, 1)
    smp = torch.arange(samples, dtype=torch.float32).view(1, -1, 1, 1, 1)
    images = torch.cat(
        [cls.expand(num_classes, samples, 1, size, size),
         smp.expand(num_classes, samples, 1, size, size)],
        dim=2,
    ).contiguous()
    names = [f"c{i}" for i in range(num_classes)]
    return FewShotData(images=images, class_names=names, groups=["g"] * num_classes)


def ids(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class index, sample index) of each image of an id_bank batch [B, M, 2, H, W]."""
    return x[:, :, 0, 0, 0].long(), x[:, :, 1, 0, 0].long()


def test_shapes_and_dtypes():
    ep = EpisodeSampler(id_bank(), ways=5, shots=3, queries=4).sample(7)
    assert ep.support_x.shape == (7, 15, 2, 4, 4)
    assert ep.query_x.shape == (7, 20, 2, 4, 4)
    assert ep.support_y.shape == (7, 15) and ep.query_y.shape == (7, 20)
    assert ep.classes.shape == (7, 5)
    assert ep.support_y.dtype == torch.int64 and ep.query_y.dtype == torch.int64
    assert ep.support_x.dtype == torch.float32
    assert ep.batch == 7 and ep.ways == 5


def test_class_major_labels_match_classes():
    ep = EpisodeSampler(id_bank(), ways=4, shots=2, queries=3, seed=1).sample(5)
    assert ep.support_y[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ep.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert torch.equal(ep.support_y, ep.support_y[:1].expand(5, -1))
    s_cls, _ = ids(ep.support_x)
    q_cls, _ = ids(ep.query_x)
    assert torch.equal(s_cls, ep.classes.gather(1, ep.support_y))
    assert torch.equal(q_cls, ep.classes.gather(1, ep.query_y))


def test_classes_distinct_and_all_used():
    ep = EpisodeSampler(id_bank(num_classes=12), ways=6, shots=1, queries=1).sample(200)
    for row in ep.classes.tolist():
        assert len(set(row)) == 6
    assert set(ep.classes.flatten().tolist()) == set(range(12))


def _assert_disjoint(ep: Episodes, ways: int, shots: int, queries: int) -> None:
    _, s_smp = ids(ep.support_x)
    _, q_smp = ids(ep.query_x)
    b = s_smp.shape[0]
    per_class = torch.cat(
        [s_smp.view(b, ways, shots), q_smp.view(b, ways, queries)], dim=2
    )
    for task in per_class.tolist():
        for drawn in task:
            assert len(set(drawn)) == shots + queries


@settings(max_examples=40, deadline=None)
@given(
    ways=st.integers(2, 9),
    shots=st.integers(1, 5),
    queries=st.integers(1, 5),
    batch=st.integers(1, 6),
    rotate=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_shapes_and_disjoint(ways, shots, queries, batch, rotate, seed):
    data = id_bank(num_classes=9, samples=10)
    ep = EpisodeSampler(data, ways, shots, queries, rotate=rotate, seed=seed).sample(batch)
    assert ep.support_x.shape == (batch, ways * shots, 2, 4, 4)
    assert ep.query_x.shape == (batch, ways * queries, 2, 4, 4)
    _assert_disjoint(ep, ways, shots, queries)
    s_cls, _ = ids(ep.support_x)
    assert torch.equal(s_cls, ep.classes.gather(1, ep.support_y))


def test_rotation_is_consistent_within_a_class():
    num_classes, samples = 8, 6
    base = torch.zeros(5, 5)
    base[0, :3] = 1.0  # an L-shape: every quarter turn looks different
    base[1, 0] = 1.0
    views = [torch.rot90(base, t) for t in range(4)]
    images = base.expand(num_classes, samples, 1, 5, 5).contiguous()
    data = FewShotData(images, [str(i) for i in range(num_classes)], ["g"] * num_classes)
    ep = EpisodeSampler(data, ways=4, shots=2, queries=3, rotate=True, seed=3).sample(64)
    x = torch.cat([ep.support_x.view(64, 4, 2, 5, 5), ep.query_x.view(64, 4, 3, 5, 5)], 2)
    seen = set()
    for task in x:
        for cls in task:
            turns = [next(t for t, v in enumerate(views) if torch.equal(img, v)) for img in cls]
            assert len(set(turns)) == 1
            seen.add(turns[0])
    assert seen == {0, 1, 2, 3}


def test_no_rotation_by_default():
    data = id_bank()
    data.images[:, :, 0, 0, 0] = -1.0  # a marked corner stays in place
    ep = EpisodeSampler(data, ways=3, shots=1, queries=1).sample(20)
    assert (ep.support_x[:, :, 0, 0, 0] == -1).all()


def test_same_seed_same_episodes_and_sample_fixed():
    data = id_bank()
    a = EpisodeSampler(data, 5, 2, 3, rotate=True, seed=11)
    b = EpisodeSampler(data, 5, 2, 3, rotate=True, seed=11)
    for _ in range(3):
        ea, eb = a.sample(4), b.sample(4)
        assert torch.equal(ea.support_x, eb.support_x) and torch.equal(ea.query_x, eb.query_x)
        assert torch.equal(ea.classes, eb.classes)
    c = EpisodeSampler(data, 5, 2, 3, rotate=True, seed=12)
    assert not torch.equal(c.sample(4).classes, EpisodeSampler(data, 5, 2, 3, seed=11).sample(4).classes)
    f1, f2 = a.sample_fixed(6, seed=99), b.sample_fixed(6, seed=99)
    assert torch.equal(f1.support_x, f2.support_x) and torch.equal(f1.classes, f2.classes)
    assert torch.equal(a.sample(4).classes, b.sample(4).classes)  # own generators unaffected


def test_to_device_keeps_content():
    ep = EpisodeSampler(id_bank(), 3, 1, 2).sample(2)
    moved = ep.to("cpu")
    assert torch.equal(moved.query_x, ep.query_x) and torch.equal(moved.classes, ep.classes)
    one = ep.task(1)
    assert one.batch == 1 and torch.equal(one.support_x[0], ep.support_x[1])


@pytest.mark.parametrize(
    ("ways", "shots", "queries", "error", "word"),
    [
        (1, 1, 1, ConfigError, "ways=1"),
        (13, 1, 1, DataError, "ways=13"),
        (3, 0, 1, ConfigError, "shots=0"),
        (3, 1, 0, ConfigError, "queries=0"),
        (3, 6, 5, DataError, "shots+queries=11"),
    ],
)
def test_bad_requests(ways, shots, queries, error, word):
    with pytest.raises(error, match=word.replace("+", r"\+")):
        EpisodeSampler(id_bank(num_classes=12, samples=10), ways, shots, queries)


def test_bad_batch_and_non_square_rotation():
    with pytest.raises(ConfigError, match="batch=0"):
        EpisodeSampler(id_bank(), 3, 1, 1).sample(0)
    data = FewShotData(torch.zeros(4, 3, 1, 4, 6), list("abcd"), ["g"] * 4)
    with pytest.raises(DataError, match="4x6"):
        EpisodeSampler(data, 3, 1, 1, rotate=True)
    with pytest.raises(DataError, match="shape"):
        EpisodeSampler(FewShotData(torch.zeros(4, 3, 4, 4), list("abcd"), ["g"] * 4), 3, 1, 1)
