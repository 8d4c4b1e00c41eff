"""MetaPoison's ensemble in slices (attacks/metapoison_slice.py): two slices, as objects in this
process or as Ray actors, craft the poisons of the undivided ensemble up to float rounding, and a
crafting resumes from a checkpoint saved with any number of slices."""

from __future__ import annotations

import pytest
import torch

from poisonlab.attacks.metapoison import CraftState, MetaPoison
from poisonlab.errors import ConfigError
from poisonlab.executors import LocalExecutor
from test_metapoison import synthetic, tiny_factory

# Smoke-like: 60 images of 8×8, M = 4 surrogates, 10 poisons, batch 10, a 4-point colour grid.
SMALL = dict(ensemble=4, craft_steps=2, batch_size=10, budget=10, grid_size=4)
# Float rounding only: with Adam's sign-like first steps a flipped sign would move δ by 2ε (0.06)
# and the grid by 2ε_c (0.08); summing the slices' gradients in another order moved δ by 7e-6.
ATOL = {"delta": 1e-4, "grid": 1e-4, "history": 1e-5, "params": 1e-5}


class Spy:
    """An executor that notes the members of every slice it starts."""

    def __init__(self, inner) -> None:
        self.inner, self.name, self.started = inner, inner.name, []

    def start_actors(self, cls, inits, **kwargs):
        self.started.append([list(init["members"]) for init in inits])
        return self.inner.start_actors(cls, inits, **kwargs)


def _craft(slices: int = 1, executor=None, resume: CraftState | None = None, steps: int = 2):
    train = synthetic(20)
    attack = MetaPoison(tiny_factory(), seed=5, **{**SMALL, "craft_steps": steps, "slices": slices})
    states: list[CraftState] = []
    poisons = attack.craft(train, attack.choose_poisons(train, 1), train.x[0], 1, target_label=0,
                           checkpoint=states.append, resume=resume, executor=executor)
    return poisons, states


def _assert_close(got, want, exact: bool = False) -> None:
    (p, states), (q, expected) = got, want
    pairs = {"delta": (p.delta, q.delta), "grid": (p.grid, q.grid),
             "history": (p.history, q.history)}
    pairs |= {f"params.{n}": (states[-1].params[n], expected[-1].params[n])
              for n in expected[-1].params}
    for key, (a, b) in pairs.items():
        assert a.shape == b.shape, key
        if exact:
            assert torch.equal(a.nan_to_num(-1.0), b.nan_to_num(-1.0)), key
        else:
            tol = ATOL[key.split(".")[0]]
            assert torch.allclose(a, b, rtol=0, atol=tol, equal_nan=True), \
                (key, float((a - b).nan_to_num(0).abs().max()))
    assert [s.ages for s in states] == [s.ages for s in expected]


@pytest.fixture(scope="module")
def undivided():
    return _craft()


@pytest.fixture(scope="module")
def two_local():
    spy = Spy(LocalExecutor())
    out = _craft(2, spy)
    assert spy.started == [[[0, 1], [2, 3]]]
    return out


def test_two_local_slices_give_the_undivided_craft(undivided, two_local):
    _assert_close(two_local, undivided)
    assert two_local[0].history.shape == (2, 4) and not two_local[0].history.isnan().all()


def test_two_ray_actors_give_the_local_slices_exactly(ray_local, undivided, two_local):
    from poisonlab.executors.ray_backend import RayExecutor

    spy = Spy(RayExecutor())
    on_ray = _craft(2, spy)
    assert spy.started == [[[0, 1], [2, 3]]]
    _assert_close(on_ray, two_local, exact=True)  # the same computations, one thread each
    _assert_close(on_ray, undivided)


def test_resume_with_slices_continues_identically():
    full, states = _craft(2, steps=3)
    assert {p.shape[0] for p in states[0].params.values()} == {4}  # gathered from both slices
    resumed, resumed_states = _craft(2, resume=states[0], steps=3)
    assert [s.step for s in resumed_states] == [2, 3]
    _assert_close((resumed, resumed_states[-1:]), (full, states[-1:]), exact=True)


@pytest.mark.parametrize(("saved_with", "resumed_with"), [(1, 2), (2, 1), (2, 3)])
def test_a_checkpoint_resumes_with_another_number_of_slices(saved_with, resumed_with):
    want, want_states = _craft(saved_with, steps=3)
    got, got_states = _craft(resumed_with, resume=want_states[0], steps=3)
    _assert_close((got, got_states[-1:]), (want, want_states[-1:]))


def test_more_slices_than_surrogates_is_one_line():
    with pytest.raises(ConfigError, match=r"slices \(5\) must be at most ensemble \(4\)") as info:
        MetaPoison(tiny_factory(), ensemble=4, slices=5)
    assert "\n" not in str(info.value)
