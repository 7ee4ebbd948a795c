"""Where and in what precision to run: device autodetection, dtype parsing, autocast contexts, and the
model wrappers (DDP, torch.compile) that evaluation and saving look through."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Iterator

import torch
import torch.nn as nn

from gpt2repro.errors import UserError

log = logging.getLogger("gpt2repro")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str | None = None) -> torch.device:
    """``requested`` if given (and available), else cuda, then mps, then cpu."""
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            requested = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise UserError(f"unknown device {requested!r}; use cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {requested!r} asked for but CUDA is not available here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {requested!r} asked for but MPS is not available here; use --device cpu")
    return device


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX): a fact the doctor
    reports; the training dtype is chosen by measurement (``perf.cpu_training_dtype``)."""
    try:
        caps = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return False
    if caps in ("AVX512", "AVX512_BF16", "AMX"):
        try:
            flags = open("/proc/cpuinfo").read()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def default_dtype(device: torch.device) -> str:
    """bf16 where the hardware computes in it natively (GPUs) or measurably faster (CPUs), else fp32."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        from gpt2repro.perf import cpu_training_dtype  # perf -> calibration -> hub: not at import time

        return cpu_training_dtype()
    return "fp32"


def parse_dtype(name: str | None, device: torch.device) -> str:
    """Validate a ``--dtype`` choice for ``device`` ("auto"/None picks the default)."""
    if name in (None, "", "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of fp32, bf16, fp16")
    if name == "fp16" and device.type == "cpu":
        raise UserError("fp16 is for CUDA GPUs without bf16; on CPU use --dtype bf16 or --dtype fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16 support; use --dtype fp16 (with loss scaling) or --dtype fp32")
    return name


def enable_tf32(device: torch.device) -> None:
    """On CUDA, fp32 matmuls and convolutions run on TF32 tensor cores (what GPT-2 recipes train with)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: str):
    """Mixed-precision context for the forward pass (weights stay fp32); a no-op for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


def sampling_dtype(name: str | None, device: torch.device) -> str:
    """``--dtype`` of sampling: as ``parse_dtype``, except that ``auto`` on CPU is fp32.

    Why: decoding on CPU is bound by streaming the weights, not by arithmetic, so the training dtype (bf16
    where the CPU multiplies faster in it) says nothing here; torch's bf16 GEMV kernels streamed bf16
    weights slower, in tokens/s, than its fp32 ones streamed fp32 weights on the CPUs measured (machine E,
    AVX512-BF16, bench_generate: 32.8 vs 40.8 tokens/s for gpt2 124M), and the compiled bf16 kernel that
    is faster costs seconds to set up in each process. ``--dtype bf16`` still asks for bf16."""
    if name in (None, "", "auto") and device.type == "cpu":
        return "fp32"
    return parse_dtype(name, device)


def inference_precision(model: nn.Module, device: torch.device, dtype: str):
    """The context a model that only runs inference computes ``dtype`` in: on CPU its weights are cast
    to ``dtype`` (in place, so the model must not train afterwards), elsewhere autocast.

    Why: decoding on CPU streams every weight once per token, and under autocast every fp32 weight is
    converted again at every token: 4 bytes read plus 2 written and read back per parameter, against 2
    read from bf16 weights. On CUDA the casts are cheap next to the kernels, and autocast keeps the
    numerics of training."""
    if device.type == "cpu" and dtype != "fp32":
        model.to(DTYPES[dtype])
        return contextlib.nullcontext()
    return autocast(device, dtype)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt() parameter numbers


def keep_freed_cpu_memory() -> bool:
    """Linux/glibc: serve every allocation from the heap and keep freed memory there for reuse.

    Why: by default glibc maps large blocks (a 200 MB fp32 logits tensor, a gradient) straight from the
    kernel and unmaps them on free, so each CPU training step faults in (and the kernel zeroes) fresh
    pages for its activations and gradients again: on the 2-core machine of benchmarks/bench_train.py
    that was ~12% of a gpt2 124M step, for ~9% more resident memory once it is kept. Process-wide;
    returns False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private RNG on ``device`` (sampling uses it instead of the global one)."""
    gen_device = device if device.type in ("cuda", "cpu") else torch.device("cpu")
    g = torch.Generator(device=gen_device)
    g.manual_seed(seed)
    return g


def unwrap(model: nn.Module) -> nn.Module:
    """The plain ``GPT`` inside DDP and/or torch.compile wrappers (FSDP2 shards in place: nothing to peel).

    Evaluation, sampling and checkpoints use the plain model: DDP's forward would expect a backward pass
    (and a collective) after it, and parameter names must not carry ``module.``/``_orig_mod.``.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The unwrapped model in eval mode (no dropout) under ``inference_mode``; the training flag is
    restored afterwards, because the trainer evaluates in the middle of a run."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


# log.jsonl keys of memory_stats, in MiB (plot.py and tracking.py read the same names)
MEMORY_FIELDS = ("cuda_max_allocated_mib", "cuda_max_reserved_mib", "cpu_rss_mib", "cpu_peak_rss_mib")
_MIB = 1 << 20


def memory_stats(device: torch.device, reset_peak: bool = False) -> dict[str, float]:
    """Memory of this process in MiB: on CUDA the peak allocated / reserved by torch's caching allocator
    since the last reset (``reset_peak`` starts a new interval: the trainer reports the peak of each log
    interval, as torchtitan does); always the current resident set and its peak over the process's life.

    Allocated is what tensors hold; reserved is what the allocator keeps from the driver (what
    ``nvidia-smi`` shows, minus the CUDA context); the gap is fragmentation and cache.
    """
    stats: dict[str, float] = {}
    if device.type == "cuda":
        stats["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / _MIB, 1)
        stats["cuda_max_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / _MIB, 1)
        if reset_peak:
            torch.cuda.reset_peak_memory_stats(device)
    rss = _current_rss_bytes()
    if rss is not None:
        stats["cpu_rss_mib"] = round(rss / _MIB, 1)
    peak = _peak_rss_bytes()
    if peak is not None:  # the kernel updates the peak lazily: it may trail the current RSS a little
        stats["cpu_peak_rss_mib"] = round(max(peak, rss or 0) / _MIB, 1)
    return stats


def format_memory(stats: dict) -> str:
    """The console's memory column: CUDA peak allocated/reserved where there is CUDA, else the RSS."""
    if "cuda_max_allocated_mib" in stats:
        allocated, reserved = stats["cuda_max_allocated_mib"] / 1024, stats["cuda_max_reserved_mib"] / 1024
        return f"mem {allocated:.2f}/{reserved:.2f} GiB"
    if "cpu_rss_mib" in stats:
        return f"rss {stats['cpu_rss_mib']:.0f} MiB"
    return "mem n/a"


def _current_rss_bytes() -> int | None:
    """Resident set size now (Linux /proc; None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int | None:
    """The largest resident set so far (getrusage: KiB on Linux, bytes on macOS; None on Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
