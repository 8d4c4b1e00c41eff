"""Device choice: use a GPU when one is present, never assume it."""

from __future__ import annotations

import functools
import os
import random
from typing import Literal

import numpy as np
import torch


def default_device() -> torch.device:
    """CUDA if available, then Apple MPS, else CPU. POISONLAB_DEVICE overrides."""
    forced = os.environ.get("POISONLAB_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (all devices) and numpy; return a CPU generator seeded with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


Bf16 = bool | Literal["auto"]  # a bf16 setting: on, off, or where the hardware has it


def bf16_fast(device: torch.device | str) -> bool:
    """Whether bfloat16 matrix products run natively on `device`: a CUDA GPU that supports
    them, or a CPU with AMX or AVX-512 BF16 (oneDNN's own test). Without them (AVX2-only
    CPUs) autocast emulates bfloat16 and a ResNet step is about four times slower."""
    return _bf16_fast(torch.device(device).type)


@functools.cache
def _bf16_fast(kind: str) -> bool:
    if kind == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if kind == "cpu":
        probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(probe()) if probe is not None else False
        except RuntimeError:
            return False
    return False


def use_bf16(setting: Bf16, device: torch.device | str) -> bool:
    """The bf16 setting made concrete: "auto" is `bf16_fast(device)`."""
    return bf16_fast(device) if setting == "auto" else bool(setting)


def autocast(device: torch.device | str, enabled: bool):
    """bfloat16 mixed precision on `device` when `enabled` (a no-op context otherwise): matrix
    products and convolutions run in bfloat16, reductions and losses stay float32. On CPUs with
    AMX or AVX-512 BF16 it roughly halves a ResNet training step; weights stay float32."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
