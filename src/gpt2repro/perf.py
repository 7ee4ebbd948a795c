"""Model FLOPs per token and MFU against the real peak of the device in use.

GPUs: a table of dense (no 2:4 sparsity) tensor-core peaks by product name and dtype. CPUs: a peak
*measured* the way a benchmark would (warmed, best of several, at a size that saturates the dtype's
kernel), because CPU peaks vary too much (cores, AVX-512, AMX, clocks) for a table; it is measured once
and cached like the kernel choices (gpt2repro.calibration). MFU on CPU is "fraction of what a large matmul
reaches".
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt2repro import calibration
from gpt2repro.calibration import best_interleaved, boot_id, load_average
from gpt2repro.config import GPTConfig
from gpt2repro.kernels import linear_in_fp32

log = logging.getLogger("gpt2repro")

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


@dataclass(frozen=True)
class CpuPeak:
    """A measured CPU matmul peak, and how it was measured (so a reader can judge the MFU built on it)."""

    flops: float
    dtype: str
    size: int  # n of the n x n x n matmul that reached the peak
    repeats: int
    threads: int
    sizes_tried: list[int]
    load_average: float  # 1-minute load average while measuring
    layout: str  # the fastest of layouts(dtype) on this CPU
    boot_id: str = ""  # calibration.boot_id() when measured ("" in entries older than this field)
    # best FLOP/s seen per "n layout" (rate_key): what later processes probe in turn (see recheck_peak)
    rates: dict[str, float] = field(default_factory=dict)
    last_probe: str = ""  # rate_key of the latest probe: the next process probes the next candidate

    def describe(self) -> str:
        tried = "/".join(str(n) for n in self.sizes_tried)
        return (
            f"measured: best of {self.repeats} warmed {self.size}^3 {self.dtype} matmuls ({self.layout}) on "
            f"{self.threads} CPU threads (sizes {tried} tried), load average {self.load_average:.1f}"
        )


_MIN_REPEATS, _MAX_REPEATS, _PATIENCE = 5, 20, 3  # sample until 3 in a row fail to beat the best
_PEAK_SIZES = (256, 512, 1024, 2048, 4096)
_PEAK_BUDGET_S = 5.0  # a larger size is tried only if its predicted cost fits in what is left
_SATURATED = 1.05  # a size that gains less than 5% over the half size has saturated the kernel
_MIN_PEAK_SIZE = 1024  # smaller sizes only predict the cost of larger ones (see measure_cpu_peak)
_MIN_SAMPLE_S = 0.02  # small matmuls are timed in groups, so a sample is not all timer resolution
_PROBE_REPEATS, _PROBE_RANGE = 3, (0.75, 1.10)  # checking a cached peak: see recheck_peak
_PROBE_BUDGET_S = 1.0  # a (size, layout) is probed in turn only if its predicted probe fits in this
_WARMUP_S = 0.1  # thread pool, primitive creation, AMX tile set-up and clocks settle in the first calls


@dataclass(frozen=True)
class MatmulTiming:
    n: int
    flops: float  # FLOP/s of the best sample
    seconds: float  # per matmul, best sample
    samples: int


# The two operand layouts a model multiplies in: a @ b (attention, bmm) and a @ b.T (nn.Linear's weight).
# One library may run them through different kernels: torch 2.13's bf16 a @ b took a 1.3 GFLOP/s
# fallback on an AVX2-only AMD EPYC, where a @ b.T went through oneDNN at 20 GFLOP/s. bf16 has a third
# candidate: a @ b.T computed in fp32 on the bf16 operands and rounded to bf16, the kernel
# gpt2repro.kernels runs bf16 products with where it is faster (CPUs without native bf16, 0.16 TFLOP/s
# there): the bf16 peak is what the fastest of them reaches.
LAYOUTS = ("a@b", "a@b.T")
IN_FP32 = "a@b.T in fp32"


def layouts(dtype: torch.dtype) -> tuple[str, ...]:
    return LAYOUTS + ((IN_FP32,) if dtype == torch.bfloat16 else ())


def _operands(n: int, dtype: torch.dtype, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)  # never the global RNG: a training run's dropout draws from it
    a = torch.rand(n, n, generator=gen).to(dtype)
    b = torch.rand(n, n, generator=gen).to(dtype)
    return a, (b if layout == "a@b" else b.t())


def _mm_in_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b by the model's own fp32 kernel for bf16 products (it multiplies by its weight's transpose)."""
    return linear_in_fp32(a, b.t(), None)


