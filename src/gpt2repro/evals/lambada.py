"""LAMBADA (Paperno et al. 2016), OpenAI's version used for GPT-2: predict a passage's final word.

Target = the last whitespace-separated word; the prompt is the text before it with the separating
whitespace removed, and the target tokens are ``encode(" " + word)`` (as lm-evaluation-harness's
``lambada_openai``, which splits on the last space; in 7 of the 5,153 passages the separator is a
newline, and we still take only the last word). ``acc``: every target token is the greedy argmax.
``ppl``: exp of the mean NLL of the whole target word (per word, the harness and GPT-2 paper convention);
``token_ppl``/``loss`` are per target token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from gpt2repro.distributed import sum_across_ranks
from gpt2repro.errors import UserError
from gpt2repro.evals.scoring import progress_bar, safe_exp, score_continuations, shard
from gpt2repro.tokenizer import get_tokenizer


def split_target(text: str) -> tuple[str, str]:
    """(prompt, final word): the last whitespace-separated word, the prompt without trailing whitespace."""
    stripped = text.rstrip()
    words = stripped.split()
    if len(words) < 2:
        raise ValueError("a LAMBADA passage needs at least two words")
    word = words[-1]
    return stripped[: len(stripped) - len(word)].rstrip(), word


def load_lambada(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, target word) of each line of the OpenAI jsonl ({"text": ...} per line); first ``limit``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LAMBADA file {path} does not exist; pass --data with OpenAI's lambada_test.jsonl")
    items = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise UserError(
                    f"{path}:{lineno}: expected an object with a string 'text' (OpenAI's LAMBADA jsonl)"
                )
            try:
                items.append(split_target(doc["text"]))
            except ValueError as e:
                raise UserError(f"{path}:{lineno}: {e}") from e
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise UserError(f"{path} holds no LAMBADA passages")
    return items


def lambada_requests(items: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    enc = get_tokenizer()
    return [(enc.encode_ordinary(prompt), enc.encode_ordinary(" " + word)) for prompt, word in items]


def evaluate_lambada(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: str = "fp32",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> dict:
    """Final-word accuracy and perplexity; passages sharded across ranks, sums all-reduced."""
    items = shard(load_lambada(path, limit), rank, world_size)
    with progress_bar(len(items), "lambada", progress and rank == 0) as bar:
        scores = score_continuations(
            model, lambada_requests(items), batch_size=batch_size, device=device, dtype=dtype, progress=bar
        )
    totals = [
        len(scores),
        sum(s.greedy for s in scores),
        -sum(s.logprob for s in scores),
        sum(s.n_tokens for s in scores),
    ]
    n, hits, nll, n_tokens = sum_across_ranks(totals, device, world_size)
    return {
        "acc": hits / n,
        "ppl": safe_exp(nll / n),
        "loss": nll / n_tokens,
        "token_ppl": safe_exp(nll / n_tokens),
        "n": int(n),
        "target_tokens": int(n_tokens),
    }
