"""The GPT-2 network, top to bottom, and its key/value cache.

Faithful to OpenAI's released model (and Hugging Face's ``GPT2LMHeadModel``): learned token and
position embeddings, pre-LayerNorm blocks (attention then MLP, each added to the residual stream),
a final LayerNorm and an LM head that *is* the token embedding matrix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt2repro.attention_kernels import decode_cache_dtype, scaled_dot_product_attention
from gpt2repro.config import ATTENTION_BACKENDS, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.kernels import Linear
from gpt2repro.loss import cross_entropy


@dataclass
class KVCache:
    """Pre-allocated keys and values of every layer, so decoding one token costs O(context), not O(context²).

    ``kv`` has shape (n_layer, 2, B, n_head, max_len, head_dim): keys then values, so a layer writes both
    with one copy (decoding is bound by its number of ops as much as by its weights). ``length`` counts
    the positions already written (all layers advance together, after the last layer has written).
    """

    kv: torch.Tensor
    length: int = 0
    layers: list[torch.Tensor] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Each layer's (2, B, n_head, max_len, head_dim) view, made once (so ``kv`` is not to be reassigned).
        # select, not unbind, and in grad mode: both kinds of view refuse some in-place writes (a cache made
        # under no_grad, then used with autograd on, would refuse every write).
        with torch.enable_grad():
            self.layers = [self.kv[i] for i in range(self.kv.shape[0])]

    @property
    def keys(self) -> torch.Tensor:
        """Every layer's keys, (n_layer, B, n_head, max_len, head_dim): a view of ``kv``."""
        return self.kv[:, 0]

    @property
    def values(self) -> torch.Tensor:
        """Every layer's values, shaped as ``keys``."""
        return self.kv[:, 1]

    @classmethod
    def empty(cls, config: GPTConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (config.n_layer, 2, batch, config.n_head, max_len, config.head_dim)
        return cls(torch.empty(shape, device=device, dtype=dtype))

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused Q/K/V projection; heads are a batch dimension."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True  # scaled at init (GPT-2 paper, section 2.3)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.backend = config.attn_backend

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``mask`` (B, T, T), True where a query may attend a key, replaces the causal mask."""
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, n_head, T, head_dim): q, k, v as views; few ops, since decoding is op-bound too
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        past = 0
        if cache is None:
            q, k, v = qkv.unbind(0)
        else:
            past, kv = cache.length, cache.layers[self.layer_idx]
            kv[:, :, :, past : past + T] = qkv[1:]  # this token's keys and values, one copy
            q, (k, v) = qkv[0], kv[:, :, :, : past + T].unbind(0)
        dropout_p = self.dropout if self.training else 0.0
        mask = mask.unsqueeze(1) if mask is not None else None  # the same mask for every head
        if self.backend == "sdpa":
            y = self._sdpa(q, k, v, past, dropout_p, mask)
        else:
            y = self._explicit(q, k, v, past, dropout_p, mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def _causal_mask(t_q: int, t_k: int, past: int, device) -> torch.Tensor:
        """True where query i (at absolute position past+i) may attend key j."""
        rows = torch.arange(t_q, device=device).unsqueeze(1) + past
        return torch.arange(t_k, device=device).unsqueeze(0) <= rows

    def _sdpa(self, q, k, v, past: int, dropout_p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
        t_q, t_k = q.shape[2], k.shape[2]
        if mask is not None:  # the caller's own mask replaces the causal one
            return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        if past == 0:  # training and prefill: the fused kernels' own causal mask
            return scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        if t_q == 1:  # decoding one token: it sees every cached position
            return scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        mask = self._causal_mask(t_q, t_k, past, q.device)
        return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)

    def _explicit(self, q, k, v, past: int, dropout_p: float, mask: torch.Tensor | None = None):
        if k.dtype != q.dtype:  # a cache kept wider than the weights (attention_kernels.decode_cache_dtype)
            k, v = k.to(q.dtype), v.to(q.dtype)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
        if mask is None:
            mask = self._causal_mask(q.shape[2], k.shape[2], past, q.device)
        att = att.masked_fill(~mask, float("-inf"))
        att = F.softmax(att, dim=-1)
        if dropout_p > 0.0:
            att = F.dropout(att, p=dropout_p)
        return att @ v


class MLP(nn.Module):
    """Position-wise feed-forward: 4x wider, tanh-approximate GELU (what OpenAI's TF code computed)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_PROJECTION = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. ``model(idx, targets)`` returns ``(logits, loss)``; logits cover the real vocabulary only."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
            )
        )
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.activation_checkpointing = False  # recompute blocks in backward to save memory
        self.apply(self._init_weights)

    # ---------------------------------------------------------------- initialisation
    def _init_weights(self, module: nn.Module) -> None:
        """OpenAI's init: N(0, 0.02), wpe N(0, 0.01), residual projections N(0, 0.02/sqrt(2*n_layer))."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_PROJECTION", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            if module is not self.lm_head:  # lm_head shares wte's tensor, initialised below
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            std = 0.01 if module is self.transformer.wpe else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids (B, T) -> logits (B, T, vocab_size) and, given targets (B, T), the mean cross-entropy.

        Targets equal to -1 are ignored. With a ``cache`` the positions continue after the cached ones and
        the cache is advanced by T. ``last_only`` returns logits (B, 1, vocab_size) of the last position
        only: decoding needs no more, and the head is the largest matmul of a prefill. Likewise a boolean
        ``logits_at`` mask (B, T) returns logits (N, vocab_size) of its N True positions only, in (batch,
        position) order: zero-shot scoring never needs the logits of the context.

        ``position_ids`` (B, T) and a boolean ``attention_mask`` (B, T, T) (True: query may attend key)
        replace 0..T-1 and the causal mask, so several continuations can share one copy of their context
        in a row (evals/scoring.py); every query must be allowed at least one key.
        """
        pos = self._positions(idx, targets, cache, last_only, logits_at, position_ids, attention_mask)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        # Checkpoint only when a backward pass follows; a KV cache must be written, not recomputed.
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        use_ckpt = use_ckpt and cache is None
        for block in self.transformer.h:
            if use_ckpt:
                x = checkpoint(block, x, None, attention_mask, use_reentrant=False)
            else:
                x = block(x, cache, attention_mask)
        if cache is not None:
            cache.length += idx.shape[1]
        if last_only:
            x = x[:, -1:, :]
        elif logits_at is not None:
            x = x[logits_at]
        x = self.transformer.ln_f(x)
        # Padded vocabulary rows (if any) exist for matmul speed only: they never reach a probability.
        logits = self.lm_head(x)
        loss = None
        if targets is not None and torch.compiler.is_compiling():  # the compiler fuses the upcast itself
            real = logits[..., : self.config.vocab_size].reshape(-1, self.config.vocab_size)
            loss = F.cross_entropy(real.float(), targets.reshape(-1), ignore_index=-1)
        elif targets is not None:
            loss = cross_entropy(logits, targets, self.config.vocab_size)
        return logits[..., : self.config.vocab_size], loss

    def _positions(self, idx, targets, cache, last_only, logits_at, position_ids, attention_mask):
        """Check forward's arguments against each other; the positions of the tokens (B, T) or (T,)."""
        if (last_only or logits_at is not None) and targets is not None:
            raise UserError("last_only/logits_at give no loss: they compute some positions' logits only")
        if cache is not None and (position_ids is not None or attention_mask is not None):
            raise UserError("position_ids/attention_mask do not combine with a KV cache")
        if idx.dim() != 2:
            raise UserError(f"expected token ids of shape (batch, time), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.block_size:
            raise UserError(
                f"sequence of {past + T} tokens is longer than the model's context of "
                f"{self.config.block_size}; crop the input (generate() does this for you)"
            )
        if attention_mask is not None and attention_mask.shape != (B, T, T):
            raise UserError(f"attention_mask must have shape {(B, T, T)}, got {tuple(attention_mask.shape)}")
        if position_ids is None:
            return torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        if position_ids.shape != idx.shape or int(position_ids.max()) >= self.config.block_size:
            raise UserError(
                f"position_ids must have shape {tuple(idx.shape)} and values below {self.config.block_size}"
            )
        return position_ids

    # ---------------------------------------------------------------- utilities
    def num_params(self, exclude_padding: bool = True) -> int:
        """Unique parameters (the tied head counted once); padded vocabulary rows left out by default."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_padding:
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def set_attention_backend(self, backend: str, layers: list[int] | None = None) -> None:
        """Choose "sdpa" or "explicit" attention for all blocks, or only for the given layer indices."""
        if backend not in ATTENTION_BACKENDS:
            raise UserError(
                f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}"
            )
        for i, block in enumerate(self.transformer.h):
            if layers is None or i in layers:
                block.attn.backend = backend
        if layers is None:
            self.config.attn_backend = backend

    def tie_weights(self) -> None:
        """The LM head *is* the token embedding (GPT-2 ties them): one tensor, one gradient. Re-tie after
        anything that replaces either parameter (``to_empty``, padding, loading into shards)."""
        self.lm_head.weight = self.transformer.wte.weight

    @torch.no_grad()
    def set_vocab_padding(self, multiple: int) -> None:
        """Re-size the tied embedding/head to a multiple of ``multiple`` rows (50257 -> 50304 for 64), for
        faster matmuls. The extra rows are zeros that no token id reaches and no returned logit shows, so
        they get no gradient and never matter."""
        if not isinstance(multiple, int) or multiple <= 0:
            raise UserError(f"vocab_pad_multiple must be a positive integer, got {multiple!r}")
        old = self.transformer.wte.weight
        self.config.vocab_pad_multiple = multiple
        rows, real = self.config.padded_vocab_size, self.config.vocab_size
        if rows == old.shape[0]:
            return
        weight = old.new_zeros(rows, self.config.n_embd)
        weight[:real] = old[:real]
        self.transformer.wte.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
        self.transformer.wte.num_embeddings = self.lm_head.out_features = rows
        self.tie_weights()

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context (e.g. fine-tune a 1024-context checkpoint at 256) by cropping wpe."""
        if not 0 < block_size <= self.config.block_size:
            raise UserError(
                f"block size {block_size} must be between 1 and the model's context {self.config.block_size}"
            )
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())
        self.transformer.wpe.num_embeddings = block_size

    def set_dropout(self, p: float) -> None:
        """Change the dropout probability everywhere (embeddings, attention, residual paths)."""
        if not 0.0 <= p < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {p}")
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            if isinstance(module, CausalSelfAttention):
                module.dropout = p

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        param = self.transformer.wte.weight
        if torch.is_autocast_enabled(param.device.type):
            dtype = torch.get_autocast_dtype(param.device.type)
        else:
            dtype = decode_cache_dtype(param.dtype, param.device, self.config.head_dim)
        return KVCache.empty(self.config, batch, max_len or self.config.block_size, param.device, dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, options=None, **option_fields) -> torch.Tensor:
        """Continue each row of ``idx`` (B, T) by ``max_new_tokens`` tokens: (B, T + new). How tokens are
        picked: a ``sample.SamplingOptions``, or its fields as keywords (``temperature=0``, ``top_k``)."""
        from gpt2repro.sample import SamplingOptions, stream_tokens

        options = options or SamplingOptions(**option_fields)
        return torch.cat([idx, *stream_tokens(self, idx, max_new_tokens, options)], dim=1)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | os.PathLike, **kwargs) -> GPT:
        """Load released GPT-2 weights (HF directory or hub name) or a checkpoint/run of this project."""
        from gpt2repro.weights import load_pretrained

        return load_pretrained(name_or_dir, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """A Hugging Face GPT-2 directory (weights, config, tokenizer) that ``transformers`` loads as is."""
        from gpt2repro.weights import save_pretrained

        save_pretrained(self, directory)