def _product(layout: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return _mm_in_fp32 if layout == IN_FP32 else torch.mm


def layout_rates(dtype: torch.dtype, n: int = 512) -> dict[str, float]:
    """FLOP/s of an n^3 ``dtype`` matmul in each of layouts(dtype) here (best of 2 after a warm-up)."""
    seconds = best_interleaved(
        {name: functools.partial(_product(name), *_operands(n, dtype, name)) for name in layouts(dtype)}, 2
    )
    return {name: 2.0 * n**3 / s for name, s in seconds.items()}


def fastest_layout(rates: dict[str, float]) -> str:
    """The operand layout (or kernel) of the highest of ``layout_rates``."""
    return max(rates, key=rates.__getitem__)


def rate_key(n: int, layout: str) -> str:
    return f"{n} {layout}"


def _time_one(product: Callable, a: torch.Tensor, b: torch.Tensor) -> float:
    t0 = time.perf_counter()
    product(a, b)
    return time.perf_counter() - t0


def best_matmul_flops(
    n: int,
    dtype: torch.dtype,
    deadline: float = math.inf,
    layout: str = "a@b",
    min_repeats: int = _MIN_REPEATS,
) -> MatmulTiming:
    """The best of at least 5 (``min_repeats``) samples of a warmed n x n x n matmul; more while samples
    keep improving (a busy machine), up to 20 or ``deadline`` (time.perf_counter())."""
    a, b = _operands(n, dtype, layout)
    product = _product(layout)
    start, calls, last = time.perf_counter(), 0, 0.0
    while calls < 2 or time.perf_counter() - start < _WARMUP_S:  # warm-up: by time, at least 2 calls
        last, calls = _time_one(product, a, b), calls + 1
    group = 1 + int(_MIN_SAMPLE_S / max(last, 1e-6))
    best, samples, since_best = math.inf, 0, 0
    while samples < min_repeats or (
        since_best < _PATIENCE and samples < _MAX_REPEATS and time.perf_counter() < deadline
    ):
        t0 = time.perf_counter()
        for _ in range(group):
            product(a, b)
        seconds = (time.perf_counter() - t0) / group
        samples, since_best = samples + 1, since_best + 1
        if seconds < 0.99 * best:
            since_best = 0
        best = min(best, seconds)
    return MatmulTiming(n, 2.0 * n**3 / best, best, samples)


def _torch_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name == "bf16" else torch.float32


def measure_cpu_peak(dtype: str) -> CpuPeak:
    """Grow the matmul until the kernel saturates (or the time budget ends); the best rate is the peak.

    Sizes double from 256; those below 1024 only predict the cost of the next, unless no larger one fits
    the budget (a CPU without native bf16 takes seconds per 1024^3). A small matmul is all per-call
    overhead on most CPUs, and where it runs from cache it outruns every training matmul: on the AMD
    EPYC this was written on, MKL's fp32 256^3 reached twice its 2048^3 rate, and unreliably so.
    """
    torch_dtype = _torch_dtype(dtype)
    start = time.perf_counter()
    small = layout_rates(torch_dtype)
    layout = fastest_layout(small)
    deadline = start + _PEAK_BUDGET_S
    timings: list[MatmulTiming] = []
    for n in _PEAK_SIZES:
        # n doubles: 8x the work per matmul, for 2 warm-up calls and at least 5 samples
        if timings and 8 * timings[-1].seconds * (_MIN_REPEATS + 2) > deadline - time.perf_counter():
            break
        timings.append(best_matmul_flops(n, torch_dtype, deadline, layout))
        large = [t for t in timings if t.n >= _MIN_PEAK_SIZE]
        if len(large) > 1 and large[-1].flops < _SATURATED * large[-2].flops:
            break
    best = max([t for t in timings if t.n >= _MIN_PEAK_SIZE] or timings[-1:], key=lambda t: t.flops)
    peak = CpuPeak(
        best.flops,
        dtype,
        best.n,
        best.samples,
        torch.get_num_threads(),
        [t.n for t in timings],
        load_average()[0],
        layout,
        boot_id(),
        {rate_key(512, name): rate for name, rate in small.items()}
        | {rate_key(t.n, layout): t.flops for t in timings},
    )
    log.info(
        "CPU %s peak %.3f TFLOP/s, %s (%.1f s)",
        dtype,
        peak.flops / 1e12,
        peak.describe(),
        time.perf_counter() - start,
    )
    return peak


def _known_rates(peak: CpuPeak) -> dict[tuple[int, str], float]:
    """``peak.rates`` by (size, layout); a key that does not parse (an edited cache file) is left out."""
    known = {}
    for key, rate in peak.rates.items():
        size, _, layout = key.partition(" ")
        if size.isdigit() and layout and rate > 0:
            known[int(size), layout] = rate
    return known


def _probe_grid(peak: CpuPeak) -> list[tuple[int, str]]:
    """Every (size, layout) a probe may try, in a fixed order: each layout at each size from 1024."""
    grid = [(n, layout) for layout in layouts(_torch_dtype(peak.dtype)) for n in _PEAK_SIZES]
    grid = [(n, layout) for n, layout in grid if n >= _MIN_PEAK_SIZE]
    return grid if (peak.size, peak.layout) in grid else [(peak.size, peak.layout), *grid]


def probe_candidates(peak: CpuPeak) -> list[tuple[int, str]]:
    """The (size, layout) pairs processes probe in turn: the peak's own, and those of ``_probe_grid``
    whose probe is predicted to fit in 1 s from the rate at that size or at half of it (sizes grow one
    step at a time, as in measure_cpu_peak: a 512^3 rate may come from cache and flatter 2048^3).

    A first measurement picks its layout at 512^3 and stops growing the matmul where it stops gaining:
    on a shared host, a slow minute makes both choices for good (fp32 here: 0.148 TFLOP/s cached at
    1024^3 a@b, 0.18-0.196 at 2048^3 a@b.T). Taking turns, later processes try them all.
    """
    known = _known_rates(peak)

    def affordable(n: int, layout: str) -> bool:
        rate = known.get((n, layout)) or known.get((n // 2, layout))
        return rate is not None and (_PROBE_REPEATS + 2) * 2.0 * n**3 / rate <= _PROBE_BUDGET_S

    own = (peak.size, peak.layout)
    return [(n, layout) for n, layout in _probe_grid(peak) if (n, layout) == own or affordable(n, layout)]


def next_probe(peak: CpuPeak) -> tuple[int, str]:
    """The candidate after the latest probe's place in the grid (the first after the end), so each one
    gets its turn while candidates come and go."""
    place = {rate_key(*c): i for i, c in enumerate(_probe_grid(peak))}
    last = place.get(peak.last_probe, -1)
    candidates = probe_candidates(peak)  # in grid order
    return next((c for c in candidates if place[rate_key(*c)] > last), candidates[0])


def _probe(peak: CpuPeak, n: int, layout: str) -> MatmulTiming:
    return best_matmul_flops(n, _torch_dtype(peak.dtype), 0.0, layout, _PROBE_REPEATS)


def _with_probe(peak: CpuPeak, n: int, layout: str, probe: MatmulTiming) -> CpuPeak:
    """``peak`` after one more probe, of an n^3 matmul in ``layout``: raised if the probe beat it."""
    key = rate_key(n, layout)
    rates = peak.rates | {key: max(peak.rates.get(key, 0.0), probe.flops)}
    probed = dataclasses.replace(peak, rates=rates, last_probe=key, boot_id=boot_id())
    if probe.flops <= peak.flops:
        return probed
    return dataclasses.replace(
        probed,
        flops=probe.flops,
        size=n,
        layout=layout,
        repeats=probe.samples,
        sizes_tried=sorted({*peak.sizes_tried, n}),
        load_average=load_average()[0],
    )


def recheck_peak(peak: CpuPeak) -> CpuPeak | None:
    """A cached peak, checked against this machine: None (measure again) if it is not this machine's.

    Every process probes it with best of 3 warmed matmuls (~0.1-1 s). A peak is a best, so a faster probe
    raises it: one measured during a slow spell of a shared host (0.089 TFLOP/s where 0.15-0.18 is usual)
    put MFU at 138% and would otherwise stay for the whole boot. Within a boot, processes take turns over
    ``probe_candidates`` (a process whose probe is not written, on an overloaded machine, leaves the turn
    to the next). Under another boot id (and where there is none: not Linux), the probe is of the peak's
    own size and layout and must land between 25% below and 10% above it, or the peak is measured again:
    cloud hosts that report the same CPU model differ (an fp32 peak of 0.131 TFLOP/s cached on one put MFU
    at 121% on the next).
    """
    if peak.boot_id and peak.boot_id == boot_id():
        n, layout = next_probe(peak)
        return _with_probe(peak, n, layout, _probe(peak, n, layout))
    probe = _probe(peak, peak.size, peak.layout)
    low, high = _PROBE_RANGE
    if not low * peak.flops <= probe.flops <= high * peak.flops:
        log.info(
            "cached CPU %s peak %.3f TFLOP/s is not this machine's (probe: %.3f): measuring it again",
            peak.dtype,
            peak.flops / 1e12,
            probe.flops / 1e12,
        )
        return None
    return _with_probe(peak, peak.size, peak.layout, probe)


def cpu_peak(dtype: str) -> CpuPeak:
    """This CPU's ``dtype`` matmul peak: measured once, cached for the process and on disk (a disk
    entry is checked, and raised, by a short probe: see ``recheck_peak``)."""
    # "/rotating": not the peaks of older versions (one size and layout for good; before "/kernels": a@b
    # only, bf16 without the fp32 kernel)
    key = f"peak/{dtype}/threads{torch.get_num_threads()}/rotating"
    return calibration.CALIBRATIONS.lookup(
        key, CpuPeak, lambda: measure_cpu_peak(dtype), recheck=recheck_peak
    )


@dataclass(frozen=True)
class DtypeChoice:
    """The CPU training dtype, and the times of one training-shaped product in each dtype that chose it."""

    dtype: str
    fp32_ms: float
    bf16_ms: float


_BF16_WINS = 1.25  # bf16 autocast also casts weights and activations: it must be clearly faster to pay
_DTYPE_SHAPE = (512, 768, 3072)  # tokens x n_embd -> 4 n_embd: GPT-2 small's MLP, nn.Linear layout


def measure_cpu_dtype() -> DtypeChoice:
    """Time x @ w.T in fp32 and in bf16 (interleaved, best of 3 after a warm-up): bf16 only if it wins.

    CPUs without native bf16 (AVX2) run bf16 matmuls 8x slower than fp32; AMX runs them several times
    faster; AVX512-BF16 in between: a flag list cannot say which, a 0.1-s measurement can.
    """
    tokens, n_in, n_out = _DTYPE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, w = torch.rand(tokens, n_in, generator=gen), torch.rand(n_out, n_in, generator=gen)
    operands = {"fp32": (x, w), "bf16": (x.bfloat16(), w.bfloat16())}
    best = best_interleaved({name: functools.partial(F.linear, *xw) for name, xw in operands.items()}, 3)
    dtype = "bf16" if best["bf16"] * _BF16_WINS < best["fp32"] else "fp32"
    choice = DtypeChoice(dtype, best["fp32"] * 1e3, best["bf16"] * 1e3)
    log.info(
        "CPU training dtype: %s (%dx%dx%d product: fp32 %.1f ms, bf16 %.1f ms)",
        dtype,
        *_DTYPE_SHAPE,
        choice.fp32_ms,
        choice.bf16_ms,
    )
    return choice


def cpu_training_dtype() -> str:
    """bf16 where this CPU multiplies in it clearly faster than in fp32, else fp32 (measured once, cached)."""
    key = f"dtype/threads{torch.get_num_threads()}"
    return calibration.CALIBRATIONS.lookup(key, DtypeChoice, measure_cpu_dtype).dtype


def peak_flops(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was obtained) for ``device`` computing in ``dtype``; None if unknown."""
    if device.type == "cuda":
        peak = gpu_peak_flops(device, dtype)
        name = torch.cuda.get_device_name(device)
        return peak, (f"{name} {dtype} data-sheet peak" if peak else f"{name}: not in the peak table")
    if device.type == "cpu":
        measured = cpu_peak("bf16" if dtype == "bf16" else "fp32")
        return measured.flops, measured.describe()
    return None, f"{device.type}: peak unknown"


def mfu(tokens_per_s: float, config: GPTConfig, seq_len: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token(config, seq_len) / peak
