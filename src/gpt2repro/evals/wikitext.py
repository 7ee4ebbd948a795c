"""WikiText-2 as lm-evaluation-harness scores it (its ``wikitext`` task): ``--style harness``.

So that a number compares with lm-eval's (leaderboards, papers, llm.c's eval scripts), every step
follows the harness and the data set it loads (``EleutherAI/wikitext_document_level``,
``wikitext-2-raw-v1``, test split):

- **Pages.** The raw test file is cut into its articles (62 for WikiText-2 test): a line that, once
  ``"= = ="`` → ``"==="`` and ``"= ="`` → ``"=="`` are joined and it is stripped, starts with ``"= "`` and
  ends with ``" ="`` (a level-1 heading) begins a new page; a page of only whitespace is dropped, except
  the last one.
- **Text fed.** Each page after the harness's ``wikitext_detokenizer`` (``" @-@ "`` → ``"-"``, ``" , "`` →
  ``", "``, …).
- **Windows.** Each page on its own, tokenised once and scored from ``<|endoftext|>`` (no context across
  pages): consecutive windows of ``context`` scored tokens, each fed the one token before it; the last,
  shorter one gets as much history as fits (the harness's ``get_rolling_token_windows`` with
  ``context_len=1`` and ``make_disjoint_window``). Every token of the page is scored once.
- **Normalisation.** Words (``len(re.split(r"\\s+", page))``) and UTF-8 bytes of the *original* page,
  summed over pages: ``word_ppl = exp(NLL / words)``, ``byte_ppl = exp(NLL / bytes)``,
  ``bpb = NLL / ln 2 / bytes`` (the harness's ``word_perplexity``, ``byte_perplexity``, ``bits_per_byte``).
"""

from __future__ import annotations

import re

import torch.nn as nn

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.errors import UserError
from gpt2repro.evals.perplexity import DEFAULT_BATCH, perplexity_metrics, resolve_context
from gpt2repro.evals.scoring import DEFAULT_SETUP, EvalSetup, safe_exp
from gpt2repro.tokenizer import get_tokenizer


def _starts_page(line: str) -> bool:
    joined = line.replace("= = =", "===").replace("= =", "==").strip()
    return joined.startswith("= ") and joined.endswith(" =")


def split_pages(text: str) -> list[str]:
    """The articles of a raw WikiText file, each from its ``= Title =`` line, lines joined by ``"\\n"``."""
    pages, lines = [], []
    for line in text.split("\n"):
        if _starts_page(line):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


# (pattern, replacement) in the harness's order; plain strings are replaced literally, compiled ones by regex
_DETOKENIZER_RULES: tuple[tuple[str | re.Pattern, str], ...] = (
    ("s '", "s'"),  # contractions
    (re.compile(r"/' [0-9]/"), r"/'[0-9]/"),
    (" @-@ ", "-"),  # number separators
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),  # punctuation
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),  # brackets and quotes
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="),  # headings and the rest
    ("= = =", "==="),
    ("= =", "=="),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)


def wikitext_detokenizer(text: str) -> str:
    """lm-evaluation-harness's undoing of WikiText's tokenisation artefacts, rule for rule."""
    for pattern, replacement in _DETOKENIZER_RULES:
        if isinstance(pattern, str):
            text = text.replace(pattern, replacement)
        else:
            text = pattern.sub(replacement, text)
    return text


def rolling_windows(tokens: list[int], context: int) -> list[tuple[list[int], list[int]]]:
    """(history, scored tokens) per window of one document, ``context`` tokens fed per window at most.

    The first window scores the first ``context`` tokens after ``<|endoftext|>``; each later one the next
    ``context`` tokens after the single token before them; the last, shorter one is fed the ``context``
    tokens before its end (its history is as long as fits).
    """
    if context < 1:
        raise UserError(f"--context must be a positive integer, got {context}")
    windows = []
    for start in range(0, len(tokens), context):
        end = min(start + context, len(tokens))
        history = [EOT_TOKEN_ID] if start == 0 else tokens[max(0, end - context - 1) : start]
        windows.append((history, tokens[start:end]))
    return windows


def harness_perplexity(
    model: nn.Module,
    text: str,
    setup: EvalSetup = DEFAULT_SETUP,
    *,
    context: int | None = None,
    limit: int | None = None,
) -> dict:
    """lm-eval's ``wikitext`` metrics of a raw WikiText file's text, on its first ``limit`` pages.

    ``context`` (the harness's ``max_length``) defaults to the model's block size capped at 1024.
    Windows of all pages are sharded across ranks together and the sums all-reduced.
    """
    pages = split_pages(text)[:limit]
    context = resolve_context(model, context)
    enc = get_tokenizer()
    windows = [
        w for page in pages for w in rolling_windows(enc.encode_ordinary(wikitext_detokenizer(page)), context)
    ]
    if not windows:
        raise UserError("the text has no tokens to score")
    scores = setup.score(
        model, setup.shard(windows), desc="wikitext2 (harness)", default_batch=DEFAULT_BATCH, unit="win"
    )
    nll, n_tokens = setup.sum_across_ranks([-sum(s.logprob for s in scores), sum(s.n_tokens for s in scores)])
    n_words = sum(len(re.split(r"\s+", page)) for page in pages)
    n_bytes = sum(len(page.encode("utf-8")) for page in pages)
    return {
        **perplexity_metrics(nll, n_tokens, n_words, n_bytes),
        "byte_ppl": safe_exp(nll / n_bytes),
        "style": "harness",
        "pages": len(pages),
        "words": n_words,
        "bytes": n_bytes,
        "windows": len(windows),
        "context": context,
        "stride": context,
        "document_split": "pages by level-1 headings (lm-eval's wikitext_document_level rule)",
        "detokenizer": "lm-eval wikitext_detokenizer",
        "first_token": "scored after <|endoftext|>; each page alone, no context across pages",
        "normalisation": "word_ppl: NLL / len(re.split(r'\\s+', page)) over the original pages; "
        "bpb: NLL / ln 2 / UTF-8 bytes of the original pages",
    }
