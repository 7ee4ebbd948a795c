"""LAMBADA: OpenAI's target-word split, and accuracy/perplexity equal to a hand loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.evals.lambada import evaluate_lambada, load_lambada, split_target
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.model import GPT
from gpt2repro.tokenizer import get_tokenizer

LAMBADA = "lambada/lambada_test.jsonl"


def copy_model() -> GPT:
    """A GPT whose greedy prediction is the current input token: blocks add nothing, no positions, tied head.

    Its logits at a position are wte @ LayerNorm(wte[token]), largest for the token itself, so a passage
    is predicted correctly exactly when its final word is one token repeating the token before it.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro", block_size=256))
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return model.eval()


@torch.inference_mode()
def hand_loop(model: GPT, items: list[tuple[str, str]]) -> tuple[int, float, int]:
    """(hits, summed NLL, target tokens), one passage at a time, full logits and F.cross_entropy."""
    enc = get_tokenizer()
    hits, nll, count = 0, 0.0, 0
    for prompt, word in items:
        ctx, target = enc.encode(prompt), enc.encode(" " + word)
        tokens = torch.tensor(ctx + target)
        logits, _ = model(tokens[None, :-1])
        scored = logits[0, len(ctx) - 1 :]
        nll += F.cross_entropy(scored, tokens[len(ctx) :], reduction="sum").item()
        hits += bool((scored.argmax(-1) == tokens[len(ctx) :]).all())
        count += len(target)
    return hits, nll, count


def test_target_is_the_last_whitespace_separated_word(shared_data):
    lines = (shared_data / LAMBADA).read_text(encoding="utf-8").splitlines()
    items = load_lambada(shared_data / LAMBADA)
    assert len(items) == len(lines) == 5153
    newline_separated = 0
    for line, (prompt, word) in zip(lines, items, strict=True):
        text = json.loads(line)["text"]
        assert word == text.split()[-1]
        if text.rsplit(" ", 1)[1] == word:  # OpenAI / lm-eval-harness: split at the last space
            assert prompt == text.rsplit(" ", 1)[0]
        else:
            newline_separated += 1
            assert prompt == text[: text.rindex(word)].rstrip()
    assert newline_separated == 7
    assert split_target('He said "go home"') == ('He said "go', 'home"')
    assert split_target("a  b \n") == ("a", "b")


def test_accuracy_and_perplexity_on_20_passages_equal_hand_loop(shared_data):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro", block_size=256)).eval()
    items = load_lambada(shared_data / LAMBADA, limit=20)
    res = evaluate_lambada(model, shared_data / LAMBADA, EvalSetup(batch_size=6), limit=20)
    hits, nll, count = hand_loop(model, items)
    assert res["n"] == 20 and res["target_tokens"] == count
    assert res["acc"] == hits / 20
    assert res["ppl"] == pytest.approx(math.exp(nll / 20), rel=1e-5)
    assert res["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_greedy_accuracy_counts_exact_hits(tmp_path):
    """With the copy model the right answers are known: single-token words that repeat the previous token."""
    passages = [
        "The coach shouted at them to run run",  # hit: " run" after " run"
        "She waved and said bye bye",  # hit
        "The answer was no",  # miss
        "They kept saying the same word: Zyzzyva Zyzzyva",  # miss: a multi-token word
        "He counted one two three four",  # miss
    ]
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    model = copy_model()
    res = evaluate_lambada(model, path, EvalSetup(batch_size=2))
    hits, nll, _ = hand_loop(model, load_lambada(path))
    assert hits == 2 and res["acc"] == pytest.approx(2 / 5)
    assert res["ppl"] == pytest.approx(math.exp(nll / 5), rel=1e-5)


def test_bad_input(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_lambada(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one two"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_lambada(bad)
    bad.write_text('{"text": "one two"}\n{"txt": "one two"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: expected an object with a string 'text'"):
        load_lambada(bad)
    bad.write_text('{"text": "lonely"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: .*at least two words"):
        load_lambada(bad)
