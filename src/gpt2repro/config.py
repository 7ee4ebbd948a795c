"""Model architecture configuration and the named presets of the GPT-2 family.

Only the *shape* of the network lives here; training hyper-parameters live in ``train_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gpt2repro.errors import UserError

GPT2_VOCAB_SIZE = 50257  # 256 byte tokens + 50,000 merges + <|endoftext|>
EOT_TOKEN_ID = 50256
ATTENTION_BACKENDS = ("sdpa", "explicit")


@dataclass
class GPTConfig:
    """Hyper-parameters of the GPT-2 architecture (defaults = GPT-2 124M)."""

    block_size: int = 1024  # maximum context length (rows of the position embedding)
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens; logits/loss/sampling only ever cover these
    vocab_pad_multiple: int = 1  # pad the embedding rows to a multiple of this (64 -> 50304) for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # GPT-2 pretraining used none at this scale; fine-tuning may want some
    layer_norm_eps: float = 1e-5
    attn_backend: str = "sdpa"  # "sdpa" (flash/memory-efficient kernels) or "explicit" (QK^T/sqrt(d) + mask)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        for name in ("block_size", "vocab_size", "vocab_pad_multiple", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise UserError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise UserError(
                f"unknown attention backend {self.attn_backend!r}; "
                f"choose one of {', '.join(ATTENTION_BACKENDS)}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        """The named architecture (``gpt2`` … ``gpt2-xl`` or a small CPU-sized one), with overrides."""
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The four released GPT-2 sizes (Radford et al. 2019, table 2; HF config.json files), then CPU-sized ones.
PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "gpt2-mini": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),  # ~30M, trains on a laptop
    "gpt2-tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),  # ~7M, the CPU demo
    "gpt2-micro": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # ~3.3M, unit tests
}
