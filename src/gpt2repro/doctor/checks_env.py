"""Rows about the machine itself: versions and device facts, the peak FLOP/s behind MFU, attention kernels."""

from __future__ import annotations

import platform
import warnings

import torch
import torch.nn.functional as F

from gpt2repro.doctor.harness import GIB, DoctorContext
from gpt2repro.doctor.report import Failure, Row, failed, passed, skipped, verdict
from gpt2repro.errors import first_line


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for ``arch_list`` (``sm_86``, ``compute_90``, ...) has kernels for a GPU of
    ``capability``: a cubin of the same major version and no newer minor, or PTX no newer than the GPU."""
    if not arch_list:
        return True  # unknown: do not fail on it
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        digits = digits.rstrip("af")  # sm_90a, sm_100f: architecture-specific variants
        if not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def _cuda_facts(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    nccl = None
    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    arch_list = torch.cuda.get_arch_list()
    return {
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl,
        "device_name": props.name,
        "gpu_count": torch.cuda.device_count(),
        "memory_gib": round(total / GIB, 1),
        "free_gib": round(free / GIB, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16": torch.cuda.is_bf16_supported(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32),
        "arch_in_build": build_runs_on((props.major, props.minor), arch_list),
    }


def _host_facts(device: torch.device) -> dict:
    from gpt2repro.runtime import cpu_supports_bf16, default_dtype

    facts = {
        "device_name": _cpu_name(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    if device.type == "cpu":
        facts["bf16"] = cpu_supports_bf16()
        facts["training_dtype"] = default_dtype(device)  # measured: what `--dtype auto` trains in
    return facts


def check_environment(ctx: DoctorContext) -> list[Row]:
    """torch/CUDA/cuDNN/NCCL versions and the device: name, memory, compute capability, bf16, TF32."""
    device = ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as `gpt2repro train` does
        torch.backends.cudnn.allow_tf32 = True
        facts = {"torch": torch.__version__, **_cuda_facts(device)}
        figure = (
            f"torch {facts['torch']}; CUDA {facts['cuda']}; cuDNN {facts['cudnn']}; NCCL {facts['nccl']}"
            f"; {facts['gpu_count']}x {facts['device_name']}; {facts['memory_gib']} GiB "
            f"({facts['free_gib']} free); sm {facts['capability']}; bf16 {'yes' if facts['bf16'] else 'no'}"
            f"; TF32 {'on' if facts['tf32'] else 'off'}"
        )
        no_kernels = None
        if not facts["arch_in_build"]:
            sm = "sm_" + facts["capability"].replace(".", "")
            no_kernels = Failure(
                "torch.cuda.get_arch_list()",
                f"this torch build has no kernels for {sm} ({', '.join(torch.cuda.get_arch_list())})",
                fix="install a torch wheel built for this GPU (see pytorch.org/get-started)",
            )
        return [verdict("environment", figure, no_kernels, **facts)]
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, **_host_facts(device)}
    figure = (
        f"torch {facts['torch']}; {'CPU build' if facts['cuda'] is None else 'CUDA ' + facts['cuda']}"
        f"; {device.type}: {facts['device_name']}; threads {facts['threads']}; "
        f"{facts['cpu_capability']}"
    )
    if "bf16" in facts:
        native = "yes" if facts["bf16"] else "no"
        figure += f"; native bf16 {native}; --dtype auto trains in {facts['training_dtype']}"
    return [passed("environment", figure, **facts)]


def check_peak(ctx: DoctorContext) -> list[Row]:
    """The peak FLOP/s that MFU is measured against, and where it came from (never a made-up number)."""
    from gpt2repro.perf import peak_flops
    from gpt2repro.runtime import parse_dtype

    dtype = parse_dtype("auto", ctx.device)
    peak, source = peak_flops(ctx.device, dtype)
    if peak is None:
        if ctx.device.type == "cuda":
            return [
                skipped(
                    "MFU peak",
                    f"{source}: MFU is not reported rather than guessed; add this GPU's "
                    "dense data-sheet peak to gpt2repro/perf.py GPU_PEAKS",
                    source="unknown",
                )
            ]
        return [skipped("MFU peak", f"{source}: MFU is not reported", source="unknown")]
    kind = "data-sheet" if ctx.device.type == "cuda" else "measured"
    unit, scale = ("TFLOP/s", 1e12) if peak >= 1e12 else ("GFLOP/s", 1e9)
    return [
        passed(
            "MFU peak",
            f"{peak / scale:.1f} {unit} {dtype} ({source})",
            peak_flops=peak,
            source=kind,
            dtype=dtype,
        )
    ]


# ---------------------------------------------------------------------- attention
def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return SDPBackend


def _default_kernel(q: torch.Tensor) -> str:
    """The kernel torch's dispatcher picks for causal attention of these shapes (no forcing)."""
    backend = _sdpa_backends()
    try:
        return backend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name.lower()
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


