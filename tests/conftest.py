"""Shared fixtures. Real data sets live in ../shared/data beside the project (never copied in)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POISONLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pytest_configure(config) -> None:
    """One cache and one runs folder per test session, never the user's (set before any
    fixture, session-scoped ones included, can load data)."""
    base = Path(tempfile.mkdtemp(prefix="poisonlab-tests-"))
    os.environ["POISONLAB_CACHE"] = str(base / "cache")
    os.environ["POISONLAB_RUNS"] = str(base / "runs")
    os.environ["MPLBACKEND"] = "Agg"
    # Test tensors are tiny: one intra-op thread is faster, and with more threads than free
    # cores OpenMP's barriers make every op wait for descheduled threads (measured: 10 s
    # instead of 0.15 s for a small attack on a busy 2-core machine).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real data sets; tests that need them skip only if the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for the whole session: starting one costs ~10 s. Every
    RayExecutor the tests build joins it (and leaves it open); it shuts down at the end. Its
    workers import poisonlab and the test modules (their piece functions) from this checkout."""
    pytest.importorskip("ray")
    from poisonlab.executors.ray_backend import RayExecutor

    before = os.environ.get("PYTHONPATH")
    paths = [str(ROOT / "src"), str(ROOT / "tests"), before or ""]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    try:  # the instance's processes inherit the environment as it is now
        executor = RayExecutor(num_cpus=2)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    try:
        yield
    finally:
        executor.close()
