"""Sliding-window perplexity: every token scored once, stride == context is plain chunking, uniform = V."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config import GPT2_VOCAB_SIZE, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.evals.perplexity import document_perplexity, read_text, sliding_windows
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.model import GPT
from gpt2repro.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt2-micro", block_size=64)).eval()


@pytest.fixture()
def text(shared_data) -> str:
    # the first ~2.4k characters of WikiText-2 test (a few hundred tokens, many windows at context 64)
    return read_text(shared_data / "wikitext-2-raw" / "wiki.test.raw")[:2400]


@pytest.mark.parametrize(
    "n_tokens,context,stride",
    [
        (2, 8, 4),
        (10, 8, 8),
        (1000, 64, 16),
        (1000, 64, 64),
        (1000, 64, 1),
        (65, 64, 32),
        (66, 64, 32),
        (300, 7, 3),
    ],
)
def test_windows_score_every_token_but_the_first_exactly_once(n_tokens, context, stride):
    windows = sliding_windows(n_tokens, context, stride)
    scored = [t for _, first, end in windows for t in range(first, end)]
    assert scored == list(range(1, n_tokens))  # once each, in order: n_tokens - 1 in all
    for begin, first, end in windows:
        assert end - 1 - begin <= context  # fed tokens fit the context
        assert first - begin >= min(first, context - stride + 1)  # history of the first scored token


def test_token_count_is_tokens_minus_one(model, text):
    res = document_perplexity(model, text, stride=32)
    n = len(get_tokenizer().encode_ordinary(text))
    assert res["tokens"] == n and res["n"] == n - 1
    assert res["context"] == 64


@torch.inference_mode()
def test_stride_equal_to_context_is_non_overlapping_chunks(model, text):
    C = 64
    res = document_perplexity(model, text, EvalSetup(batch_size=3), stride=C, context=C)
    tokens = torch.tensor(get_tokenizer().encode_ordinary(text))
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, C):  # chunk = C inputs and the C next tokens as targets
        chunk = tokens[start : start + C + 1]
        logits, _ = model(chunk[None, :-1])
        nll += F.cross_entropy(logits[0], chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    assert res["n"] == count == len(tokens) - 1
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


@torch.inference_mode()
def test_smaller_stride_gives_each_token_more_context(model, text):
    """Reference: score token t with exactly the history its window gives it, one token at a time."""
    C, S = 12, 4
    res = document_perplexity(model, text[:200], EvalSetup(batch_size=2), stride=S, context=C)
    tokens = torch.tensor(get_tokenizer().encode_ordinary(text[:200]))
    assert res["windows"] >= 5
    nll = 0.0
    for t in range(1, len(tokens)):
        begin = 0 if t <= C else ((t - C - 1) // S + 1) * S  # first window whose reach (begin + C) covers t
        logits, _ = model(tokens[None, begin:t])
        nll += F.cross_entropy(logits[0, -1:], tokens[t : t + 1], reduction="sum").item()
    assert res["loss"] == pytest.approx(nll / (len(tokens) - 1), rel=1e-5)


def test_uniform_model_has_perplexity_vocab_size(text):
    model = GPT(GPTConfig.preset("gpt2-micro", block_size=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()  # tied head: every logit is 0, every token has p = 1/50257
    res = document_perplexity(model, text)
    assert res["ppl"] == pytest.approx(GPT2_VOCAB_SIZE, rel=1e-5)
    nll = res["n"] * math.log(GPT2_VOCAB_SIZE)
    assert res["word_ppl"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-5)
    assert res["bpb"] == pytest.approx(nll / math.log(2) / len(text.encode("utf-8")), rel=1e-5)
    assert res["words"] == len(text.split()) and res["bytes"] == len(text.encode("utf-8"))


def test_limit_counts_tokens(model, text):
    res = document_perplexity(model, text, limit=100)
    assert res["tokens"] == 100 and res["n"] == 99


def test_bad_options(model, text, tmp_path):
    with pytest.raises(UserError, match="stride"):
        document_perplexity(model, text, stride=100, context=64)
    with pytest.raises(UserError, match="block size"):
        document_perplexity(model, text, context=128)
    with pytest.raises(UserError, match="does not exist"):
        read_text(tmp_path / "wiki.test.raw")
