"""HellaSwag (Zellers et al. 2019), zero-shot, with both scorers that published GPT-2 numbers use.

- ``completion`` (build-nanogpt / llm.c): context = raw ``ctx``, candidate = ``" " + ending``; acc picks the
  highest summed log-likelihood, acc_norm the highest mean log-likelihood per ending *token*.
  GPT-2 124M: acc_norm 0.2955.
- ``harness`` (EleutherAI lm-evaluation-harness): context = ``activity_label + ": " + ctx_a + " " +
  ctx_b.capitalize()`` and every ending go through the harness's preprocessing; acc picks the highest
  summed log-likelihood, acc_norm the highest log-likelihood divided by the ending's *character* length.
  GPT-2 124M: acc_norm 0.3114.

Input: the official ``hellaswag_val.jsonl`` (downloaded and cached when online), or the plain-text
derived file made for llama.cpp (6 lines per item, already harness-preprocessed; harness style only).
The derived file keeps ``ctx_b`` in lower case ("... on a roof. he" where the harness feeds "He"), so
its scores are close to, not identical with, the harness's.
"""

from __future__ import annotations

import bz2
import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn

from gpt2repro.errors import UserError
from gpt2repro.evals.scoring import DEFAULT_SETUP, EvalSetup, harness_encode_pair
from gpt2repro.hub import HELLASWAG_VAL, fetch
from gpt2repro.tokenizer import get_tokenizer

STYLES = ("completion", "harness")
DATA_HINT = "PATH (hellaswag_val.jsonl, or the derived hellaswag_val_full.txt[.bz2] with --style harness)"
N_ENDINGS = 4
LINES_PER_DERIVED_ITEM = 2 + N_ENDINGS  # context, label, 4 endings
DEFAULT_BATCH = 16  # items (of 4 candidates) per forward pass
CONVENTIONS = {
    "completion": {
        "prompt": "ctx (raw)",
        "tokenisation": "encode(ctx) and encode(' ' + ending) separately (build-nanogpt)",
        "normalisation": "acc: summed logprob; acc_norm: logprob / ending tokens",
    },
    "harness": {
        "prompt": "activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize(), harness-preprocessed",
        "tokenisation": "encode(context + ' ' + ending) cut after encode(context) (lm-eval _encode_pair)",
        "normalisation": "acc: summed logprob; acc_norm: logprob / ending characters",
    },
}


@dataclass(frozen=True)
class HellaSwagItem:
    """One question as each scorer sees it; ``completion_*`` is None for the derived text file."""

    label: int
    harness_context: str
    harness_endings: tuple[str, ...]
    completion_context: str | None = None
    completion_endings: tuple[str, ...] | None = None


@dataclass(frozen=True)
class HellaSwagScore:
    """Per-candidate log-likelihoods of one item and the two predictions."""

    label: int
    logprobs: tuple[float, ...]  # summed over the ending's tokens (natural log)
    n_tokens: tuple[int, ...]
    n_chars: tuple[int, ...]  # harness normaliser: characters of the preprocessed ending
    pred: int  # argmax of logprobs
    pred_norm: int  # argmax of logprob/token (completion) or logprob/char (harness)


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning of WikiHow artefacts (one pass of each rule, as there)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


# ------------------------------------------------------------------------------------------ reading
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if raw[:3] == b"BZh":
        try:
            raw = bz2.decompress(raw)
        except (OSError, ValueError) as e:
            raise UserError(f"HellaSwag file {path} looks bz2-compressed but does not decompress: {e}") from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"HellaSwag file {path} is not UTF-8 text (byte {e.start}); is it the right file?"
        ) from e


