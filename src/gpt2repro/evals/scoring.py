"""Shared machinery of every evaluation: batched log-likelihood of continuations, sharding, progress.

All zero-shot tasks reduce to one question: how likely is this continuation after that context? We answer
it for many (context, continuation) pairs at once: pairs that share a context share one copy of it in a
row, rows are sorted by length (little padding) and right-padded into one forward pass, and the LM head
is applied only to the positions that are scored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.distributed import DistInfo, sum_across_ranks
from gpt2repro.loss import logprobs_at
from gpt2repro.runtime import autocast, evaluation_mode
from gpt2repro.tokenizer import get_tokenizer


@dataclass(frozen=True)
class EvalSetup:
    """Where and how an evaluation runs, the same for every task: one object instead of six keywords.

    ``batch_size`` counts the task's examples per forward pass (HellaSwag items, LAMBADA passages,
    WikiText windows, val sequences); ``None`` takes the task's default. ``rank``/``world_size`` shard
    the examples over torch.distributed processes; the sums are all-reduced, so every rank returns the
    single-process result. ``progress`` shows a bar on rank 0.
    """

    batch_size: int | None = None
    device: torch.device | str = "cpu"
    dtype: str = "fp32"
    rank: int = 0
    world_size: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}"
            )

    @classmethod
    def for_process(
        cls,
        info: DistInfo,
        device: torch.device | str,
        dtype: str,
        *,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> EvalSetup:
        """The setup of this process under torchrun (or alone): rank and world size from ``info``."""
        return cls(batch_size, device, dtype, info.rank, info.world_size, progress)

    def batch(self, default: int) -> int:
        return self.batch_size or default

    def shard(self, items: Sequence) -> list:
        return shard(items, self.rank, self.world_size)

    def sum_across_ranks(self, values: Sequence[float]) -> list[float]:
        return sum_across_ranks(values, self.device, self.world_size)

    def score(
        self,
        model: nn.Module,
        requests: Sequence[tuple[Sequence[int], Sequence[int]]],
        *,
        desc: str,
        default_batch: int,
        per_item: int = 1,
        unit: str = "ex",
    ) -> list[ContinuationScore]:
        """:func:`score_continuations` under this setup: ``batch_size`` items of ``per_item`` requests each
        (e.g. the 4 candidates of a HellaSwag item) per forward pass, a progress bar counting items."""
        with progress_bar(len(requests) // per_item, desc, self.progress and self.rank == 0, unit) as bar:
            return score_continuations(
                model,
                requests,
                batch_size=self.batch(default_batch) * per_item,
                device=self.device,
                dtype=self.dtype,
                progress=bar,
                requests_per_item=per_item,
            )


DEFAULT_SETUP = EvalSetup()  # one process, CPU, fp32, the task's batch size, no progress bar


@dataclass(frozen=True)
class ContinuationScore:
    """Log-likelihood of one continuation: summed natural-log probability, its token count, greedy hit."""

    logprob: float
    n_tokens: int
    greedy: bool  # every continuation token is the argmax prediction


def harness_encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of (context, continuation) as lm-evaluation-harness makes them (``_encode_pair``).

    Trailing whitespace of the context moves to the continuation; the whole string is encoded and cut
    after the context's own tokens, so a BPE merge across the boundary is handled as the harness does.
    An empty context gives no tokens (the scorer then feeds EOT, as the harness's prefix token).
    """
    enc = get_tokenizer()
    if not context:
        return [], enc.encode_ordinary(continuation)
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_tokens = enc.encode_ordinary(stripped)
    whole = enc.encode_ordinary(stripped + continuation)
    return context_tokens, whole[len(context_tokens) :]


def fit_context(context: Sequence[int], continuation: Sequence[int], max_len: int) -> list[int]:
    """The context to feed: EOT if empty (as lm-eval-harness), left-truncated to fit ``max_len`` in all."""
    keep = max_len - len(continuation)
    if keep < 1:
        raise ValueError(
            f"a continuation of {len(continuation)} tokens does not fit in a context of {max_len - 1}"
        )
    context = list(context) if len(context) else [EOT_TOKEN_ID]
    return context[-keep:]


@dataclass
class _PackedRow:
    """One context followed by the inputs of one or more continuations that share it.

    Each continuation's tokens (all but its last, which is only a target) sit after the context at the
    positions they would have right after it, and attend to the context and to themselves only; its first
    token is predicted from the context's last position, which all of them share. A HellaSwag example
    (one context, four endings) is one row instead of four, and its context is computed once.
    """

    context: list[int]
    continuations: list[tuple[int, list[int]]]  # (request index, continuation tokens)

    def __len__(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.continuations)


