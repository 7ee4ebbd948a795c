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
NEWLINE_BEFORE_TARGET = (426, 1053, 2881, 3047, 3977, 4351, 4462)  # line indices in lambada_test.jsonl


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


def hand_loop(model: GPT, items: list[tuple[str, str]]) -> tuple[int, float, int]:
    """(hits, summed NLL, target tokens) with the paper's tokens: encode(prompt), encode(" " + word)."""
    enc = get_tokenizer()
    return hand_loop_tokens(model, [(enc.encode(prompt), enc.encode(" " + word)) for prompt, word in items])


@torch.inference_mode()
def hand_loop_tokens(model: GPT, pairs: list[tuple[list[int], list[int]]]) -> tuple[int, float, int]:
    """(hits, summed NLL, target tokens), one passage at a time, full logits and F.cross_entropy."""
    hits, nll, count = 0, 0.0, 0
    for ctx, target in pairs:
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


def test_the_7_newline_passages_get_lm_evals_targets_only_under_harness_style(shared_data):
    texts = [
        json.loads(line)["text"] for line in (shared_data / LAMBADA).read_text(encoding="utf-8").splitlines()
    ]
    paper = load_lambada(shared_data / LAMBADA)  # the default
    harness = load_lambada(shared_data / LAMBADA, style="harness")
    assert [i for i, (p, h) in enumerate(zip(paper, harness, strict=True)) if p != h] == list(
        NEWLINE_BEFORE_TARGET
    )
    for i in NEWLINE_BEFORE_TARGET:
        words = texts[i].split(" ")  # lambada_openai: doc_to_text = words[:-1]|join(' '), target = words[-1]
        assert harness[i] == (" ".join(words[:-1]), words[-1]) and "\n" in harness[i][1]
        assert paper[i][1] == texts[i].split()[-1] and "\n" not in paper[i][1]
    assert paper[2881][1] == "gloves" and harness[2881][1] == "the\ngloves"


def test_harness_style_scores_lm_evals_pairs(shared_data, tmp_path):
    """On the 7 passages: harness = lm-eval's tokens (whole text encoded, cut after the context)."""
    lines = (shared_data / LAMBADA).read_text(encoding="utf-8").splitlines()
    path = tmp_path / "seven.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in NEWLINE_BEFORE_TARGET))
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro", block_size=256)).eval()
    enc = get_tokenizer()
    pairs = []
    for context, word in load_lambada(path, style="harness"):
        ctx = enc.encode(context)
        pairs.append((ctx, enc.encode(context + " " + word)[len(ctx) :]))
    harness = evaluate_lambada(model, path, EvalSetup(batch_size=3), style="harness")
    hits, nll, count = hand_loop_tokens(model, pairs)
    assert harness["n"] == 7 and harness["target_tokens"] == count and harness["acc"] == hits / 7
    assert harness["ppl"] == pytest.approx(math.exp(nll / 7), rel=1e-5)
    paper = evaluate_lambada(model, path, EvalSetup(batch_size=3))
    hits, nll, count = hand_loop(model, load_lambada(path))
    assert paper["target_tokens"] == count < harness["target_tokens"]  # one word against two
    assert paper["ppl"] == pytest.approx(math.exp(nll / 7), rel=1e-5)
    assert paper["style"] == "paper" and "text.split()[-1]" in paper["target"]
    assert harness["style"] == "harness" and "text.split(' ')[-1]" in harness["target"]


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
    with pytest.raises(UserError, match=r"bad\.jsonl:1: .*needs a space"):
        load_lambada(bad, style="harness")
    bad.write_bytes(b'{"text": "one two"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe binary\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not UTF-8 text"):
        load_lambada(bad)
