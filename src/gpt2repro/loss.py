"""The language-modelling loss: cross-entropy over the real vocabulary, computed a few rows at a time.

Why not ``F.cross_entropy(logits[..., :V].float(), targets)``: under bf16 autocast that expression
materialises four logits-sized fp32 tensors (the upcast, log-softmax, and in backward its gradient and a
zero-filled buffer for the slice of the padded vocabulary), about 200 MB each for a 4x256 batch and 3 GB
each for build-nanogpt's 16x1024 batch. Here each block of rows is upcast, reduced (log-sum-exp) and
forgotten; backward recomputes the softmax block by block and writes the gradient once, in the logits'
own dtype, with zeros in the padded columns. The arithmetic is the same fp32 log-softmax.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -1
_BLOCK_ELEMENTS = 1 << 20  # fp32 elements per block: 4 MB, well inside the last-level cache
# 256 MB fp32 on a GPU: it has no such cache, and each block costs kernel launches (4 MB blocks of a
# 16x1024-token batch would be ~800 blocks, several launches each, per micro-step)
_GPU_BLOCK_ELEMENTS = 1 << 26


def _row_blocks(n_rows: int, n_cols: int, device: torch.device):
    block = _BLOCK_ELEMENTS if device.type == "cpu" else _GPU_BLOCK_ELEMENTS
    step = max(1, block // n_cols)
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def _row_log_sum_exp(
    logits: torch.Tensor, n_cols: int, with_argmax: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log-sum-exp of each row's first ``n_cols`` logits (and its argmax), a block of rows at a time."""
    n_rows = logits.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    best = torch.empty(n_rows, dtype=torch.long, device=logits.device) if with_argmax else None
    for rows in _row_blocks(n_rows, n_cols, logits.device):
        values = logits[rows, :n_cols].float()
        lse[rows] = torch.logsumexp(values, dim=-1)
        if best is not None:
            best[rows] = values.argmax(dim=-1)
    return lse, best


class _BlockwiseCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
        lse, _ = _row_log_sum_exp(logits, vocab_size)
        valid = targets != IGNORE_INDEX
        safe_targets = torch.where(valid, targets, 0)
        target_logits = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1).float()
        count = valid.sum()
        loss = torch.where(valid, lse - target_logits, 0.0).sum() / count
        ctx.save_for_backward(logits, safe_targets, valid, lse, count)
        ctx.vocab_size = vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        logits, safe_targets, valid, lse, count = ctx.saved_tensors
        vocab_size = ctx.vocab_size
        grad = torch.empty_like(logits)
        grad[:, vocab_size:] = 0  # padded vocabulary columns never carry probability
        row_scale = (grad_loss / count) * valid.float()  # ignored rows contribute nothing
        for rows in _row_blocks(logits.shape[0], vocab_size, logits.device):
            probs = logits[rows, :vocab_size].float().sub_(lse[rows].unsqueeze(1)).exp_()
            probs.scatter_add_(1, safe_targets[rows].unsqueeze(1), -valid[rows].float().unsqueeze(1))
            grad[rows, :vocab_size] = probs.mul_(row_scale[rows].unsqueeze(1))
        return grad, None, None


@torch.no_grad()
def logprobs_at(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log_softmax(logits[rows[k]])[targets[k]]`` (fp32) and whether that target is the row's argmax.

    Zero-shot scoring asks for many targets per row (a HellaSwag context's last position is scored
    for each of its four endings): each row's log-sum-exp and argmax are computed once, a block of
    rows at a time while it is in cache, and the logits are never copied or upcast whole.
    """
    lse, best = _row_log_sum_exp(logits, logits.shape[1], with_argmax=True)
    return logits[rows, targets].float() - lse[rows], best[rows] == targets


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (..., >= vocab_size) against ``targets`` (...), -1 ignored.

    Columns at or past ``vocab_size`` (vocabulary padding) are left out of the softmax. The result is
    fp32 whatever the logits' dtype; a batch with every target ignored gives NaN, as F.cross_entropy does.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    if flat_logits.shape[0] != flat_targets.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    if flat_targets.device.type == "cpu" and flat_targets.numel():  # on CUDA this check would sync
        low, high = flat_targets.min().item(), flat_targets.max().item()
        if low < IGNORE_INDEX or high >= vocab_size:
            raise ValueError(f"target ids must be in [0, {vocab_size}) or {IGNORE_INDEX}; got {low}..{high}")
    return _BlockwiseCrossEntropy.apply(flat_logits, flat_targets, vocab_size)
