"""The model against Hugging Face's GPT2LMHeadModel holding identical weights, plus init and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hf_reference import SMALL, hf_grad_in_our_layout, hf_twin, our_twin, random_hf_model
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2repro import GPT, GPTConfig, kernels
from gpt2repro.config import PRESETS


def random_tokens(B: int, T: int, seed: int, vocab: int = 50257) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_relative_grad_error(ours: GPT, hf) -> tuple[float, str]:
    """The worst ||g_ours - g_hf|| / ||g_hf|| over all parameters (tied head counted once)."""
    worst, worst_name = 0.0, ""
    for name, p in ours.named_parameters():
        ref = hf_grad_in_our_layout(hf, name)
        err = ((p.grad - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


def check_parity(ours: GPT, hf, x: torch.Tensor, y: torch.Tensor, logit_tol: float) -> None:
    """Logits, loss and every gradient of ours vs HF on one batch."""
    logits, loss = ours(x, y)
    hf_logits = hf(x).logits
    hf_loss = F.cross_entropy(hf_logits.reshape(-1, hf_logits.size(-1)), y.reshape(-1))
    assert logits.shape == hf_logits.shape == (*x.shape, 50257)
    assert (logits - hf_logits).abs().max().item() <= logit_tol
    assert abs(loss.item() - hf_loss.item()) <= 1e-5
    loss.backward()
    hf_loss.backward()
    err, name = max_relative_grad_error(ours, hf)
    assert err <= 1e-4, f"gradient of {name} differs by {err:.2e} (relative)"


# ---------------------------------------------------------------------------- small config
@pytest.fixture
def small_pair(tmp_path):
    hf = random_hf_model(GPTConfig(**SMALL))
    return our_twin(hf, tmp_path), hf


def test_small_config_logits_loss_and_grads_match_hf(small_pair):
    ours, hf = small_pair
    x, y = random_tokens(3, 48, seed=1), random_tokens(3, 48, seed=2)
    check_parity(ours, hf, x, y, logit_tol=1e-5)


def test_ignored_targets_match_hf_ignore_index(small_pair):
    ours, hf = small_pair
    x, y = random_tokens(2, 20, seed=3), random_tokens(2, 20, seed=4)
    y[0, :7] = -1
    with torch.no_grad():
        _, loss = ours(x, y)
        hf_logits = hf(x).logits
    ref = F.cross_entropy(hf_logits.reshape(-1, 50257), y.reshape(-1), ignore_index=-1)
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_explicit_attention_equals_sdpa(small_pair):
    ours, _ = small_pair
    x = random_tokens(2, 40, seed=5)
    with torch.no_grad():
        sdpa, _ = ours(x)
        ours.set_attention_backend("explicit", layers=[1])  # one block only
        mixed, _ = ours(x)
        ours.set_attention_backend("explicit")
        explicit, _ = ours(x)
        # and with a KV cache: prefill 25 tokens, then 15 at once, vs the SDPA full pass
        cache = ours.new_cache(2)
        ours(x[:, :25], cache=cache)
        cached, _ = ours(x[:, 25:], cache=cache)
    assert [b.attn.backend for b in ours.transformer.h] == ["explicit", "explicit"]
    assert (mixed - sdpa).abs().max().item() <= 1e-5
    assert (explicit - sdpa).abs().max().item() <= 1e-5
    assert (cached - sdpa[:, 25:]).abs().max().item() <= 1e-5


def test_padded_vocabulary_changes_no_probability(tmp_path):
    hf = random_hf_model(GPTConfig(**SMALL))
    plain = our_twin(hf, tmp_path / "a")
    padded = our_twin(hf, tmp_path / "b", vocab_pad_multiple=64)
    assert padded.transformer.wte.weight.shape[0] == 50304
    assert padded.lm_head.weight is padded.transformer.wte.weight
    assert padded.num_params() == plain.num_params()
    x, y = random_tokens(2, 32, seed=6), random_tokens(2, 32, seed=7)
    logits_a, loss_a = plain(x, y)
    logits_b, loss_b = padded(x, y)
    assert logits_b.shape[-1] == 50257
    assert abs(loss_a.item() - loss_b.item()) <= 1e-6
    assert (logits_a - logits_b).abs().max().item() <= 1e-5
    loss_b.backward()
    assert padded.transformer.wte.weight.grad[50257:].abs().max().item() == 0.0  # padding never learns


def test_kv_cache_forward_equals_full_forward(small_pair):
    ours, _ = small_pair
    x = random_tokens(2, 30, seed=8)
    with torch.no_grad():
        full, _ = ours(x)
        cache = ours.new_cache(2)
        steps = [ours(x[:, :10], cache=cache)[0]]
        steps += [ours(x[:, t : t + 1], cache=cache)[0] for t in range(10, 30)]
    assert cache.length == 30
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("made_under", ["no_grad", "grad", "inference_mode"])
def test_kv_cache_made_in_one_grad_mode_works_in_another(small_pair, made_under):
    """A cache keeps per-layer views; they must accept writes whether the forward runs with autograd or
    not, wherever the cache was made (an inference-mode cache stays inside inference mode, as torch
    requires of inference tensors)."""
    ours, _ = small_pair
    x = random_tokens(1, 12, seed=9)
    with torch.no_grad():
        full, _ = ours(x)
    modes = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference_mode": torch.inference_mode}
    with modes[made_under]():
        cache = ours.new_cache(1)
    uses = [torch.inference_mode] if made_under == "inference_mode" else [torch.enable_grad, torch.no_grad]
    steps = []
    for t in range(12):
        with uses[t % len(uses)]():
            steps.append(ours(x[:, t : t + 1], cache=cache)[0].detach())
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _decode_step_ops(n_layer: int) -> list[str]:
    """The tensor ops one steady-state decode step dispatches (the third token after a prefill)."""
    model = GPT(GPTConfig(n_layer=n_layer, n_head=2, n_embd=32, vocab_size=101, block_size=64)).eval()
    with torch.no_grad():
        cache = model.new_cache(1)
        for idx in ([[1, 2, 3]], [[4]]):
            model(torch.tensor(idx), cache=cache)
        with _CountOps() as counter:
            model(torch.tensor([[5]]), cache=cache)
    return counter.ops


def test_a_decode_step_stays_a_few_ops_per_layer(monkeypatch):
    """Decoding on CPU is bound by its number of ops as much as by its weights: a layer's step is its 4
    products, 2 LayerNorms, GELU, attention, 2 adds, one KV-cache copy and a few views (28 ops with the
    row blocks); nothing is rebuilt per token and nothing is concatenated."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    two, three = _decode_step_ops(2), _decode_step_ops(3)
    per_layer = len(three) - len(two)
    assert per_layer <= 30, per_layer
    assert len(two) - 2 * per_layer <= 20
    assert three.count("baddbmm") == 12 and three.count("copy_") == 3
    assert "cat" not in three


