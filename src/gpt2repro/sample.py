"""Autoregressive sampling: KV-cached decoding, temperature, top-k, top-p, greedy.

``stream_tokens`` is the one decoding loop; ``GPT.generate`` and the ``gpt2repro sample`` command both
use it. Randomness comes only from the ``torch.Generator`` passed in, so sampling never disturbs (or
depends on) the global RNG a training run is using.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from gpt2repro.errors import UserError


def check_sampling_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None
) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k <= 0):
        raise UserError(f"top_k must be a positive integer (or None for no limit), got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability ≥ top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from the last-position logits (B, V) -> (B, 1)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def stream_tokens(
    model,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_token: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, shape (B, 1), ``max_new_tokens`` times (or until all stopped).

    The prompt is prefilled once into a KV cache, then one token at a time is fed. A prompt longer than
    the context is cropped from the left (with a warning); once the context is full, the window slides
    and the cache is rebuilt from the most recent tokens.
    """
    check_sampling_options(max_new_tokens, temperature, top_k, top_p)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"prompt must be token ids of shape (batch, time>=1), got shape {tuple(idx.shape)}")
    block_size = model.config.block_size
    if idx.size(1) > block_size:
        warnings.warn(
            f"prompt of {idx.size(1)} tokens is longer than the context ({block_size}); "
            f"keeping its last {block_size} tokens",
            stacklevel=3,
        )
        idx = idx[:, -block_size:]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            context = idx
            done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
            cache = None
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits, _ = model(context[:, -block_size:])
                elif cache is None or cache.length >= block_size:
                    # prefill (again, once the window is full: positions shift, so old keys are stale)
                    cache = model.new_cache(idx.size(0))
                    logits, _ = model(context[:, -block_size:], cache=cache)
                else:
                    logits, _ = model(context[:, -1:], cache=cache)
                token = next_token(logits[:, -1, :], temperature, top_k, top_p, generator)
                if stop_token is not None:
                    token = torch.where(done, torch.full_like(token, stop_token), token)
                    done |= token == stop_token
                context = torch.cat([context, token], dim=1)
                yield token
                if stop_token is not None and bool(done.all()):
                    return
    finally:
        model.train(was_training)
