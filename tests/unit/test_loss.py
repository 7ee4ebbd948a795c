"""The blockwise cross-entropy against torch's F.cross_entropy on the real-vocabulary slice."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gpt2repro.loss as loss_module
from gpt2repro.loss import cross_entropy


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    real = logits[..., :vocab_size].reshape(-1, vocab_size).float()
    return F.cross_entropy(real, targets.reshape(-1), ignore_index=-1)


def loss_and_grad(fn, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, upstream: float):
    x = logits.clone().requires_grad_()
    loss = fn(x, targets, vocab_size)
    (loss * upstream).backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_f_cross_entropy(dtype, tol, padded, monkeypatch):
    monkeypatch.setattr(loss_module, "_BLOCK_ELEMENTS", 1000)  # many blocks, and a ragged last one
    vocab, width = 301, (320 if padded else 301)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, width, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (3, 7), generator=gen)
    targets[0, 2] = targets[2, 6] = -1
    got, got_grad = loss_and_grad(cross_entropy, logits, targets, vocab, upstream=0.7)
    want, want_grad = loss_and_grad(reference, logits, targets, vocab, upstream=0.7)
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    assert got_grad.dtype == dtype and got_grad.shape == logits.shape
    # bf16 gradients are rounded once either way; allow one bf16 ulp of the largest entry
    grad_tol = 1e-7 if dtype == torch.float32 else 2**-8 * want_grad.abs().max().item()
    assert (got_grad.float() - want_grad.float()).abs().max().item() <= grad_tol
    if padded:
        assert got_grad[..., vocab:].abs().max().item() == 0.0
    assert got_grad[0, 2].abs().max().item() == 0.0  # an ignored position gets no gradient


def test_every_target_ignored_gives_nan_like_torch():
    logits = torch.randn(2, 5, 11)
    targets = torch.full((2, 5), -1)
    assert math.isnan(cross_entropy(logits, targets, 11).item())
    assert math.isnan(reference(logits, targets, 11).item())


@pytest.mark.parametrize("bad", [11, 15, -2])
def test_target_outside_the_real_vocabulary_is_refused(bad):
    targets = torch.zeros(2, 5, dtype=torch.long)
    targets[1, 3] = bad
    with pytest.raises(ValueError, match=r"target ids must be in \[0, 11\)"):
        cross_entropy(torch.randn(2, 5, 16), targets, 11)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(torch.randn(2, 5, 16), torch.zeros(2, 4, dtype=torch.long), 11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_at_matches_log_softmax_and_argmax(dtype, monkeypatch):
    """Rows asked for several times (a shared context position), a ragged last block, a padded view."""
    monkeypatch.setattr(loss_module, "_BLOCK_ELEMENTS", 1000)
    torch.manual_seed(0)
    padded = torch.randn(13, 317).to(dtype)
    logits = padded[:, :300]  # the model returns the real-vocabulary slice of padded logits
    rows = torch.tensor([0, 0, 0, 5, 12, 7, 7])
    targets = torch.tensor([3, 299, 0, 10, 42, 0, 1])
    targets[4] = int(logits[12].float().argmax())  # one hit at least
    logprob, hit = loss_module.logprobs_at(logits, rows, targets)
    expected = F.log_softmax(logits.float(), dim=-1)[rows, targets]
    assert logprob.dtype == torch.float32
    torch.testing.assert_close(logprob, expected, rtol=0, atol=1e-5)
    assert hit.tolist() == (logits.float().argmax(dim=-1)[rows] == targets).tolist()
    assert hit[4]


def test_blocks_are_cache_sized_on_cpu_and_large_on_gpus():
    """A GPU gets few large blocks (each block costs kernel launches); the CPU's fit in its cache."""
    vocab, rows = 50304, 16 * 1024
    for device, elements in (("cpu", loss_module._BLOCK_ELEMENTS), ("cuda", loss_module._GPU_BLOCK_ELEMENTS)):
        blocks = list(loss_module._row_blocks(rows, vocab, torch.device(device)))
        assert blocks[0] == slice(0, elements // vocab) and blocks[-1].stop == rows
        assert len(blocks) == math.ceil(rows / (elements // vocab))
