"""LAMBADA (Paperno et al. 2016), OpenAI's version used for GPT-2: predict a passage's final word.

Two definitions of the target (``style``), the only place where they differ:

- ``paper`` (default): the last whitespace-separated word; the prompt is the text before it with the
  separating whitespace removed, and the target tokens are ``encode(" " + word)``.
- ``harness`` (lm-evaluation-harness's ``lambada_openai``): the text after the last *space*,
  ``text.split(" ")[-1]``; context = the text before that space. Tokens as the harness's
  ``_encode_pair``: the whole text encoded and cut after the context's tokens. In 7 of the 5,153
  passages (indices 426, 1053, 2881, 3047, 3977, 4351, 4462) a newline precedes the last word, so the
  harness's target holds two words there.

``acc``: every target token is the greedy argmax. ``ppl``: exp of the mean NLL of the whole target (per
passage, the harness and GPT-2 paper convention); ``token_ppl``/``loss`` are per target token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch.nn as nn

from gpt2repro.errors import UserError
from gpt2repro.evals.scoring import DEFAULT_SETUP, EvalSetup, harness_encode_pair, safe_exp
from gpt2repro.tokenizer import get_tokenizer

STYLES = ("paper", "harness")
DEFAULT_BATCH = 16  # passages per forward pass
CONVENTIONS = {
    "paper": {
        "target": "last whitespace-separated word (text.split()[-1])",
        "tokenisation": "encode(prompt) and encode(' ' + word) separately",
    },
    "harness": {
        "target": "text after the last space (text.split(' ')[-1], lm-eval lambada_openai)",
        "tokenisation": "encode(text) cut after encode(context) (lm-eval _encode_pair)",
    },
}


def split_target(text: str) -> tuple[str, str]:
    """``paper``: (prompt, final word), the last whitespace-separated word, the prompt without trailing
    whitespace."""
    stripped = text.rstrip()
    words = stripped.split()
    if len(words) < 2:
        raise ValueError("a LAMBADA passage needs at least two words")
    word = words[-1]
    return stripped[: len(stripped) - len(word)].rstrip(), word


def harness_split(text: str) -> tuple[str, str]:
    """``harness``: (context, target) split at the last space, as ``lambada_openai``'s templates do."""
    if " " not in text:
        raise ValueError("a LAMBADA passage needs a space before its last word")
    context, target = text.rsplit(" ", 1)
    return context, target


def read_passages(path: str | os.PathLike, limit: int | None = None) -> list[tuple[int, str]]:
    """(line number, ``text``) of each line of the OpenAI jsonl, the first ``limit``; a bad line is a
    one-line error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LAMBADA file {path} does not exist; pass --data with OpenAI's lambada_test.jsonl")
    texts = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line); "
                "pass OpenAI's lambada_test.jsonl"
            ) from e
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
        texts.append((lineno, doc["text"]))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise UserError(f"{path} holds no LAMBADA passages")
    return texts


def load_lambada(
    path: str | os.PathLike, limit: int | None = None, style: str = "paper"
) -> list[tuple[str, str]]:
    """(context, target word) of each passage under ``style``; the first ``limit`` passages."""
    if style not in STYLES:
        raise UserError(f"unknown LAMBADA style {style!r}; choose one of {', '.join(STYLES)}")
    split = split_target if style == "paper" else harness_split
    items = []
    for lineno, text in read_passages(path, limit):
        try:
            items.append(split(text))
        except ValueError as e:
            raise UserError(f"{path}:{lineno}: {e}") from e
    return items


def lambada_requests(
    items: Sequence[tuple[str, str]], style: str = "paper"
) -> list[tuple[list[int], list[int]]]:
    """Token pairs of (context, " " + target), tokenised the way ``style`` defines."""
    if style == "harness":
        return [harness_encode_pair(context, " " + word) for context, word in items]
    enc = get_tokenizer()
    return [(enc.encode_ordinary(prompt), enc.encode_ordinary(" " + word)) for prompt, word in items]


def evaluate_lambada(
    model: nn.Module,
    path: str | os.PathLike,
    setup: EvalSetup = DEFAULT_SETUP,
    *,
    style: str = "paper",
    limit: int | None = None,
) -> dict:
    """Final-word accuracy and perplexity; passages sharded across ranks, sums all-reduced."""
    items = setup.shard(load_lambada(path, limit, style))
    scores = setup.score(
        model, lambada_requests(items, style), desc=f"lambada ({style})", default_batch=DEFAULT_BATCH
    )
    totals = [
        len(scores),
        sum(s.greedy for s in scores),
        -sum(s.logprob for s in scores),
        sum(s.n_tokens for s in scores),
    ]
    n, hits, nll, n_tokens = setup.sum_across_ranks(totals)
    return {
        "acc": hits / n,
        "ppl": safe_exp(nll / n),
        "loss": nll / n_tokens,
        "token_ppl": safe_exp(nll / n_tokens),
        "n": int(n),
        "target_tokens": int(n_tokens),
        "style": style,
        **CONVENTIONS[style],
        "normalisation": "ppl: exp(mean NLL per passage target); loss, token_ppl: per target token",
    }
