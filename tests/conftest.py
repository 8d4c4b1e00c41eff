"""Shared fixtures. Real data sets live in ../shared/data beside the project (never copied in)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("POISONLAB_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to the real data sets; tests that need them skip only if the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache and runs folders, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "poisonlab-cache"
    monkeypatch.setenv("POISONLAB_CACHE", str(cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
