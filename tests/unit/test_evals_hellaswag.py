"""HellaSwag: both scorers against a plain one-candidate-at-a-time loop, preprocessing, files, batching."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.evals.hellaswag import (
    evaluate_hellaswag,
    harness_preprocess,
    load_hellaswag,
    score_hellaswag,
)
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.model import GPT
from gpt2repro.tokenizer import get_tokenizer

DERIVED = "hellaswag/derived-not-original/hellaswag_val_full.txt.bz2"

# Hand-written items in the official hellaswag_val.jsonl schema (the wording imitates real items).
EXAMPLES = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
    },
    {
        "ind": 100,
        "activity_label": "Personal Care and Style",
        "ctx_a": "[header] How to dye your hair with kool aid [title] Wash your hair.  [step] Rinse it well.",
        "ctx_b": "",
        "ctx": "[header] How to dye your hair with kool aid [title] Wash your hair.  [step] Rinse it well.",
        "endings": [
            "[title] Mix the kool aid with hot water.",
            "Eat  the kool aid [step] slowly.",
            "Paint the wall [substeps] blue.",
            "Call a friend.",
        ],
        "source_id": "wikihow~123",
        "split": "val",
        "split_type": "zeroshot",
        "label": "0",
    },
    {
        "ind": 7,
        "activity_label": "Clean and jerk",
        "ctx_a": "A lady walks to a barbell. She bends down.",
        "ctx_b": "the lady",
        "ctx": "A lady walks to a barbell. She bends down. the lady",
        "endings": [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        "source_id": "activitynet~v_-lJS58hyo1c",
        "split": "val",
        "split_type": "zeroshot",
        "label": 3,
    },
]
# What lm-evaluation-harness feeds for these items (worked out by hand from its rules).
HARNESS_CONTEXTS = [
    "Roof shingle removal: A man is sitting on a roof. He",
    # " [title]" -> ". ", brackets dropped, ONE pass of "  " -> " " (3 spaces become 2, as in the harness)
    "Personal Care and Style: How to dye your hair with kool aid. Wash your hair.  Rinse it well.",
    "Clean and jerk: A lady walks to a barbell. She bends down. The lady",
]
# "[title]" at the very start has no space before it, so it is only deleted and its space stays (harness too)
HARNESS_ENDINGS_1 = [
    " Mix the kool aid with hot water.",
    "Eat the kool aid slowly.",
    "Paint the wall blue.",
    "Call a friend.",
]


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig.preset("gpt2-micro"))
    with torch.no_grad():
        m.transformer.wte.weight.mul_(30)  # spread the logits so candidates differ clearly
    return m.eval()


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    return path


@torch.inference_mode()
def reference_logprob(model: GPT, context: list[int], ending: list[int]) -> float:
    """Summed log-probability of ``ending`` after ``context``: one candidate, full logits, F.cross_entropy."""
    tokens = torch.tensor(context + ending)
    logits, _ = model(tokens[None, :-1])
    return -F.cross_entropy(logits[0, len(context) - 1 :], tokens[len(context) :], reduction="sum").item()


def test_harness_preprocess_title_header_and_double_spaces(jsonl):
    text = " Making tea [header] Boil water [title] Pour it.  Wait [step] a minute.  "
    assert harness_preprocess(text) == "Making tea Boil water. Pour it. Wait a minute."
    items, style = load_hellaswag(jsonl, "harness")
    assert style == "harness"
    assert [i.harness_context for i in items] == HARNESS_CONTEXTS
    assert list(items[1].harness_endings) == HARNESS_ENDINGS_1


def test_completion_scorer_matches_reference_loop(model, jsonl):
    enc = get_tokenizer()
    items, _ = load_hellaswag(jsonl, "completion")
    scores = score_hellaswag(model, items, EvalSetup(batch_size=2), style="completion")
    for example, score in zip(EXAMPLES, scores, strict=True):
        ctx = enc.encode(example["ctx"])
        ends = [enc.encode(" " + e) for e in example["endings"]]
        ref_sum = [reference_logprob(model, ctx, e) for e in ends]
        ref_mean = [s / len(e) for s, e in zip(ref_sum, ends, strict=True)]
        assert score.logprobs == pytest.approx(ref_sum, rel=1e-5, abs=1e-4)
        assert score.n_tokens == tuple(len(e) for e in ends)
        assert [s / n for s, n in zip(score.logprobs, score.n_tokens, strict=True)] == pytest.approx(
            ref_mean, rel=1e-5, abs=1e-4
        )
        assert score.pred == max(range(4), key=lambda i: ref_sum[i])  # lowest summed loss
        assert score.pred_norm == max(range(4), key=lambda i: ref_mean[i])  # lowest mean loss
        assert score.label == int(example["label"])
    # the scorer must be able to disagree with itself across normalisations, or acc_norm tests nothing
    assert any(s.pred != s.pred_norm for s in scores)


def test_harness_scorer_matches_reference_loop(model, jsonl):
    enc = get_tokenizer()
    items, _ = load_hellaswag(jsonl, "harness")
    scores = score_hellaswag(model, items, EvalSetup(batch_size=3), style="harness")
    for k, (example, score) in enumerate(zip(EXAMPLES, scores, strict=True)):
        context = HARNESS_CONTEXTS[k]
        endings = [harness_preprocess(e) for e in example["endings"]]
        ctx = enc.encode(context)
        ends = [enc.encode(context + " " + e)[len(ctx) :] for e in endings]
        ref_sum = [reference_logprob(model, ctx, e) for e in ends]
        ref_char = [s / len(e) for s, e in zip(ref_sum, endings, strict=True)]
        assert score.logprobs == pytest.approx(ref_sum, rel=1e-5, abs=1e-4)
        assert score.n_chars == tuple(len(e) for e in endings)
        assert score.pred == max(range(4), key=lambda i: ref_sum[i])
        assert score.pred_norm == max(range(4), key=lambda i: ref_char[i])


def test_evaluate_counts_predictions(model, jsonl):
    items, _ = load_hellaswag(jsonl, "completion")
    scores = score_hellaswag(model, items, style="completion")
    res = evaluate_hellaswag(model, jsonl, style="completion")
    assert res["n"] == 3 and res["style"] == "completion"
    assert res["acc"] == pytest.approx(sum(s.pred == s.label for s in scores) / 3)
    assert res["acc_norm"] == pytest.approx(sum(s.pred_norm == s.label for s in scores) / 3)
    assert evaluate_hellaswag(model, jsonl)["style"] == "completion"  # auto for the jsonl


def test_batched_equals_unbatched_on_derived_file(model, shared_data):
    items, style = load_hellaswag(shared_data / DERIVED, "auto", limit=4)
    assert style == "harness"
    # the same contexts with the endings reversed: candidates of different items share a batch
    items += [dataclasses.replace(i, harness_endings=i.harness_endings[::-1]) for i in items]
    one = score_hellaswag(model, items, EvalSetup(batch_size=1), style=style)
    many = score_hellaswag(model, items, EvalSetup(batch_size=4), style=style)
    for a, b in zip(one, many, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, rel=1e-5, abs=1e-4)
        assert (a.pred, a.pred_norm) == (b.pred, b.pred_norm)
    assert one[0].logprobs == pytest.approx(one[4].logprobs[::-1], rel=1e-5, abs=1e-4)


def test_derived_file_layout(shared_data):
    items, _ = load_hellaswag(shared_data / DERIVED, "harness")
    assert len(items) == 10042
    assert [sum(i.label == k for i in items) for k in range(4)] == [2515, 2485, 2584, 2458]  # per SOURCES.md
    first = items[0]
    assert first.harness_context == "Roof shingle removal: A man is sitting on a roof. he"
    assert first.label == 3 and first.harness_endings[3] == "starts pulling up roofing on a roof."
    assert first.completion_context is None


# ------------------------------------------------------------------------------------------ bad input
def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_hellaswag(tmp_path / "nope.jsonl", "completion")


def test_malformed_jsonl_line_names_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + '{"ctx": "oops",\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: not valid JSON"):
        load_hellaswag(path, "completion")


def test_label_out_of_range(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + json.dumps({**EXAMPLES[2], "label": 4}) + "\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: label 4 is not one of 0\.\.3"):
        load_hellaswag(path, "harness")


def test_completion_style_on_derived_file_is_refused(shared_data):
    with pytest.raises(UserError, match="supports only --style harness"):
        load_hellaswag(shared_data / DERIVED, "completion")


def test_truncated_derived_file(tmp_path):
    path = tmp_path / "derived.txt"
    path.write_text("Ctx: a man\n2\nend one\nend two\nend three\n")
    with pytest.raises(UserError, match="not a multiple of 6"):
        load_hellaswag(path, "harness")
