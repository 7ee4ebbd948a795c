"""Validation loss on a fixed set of held-out tokens (the same tokens at every evaluation of a run).

Sharded across ranks under DDP: each rank evaluates its own slice of the val batches and the summed
loss and token counts are all-reduced, so every rank returns the same, exact mean.
"""

from __future__ import annotations

import os

import torch

from gpt2repro.distributed import sum_across_ranks
from gpt2repro.runtime import autocast, evaluation_mode


@torch.no_grad()
def val_loss(
    model: torch.nn.Module,
    data_dir: str | os.PathLike,
    *,
    batch_size: int,
    seq_len: int,
    max_tokens: int | None,
    device: torch.device | str,
    dtype: str,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Mean next-token cross-entropy over the first ``max_tokens`` val tokens of ``data_dir``.

    Returns ``{"loss": float, "tokens": int}`` (tokens counted over all ranks). ``model`` should be the
    unwrapped ``GPT`` (not the DDP wrapper); it is put in eval mode and restored afterwards.
    """
    from gpt2repro.data import val_batches

    device = torch.device(device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per batch
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with evaluation_mode(model) as gpt:
        for x, y in val_batches(
            data_dir, batch_size, seq_len, max_tokens=max_tokens, rank=rank, world_size=world_size
        ):
            x, y = x.to(device), y.to(device)
            with autocast(device, dtype):
                _, loss = gpt(x, y)
            n = (y != -1).sum()
            loss_sum += loss.double() * n
            tokens += n
    loss_sum, tokens = sum_across_ranks([loss_sum.item(), tokens.item()], device, world_size)
    n_tokens = int(tokens)
    return {"loss": loss_sum / max(n_tokens, 1), "tokens": n_tokens}
