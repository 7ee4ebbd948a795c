"""Helpers shared by the tests that run real training processes (one process, torchrun, signals)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2repro.checkpoint import latest_checkpoint, load_checkpoint
from gpt2repro.prepare import prepare_corpus
from gpt2repro.sources import embedded_documents

T = 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in every process: same float reductions
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
GPT2REPRO = [sys.executable, "-m", "gpt2repro"]


def tiny_corpus(data: Path) -> Path:
    """``data``, now holding token shards of the embedded corpus's first 40,000 tokens (4,096 for val)."""
    prepare_corpus(
        embedded_documents(), data, source_name="embedded", max_tokens=40_000, val_tokens=4_096, workers=1
    )
    return data


def run_overrides(data: Path, out: Path, **extra) -> dict:
    base = dict(
        model="gpt2-micro",
        data=str(data),
        out=str(out),
        device="cpu",
        dtype="fp32",
        compile="false",
        seq_len=T,
        micro_batch=4,
        total_batch=8 * T,
        max_steps=5,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        eval_tokens=512,
        checkpoint_every=0,
        sample_every=0,
        num_samples=0,
        log_every=1,
    )
    return {**base, **extra}


def as_flags(overrides: dict) -> list[str]:
    return [arg for k, v in overrides.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def run_cli(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = run_cli(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def final_params(run_dir: Path) -> dict:
    """The newest checkpoint's parameters, whatever its format (a file, or FSDP shards)."""
    from gpt2repro import GPT

    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    if "model" in ckpt:
        return ckpt["model"]
    return GPT.from_pretrained(run_dir).state_dict()


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    """The last logged training loss of each step (a resumed run appends to the log)."""
    return {r["step"]: r["train_loss"] for r in train_log(run_dir) if "train_loss" in r}


def without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The key bias gets a gradient that is exactly zero in theory (softmax ignores a shift q.b_k shared by
    all keys of a query), so its float-rounding noise, which depends on the reduction order, is all Adam
    sees and normalises up to a visible update. Every other parameter must match."""
    if name.endswith("attn.c_attn.bias"):
        n = tensor.numel() // 3
        return torch.cat([tensor[:n], tensor[2 * n :]])
    return tensor


def assert_equal_but_isolated_rounding(a: torch.Tensor, b: torch.Tensor, name: str, atol: float = 1e-6):
    """Equal to ``atol``, except for at most 1 entry in 100,000 that stays within 1e-4.

    Two ranks sum their halves of the batch in another order than one process does, so every gradient
    differs by float rounding (~1e-7 relative). Where a gradient entry nearly cancels (an unseen token's
    embedding column, say), that rounding is a large share of it, and Adam, which divides by the
    gradient's own size, turns it into a visible update: one entry of wte's 3.2 million did so here. A
    real DDP mistake (a missing average, a rank's batch dropped) moves every entry by ~lr.
    """
    diff = (a - b).abs()
    off = int((diff > atol).sum())
    assert off <= max(1, a.numel() // 100_000), f"{name}: {off} of {a.numel()} entries differ by > {atol}"
    assert diff.max().item() <= 1e-4, f"{name}: differs by {diff.max().item():.2e}"


def assert_same_parameters(a_params: dict, b_params: dict, atol: float = 1e-6) -> None:
    assert a_params.keys() == b_params.keys()
    for name in b_params:
        a, b = without_key_bias(name, a_params[name]), without_key_bias(name, b_params[name])
        assert_equal_but_isolated_rounding(a, b, name, atol)


def assert_same_losses(run_a: Path, run_b: Path, atol: float = 1e-5) -> None:
    a, b = train_losses(run_a), train_losses(run_b)
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=atol), step
