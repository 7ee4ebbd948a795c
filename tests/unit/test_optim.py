"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from gpt2repro import GPT, GPTConfig
from gpt2repro.optim import lr_at, make_optimizer, param_groups

MAX_LR, RATIO, WARMUP, DECAY = 6e-4, 0.1, 715, 19073


def schedule(step: int) -> float:
    return lr_at(step, max_lr=MAX_LR, min_lr_ratio=RATIO, warmup_steps=WARMUP, decay_steps=DECAY)


def test_lr_schedule_key_points():
    min_lr = MAX_LR * RATIO
    assert schedule(0) == pytest.approx(MAX_LR / WARMUP)  # build-nanogpt: (it + 1) / warmup
    assert schedule(WARMUP - 1) == pytest.approx(MAX_LR)  # end of warmup
    assert schedule(WARMUP) == pytest.approx(MAX_LR)  # start of the cosine
    mid = WARMUP + (DECAY - WARMUP) / 2
    assert schedule(int(mid)) == pytest.approx((MAX_LR + min_lr) / 2, rel=1e-4)
    assert schedule(DECAY) == pytest.approx(min_lr)
    assert schedule(DECAY + 1000) == pytest.approx(min_lr)  # constant after the floor
    # monotone: up during warmup, down after
    warm = [schedule(s) for s in range(WARMUP)]
    decay = [schedule(s) for s in range(WARMUP, DECAY + 1, 97)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)


def test_cosine_part_matches_torch_cosine_annealing():
    """The decay phase equals torch's CosineAnnealingLR (eta_min = floor, T_max = decay length)."""
    warmup, decay = 10, 110
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=MAX_LR)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay - warmup, eta_min=MAX_LR * RATIO)
    for step in range(warmup, decay + 1):
        ours = lr_at(step, max_lr=MAX_LR, min_lr_ratio=RATIO, warmup_steps=warmup, decay_steps=decay)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        ref.step()


def test_param_groups_match_build_nanogpt_124m():
    """build-nanogpt's log for GPT-2 124M (vocab 50304): 50 decayed tensors with 124,354,560 parameters,
    98 non-decayed tensors with 121,344 parameters."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = GPT(GPTConfig.preset("gpt2", vocab_pad_multiple=64))
    decay, no_decay = param_groups(model, 0.1)
    assert len(decay["params"]) == 50 and sum(p.numel() for p in decay["params"]) == 124_354_560
    assert len(no_decay["params"]) == 98 and sum(p.numel() for p in no_decay["params"]) == 121_344
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_param_groups_by_name():
    model = GPT(GPTConfig.preset("gpt2-micro"))
    decay, no_decay = param_groups(model, 0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    assert "lm_head.weight" not in by_id  # tied to wte: counted once
    assert decayed == {n for n, p in model.named_parameters() if n.endswith(".weight") and "ln" not in n}
    assert {by_id[id(p)] for p in no_decay["params"]} == set(by_id.values()) - decayed
    assert all(".bias" in by_id[id(p)] or ".ln_" in by_id[id(p)] for p in no_decay["params"])


def test_optimizer_settings():
    model = GPT(GPTConfig.preset("gpt2-micro"))
    cpu = torch.device("cpu")
    opt = make_optimizer(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device=cpu)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
