"""CPU attention kernels chosen by measurement (as gpt2repro.kernels chooses products).

- bf16 attention (autocast or bf16 tensors) runs torch's bf16 kernel, or fp32 arithmetic on the
  bf16-rounded operands rounded to bf16 at the end, whichever was measured faster for the shape class: on
  AVX2 the bf16 backward is 4.6x slower than fp32 at GPT-2's T=256.
- Decoding with bf16 weights keeps its KV cache in bf16 or in fp32, as measured: where attention runs in
  fp32 anyway (machine E, AVX512-BF16: torch's bf16 kernel for one query took 450 us against 68 in fp32
  over 512 keys), a bf16 cache would be converted whole at every token and every layer; an fp32 cache
  holds the same bf16-rounded keys and values, converted once as they are written.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gpt2repro import calibration
from gpt2repro.kernels import (
    BF16_HEADS,
    BF16_KERNEL_ENV,
    BF16_KERNELS,
    BF16_SEQ,
    autograd_mode,
    bf16_kernel,
    bucket,
    computes_in_bf16,
    run_product,
)


def _attention_in_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    bf16 = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        qkv = (t.to(bf16).float() for t in (q, k, v))
        return F.scaled_dot_product_attention(*qkv, **kwargs).to(bf16)


def _bf16_attention_kernel(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> str:
    t_q, t_k = bucket(q.shape[-2], BF16_SEQ), bucket(k.shape[-2], BF16_SEQ)
    kind = "mask" if mask is not None else "causal" if causal else "full"
    mode, dim = autograd_mode(q, k), q.shape[-1]
    key = f"bf16/attention/{mode}/q{t_q}/k{t_k}/d{dim}/{kind}/threads{torch.get_num_threads()}"

    def measure() -> calibration.KernelChoice:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, BF16_HEADS, t, dim, generator=gen).bfloat16() for t in (t_q, t_k, t_k))
        extra = {"is_causal": causal and mask is None}
        if mask is not None:
            extra["attn_mask"] = torch.ones(t_q, t_k, dtype=torch.bool).tril(t_k - t_q)
        products = {"native": F.scaled_dot_product_attention, "fp32": _attention_in_fp32}
        candidates = {
            n: functools.partial(run_product, p, mode, (q, k, v), **extra) for n, p in products.items()
        }
        return calibration.measure_kernels(key, candidates, "native")

    return bf16_kernel(key, measure, mode)


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``; bf16 attention on CPU runs in fp32 where measured faster
    (AVX2: the bf16 backward is 4.6x slower than fp32 at GPT-2's T=256), rounded to bf16 at the end."""
    kwargs = {"attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal}
    if k.dtype != q.dtype and q.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
        # a KV cache kept in fp32 for bf16 weights (decode_cache_dtype): q joins it, the output returns
        return F.scaled_dot_product_attention(q.to(k.dtype), k, v, **kwargs).to(q.dtype)
    if (
        q.device.type == "cpu"
        and computes_in_bf16(q, q)
        and not torch.compiler.is_compiling()
        and _bf16_attention_kernel(q, k, attn_mask, is_causal) == "fp32"
    ):
        return _attention_in_fp32(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def decode_cache_dtype(dtype: torch.dtype, device: torch.device | str, head_dim: int) -> torch.dtype:
    """The dtype of the KV cache of a model whose weights are ``dtype``: theirs, except bf16 weights on
    CPU, whose cache is fp32 where one query's attention over a fp32 cache was measured faster than over
    a bf16 one (with the kernel chosen for it), over 256 keys. ``GPT2REPRO_BF16_KERNEL`` forces it:
    ``native`` keeps bf16, ``fp32`` fp32."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return dtype
    key = f"bf16/decode-cache/k{BF16_SEQ}/d{head_dim}/threads{torch.get_num_threads()}"

    @torch.no_grad()
    def measure() -> calibration.KernelChoice:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (
            torch.randn(1, BF16_HEADS, t, head_dim, generator=gen).bfloat16() for t in (1, BF16_SEQ, BF16_SEQ)
        )
        caches = {"native": (k, v), "fp32": (k.float(), v.float())}
        candidates = {
            name: functools.partial(scaled_dot_product_attention, q, *kv) for name, kv in caches.items()
        }
        return calibration.measure_kernels(key, candidates, "native")

    kernel = calibration.chosen_kernel(BF16_KERNEL_ENV, BF16_KERNELS, key, measure)
    return torch.float32 if kernel == "fp32" else torch.bfloat16
