"""Shared fixtures: small models, the shared data directory, deterministic CPU threads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# tests/unit and tests/integration import the shared helpers of this directory by name
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data directory {SHARED_DATA} is missing (expected ../shared/data beside the repo)")
    return SHARED_DATA
