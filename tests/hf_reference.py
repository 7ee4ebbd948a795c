"""The reference for parity tests: Hugging Face ``GPT2LMHeadModel`` holding exactly our weights."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from gpt2repro import GPT, GPTConfig

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

SMALL = dict(n_layer=2, n_head=4, n_embd=64, block_size=160)  # real 50257-token vocabulary


def hf_config(config: GPTConfig) -> GPT2Config:
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        layer_norm_epsilon=config.layer_norm_eps,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def random_hf_model(config: GPTConfig, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(hf_config(config)).eval()


def hf_twin(model: GPT, directory: Path) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel`` loaded from what ``save_pretrained`` wrote for ``model``."""
    model.save_pretrained(directory)
    return GPT2LMHeadModel.from_pretrained(directory).eval()


def our_twin(hf: GPT2LMHeadModel, directory: Path, **overrides) -> GPT:
    """Our ``GPT`` loaded from what HF's own ``save_pretrained`` wrote for ``hf``."""
    hf.save_pretrained(directory)
    return GPT.from_pretrained(directory, **overrides).eval()


CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_grad_in_our_layout(hf: GPT2LMHeadModel, name: str) -> torch.Tensor:
    """The gradient of HF's parameter ``name`` (same names as ours), Conv1D ones transposed to nn.Linear's."""
    grad = hf.get_parameter(name).grad
    return grad.t() if name.endswith(CONV1D) else grad
