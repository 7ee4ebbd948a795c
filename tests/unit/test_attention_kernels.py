"""CPU attention kernels: bf16 attention in fp32 against torch's bf16 kernel, and the decode cache's dtype."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import GPT, GPTConfig, attention_kernels, calibration, kernels


@pytest.mark.parametrize("kind", ["causal", "mask", "full"])
def test_bf16_attention_in_fp32_is_torch_bf16_attention_up_to_rounding(kind, monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).tril() if kind == "mask" else None
    grad_out = torch.randn(2, 3, 9, 16)
    results = {}
    for kernel in ("fp32", "native"):
        monkeypatch.setenv(kernels.BF16_KERNEL_ENV, kernel)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        causal = kind == "causal"
        y = attention_kernels.scaled_dot_product_attention(*leaves, attn_mask=mask, is_causal=causal)
        (y.float() * grad_out).sum().backward()
        results[kernel] = [y, *(t.grad for t in leaves)]
    exact = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, is_causal=kind == "causal"
    )
    assert torch.equal(results["fp32"][0], exact.bfloat16())
    for got, expected in zip(results["fp32"], results["native"], strict=True):
        assert got.dtype == expected.dtype == torch.bfloat16
        assert (got.float() - expected.float()).abs().max() <= 2**-6 * expected.float().abs().max()


def decode_logits(model: GPT, cache, steps: int = 6) -> list[torch.Tensor]:
    """Logits of a prefill of 5 tokens, then of ``steps`` greedy tokens fed one at a time."""
    idx = torch.tensor([[464, 3290, 318, 257, 1332]])
    logits, _ = model(idx, cache=cache, last_only=True)
    seen = [logits]
    for _ in range(steps):
        logits, _ = model(logits[:, -1:].argmax(-1), cache=cache)
        seen.append(logits)
    return seen


@pytest.fixture(autouse=True)
def decode_by_f_linear(monkeypatch):
    """Decode products by F.linear throughout: a compiled GEMV paid for in mid-test would change rounding."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "linear")


@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
@torch.inference_mode()
def test_an_fp32_cache_decodes_a_bf16_model_exactly_as_fp32_attention_over_a_bf16_cache(backend, monkeypatch):
    """The fp32 cache holds the bf16-rounded keys and values, so attention over it is the fp32 attention
    kernel's over a bf16 cache, bit for bit: the cache changes the speed, not one logit. The explicit
    backend brings the cache to the weights' dtype, as over a bf16 cache."""
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "fp32")  # both caches' attention in fp32
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro", attn_backend=backend)).eval().to(torch.bfloat16)
    wide = model.new_cache(1)
    assert wide.kv.dtype == torch.float32
    narrow = type(wide).empty(model.config, 1, model.config.block_size, "cpu", torch.bfloat16)
    for got, expected in zip(decode_logits(model, wide), decode_logits(model, narrow), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "native")
    assert model.new_cache(1).kv.dtype == torch.bfloat16


@torch.inference_mode()
def test_attention_over_an_fp32_cache_is_fp32_whatever_the_bf16_attention_choice(fresh_cache, monkeypatch):
    """Where bf16 attention was measured fastest in torch's bf16 kernel but the cache is fp32, the query
    joins the cache's dtype (torch refuses mixed dtypes): the same logits as the fp32 kernel's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2-micro")).eval().to(torch.bfloat16)
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "fp32")
    expected = decode_logits(model, model.new_cache(1))
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "auto")

    def measure_kernels(key, candidates, default, **_):
        """The cache fp32, attention over bf16 native; the prefill's bf16 GEMMs in fp32, as forced above."""
        kernel = "native" if key.startswith("bf16/attention/") else "fp32"
        return calibration.KernelChoice(kernel, {"native": 1.0, "fp32": 1.0})

    monkeypatch.setattr(calibration, "measure_kernels", measure_kernels)
    monkeypatch.setattr(kernels, "measure_kernels", measure_kernels)
    cache = model.new_cache(1)
    assert cache.kv.dtype == torch.float32
    for got, want in zip(decode_logits(model, cache), expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("measured, dtype", [("fp32", torch.float32), ("native", torch.bfloat16)])
def test_decode_cache_dtype_is_the_weights_except_bf16_on_cpu_where_it_is_measured(
    measured, dtype, fresh_cache, monkeypatch
):
    """fp32 weights, and any GPU: the weights' dtype, nothing measured. bf16 on CPU: one query over 256
    keys, timed over a bf16 cache ("native") and an fp32 one; the winner's dtype."""
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "auto")
    asked = []

    def measure_kernels(key, candidates, default):
        if not key.startswith("bf16/decode-cache/"):  # the bf16 cache's own attention kernel, asked inside
            return calibration.KernelChoice("fp32", {"native": 10.0, "fp32": 1.0})
        outputs = {name: run() for name, run in candidates.items()}
        asked.append((key, default, {name: (y.shape, y.dtype) for name, y in outputs.items()}))
        return calibration.KernelChoice(measured, {"native": 10.0, "fp32": 10.0})

    monkeypatch.setattr(calibration, "measure_kernels", measure_kernels)
    choose = attention_kernels.decode_cache_dtype
    assert choose(torch.float32, torch.device("cpu"), 64) == torch.float32
    assert choose(torch.bfloat16, torch.device("cuda"), 64) == torch.bfloat16
    assert asked == []
    assert choose(torch.bfloat16, torch.device("cpu"), 64) == dtype
    out = (torch.Size([1, 8, 1, 64]), torch.bfloat16)
    key = f"bf16/decode-cache/k256/d64/threads{torch.get_num_threads()}"
    assert asked == [(key, "native", {"native": out, "fp32": out})]


def test_the_decode_cache_choice_is_right_where_the_difference_is_clear(fresh_cache, monkeypatch):
    """An independent timing (not the calibration's code) of one query over 256 keys: where one cache is
    2x faster, that one is chosen."""
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "auto")
    q, k, v = (torch.randn(1, 8, t, 64).bfloat16() for t in (1, 256, 256))
    caches = {"bf16": (k, v), "fp32": (k.float(), v.float())}
    seconds = dict.fromkeys(caches, float("inf"))
    with torch.no_grad():
        for kv in caches.values():
            attention_kernels.scaled_dot_product_attention(q, *kv)  # warm-up, and its own calibration
        for _round in range(5):  # interleaved, best of 5 groups of 10: a burst of load slows both alike
            for name, kv in caches.items():
                t0 = time.perf_counter()
                for _ in range(10):
                    attention_kernels.scaled_dot_product_attention(q, *kv)
                seconds[name] = min(seconds[name], time.perf_counter() - t0)
    dtype = attention_kernels.decode_cache_dtype(torch.bfloat16, torch.device("cpu"), 64)
    if seconds["fp32"] * 2 < seconds["bf16"]:
        assert dtype == torch.float32, seconds
    elif seconds["bf16"] * 2 < seconds["fp32"]:
        assert dtype == torch.bfloat16, seconds
    else:
        assert dtype in (torch.float32, torch.bfloat16)  # close: either is defensible, the margin decides
