"""The trainer's optimizer step: fp16 loss scaling (unscale before clipping, skipped overflow steps)."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import save_tiny_hf_gpt2, tokens

from gpt2repro.train_config import TrainConfig

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 saved by Hugging Face itself, as a fine-tuning user would download it."""
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf"))


# ---------------------------------------------------------------- fp16 loss scaling (the trainer's step)
def _trainer(hf_dir, dtype: str, scaler_init: float | None, grad_clip: float = 0.05):
    """The trainer's step on CPU; fp16 + GradScaler is forced in (the CLI refuses fp16 on CPU) to run it."""
    from gpt2repro.trainer import Trainer

    cfg = TrainConfig(
        init_from=str(hf_dir),
        seq_len=8,
        micro_batch=2,
        total_batch=32,
        lr=1e-3,
        warmup_steps=0,
        grad_clip=grad_clip,
        dtype="fp32",
        compile="false",
        device="cpu",
    )
    trainer = Trainer(cfg, torch.device("cpu"))
    trainer.dtype = dtype
    if scaler_init is not None:
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scaler_init)
    return trainer


def _batches(n: int):
    data = [(tokens(2, 8, seed=10 + i), tokens(2, 8, seed=50 + i)) for i in range(n)]
    return iter(data).__next__


def test_loss_scaling_unscales_before_clipping(hf_dir):
    plain, scaled = _trainer(hf_dir, "fp32", None), _trainer(hf_dir, "fp32", 2.0**12)
    next_plain, next_scaled = _batches(4), _batches(4)
    for _ in range(2):
        a, b = plain.train_step(next_plain), scaled.train_step(next_scaled)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)  # the true norm, not 4096x
        assert a["grad_norm"] > 0.05  # clipping is active, so clipping scaled grads would change the update
    for (name, p), q in zip(plain.raw_model.named_parameters(), scaled.raw_model.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(hf_dir):
    trainer = _trainer(hf_dir, "fp16", 2.0**19, grad_clip=1.0)  # too large: fp16 gradients overflow
    before = {n: p.detach().clone() for n, p in trainer.raw_model.named_parameters()}
    batch = (tokens(2, 8, seed=10), tokens(2, 8, seed=11))

    def next_batch():
        return batch

    stats = trainer.train_step(next_batch)
    assert not math.isfinite(stats["grad_norm"])
    assert trainer.scaler.get_scale() == 2.0**18
    for name, p in trainer.raw_model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
    losses = [trainer.train_step(next_batch)["train_loss"] for _ in range(6)]
    assert losses[-1] < stats["train_loss"] - 0.3, losses  # then fp16 steps fit the repeated batch