def _label(value, where: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        label = None
    if label is None or isinstance(value, bool) or not 0 <= label < N_ENDINGS:
        raise UserError(
            f"{where}: label {value!r} is not one of 0..{N_ENDINGS - 1} "
            "(the test split has no labels; use the val split)"
        )
    return label


def _parse_jsonl(text: str, path: Path) -> list[HellaSwagItem]:
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected a JSON object in the official HellaSwag schema")
        missing = [k for k in ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label") if k not in doc]
        if missing:
            raise UserError(f"{where}: missing field(s) {missing} of the official HellaSwag schema")
        endings = doc["endings"]
        if not (
            isinstance(endings, list)
            and len(endings) == N_ENDINGS
            and all(isinstance(e, str) for e in endings)
        ):
            raise UserError(f"{where}: 'endings' must be a list of {N_ENDINGS} strings")
        if not all(isinstance(doc[k], str) for k in ("ctx", "ctx_a", "ctx_b", "activity_label")):
            raise UserError(f"{where}: 'ctx', 'ctx_a', 'ctx_b' and 'activity_label' must be strings")
        query = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        items.append(
            HellaSwagItem(
                label=_label(doc["label"], where),
                harness_context=harness_preprocess(query),
                harness_endings=tuple(harness_preprocess(e) for e in endings),
                completion_context=doc["ctx"],
                completion_endings=tuple(endings),
            )
        )
    return items


def _parse_derived(text: str, path: Path) -> list[HellaSwagItem]:
    lines = text.split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % LINES_PER_DERIVED_ITEM:
        raise UserError(
            f"{path}: {len(lines)} lines is not a multiple of {LINES_PER_DERIVED_ITEM} "
            "(context, label, 4 endings per item); the file is truncated or not the derived HellaSwag text"
        )
    items = []
    for start in range(0, len(lines), LINES_PER_DERIVED_ITEM):
        context, label, *endings = lines[start : start + LINES_PER_DERIVED_ITEM]
        where = f"{path}:{start + 2}"
        if not label.strip().isdigit():
            raise UserError(f"{where}: expected the gold label (0..3) on the second line of each 6-line item")
        items.append(
            HellaSwagItem(label=_label(label, where), harness_context=context, harness_endings=tuple(endings))
        )
    return items


def load_hellaswag(
    path: str | os.PathLike | None, style: str = "auto", limit: int | None = None
) -> tuple[list[HellaSwagItem], str]:
    """Items of the official jsonl or the derived text (format sniffed from the content), first ``limit``,
    and the style to score them with (``auto``: completion for the jsonl, harness for the derived text).

    ``path=None`` takes the official file from the cache, downloading it when online.
    """
    if style not in (*STYLES, "auto"):
        raise UserError(f"unknown HellaSwag style {style!r}; choose one of {', '.join(STYLES)} or auto")
    path = Path(path) if path is not None else fetch(HELLASWAG_VAL, DATA_HINT)
    if not path.is_file():
        raise UserError(
            f"HellaSwag file {path} does not exist; pass --data with hellaswag_val.jsonl or the derived text"
        )
    stat = path.stat()
    items, is_jsonl = _load_file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if style == "auto":
        style = "completion" if is_jsonl else "harness"
    if not is_jsonl and style == "completion":
        raise UserError(
            f"{path} is the derived HellaSwag text (harness-preprocessed contexts, no raw 'ctx'): "
            "it supports only --style harness; for --style completion pass the official hellaswag_val.jsonl"
        )
    return list(items[:limit] if limit is not None else items), style


@functools.lru_cache(maxsize=4)
def _load_file(path: str, size: int, mtime_ns: int) -> tuple[tuple[HellaSwagItem, ...], bool]:
    """Parsed once per file version: the trainer evaluates the same file again and again."""
    text = _read_text(Path(path))
    is_jsonl = text.lstrip().startswith("{")
    items = _parse_jsonl(text, Path(path)) if is_jsonl else _parse_derived(text, Path(path))
    if not items:
        raise UserError(f"{path} holds no HellaSwag items")
    return tuple(items), is_jsonl


# ------------------------------------------------------------------------------------------ scoring
def candidate_tokens(item: HellaSwagItem, style: str) -> list[tuple[list[int], list[int]]]:
    """(context tokens, ending tokens) of the 4 candidates, tokenised the way each reference does it.

    completion: ``encode(ctx)`` and ``encode(" " + ending)`` separately (build-nanogpt).
    harness: encode ``context + " " + ending`` whole and split it after ``len(encode(context))`` tokens
    (lm-evaluation-harness's ``_encode_pair``), so a merge across the boundary is handled as it does.
    """
    enc = get_tokenizer()
    if style == "completion":
        if item.completion_context is None:
            raise UserError("the derived HellaSwag text supports only --style harness")
        context = enc.encode_ordinary(item.completion_context)
        return [(context, enc.encode_ordinary(" " + e)) for e in item.completion_endings]
    return [harness_encode_pair(item.harness_context, " " + ending) for ending in item.harness_endings]


def score_hellaswag(
    model: nn.Module, items: Sequence[HellaSwagItem], setup: EvalSetup = DEFAULT_SETUP, *, style: str
) -> list[HellaSwagScore]:
    """Per-item candidate scores; ``setup.batch_size`` items (4 candidates each) share a forward pass."""
    requests = [pair for item in items for pair in candidate_tokens(item, style)]
    scores = setup.score(
        model, requests, desc=f"hellaswag ({style})", default_batch=DEFAULT_BATCH, per_item=N_ENDINGS
    )
    out = []
    for k, item in enumerate(items):
        cands = scores[k * N_ENDINGS : (k + 1) * N_ENDINGS]
        logprobs = tuple(c.logprob for c in cands)
        n_tokens = tuple(c.n_tokens for c in cands)
        n_chars = tuple(len(e) for e in item.harness_endings)
        norm = n_tokens if style == "completion" else n_chars
        normalised = [lp / max(n, 1) for lp, n in zip(logprobs, norm, strict=True)]
        out.append(
            HellaSwagScore(
                label=item.label,
                logprobs=logprobs,
                n_tokens=n_tokens,
                n_chars=n_chars,
                pred=_argmax(logprobs),
                pred_norm=_argmax(normalised),
            )
        )
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, like numpy


def evaluate_hellaswag(
    model: nn.Module,
    path: str | os.PathLike | None,
    setup: EvalSetup = DEFAULT_SETUP,
    *,
    style: str = "auto",
    limit: int | None = None,
) -> dict:
    """Accuracy and normalised accuracy on the first ``limit`` items (all by default).

    ``style="auto"`` scores the official jsonl build-nanogpt's way (completion) and the derived text
    file the harness way (the only one it supports); the style used is returned with the metrics.
    Items are sharded across ranks and the counts summed, so every rank returns the single-process result.
    """
    items, style = load_hellaswag(path, style, limit)
    scores = score_hellaswag(model, setup.shard(items), setup, style=style)
    correct = sum(s.pred == s.label for s in scores)
    correct_norm = sum(s.pred_norm == s.label for s in scores)
    n, correct, correct_norm = setup.sum_across_ranks([len(scores), correct, correct_norm])
    return {
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "n": int(n),
        "style": style,
        **CONVENTIONS[style],
    }