def _try_kernel(name: str, q: torch.Tensor) -> tuple[bool, str]:
    """Run causal SDPA with only kernel ``name`` allowed; (ran, why not) with torch's own reasons."""
    from torch.nn.attention import sdpa_kernel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with sdpa_kernel(getattr(_sdpa_backends(), name)):
                F.scaled_dot_product_attention(q, q, q, is_causal=True)
            return True, ""
        except RuntimeError as e:
            reasons = [first_line(w.message, 400) for w in caught] or [first_line(e, 400)]
            return False, "; ".join(dict.fromkeys(reasons))[:400]


def _explicit_agrees(ctx: DoctorContext, kernel: str, dtype: str) -> float:
    """max |logits(sdpa under ``kernel``) - logits(explicit QK^T softmax)| / max |logits|, 2-layer model."""
    from torch.nn.attention import sdpa_kernel

    from gpt2repro.model import GPT, GPTConfig
    from gpt2repro.runtime import autocast

    s = ctx.sizes
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(s.model, n_layer=2, block_size=s.seq_len)).to(ctx.device).eval()
    idx = torch.randint(0, 50257, (min(s.micro_batch, 4), s.seq_len), device=ctx.device)
    with torch.no_grad(), autocast(ctx.device, dtype):
        with sdpa_kernel(getattr(_sdpa_backends(), kernel)):
            fused = model(idx)[0].float()
        model.set_attention_backend("explicit")
        explicit = model(idx)[0].float()
    return float((fused - explicit).abs().max() / explicit.abs().max().clamp_min(1e-6))


def _first_kernel_that_runs(q: torch.Tensor) -> tuple[str | None, dict[str, tuple[bool, str]]]:
    """Flash forced first, then memory-efficient, then math: the first that runs, and why others did not."""
    tried = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
        tried[name] = _try_kernel(name, q)
        if tried[name][0]:
            return name, tried
    return None, tried


def check_attention(ctx: DoctorContext) -> list[Row]:
    """Which SDPA kernel runs for the training shapes; flash forced; the explicit backend agrees."""
    from gpt2repro.model import GPTConfig
    from gpt2repro.runtime import DTYPES, parse_dtype

    dtype = parse_dtype("auto", ctx.device)
    cfg = GPTConfig.preset(ctx.sizes.model)
    shape = (min(ctx.sizes.micro_batch, 4), cfg.n_head, ctx.sizes.seq_len, cfg.head_dim)
    q = torch.randn(shape, device=ctx.device, dtype=DTYPES[dtype])
    default = _default_kernel(q)
    runs, tried = _first_kernel_that_runs(q)
    flash = tried["FLASH_ATTENTION"][0]
    metrics = dict(default_kernel=default, forced_flash=flash, runs=runs, shape=str(shape), dtype=dtype)
    name = "attention kernel"
    if runs is None:
        reasons = " | ".join(f"{n}: {why}" for n, (_, why) in tried.items())
        return [failed(name, "F.scaled_dot_product_attention", f"no SDPA kernel ran: {reasons}", **metrics)]
    rel = _explicit_agrees(ctx, runs, dtype)
    tol = 1e-4 if dtype == "fp32" else 3e-2
    metrics.update(explicit_rel_diff=rel, tolerance=tol)
    figure = (
        f"default {default}; forced flash {'ok' if runs == 'FLASH_ATTENTION' else 'unavailable'}"
        f"; explicit agrees {rel:.1e} (tol {tol:.0e}); {dtype} B,H,T,D={shape}"
    )
    if rel > tol:
        why = f"the explicit backend differs from SDPA ({runs}) by {rel:.2e} relative, above {tol}"
        fix = "report it: one of the two attention paths is wrong on this device"
        call = "CausalSelfAttention._explicit vs F.scaled_dot_product_attention"
        return [failed(name, call, why, fix=fix, figure=figure, **metrics)]
    if runs == "FLASH_ATTENTION":
        return [passed(name, figure, **metrics)]
    fallback = runs.split("_")[0].lower().replace("efficient", "memory-efficient")
    why = (
        f"flash attention unavailable on this {ctx.device.type}: falling back to {fallback} "
        f"({tried['FLASH_ATTENTION'][1]})"
    )
    if ctx.device.type == "cuda" and torch.cuda.get_device_capability(ctx.device) >= (8, 0):
        fix = "training still runs, slower; install an official torch wheel (flash attention for sm80+)"
        call = "F.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION)"
        return [failed(name, call, why, fix=fix, figure=figure, **metrics)]
    return [passed(name, figure, why, **metrics)]
