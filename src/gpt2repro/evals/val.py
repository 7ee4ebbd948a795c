"""Validation loss on a fixed set of held-out tokens (the same tokens at every evaluation of a run).

Sharded across ranks under DDP: each rank evaluates its own slice of the val batches and the summed
loss and token counts are all-reduced, so every rank returns the same, exact mean.
"""

from __future__ import annotations

import os

import torch

from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.runtime import autocast, evaluation_mode

DEFAULT_BATCH = 8  # sequences per forward pass


@torch.no_grad()
def val_loss(
    model: torch.nn.Module,
    data_dir: str | os.PathLike,
    setup: EvalSetup,
    *,
    seq_len: int,
    max_tokens: int | None,
) -> dict:
    """Mean next-token cross-entropy over the first ``max_tokens`` val tokens of ``data_dir``.

    Returns ``{"loss": float, "tokens": int}`` (tokens counted over all ranks). ``model`` should be the
    unwrapped ``GPT`` (not the DDP wrapper); it is put in eval mode and restored afterwards.
    """
    from gpt2repro.data import val_batches

    device = torch.device(setup.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per batch
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with evaluation_mode(model) as gpt:
        batches = val_batches(
            data_dir,
            setup.batch(DEFAULT_BATCH),
            seq_len,
            max_tokens=max_tokens,
            rank=setup.rank,
            world_size=setup.world_size,
        )
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, setup.dtype):
                _, loss = gpt(x, y)
            n = (y != -1).sum()
            loss_sum += loss.double() * n
            tokens += n
    loss_sum, tokens = setup.sum_across_ranks([loss_sum.item(), tokens.item()])
    n_tokens = int(tokens)
    return {"loss": loss_sum / max(n_tokens, 1), "tokens": n_tokens}
