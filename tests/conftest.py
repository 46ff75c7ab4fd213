"""Shared fixtures: one tiny model set per test session (real formats, random weights), offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' ops are so small that thread hand-off dominates them; with several threads on
# a 2-core machine a tiny job ran 5-50x slower (measured: 34 s vs 6 s for a first run). One thread,
# set before torch loads, also for the backend processes the service and add-on tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGE = REPO / "examples" / "toy_bear.png"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A complete tiny model set written once per session. Treat it as read-only."""
    from make_your_3d.models.tiny import write_tiny_set

    return write_tiny_set(tmp_path_factory.mktemp("tiny_models"), seed=0)


@pytest.fixture(scope="session")
def example_image() -> Path:
    return EXAMPLE_IMAGE


@pytest.fixture(scope="module", autouse=True)
def _own_stage_cache(tmp_path_factory):
    """The stage cache is one per user (paths.default_cache_dir): each test module, and the backend
    processes it starts, gets a fresh one instead of reading or filling the real one."""
    old = os.environ.get("MAKE_YOUR_3D_CACHE")
    os.environ["MAKE_YOUR_3D_CACHE"] = str(tmp_path_factory.mktemp("stage_cache"))
    yield
    if old is None:
        os.environ.pop("MAKE_YOUR_3D_CACHE", None)
    else:
        os.environ["MAKE_YOUR_3D_CACHE"] = old