def test_presets_have_the_published_shapes():
    assert GPT(GPTConfig.preset("gpt2-micro")).num_params() == 3_324_736
    expected = {
        "gpt2": (12, 12, 768),
        "gpt2-medium": (24, 16, 1024),
        "gpt2-large": (36, 20, 1280),
        "gpt2-xl": (48, 25, 1600),
    }
    for name, (n_layer, n_head, n_embd) in expected.items():
        c = GPTConfig.preset(name)
        shape = (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size)
        assert shape == (n_layer, n_head, n_embd, 1024, 50257)
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"}


# ---------------------------------------------------------------------------- gpt2 124M
@pytest.fixture(scope="module")
def gpt2_fresh():
    torch.manual_seed(1234)
    return GPT(GPTConfig.preset("gpt2"))


def test_gpt2_parameter_count(gpt2_fresh):
    assert gpt2_fresh.num_params() == 124_439_808
    assert gpt2_fresh.lm_head.weight is gpt2_fresh.transformer.wte.weight


def test_gpt2_init_std_per_group(gpt2_fresh):
    """OpenAI's init: 0.02 everywhere, wpe 0.01, residual projections 0.02/sqrt(2*n_layer)."""
    residual = 0.02 / math.sqrt(2 * 12)
    blocks = gpt2_fresh.transformer.h
    groups = {"wte": ([gpt2_fresh.transformer.wte.weight], 0.02)}
    groups["wpe"] = ([gpt2_fresh.transformer.wpe.weight], 0.01)
    groups["c_attn"] = ([b.attn.c_attn.weight for b in blocks], 0.02)
    groups["c_fc"] = ([b.mlp.c_fc.weight for b in blocks], 0.02)
    groups["attn.c_proj"] = ([b.attn.c_proj.weight for b in blocks], residual)
    groups["mlp.c_proj"] = ([b.mlp.c_proj.weight for b in blocks], residual)
    for name, (tensors, target) in groups.items():
        std = torch.cat([t.detach().flatten() for t in tensors]).std().item()
        assert abs(std / target - 1) < 0.05, f"{name}: std {std:.5f}, target {target:.5f}"
    for name, p in gpt2_fresh.named_parameters():
        if name.endswith(".bias"):
            assert p.abs().max().item() == 0.0, name
        elif ".ln_" in name or "ln_f" in name:
            assert torch.equal(p, torch.ones_like(p)), name


