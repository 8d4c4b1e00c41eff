"""Safe model files: safetensors round trips, refused pickles, and weights that do not fit."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from poisonlab.errors import ModelFileError
from poisonlab.runs.checkpoints import (
    load_into,
    load_weights,
    match_key_names,
    pack_state,
    save_weights,
    unpack_state,
)


class FileCreator:
    """A pickle payload that would create `target` if it were ever unpickled normally."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def mlp(hidden: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_safetensors_round_trip_with_metadata(tmp_path):
    state = mlp().state_dict()
    path = save_weights(tmp_path / "m.safetensors", state, {"arch": "mlp", "epoch": 3})
    tensors, meta = load_weights(path)
    assert meta == {"arch": "mlp", "epoch": "3"}
    assert tensors.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(tensors[key], value)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_views_and_shared_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "row": base[1], "same": base, "alias": base}
    tensors, _ = load_weights(save_weights(tmp_path / "v.safetensors", state))
    for key, value in state.items():
        assert torch.equal(tensors[key], value)


def test_non_tensor_value_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match="cannot save 'epoch': int is not a tensor"):
        save_weights(tmp_path / "x.safetensors", {"epoch": 3})


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_torch_save_state_dict_loads(tmp_path, suffix):
    state = mlp().state_dict()
    path = tmp_path / f"m{suffix}"
    torch.save(state, path)
    tensors, meta = load_weights(path)
    assert meta == {}
    assert all(torch.equal(tensors[k], v) for k, v in state.items())


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    state = mlp().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 7, "state_dict": state}, path)
    tensors, _ = load_weights(path)
    assert tensors.keys() == state.keys()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    payload = {"weight": FileCreator(target)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(ModelFileError) as info:
        load_weights(path)
    message = str(info.value)
    assert message.startswith(f"refusing to load {path}: it contains code, not just weights (")
    assert "\n" not in message
    assert not target.exists()


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="model file not found: .*nope.safetensors"):
        load_weights(tmp_path / "nope.safetensors")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ModelFileError, match=f"cannot read {path}: not a valid safetensors file"):
        load_weights(path)


def test_truncated_pt_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(mlp().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelFileError, match=f"cannot read {path}: "):
        load_weights(path)


@pytest.mark.parametrize(
    "obj, found",
    [
        ([torch.ones(2)], "found list"),
        ({"w": torch.ones(2), "epoch": 3}, "entry 'epoch' is int, not a tensor"),
        ({1: torch.ones(2)}, "key 1 is int, not a parameter name"),
        ({}, "found dict"),
    ],
)
def test_pickle_that_is_not_a_state_dict(tmp_path, obj, found):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(ModelFileError, match=f"{path} does not hold a state dict.*{found}"):
        load_weights(path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"x")
    with pytest.raises(ModelFileError, match=f"unsupported model file {path}"):
        load_weights(path)


def test_load_into_round_trip(tmp_path):
    source, target = mlp(), nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    path = save_weights(tmp_path / "m.safetensors", source.state_dict())
    assert load_into(target, path) is target
    x = torch.randn(5, 10)
    assert torch.equal(target(x), source(x))


def test_shape_mismatch_names_keys_and_shapes(tmp_path):
    path = save_weights(tmp_path / "m.safetensors", mlp(hidden=8).state_dict())
    with pytest.raises(ModelFileError) as info:
        load_into(mlp(hidden=16), path, name="mlp16")
    assert str(info.value) == (
        "weights in m.safetensors do not fit mlp16: 0.weight has shape [8,10], expected [16,10]; "
        "0.bias has shape [8], expected [16]; 2.weight has shape [3,8], expected [3,16]"
    )


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_integer_or_bool_weights_are_refused(tmp_path, dtype):
    """Right shapes but int8/bool values: load_state_dict would cast them into a broken model."""
    state = {k: v.to(dtype) for k, v in mlp().state_dict().items()}
    path = save_weights(tmp_path / "m.safetensors", state)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ModelFileError, match=rf"0\.weight has dtype {name}, expected "
                                             "floating-point weights"):
        load_into(mlp(), path)
    half = save_weights(tmp_path / "h.safetensors",
                        {k: v.half() for k, v in mlp().state_dict().items()})
    load_into(mlp(), half)  # other float precisions are ordinary weights


