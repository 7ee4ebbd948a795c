"""Packed scoring (continuations sharing one copy of their context) against scoring each pair alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import GPT, GPTConfig
from gpt2repro.evals.scoring import EvalSetup, _pack, harness_encode_pair, score_continuations
from gpt2repro.tokenizer import get_tokenizer


def tiny_model(backend: str = "sdpa") -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=50257, attn_backend=backend)
    return GPT(config).eval()


def alone(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """The definition: feed context + continuation[:-1] by itself, sum the continuation's log-probs."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logits, _ = model(tokens[:, :-1])
    scored = logits[0, len(context) - 1 :].float()
    logprobs = F.log_softmax(scored, dim=-1)
    target = torch.tensor(continuation)
    return float(logprobs.gather(1, target.unsqueeze(1)).sum()), bool((scored.argmax(-1) == target).all())


def requests_with_shared_contexts() -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, 50257, (n,), generator=gen).tolist()

    a, b, c = tokens(9), tokens(4), tokens(1)
    return [
        (a, tokens(3)),
        (a, tokens(1)),
        (a, tokens(6)),
        (a, tokens(2)),  # four endings of one context
        (b, tokens(5)),  # a context of its own
        (c, tokens(8)),
        (c, tokens(8)),
        (c, tokens(8)),
        (c, tokens(8)),
    ]  # 1 + 4*7 > 24: split in two rows


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_packed_scores_equal_each_pair_scored_alone(backend, batch_size):
    model = tiny_model(backend)
    requests = requests_with_shared_contexts()
    scores = score_continuations(model, requests, batch_size=batch_size, device="cpu")
    for (context, continuation), score in zip(requests, scores, strict=True):
        logprob, greedy = alone(model, context, continuation)
        assert score.n_tokens == len(continuation)
        assert score.logprob == pytest.approx(logprob, abs=1e-4)
        assert score.greedy == greedy


def test_packing_shares_a_context_only_while_the_row_fits():
    rows = _pack(requests_with_shared_contexts(), max_len=24)
    assert [len(r.continuations) for r in rows] == [4, 1, 3, 1]
    assert all(len(r) <= 24 for r in rows)
    assert [i for r in rows for i, _ in r.continuations] == list(range(9))


def test_position_ids_and_attention_mask_reproduce_separate_forwards():
    """Two continuations after one context in one row = each fed alone (the model-level contract)."""
    model = tiny_model()
    ctx, x, y = [5, 6, 7], [8, 9], [10, 11, 12]
    row = torch.tensor([ctx + x + y])
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :3, :3] = torch.ones(3, 3).tril().bool()
    mask[0, 3:5, :3] = True
    mask[0, 3:5, 3:5] = torch.ones(2, 2).tril().bool()
    mask[0, 5:, :3] = True
    mask[0, 5:, 5:] = torch.ones(3, 3).tril().bool()
    with torch.no_grad():
        packed, _ = model(row, position_ids=pos, attention_mask=mask)
        first, _ = model(torch.tensor([ctx + x]))
        second, _ = model(torch.tensor([ctx + y]))
    torch.testing.assert_close(packed[0, :5], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[0, 5:], second[0, 3:], atol=1e-5, rtol=0)


def test_harness_encode_pair_is_lm_evals_split():
    """lm-eval's _encode_pair: trailing context whitespace joins the continuation, whole string cut."""
    enc = get_tokenizer()
    context, continuation = harness_encode_pair("He said", " hello")
    assert (context, continuation) == (enc.encode("He said"), enc.encode(" hello"))
    context, continuation = harness_encode_pair("Walk to the ", "door")  # trailing space moves over
    assert context == enc.encode("Walk to the") and continuation == enc.encode(" door")
    context, continuation = harness_encode_pair(
        "x", "\n\nRidley"
    )  # split(' ') targets can open with newlines
    assert context + continuation == enc.encode("x\n\nRidley")
    assert harness_encode_pair("", " a") == (
        [],
        enc.encode(" a"),
    )  # the scorer feeds EOT for an empty context


def test_eval_setup():
    assert EvalSetup().batch(16) == 16 and EvalSetup(batch_size=3).batch(16) == 3
    assert EvalSetup(rank=1, world_size=2).shard(list(range(5))) == [1, 3]
    with pytest.raises(ValueError, match="batch_size"):
        EvalSetup(batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        EvalSetup(rank=2, world_size=2)
