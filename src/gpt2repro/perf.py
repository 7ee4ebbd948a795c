"""Model FLOPs per token and MFU against the real peak of the device in use.

GPUs: a table of dense (no 2:4 sparsity) tensor-core peaks by product name and dtype. CPUs: a peak
*measured* once per process with a square matmul in the training dtype, because CPU peaks vary too much
(cores, AVX-512, AMX, clocks) for a table; MFU on CPU is therefore "fraction of what a large matmul reaches".
"""

from __future__ import annotations

import functools
import time

import torch

from gpt2repro.config import GPTConfig

# Dense peak FLOP/s per GPU, from the vendors' data sheets. fp32 means TF32 tensor cores (TF32 is on).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 378e12}),
    ("H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp32": 418e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),  # SXM
    ("H800", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 494e12}),
    ("B200", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 1100e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A800", {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 35e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 62.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 60e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 6 per weight-multiply, PaLM appendix B).

    Matmul weights: every block's linears and the LM head over the *padded* vocabulary (what is
    actually multiplied); position embeddings and LayerNorms do no matmul. Attention scores add
    12 * n_layer * n_embd * seq_len (nanoGPT/llm.c count the full T x T, so we do too: comparable MFU).
    """
    c = config.n_embd
    block = 12 * c * c  # c_attn 3c^2 + attn c_proj c^2 + mlp 8c^2
    matmul_params = config.n_layer * block + config.padded_vocab_size * c
    return 6.0 * matmul_params + 12.0 * config.n_layer * c * seq_len


def gpu_peak_flops(device: torch.device, dtype: str) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAKS:
        if key.lower() in name.lower():
            return peaks.get(dtype) or peaks.get("fp16")
    return None


@functools.lru_cache(maxsize=8)
def measured_cpu_peak_flops(dtype: str = "bf16", seconds: float = 0.5, n: int = 2048) -> float:
    """FLOP/s of an n x n x n matmul in ``dtype`` on this CPU with torch's current threads (cached)."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a training run's dropout draws from it
    a = torch.randn(n, n, generator=gen).to(torch_dtype)
    b = torch.randn(n, n, generator=gen).to(torch_dtype)
    torch.mm(a, b)  # warm-up (thread pool, kernel selection)
    iters, start = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iters >= 3:
            return 2.0 * n**3 * iters / elapsed


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was obtained) for ``device`` computing in ``dtype``; None if unknown."""
    if device.type == "cuda":
        peak = gpu_peak_flops(device, dtype)
        name = torch.cuda.get_device_name(device)
        return peak, (f"{name} {dtype} data-sheet peak" if peak else f"{name}: not in the peak table")
    if device.type == "cpu":
        matmul_dtype = "bf16" if dtype == "bf16" else "fp32"
        peak = measured_cpu_peak_flops(matmul_dtype)
        return peak, f"measured {matmul_dtype} 2048^3 matmul on {torch.get_num_threads()} CPU threads"
    return None, f"{device.type}: peak unknown"


def mfu(tokens_per_s: float, config: GPTConfig, seq_len: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token(config, seq_len) / peak
