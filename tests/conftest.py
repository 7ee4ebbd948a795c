"""Shared fixtures: small models, the shared data directory, deterministic CPU threads."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# tests/unit and tests/integration import the shared helpers of this directory by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# One cache for the whole session (this process and every CLI/torchrun process it starts): the measured
# CPU peak and kernel calibrations are taken once, not in every subprocess, and ~/.cache stays untouched.
os.environ.setdefault("GPT2REPRO_CACHE", tempfile.mkdtemp(prefix="gpt2repro-test-cache-"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data directory {SHARED_DATA} is missing (expected ../shared/data beside the repo)")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Busy shared cores make multi-threaded CPU kernels crawl; these tiny models need one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty calibration cache under tmp_path (kernel choices and the CPU peak), on a machine that
    counts as quiet (entries get written)."""
    from gpt2repro import calibration

    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    monkeypatch.delenv(calibration.KERNEL_CACHE_ENV, raising=False)
    monkeypatch.setattr(calibration, "machine_overloaded", lambda: False)
    cache = calibration.CalibrationCache()
    monkeypatch.setattr(calibration, "CALIBRATIONS", cache)
    return cache