def test_gpt2_fresh_loss_is_uniform(gpt2_fresh):
    """The loss of OpenAI's init on random tokens: ln V + σ²/2 for logits ~ N(0, σ²), within 0.03.

    The tied head turns the unit-variance ln_f output into logits of variance σ² = n_embd·0.02² = 0.307,
    and E[logsumexp] of V Gaussian logits is ln V + σ²/2 = 10.979. The issue's "ln(50257) ± 0.15" is a
    hair too tight: the expectation itself sits 0.154 above ln(50257) = 10.825.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    x, y = random_tokens(2, 64, seed=9), random_tokens(2, 64, seed=10)
    with torch.no_grad():
        _, loss = gpt2_fresh(x, y)
    expected = math.log(50257) + 768 * 0.02**2 / 2
    assert abs(loss.item() - expected) <= 0.03
    # The reference: a freshly initialised GPT2LMHeadModel (HF's own init) lands at the same place.
    torch.manual_seed(4321)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    with torch.no_grad():
        hf_loss = hf(input_ids=x).logits.log_softmax(-1).gather(-1, y.unsqueeze(-1))
    assert abs(loss.item() - (-hf_loss.mean().item())) <= 0.03


def test_gpt2_124m_logits_loss_and_grads_match_hf(gpt2_fresh, tmp_path):
    ours = GPT(gpt2_fresh.config)
    ours.load_state_dict(gpt2_fresh.state_dict())
    hf = hf_twin(ours, tmp_path)
    x, y = random_tokens(1, 64, seed=11), random_tokens(1, 64, seed=12)
    check_parity(ours, hf, x, y, logit_tol=1e-4)


def test_adamw_training_matches_hf_step_by_step(tmp_path):
    """llm.c's test_gpt2: 10 AdamW steps (B=4, T=64, lr 1e-4) from identical weights give the same losses.

    A 2-layer, 64-wide model with the full vocabulary: at 124M the same check of the same code costs
    minutes of CPU (124M's forward/backward parity is tested above).
    """
    torch.manual_seed(21)
    ours = GPT(GPTConfig(**{**SMALL, "block_size": 64}))
    hf = hf_twin(ours, tmp_path)
    ours.train()
    hf.train()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    data = torch.randint(0, 50257, (10, 4, 65), generator=torch.Generator().manual_seed(13))
    losses = []
    for step in range(10):
        x, y = data[step, :, :-1], data[step, :, 1:]
        _, loss = ours(x, y)
        hf_loss = F.cross_entropy(hf(x).logits.reshape(-1, 50257), y.reshape(-1))
        assert abs(loss.item() - hf_loss.item()) <= 1e-4, f"step {step}: {loss.item()} vs {hf_loss.item()}"
        losses.append(loss.item())
        for opt, value in ((opt_ours, loss), (opt_hf, hf_loss)):
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    assert losses[-1] < losses[0] - 0.01  # the steps really trained (toward the uniform ln V on random data)
