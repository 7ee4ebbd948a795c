"""Small models and inputs shared by the unit tests of the model and of runs that start from one."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2repro.config import GPTConfig
from gpt2repro.model import GPT


def tiny_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    fields = dict(block_size=32, n_layer=2, n_head=2, n_embd=32) | overrides
    return GPT(GPTConfig(**fields))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, length), generator=g)


def save_tiny_hf_gpt2(root: Path) -> Path:
    """A random GPT-2 saved by Hugging Face itself in ``root``, as a fine-tuning user would download it."""
    import transformers

    torch.manual_seed(1234)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    path = root / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path
