"""Device, dtype and allocator choices of gpt2repro.runtime."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpt2repro.errors import UserError
from gpt2repro.runtime import parse_dtype, pick_device

FAULTS_OF_A_TRAINING_LIKE_LOOP = """
import resource, sys, torch
from gpt2repro.runtime import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
def step():  # activations and gradients of assorted sizes, one 200 MB tensor, all freed again
    a = torch.ones(4_000_000); b = torch.ones(1_300_000); del a
    c = torch.ones(4_000_000); d = torch.ones(50_000_000); del b, c, d
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_OF_A_TRAINING_LIKE_LOOP, mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_kept_memory_is_reused_instead_of_faulted_in_again():
    default, kept = page_faults("default"), page_faults("keep")
    # 10 steps that allocate ~280 MB each: by default ~70k page faults a step; kept, a small fraction.
    assert default > 100_000
    assert kept * 4 < default, (default, kept)


def test_pick_device_and_dtype_refuse_what_is_not_here():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            pick_device("cuda")
    with pytest.raises(UserError, match="fp16 is for CUDA"):
        parse_dtype("fp16", torch.device("cpu"))
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("fp8", torch.device("cpu"))
    assert parse_dtype("fp32", torch.device("cpu")) == "fp32"