def test_missing_and_unexpected_keys(tmp_path):
    state = mlp().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(ModelFileError) as info:
        load_into(mlp(), state)
    message = str(info.value)
    assert message.startswith("weights in the given state dict do not fit Sequential: ")
    assert "2.bias is missing (expected shape [3])" in message
    assert "extra.weight is not part of the model" in message
    model = mlp()
    load_into(model, {"0.weight": torch.ones(16, 10)}, strict=False)
    assert torch.equal(model[0].weight, torch.ones(16, 10))
    with pytest.raises(ModelFileError, match="0.weight has shape \\[2,2\\], expected \\[16,10\\]"):
        load_into(mlp(), {"0.weight": torch.ones(2, 2)}, strict=False)


def test_many_problems_are_summarised():
    deep = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    with pytest.raises(ModelFileError, match="; and 6 more$"):
        load_into(deep, {})


def test_data_parallel_prefix_is_dropped():
    source = mlp()
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = load_into(mlp(hidden=16), wrapped)
    assert torch.equal(target[2].bias, source[2].bias)


def test_wrapper_prefixes_are_dropped_only_when_they_make_the_keys_fit():
    source = mlp()
    for prefix in ("model.", "module.model.", "model.module."):
        wrapped = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
        target = load_into(mlp(hidden=16), wrapped)
        assert torch.equal(target[2].bias, source[2].bias), prefix
    holder = nn.Module()  # a model whose own keys start with model. keeps them
    holder.model = mlp()
    own = holder.state_dict()
    assert match_key_names(own, own) == own
    ddp = {f"module.{k}": v for k, v in own.items()}
    assert list(match_key_names(ddp, own)) == list(own)
    other = {f"module.{k}": v for k, v in {"a.weight": torch.zeros(1)}.items()}
    assert match_key_names(other, own) == other  # no removal makes them fit: unchanged


def test_a_mismatch_names_missing_and_unexpected_keys_even_when_many_are_missing():
    deep = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    state = {f"layer{k}": v for k, v in deep.state_dict().items()}
    with pytest.raises(ModelFileError) as info:
        load_into(deep, state, source="f.pt")
    message = str(info.value)
    assert message.startswith("weights in f.pt do not fit Sequential: 0.weight is missing")
    assert "layer0.weight is not part of the model" in message and message.endswith("and 16 more")


def test_pack_state_round_trips_optimizer_state(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 12,
        "pair": (1, None),
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},
        "rng": torch.get_rng_state(),
    }
    tensors, skeleton = pack_state(state)
    path = save_weights(tmp_path / "state.safetensors", tensors, {"s": skeleton})
    loaded, meta = load_weights(path)
    back = unpack_state(loaded, meta["s"])
    assert back["step"] == 12 and back["pair"] == (1, None)
    assert torch.equal(back["a.b"], torch.ones(1)) and torch.equal(back["a"]["b"], torch.zeros(1))
    assert torch.equal(back["rng"], state["rng"])
    assert list(back["optim"]["state"]) == [0, 1, 2, 3]  # integer keys survive
    restored = torch.optim.SGD(mlp().parameters(), lr=0.5, momentum=0.9)
    restored.load_state_dict(back["optim"])
    assert restored.param_groups[0]["lr"] == 0.1
    momentum = restored.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(momentum, opt.state_dict()["state"][0]["momentum_buffer"])


def test_pack_state_refuses_unknown_objects():
    with pytest.raises(
        ModelFileError, match="cannot save state at 'model': unsupported Sequential"
    ):
        pack_state({"model": mlp()})


def test_a_failed_write_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """A full disk fails inside safetensors' writer: reported as the write that failed (the CLI
    prints it as one line), not as an invalid file, and no partial file is left behind."""
    from safetensors import SafetensorError

    import poisonlab.runs.checkpoints as checkpoints

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(checkpoints, "save_file", full)
    target = tmp_path / "w.safetensors"
    with pytest.raises(OSError, match=r"cannot write .*w\.safetensors: I/O error: No space left"):
        save_weights(target, {"a": torch.ones(2)})
    assert list(tmp_path.iterdir()) == []
