"""Sampling: greedy = HF generate, KV cache = no cache, top-k/top-p sets, RNG isolation, UTF-8 stream, CLI."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hf_reference import SMALL, our_twin, random_hf_model

from gpt2repro import GPT, GPTConfig, UserError
from gpt2repro.cli import main
from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.sample import Utf8Stream, filter_logits, next_token
from gpt2repro.tokenizer import get_tokenizer

PROMPT = "Hello, I'm a language model,"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = random_hf_model(GPTConfig(**SMALL), seed=7)
    with torch.no_grad():  # 3x the projection weights: greedy paths that wander instead of repeating a token
        for name, p in hf.named_parameters():
            if p.dim() == 2 and ".h." in name:
                p.mul_(3)
    hf.generation_config.eos_token_id = None  # random weights may pick 50256: generate all 100 tokens
    return our_twin(hf, tmp_path_factory.mktemp("hf")), hf


@pytest.fixture
def micro() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt2-micro", block_size=32)).eval()


def prompt_ids(batch: int = 1) -> torch.Tensor:
    return torch.tensor([get_tokenizer().encode(PROMPT)] * batch)


# ---------------------------------------------------------------------------- greedy and the KV cache
def test_greedy_100_tokens_cache_equals_no_cache_equals_hf_generate(pair):
    ours, hf = pair
    idx = prompt_ids()
    cached = ours.generate(idx, 100, temperature=0)
    uncached = ours.generate(idx, 100, temperature=0, use_cache=False)
    with torch.no_grad():
        reference = hf.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=100,
            do_sample=False,
            pad_token_id=EOT_TOKEN_ID,
        )
    assert cached.shape == (1, idx.size(1) + 100)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)
    assert len(set(cached[0, idx.size(1) :].tolist())) > 20  # not a degenerate repetition


def test_batched_and_sliding_window_generation_cache_equals_no_cache(micro):
    """Past the 32-token context the window slides; the cache is rebuilt and must stay exact."""
    idx = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    cached = micro.generate(idx, 40, temperature=0)
    uncached = micro.generate(idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 60) and torch.equal(cached, uncached)
    # sampling too: the same RNG draws in both paths
    a = micro.generate(idx, 40, top_k=50, generator=torch.Generator().manual_seed(1))
    b = micro.generate(idx, 40, top_k=50, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert torch.equal(a, b)


def test_long_prompt_is_cropped_from_the_left_with_a_warning(micro, caplog):
    idx = torch.randint(0, 50257, (1, 50), generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING, logger="gpt2repro"):  # a log line for users, not a Python warning
        out = micro.generate(idx, 5, temperature=0)
    assert "keeping its last 32 tokens" in caplog.text
    assert torch.equal(out[:, :50], idx)
    assert torch.equal(out[:, 50:], micro.generate(idx[:, -32:], 5, temperature=0)[:, 32:])


def test_stop_token_ends_generation(micro):
    with torch.no_grad():  # make <|endoftext|> the likeliest token everywhere
        micro.transformer.ln_f.weight.zero_()
        micro.transformer.ln_f.bias.copy_(micro.transformer.wte.weight[EOT_TOKEN_ID] * 100)
    idx = prompt_ids(batch=2)
    assert micro.generate(idx, 10, temperature=0, stop_token=EOT_TOKEN_ID).shape == (2, idx.size(1) + 1)
    assert (micro.generate(idx, 10, temperature=0)[:, idx.size(1) :] == EOT_TOKEN_ID).all()


# ---------------------------------------------------------------------------- top-k, top-p, temperature
def allowed_set(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> set[int]:
    """Reference: the k likeliest, intersected with the smallest likeliest prefix of probability >= top_p."""
    order = sorted(range(logits.numel()), key=lambda i: -logits[i].item())
    keep = set(order[:top_k]) if top_k else set(order)
    if top_p is not None:
        kept_logits = [logits[i].item() for i in order if i in keep]
        z = max(kept_logits)
        total = sum(math.exp(v - z) for v in kept_logits)
        prefix, cumulative = set(), 0.0
        for i in (i for i in order if i in keep):
            prefix.add(i)
            cumulative += math.exp(logits[i].item() - z) / total
            if cumulative >= top_p:
                break
        keep = prefix
    return keep


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.5), (20, 0.8), (1, None), (None, 1e-6)])
def test_filter_and_sampling_stay_in_the_allowed_set(top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g) * 3
    filtered = filter_logits(logits, top_k, top_p)
    for row in range(4):
        allowed = allowed_set(logits[row], top_k, top_p)
        assert set(torch.nonzero(filtered[row].isfinite()).flatten().tolist()) == allowed
        draws = next_token(logits[row : row + 1].expand(500, -1), 1.0, top_k, top_p, g).flatten().tolist()
        assert set(draws) <= allowed
        if len(allowed) > 1:
            assert len(set(draws)) > 1  # really sampling, not argmax


def test_generation_never_emits_a_filtered_token(micro):
    """End to end: every emitted token is in the allowed set of the logits the model produced at that step."""
    with torch.no_grad():
        micro.transformer.wte.weight.mul_(20)  # peaked distributions make the sets small
    seen = []
    micro.lm_head.register_forward_hook(lambda m, i, out: seen.append(out[:, -1, :50257].detach().clone()))
    idx = prompt_ids(batch=2)
    temperature, top_k, top_p = 0.7, 40, 0.6
    out = micro.generate(
        idx, 20, temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(4)
    )
    assert len(seen) == 20
    sizes = []
    for step, logits in enumerate(seen):
        for row in range(2):
            allowed = allowed_set(logits[row] / temperature, top_k, top_p)
            sizes.append(len(allowed))
            assert out[row, idx.size(1) + step].item() in allowed
    assert min(sizes) < 40  # top-p really cut below top-k somewhere


def test_top_k_1_and_tiny_top_p_are_greedy(pair):
    ours, _ = pair
    idx = prompt_ids()
    greedy = ours.generate(idx, 20, temperature=0)
    assert torch.equal(ours.generate(idx, 20, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(ours.generate(idx, 20, top_p=1e-9, generator=torch.Generator().manual_seed(0)), greedy)


def test_sampling_uses_only_its_generator(micro):
    idx = prompt_ids(batch=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = micro.generate(idx, 15, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = micro.generate(idx, 15, generator=torch.Generator().manual_seed(5))
    c = micro.generate(idx, 15, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # rows are independent samples


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=-5), "max_new_tokens"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=-3), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_impossible_options_raise_one_clear_error(micro, kwargs, message):
    kwargs = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(UserError, match=message):
        micro.generate(prompt_ids(), kwargs.pop("max_new_tokens"), **kwargs)


def test_bad_prompts(micro):
    with pytest.raises(UserError, match="shape"):
        micro.generate(torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(UserError, match="shape"):
        micro.generate(torch.zeros(5, dtype=torch.long), 3)


# ---------------------------------------------------------------------------- streaming text
def test_utf8_stream_holds_back_partial_characters():
    enc = get_tokenizer()
    text = "Emoji 😀🎉, CJK 日本語の文章, accents déjà vu, math ∮ E⋅da = Q"
    ids = enc.encode(text)
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    partial = [p for p in pieces if not _is_utf8(p)]
    assert partial, "the test needs tokens that split a character"
    stream = Utf8Stream()
    chunks = [stream.push(p) for p in pieces] + [stream.finish()]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    broken = Utf8Stream()  # bytes that never complete a character: U+FFFD, like decode()
    assert broken.push(b"ab\xe6\x97") + broken.finish() == enc.decode([64, 65]) + "\ufffd"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# ---------------------------------------------------------------------------- the CLI
def run_cli(capsys, *args: str) -> str:
    assert main(["sample", *args]) == 0
    return capsys.readouterr().out


def test_cli_streams_exactly_the_decoded_tokens(capsys):
    out = run_cli(
        capsys,
        "--model-preset",
        "gpt2-micro",
        "--greedy",
        "--max-new-tokens",
        "25",
        "--dtype",
        "fp32",
        "--prompt",
        "Naïve café 😀",
    )
    torch.manual_seed(42)  # the CLI seeds the random init with --seed
    model = GPT(GPTConfig.preset("gpt2-micro")).eval()
    idx = torch.tensor([get_tokenizer().encode("Naïve café 😀")])
    assert out == get_tokenizer().decode(model.generate(idx, 25, temperature=0)[0].tolist()) + "\n"


def test_cli_bf16_on_cpu_decodes_with_bf16_weights_not_autocast(capsys, monkeypatch):
    """On CPU, ``--dtype bf16`` casts the weights once (autocast would convert every weight at every
    token): the text is that of the bf16-cast model's own greedy generation, with autocast off. ``auto``
    is fp32 there."""
    import gpt2repro.sample as sample_module

    seen = []
    real = sample_module.print_sample

    def spy(model, *args):
        seen.append((torch.is_autocast_enabled("cpu"), model.lm_head.weight.dtype))
        return real(model, *args)

    monkeypatch.setattr(sample_module, "print_sample", spy)
    args = ["--model-preset", "gpt2-micro", "--greedy", "--max-new-tokens", "20", "--prompt", PROMPT]
    out = run_cli(capsys, *args, "--dtype", "bf16")
    assert seen == [(False, torch.bfloat16)]
    torch.manual_seed(42)  # the CLI seeds the random init with --seed
    model = GPT(GPTConfig.preset("gpt2-micro")).eval().to(torch.bfloat16)
    expected = model.generate(prompt_ids(), 20, temperature=0)[0].tolist()
    assert out == get_tokenizer().decode(expected) + "\n"
    seen.clear()
    run_cli(capsys, *args)  # --dtype auto: fp32 on CPU, whatever the CPU trains fastest in
    assert seen == [(False, torch.float32)]


def test_cli_samples_are_reproducible_and_one_block_each(capsys):
    args = ["--model-preset", "gpt2-micro", "--num-samples", "3", "--max-new-tokens", "12", "--seed", "7"]
    first = run_cli(capsys, *args)
    assert first == run_cli(capsys, *args)
    assert [line for line in first.splitlines() if line.startswith("--- sample")] == [
        "--- sample 1/3 ---",
        "--- sample 2/3 ---",
        "--- sample 3/3 ---",
    ]
    assert first.count(PROMPT) == 3
    assert run_cli(capsys, *args[:-1], "8") != first


def test_cli_model_from_hf_dir_and_run_dir_agree(pair, tmp_path, capsys):
    ours, _ = pair
    from gpt2repro.checkpoint import atomic_save, checkpoint_path

    ours.save_pretrained(tmp_path / "hf")
    atomic_save(
        {"model": ours.state_dict(), "model_config": ours.config.to_dict(), "step": 1},
        checkpoint_path(tmp_path / "run", 1),
    )
    common = ["--max-new-tokens", "10", "--dtype", "fp32", "--top-p", "0.9", "--stop-at-eot", "--no-cache"]
    from_hf = run_cli(capsys, "--model", str(tmp_path / "hf"), *common)
    assert from_hf.startswith(PROMPT) and len(from_hf) > len(PROMPT) + 5
    assert run_cli(capsys, "--model", str(tmp_path / "run"), *common) == from_hf


def test_training_samples_on_cpu_decode_in_fp32_not_under_the_training_autocast(monkeypatch):
    """Samples taken during a bf16 run on CPU: autocast would convert every weight at every token, so they
    decode in sampling's own dtype (fp32), and read as the fp32 model's own seeded generation."""
    from gpt2repro import training_run
    from gpt2repro.sample import SamplingOptions
    from gpt2repro.train_config import TrainConfig

    model = GPT(GPTConfig.preset("gpt2-micro")).eval()
    seen = []
    real = GPT.generate

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate", spy)
    cfg = TrainConfig(num_samples=2, sample_tokens=6, seed=3)
    texts = training_run.sample_texts(model, cfg, torch.device("cpu"), "bf16")
    assert seen == [False] and model.lm_head.weight.dtype == torch.float32  # the model keeps training
    prompt = torch.tensor([get_tokenizer().encode(training_run.SAMPLE_PROMPT)] * 2)
    options = SamplingOptions(top_k=50, generator=torch.Generator().manual_seed(3))
    expected = real(model, prompt, 6, options)
    assert texts == [get_tokenizer().decode(row.tolist()) for row in expected]
