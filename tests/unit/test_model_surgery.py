"""Model surgery on ``GPT``: context cropping, dropout, activation checkpointing, vocabulary padding."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import tiny_model, tokens

from gpt2repro.errors import UserError
from gpt2repro.model import GPT


# ---------------------------------------------------------------- context cropping
@pytest.mark.parametrize("backend", ["sdpa", "explicit"])
def test_cropped_model_gives_the_same_logits_on_a_short_sequence(backend):
    model = tiny_model(attn_backend=backend).eval()
    idx = tokens(2, 12)
    with torch.no_grad():
        before, _ = model(idx)
        model.crop_block_size(16)
        after, _ = model(idx)
    assert model.config.block_size == 16
    assert model.transformer.wpe.weight.shape == (16, 32)
    assert model.transformer.wpe.num_embeddings == 16
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with pytest.raises(UserError, match="longer than the model's context of 16"):
        model(tokens(1, 17))


def test_cropped_model_trains_and_generates_within_the_new_context():
    model = tiny_model()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.requires_grad
    _, loss = model(tokens(2, 8), tokens(2, 8, seed=2))
    loss.backward()
    assert model.transformer.wpe.weight.grad.shape == (8, 32)
    out = model.generate(tokens(1, 4), 10, temperature=0.0)  # runs past 8: generate() crops its input
    assert out.shape == (1, 14)


def test_crop_cannot_grow_the_context():
    model = tiny_model()
    with pytest.raises(UserError, match="between 1 and the model's context 32"):
        model.crop_block_size(33)
    with pytest.raises(UserError):
        model.crop_block_size(0)


# ---------------------------------------------------------------- dropout
def _dropout_sites(model: GPT) -> dict[str, list]:
    """Each place dropout acts, as (module, attribute) pairs that hold its probability."""
    blocks = list(model.transformer.h)
    return {
        "embeddings": [(model.transformer.drop, "p")],
        "attention weights": [(b.attn, "dropout") for b in blocks],
        "attention residual": [(b.attn.resid_dropout, "p") for b in blocks],
        "mlp residual": [(b.mlp.dropout, "p") for b in blocks],
    }


@pytest.mark.parametrize(
    "backend, site",
    [
        ("sdpa", "embeddings"),
        ("sdpa", "attention weights"),
        ("explicit", "attention weights"),
        ("sdpa", "attention residual"),
        ("sdpa", "mlp residual"),
    ],
)
def test_each_dropout_site_is_active_in_train_mode_and_off_in_eval(backend, site):
    model = tiny_model(attn_backend=backend)
    idx = tokens(1, 12)
    with torch.no_grad():
        reference, _ = model.eval()(idx)
        for module, attr in _dropout_sites(model)[site]:
            setattr(module, attr, 0.3)
        model.train()
        a, _ = model(idx)
        b, _ = model(idx)
        assert not torch.allclose(a, reference), f"dropout at the {site} has no effect in train mode"
        assert not torch.allclose(a, b), f"dropout at the {site} does not draw a fresh mask"
        model.eval()
        c, _ = model(idx)
        d, _ = model(idx)
    torch.testing.assert_close(c, reference, rtol=0, atol=0, msg=f"{site} dropout acts in eval mode")
    torch.testing.assert_close(d, c, rtol=0, atol=0)


def test_set_dropout_reaches_every_site_and_the_config():
    model = tiny_model()
    model.set_dropout(0.15)
    assert model.config.dropout == 0.15
    for site, slots in _dropout_sites(model).items():
        assert all(getattr(m, a) == 0.15 for m, a in slots), site
    with pytest.raises(UserError, match="dropout must be in"):
        model.set_dropout(1.0)


# ---------------------------------------------------------------- activation checkpointing
def _grads(model: GPT, idx, targets, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both models
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_identical_gradients(dropout):
    plain = tiny_model(dropout=dropout).train()
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing = True
    block_calls = []  # pre-hooks: the recompute stops early, before a forward hook would fire
    for block in ckpt.transformer.h:
        block.register_forward_pre_hook(lambda *_: block_calls.append(1))
    idx, targets = tokens(2, 32), tokens(2, 32, seed=3)

    loss_plain, grads_plain = _grads(plain, idx, targets, seed=7)
    loss_ckpt, grads_ckpt = _grads(ckpt, idx, targets, seed=7)

    assert len(block_calls) == 2 * ckpt.config.n_layer, "each block should run again in the backward pass"
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=0, atol=1e-6, msg=name)


def _saved_activation_bytes(model: GPT, idx) -> int:
    """Bytes autograd keeps for the backward pass outside checkpointed regions (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, idx)
    return total


def test_with_activation_checkpointing_a_layer_keeps_only_its_input_for_backward():
    B, T, C = 2, 32, 32
    idx = tokens(B, T)
    per_two_layers = {}
    for ckpt in (False, True):
        saved = []
        for n_layer in (2, 4):
            model = tiny_model(n_layer=n_layer).train()
            model.activation_checkpointing = ckpt
            saved.append(_saved_activation_bytes(model, idx))
        per_two_layers[ckpt] = saved[1] - saved[0]
    assert per_two_layers[True] == 2 * B * T * C * 4  # the two extra blocks' fp32 inputs, nothing else
    assert per_two_layers[False] > 10 * per_two_layers[True]


def test_activation_checkpointing_only_acts_in_train_mode():
    model = tiny_model().eval()
    idx = tokens(2, 16)
    plain = _saved_activation_bytes(model, idx)
    model.activation_checkpointing = True
    assert _saved_activation_bytes(model, idx) == plain  # eval mode: forward as usual
    model.train()
    assert _saved_activation_bytes(model, idx) < plain


def test_training_forward_with_a_kv_cache_is_not_checkpointed():
    model = tiny_model()
    model.activation_checkpointing = True
    idx = tokens(1, 10)
    cache = model.new_cache(1)
    logits_cached, _ = model(idx[:, :6], cache=cache)
    logits_cached2, _ = model(idx[:, 6:], cache=cache)
    model.activation_checkpointing = False
    model.eval()
    with torch.no_grad():
        full, _ = model(idx)
    cached = torch.cat([logits_cached, logits_cached2], 1).detach()
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- vocabulary padding after loading
def test_vocab_padding_keeps_logits_and_the_padded_rows_get_no_gradient():
    model = tiny_model()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=4)
    with torch.no_grad():
        before, _ = model.eval()(idx)
    model.set_vocab_padding(64)
    assert model.config.padded_vocab_size == 50304
    assert model.transformer.wte.weight.shape == (50304, 32)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_params() == tiny_model().num_params()
    with torch.no_grad():
        after, _ = model(idx)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    assert torch.count_nonzero(model.transformer.wte.weight.grad[50257:]) == 0
    assert torch.count_nonzero(model.transformer.wte.weight[50257:]) == 0