def _pack(requests, max_len: int) -> list[_PackedRow]:
    """Consecutive requests with the same (fitted) context share a row while it fits the model."""
    rows: list[_PackedRow] = []
    for i, (context, continuation) in enumerate(requests):
        if len(continuation) == 0:
            raise ValueError(f"request {i} has an empty continuation")
        continuation = list(continuation)
        context = fit_context(context, continuation, max_len + 1)
        last = rows[-1] if rows else None
        if last is not None and last.context == context and len(last) + len(continuation) - 1 <= max_len:
            last.continuations.append((i, continuation))
        else:
            rows.append(_PackedRow(context, [(i, continuation)]))
    return rows


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
    """Score every (context tokens, continuation tokens) pair; about ``batch_size`` pairs per forward pass.

    Each pair is scored as if ``context + continuation[:-1]`` were fed alone (the last token is only a
    target); a continuation that would not fit is given less context from the left. Consecutive pairs
    with the same context share one copy of it (``_PackedRow``). ``progress`` advances by one per
    ``requests_per_item`` pairs (e.g. 4 HellaSwag candidates make one example).
    """
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[ContinuationScore | None] = [None] * len(requests)
    with evaluation_mode(model) as gpt:
        rows = _pack(requests, gpt.config.block_size)
        rows.sort(key=lambda r: -len(r))  # longest first: similar lengths share a batch
        done, start = 0, 0
        while start < len(rows):
            chunk, pairs = [], 0
            while start < len(rows) and (not chunk or pairs + len(rows[start].continuations) <= batch_size):
                chunk.append(rows[start])
                pairs += len(rows[start].continuations)
                start += 1
            for i, score in _score_rows(gpt, chunk, device, dtype):
                results[i] = score
            if progress is not None:
                before, done = done // requests_per_item, done + pairs
                progress.update(done // requests_per_item - before)
    return results  # type: ignore[return-value]


def _score_rows(gpt: nn.Module, chunk: list[_PackedRow], device: torch.device, dtype: str):
    """(request index, score) of every continuation in ``chunk``, from one forward pass."""
    width = max(len(row) for row in chunk)
    shared = any(len(row.continuations) > 1 for row in chunk)
    idx = torch.zeros((len(chunk), width), dtype=torch.long)
    scored = torch.zeros((len(chunk), width), dtype=torch.bool)
    pos = torch.arange(width).repeat(len(chunk), 1) if shared else None
    mask = torch.eye(width, dtype=torch.bool).repeat(len(chunk), 1, 1) if shared else None  # pads: self only
    picks: list[tuple[int, list[tuple[int, int]], list[int]]] = []  # (request, [(row, position)], targets)
    for r, row in enumerate(chunk):
        n_ctx = len(row.context)
        idx[r, :n_ctx] = torch.tensor(row.context)
        if shared:
            mask[r, :n_ctx, :n_ctx] = torch.ones(n_ctx, n_ctx, dtype=torch.bool).tril()
        offset = n_ctx
        for i, cont in row.continuations:
            n = len(cont) - 1  # inputs of this continuation
            idx[r, offset : offset + n] = torch.tensor(cont[:-1])
            if shared:
                pos[r, offset : offset + n] = torch.arange(n_ctx, n_ctx + n)
                mask[r, offset : offset + n, :n_ctx] = True
                mask[r, offset : offset + n, offset : offset + n] = torch.ones(n, n, dtype=torch.bool).tril()
            where = [(r, n_ctx - 1)] + [(r, offset + k) for k in range(n)]
            scored[r, n_ctx - 1] = True
            scored[r, offset : offset + n] = True
            picks.append((i, where, cont))
            offset += n
    with autocast(device, dtype):
        logits, _ = gpt(
            idx.to(device),
            logits_at=scored.to(device),  # the head runs on scored positions only
            position_ids=pos.to(device) if shared else None,
            attention_mask=mask.to(device) if shared else None,
        )
    row_of = (scored.flatten().cumsum(0) - 1).view(scored.shape).tolist()  # (row, position) -> ``logits`` row
    flat_rows = torch.tensor([row_of[r][p] for _, where, _ in picks for r, p in where], device=logits.device)
    wanted = torch.tensor([t for _, _, cont in picks for t in cont], device=logits.device)
    # logits (N, V) are in (batch, position) order; a shared context position is asked for once per ending
    token_logprob, token_hit = logprobs_at(logits, flat_rows, wanted)
    counts = [len(cont) for _, _, cont in picks]
    sums = torch.split(token_logprob.double(), counts)
    hits = torch.split(token_hit, counts)
    return [
        (i, ContinuationScore(float(s.sum()), n, bool(h.all())))
        for (i, _, _), s, h, n in zip(picks, sums, hits, counts, strict=True)
    ]


# ---------------------------------------------------------------------------------------------- sharding
def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at ``rank``: disjoint shards that together cover all items."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "ex") -> tqdm:
    """A tqdm bar showing items/s; ``enabled=False`` (or a non-zero rank) keeps it silent."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True, leave=False)


def safe_exp(x: float) -> float:
    """exp that returns inf instead of raising for an astronomically bad model."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf
