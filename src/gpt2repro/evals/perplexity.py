"""Zero-shot perplexity of a long document (WikiText-2) with a strided sliding window.

The document is tokenised once. Window *i* starts at ``i * stride`` and feeds at most ``context`` tokens;
it scores only the tokens no earlier window scored, so every token but the first is scored exactly once,
each with at least ``context - stride + 1`` tokens of history (``stride == context`` gives plain
non-overlapping chunks, smaller strides give more context at more compute).

Text: the whole raw file, as is. The GPT-2 paper also ran unreleased "invertible de-tokenizers" over
WikiText's ``@-@``/`` , `` artefacts (worth 2.5-5 ppl there); we do not, so expect higher numbers than the
paper's 29.41 for GPT-2 124M. Word-level perplexity and bits per byte follow lm-evaluation-harness: the
total token NLL divided by the whitespace-separated words / UTF-8 bytes of the original text.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn

from gpt2repro.distributed import sum_across_ranks
from gpt2repro.errors import UserError
from gpt2repro.evals.scoring import (
    progress_bar,
    safe_exp,
    score_continuations,
    shard,
)
from gpt2repro.runtime import unwrap
from gpt2repro.tokenizer import get_tokenizer

DEFAULT_STRIDE = 512
MAX_CONTEXT = 1024


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_target, end) per window: feed tokens[begin:end-1], score targets [first_target, end)."""
    if context < 1 or not 1 <= stride <= context:
        raise UserError(f"need 1 <= stride <= context, got stride={stride}, context={context}")
    windows, scored_until, begin = [], 1, 0
    while scored_until < n_tokens:
        end = min(begin + context + 1, n_tokens)
        windows.append((begin, scored_until, end))
        scored_until, begin = end, begin + stride
    return windows


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"text file {path} does not exist; pass --data with e.g. wikitext-2-raw/wiki.test.raw"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); pass the raw WikiText file") from e


def document_perplexity(
    model: nn.Module,
    text: str,
    *,
    stride: int | None = None,
    context: int | None = None,
    limit: int | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Token perplexity, word perplexity and bits per byte of ``text`` (its first ``limit`` tokens).

    ``context`` defaults to the model's block size, capped at 1024 (GPT-2's); ``stride`` to 512, or half
    the context when that is shorter (a small model's block size). Windows are sharded
    across ranks and the NLL sums all-reduced, so every rank returns the single-process result.
    """
    tokens = get_tokenizer().encode_ordinary(text)
    if limit is not None:
        tokens = tokens[:limit]
        text = get_tokenizer().decode_bytes(tokens).decode("utf-8", errors="replace")
    if len(tokens) < 2:
        raise UserError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    context = context or min(unwrap(model).config.block_size, MAX_CONTEXT)
    if context > unwrap(model).config.block_size:
        raise UserError(
            f"context {context} is longer than the model's block size {unwrap(model).config.block_size}"
        )
    stride = stride or min(DEFAULT_STRIDE, max(1, context // 2))
    windows = sliding_windows(len(tokens), context, stride)
    requests = [(tokens[b:f], tokens[f:e]) for b, f, e in shard(windows, rank, world_size)]
    with progress_bar(len(requests), "perplexity", progress and rank == 0, unit="win") as bar:
        scores = score_continuations(
            model, requests, batch_size=batch_size, device=device, dtype=dtype, progress=bar
        )
    nll = -sum(s.logprob for s in scores)
    n_scored = sum(s.n_tokens for s in scores)
    nll, n_scored = sum_across_ranks([nll, n_scored], device, world_size)
    n_words = len(text.split())
    n_bytes = len(text.encode("utf-8"))
    return {
        "loss": nll / n_scored,
        "ppl": safe_exp(nll / n_scored),
        "word_ppl": safe_exp(nll / n_words),
        "bpb": nll / math.log(2) / n_bytes,
        "n": int(n_scored),
        "tokens": len(tokens),
        "words": n_words,
        "bytes": n_bytes,
        "windows": len(windows),
        "stride": stride,
        "context": context,
    }
