"""Shared machinery of every evaluation: batched log-likelihood of continuations, sharding, progress.

All zero-shot tasks reduce to one question: how likely is this continuation after that context? We answer
it for many (context, continuation) pairs at once: pairs are sorted by length (little padding), packed
right-padded into one forward pass, and the LM head is applied only to the positions that are scored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.runtime import autocast


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: summed natural-log probability, its token count, greedy hit."""

    logprob: float
    n_tokens: int
    greedy: bool  # every continuation token is the argmax prediction


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT inside a DDP and/or torch.compile wrapper (evaluation needs neither)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode (no dropout), no autograd; the training flag is restored after (the trainer calls us)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def fit_context(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[int]:
    """The context to feed: EOT if empty (as lm-eval-harness), left-truncated to fit ``max_len`` in all."""
    keep = max_len - len(continuation)
    if keep < 1:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit in a context of {max_len - 1}"
        )
    context = list(context) if len(context) else [EOT_TOKEN_ID]
    return context[-keep:]


def score_continuations(
    model: nn.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    device: torch.device | str,
    dtype: str = "fp32",
    progress: tqdm | None = None,
    requests_per_item: int = 1,
) -> list[ContinuationScore]:
    """Score every (context tokens, continuation tokens) pair; ``batch_size`` pairs per forward pass.

    The sequence fed is ``context + continuation[:-1]`` (the last token is only a target); a continuation
    that would not fit is given less context from the left. ``progress`` advances by one per
    ``requests_per_item`` pairs (e.g. 4 HellaSwag candidates make one example).
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[ContinuationScore | None] = [None] * len(requests)
    with evaluation_mode(model) as gpt:
        max_len = gpt.config.block_size + 1
        rows = []
        for i, (context, continuation) in enumerate(requests):
            if len(continuation) == 0:
                raise ValueError(f"request {i} has an empty continuation")
            rows.append(
                (i, fit_context(context, continuation, max_len) + list(continuation), len(continuation))
            )
        rows.sort(key=lambda r: -len(r[1]))  # longest first: similar lengths share a batch
        done = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for (i, _, _), score in zip(chunk, _score_batch(gpt, chunk, device, dtype), strict=True):
                results[i] = score
            if progress is not None:
                before, done = done // requests_per_item, done + len(chunk)
                progress.update(done // requests_per_item - before)
    return results  # type: ignore[return-value]


def _score_batch(gpt: nn.Module, chunk, device: torch.device, dtype: str) -> list[ContinuationScore]:
    width = max(len(tokens) for _, tokens, _ in chunk) - 1
    idx = torch.zeros((len(chunk), width), dtype=torch.long)
    targets = torch.zeros((len(chunk), width), dtype=torch.long)
    scored = torch.zeros((len(chunk), width), dtype=torch.bool)
    for r, (_, tokens, n_cont) in enumerate(chunk):
        t = torch.tensor(tokens, dtype=torch.long)
        idx[r, : len(t) - 1] = t[:-1]
        targets[r, : len(t) - 1] = t[1:]
        scored[r, len(t) - 1 - n_cont : len(t) - 1] = True
    idx, targets, scored = idx.to(device), targets.to(device), scored.to(device)
    with autocast(device, dtype):
        logits, _ = gpt(idx, positions=scored)  # the head runs on the scored positions only
    logits = logits.float()  # (N, V), rows in (batch, position) order
    wanted = targets[scored]
    # log_softmax picked at the targets, without materialising the (N, V) log-probabilities
    token_logprob = logits.gather(1, wanted.unsqueeze(1)).squeeze(1) - logits.logsumexp(dim=-1)
    token_hit = logits.argmax(dim=-1) == wanted
    counts = scored.sum(dim=1).tolist()
    sums = torch.split(token_logprob.double(), counts)
    hits = torch.split(token_hit, counts)
    return [
        ContinuationScore(float(s.sum()), n, bool(h.all()))
        for s, h, n in zip(sums, hits, counts, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- sharding
def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at ``rank``: disjoint shards that together cover all items."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def sum_across_ranks(values: Sequence[float], world_size: int, device: torch.device | str) -> list[float]:
    """Add per-rank totals (counts, summed log-likelihoods) over all processes; identity on one process."""
    if world_size == 1:
        return [float(v) for v in values]
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    device = torch.device(device)
    if dist.get_backend() == "gloo":
        device = torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "ex") -> tqdm:
    """A tqdm bar showing items/s; ``enabled=False`` (or a non-zero rank) keeps it silent."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def safe_exp(x: float) -> float:
    """exp that returns inf instead of raising for an astronomically bad model."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
