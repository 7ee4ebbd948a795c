"""Zero-shot perplexity of a long document (WikiText-2) with a strided sliding window (``--style paper``).

The document is tokenised once. Window *i* starts at ``i * stride`` and feeds at most ``context`` tokens;
it scores only the tokens no earlier window scored, so every token but the first is scored exactly once,
each with at least ``context - stride + 1`` tokens of history (``stride == context`` gives plain
non-overlapping chunks, smaller strides give more context at more compute).

Text: the whole raw file, as is. The GPT-2 paper also ran unreleased "invertible de-tokenizers" over
WikiText's ``@-@``/`` , `` artefacts (worth 2.5-5 ppl there); we do not, so expect higher numbers than the
paper's 29.41 for GPT-2 124M. Word-level perplexity and bits per byte: the total token NLL divided by the
whitespace-separated words / UTF-8 bytes of the text. lm-evaluation-harness's definition (pages, its
detokenizer, rolling windows from EOT) is ``--style harness``, in :mod:`gpt2repro.evals.wikitext`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch.nn as nn

from gpt2repro.errors import UserError
from gpt2repro.evals.scoring import DEFAULT_SETUP, EvalSetup, safe_exp
from gpt2repro.runtime import unwrap
from gpt2repro.tokenizer import get_tokenizer

DEFAULT_STRIDE = 512
DEFAULT_BATCH = 4  # windows per forward pass
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
    """The file as text (universal newlines, like Python's ``open``), or one line saying why not."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"text file {path} does not exist; pass --data with e.g. wikitext-2-raw/wiki.test.raw"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); pass the raw WikiText file") from e
    return text.replace("\r\n", "\n").replace("\r", "\n")


def resolve_context(model: nn.Module, context: int | None) -> int:
    """``context`` or the model's block size capped at GPT-2's 1024; never longer than the model."""
    block_size = unwrap(model).config.block_size
    context = min(block_size, MAX_CONTEXT) if context is None else context
    if context > block_size:
        raise UserError(f"--context {context} is longer than the model's block size {block_size}")
    return context


def perplexity_metrics(nll: float, n_tokens: int, n_words: int, n_bytes: int) -> dict:
    """Per-token loss and perplexity, word perplexity and bits per byte of a total NLL (natural log)."""
    return {
        "loss": nll / n_tokens,
        "ppl": safe_exp(nll / n_tokens),
        "word_ppl": safe_exp(nll / n_words),
        "bpb": nll / math.log(2) / n_bytes,
        "n": int(n_tokens),
    }


def document_perplexity(
    model: nn.Module,
    text: str,
    setup: EvalSetup = DEFAULT_SETUP,
    *,
    stride: int | None = None,
    context: int | None = None,
    limit: int | None = None,
) -> dict:
    """``--style paper``: token/word perplexity and bits per byte of ``text`` (its first ``limit`` tokens).

    ``context`` defaults to the model's block size, capped at 1024 (GPT-2's); ``stride`` to 512, or half
    the context when that is shorter (a small model's block size). Windows are sharded across ranks.
    """
    tokens = get_tokenizer().encode_ordinary(text)
    if limit is not None:
        tokens = tokens[:limit]
        text = get_tokenizer().decode_bytes(tokens).decode("utf-8", errors="replace")
    if len(tokens) < 2:
        raise UserError(f"the text has {len(tokens)} token(s); perplexity needs at least 2")
    context = resolve_context(model, context)
    stride = min(DEFAULT_STRIDE, max(1, context // 2)) if stride is None else stride
    windows = sliding_windows(len(tokens), context, stride)
    requests = [(tokens[b:f], tokens[f:e]) for b, f, e in setup.shard(windows)]
    scores = setup.score(model, requests, desc="wikitext2 (paper)", default_batch=DEFAULT_BATCH, unit="win")
    nll, n_scored = setup.sum_across_ranks([-sum(s.logprob for s in scores), sum(s.n_tokens for s in scores)])
    n_words, n_bytes = len(text.split()), len(text.encode("utf-8"))
    return {
        **perplexity_metrics(nll, n_scored, n_words, n_bytes),
        "style": "paper",
        "tokens": len(tokens),
        "words": n_words,
        "bytes": n_bytes,
        "windows": len(windows),
        "context": context,
        "stride": stride,
        "document_split": "none: the whole file is one document",
        "detokenizer": "none",
        "first_token": "not scored (no <|endoftext|> prefix)",
        "normalisation": "word_ppl: NLL / str.split() words of the text; bpb: NLL / ln 2 / UTF-8 bytes",
    }
