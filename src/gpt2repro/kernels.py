"""CPU kernel choices, made by measuring the candidates on the machine where they run.

The same product can be fastest through different kernels on different CPUs: decoding multiplies one to
four rows by each weight matrix, a GEMV that MKL streams at under half the memory bandwidth on AMD EPYC
(where splitting the weight into row blocks and calling ``bmm`` doubles decoding) but near full bandwidth
on Intel with AMX (where the same ``bmm`` halves it). No table of CPUs can be right, so every choice is a
short calibration at first use: the candidates run interleaved, best of several rounds, on weights that
stream from memory as a real model's do. The result is cached for the process and on disk under
``hub.cache_root() / "kernels"``, one JSON file per CPU identity (model, torch version, the ISA torch and
its libraries were allowed: ``ATEN_CPU_CAPABILITY`` & co.), one entry per shape class and thread count.
Cloud hosts that report the same CPU model still differ, so a close call is not written (each process
measures it), and a cached figure can be re-checked before use (the CPU peak: perf.recheck_peak).

Environment: ``GPT2REPRO_DECODE_KERNEL=auto|bmm|linear`` forces the decode kernel (no calibration);
``GPT2REPRO_KERNEL_CACHE=0`` neither reads nor writes the disk cache (measure afresh in each process).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write
from gpt2repro.hub import cache_root

log = logging.getLogger("gpt2repro")

DECODE_KERNEL_ENV = "GPT2REPRO_DECODE_KERNEL"
KERNEL_CACHE_ENV = "GPT2REPRO_KERNEL_CACHE"
# Variables that change which kernels torch, oneDNN and MKL run: part of the machine's identity.
ISA_ENV_VARS = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "MKL_CBWR",
)
# The instruction sets that decide CPU matmul speed, as /proc/cpuinfo names them, with readable names.
ISA_FLAGS = (
    ("amx_bf16", "AMX-BF16"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512f", "AVX512"),
    ("avx2", "AVX2"),
)


@dataclass(frozen=True)
class CpuIdentity:
    """What decides which CPU kernel is fastest: the chip, the torch build, the ISA it may use."""

    model: str
    flags: frozenset[str]
    capability: str  # the ATen kernels in use (torch.backends.cpu.get_cpu_capability())
    torch_version: str
    isa_env: tuple[tuple[str, str], ...]

    @property
    def key(self) -> str:
        """A file-name-safe key: readable CPU model plus a hash of everything that identifies the machine."""
        text = json.dumps([self.model, self.capability, self.torch_version, self.isa_env])
        slug = "".join(c if c.isalnum() else "-" for c in self.model).strip("-")[:40] or "cpu"
        return f"{slug}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    def isa_summary(self) -> str:
        return " ".join(f"{name}:{'yes' if flag in self.flags else 'no'}" for flag, name in ISA_FLAGS)


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


@functools.cache
def cpu_identity() -> CpuIdentity:
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    isa_env = tuple((k, os.environ[k]) for k in ISA_ENV_VARS if k in os.environ)
    return CpuIdentity(
        model=model,
        flags=frozenset(_cpuinfo_field("flags").split()),
        capability=torch.backends.cpu.get_cpu_capability(),
        torch_version=torch.__version__,
        isa_env=isa_env,
    )


@functools.cache
def boot_id() -> str:
    """This boot of this machine (Linux), "" where unknown: a cached timing taken under another boot id
    may come from another host that reports the same CPU model (cloud VMs), so it is checked again."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15-minute load averages; NaN where the OS has none (Windows)."""
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return (math.nan,) * 3


def describe_cpu() -> str:
    """One line naming the conditions a CPU figure was measured under (every benchmark prints it)."""
    cpu = cpu_identity()
    env = "".join(f" {k}={v}" for k, v in cpu.isa_env)
    load = " ".join(f"{x:.2f}" for x in load_average())
    return (
        f"CPU {cpu.model} ({os.cpu_count()} cores) | {cpu.isa_summary()} | torch {cpu.torch_version} "
        f"ATen {cpu.capability}{env} | {torch.get_num_threads()} torch threads | load average {load}"
    )


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when unknown."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        digits = size.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 * 2**20


def machine_overloaded() -> bool:
    """More runnable threads than cores (1-minute load average): timings now say little about the CPU."""
    return load_average()[0] > (os.cpu_count() or 1)  # False where the load is unknown (NaN)


T = TypeVar("T")


def best_interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    *,
    min_rounds: int | None = None,
    budget_s: float = math.inf,
) -> dict[str, float]:
    """Seconds of each candidate: best of ``rounds`` calls after one warm-up, the candidates taking turns
    (in reverse order every other round) so that a burst of load on a shared machine slows them alike.
    After ``min_rounds`` rounds, stop once ``budget_s`` seconds have passed (a slow or busy machine)."""
    best = dict.fromkeys(candidates, math.inf)
    for run in candidates.values():  # warm-up: thread pool, kernel selection, page faults
        run()
    start = time.perf_counter()
    for round_ in range(rounds):
        order = list(candidates) if round_ % 2 == 0 else list(reversed(candidates))
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            best[name] = min(best[name], time.perf_counter() - t0)
        if round_ + 1 >= (min_rounds or rounds) and time.perf_counter() - start > budget_s:
            break
    return best


class CalibrationCache:
    """Measured choices for this CPU: kept for the process, and in one JSON file per CPU identity.

    A choice measured while the machine is overloaded stays in this process only: the next process
    measures again rather than inherit timings that said more about the other programs than the CPU.
    So does one that ``persist`` rejects (a close call), and a disk entry that ``persist`` or ``recheck``
    rejects here is measured again: cloud hosts that report the same CPU model differ (memory bandwidth,
    clocks), and a near tie on one host was a 19% loss on another.
    """

    def __init__(self) -> None:
        self._memory: dict[str, object] = {}

    def clear_memory(self) -> None:
        self._memory.clear()

    @property
    def path(self) -> Path:
        return cache_root() / "kernels" / f"{cpu_identity().key}.json"

    def lookup(
        self,
        key: str,
        cls: type[T],
        measure: Callable[[], T],
        *,
        persist: Callable[[T], bool] | None = None,
        recheck: Callable[[T], T | None] | None = None,
    ) -> T:
        """The cached ``cls`` for ``key``, else ``measure()``, kept in memory and on disk.

        Only values that ``persist(value)`` accepts are written to disk or read from it (an entry an older
        version wrote may not pass); ``recheck(disk_value)`` returns the value to use (written back if it
        changed), or None to measure again."""
        if key in self._memory:
            return self._memory[key]  # type: ignore[return-value]
        keep = persist or (lambda value: True)
        use_disk = os.environ.get(KERNEL_CACHE_ENV, "1") != "0"
        value = self._from_disk(key, cls) if use_disk else None
        if value is not None and not keep(value):
            value = None
        if value is not None and recheck is not None:
            checked = recheck(value)
            if checked is not None and checked != value:
                self._store(key, checked)
            value = checked
        if value is None:
            value = measure()
            if use_disk and keep(value):
                self._store(key, value)
        self._memory[key] = value
        return value

    def _store(self, key: str, value: object) -> None:
        if not machine_overloaded():  # a figure taken under load stays in this process
            self._write({**self._read(), key: dataclasses.asdict(value)})  # type: ignore[arg-type]

    def _from_disk(self, key: str, cls: type[T]) -> T | None:
        try:
            return cls(**self._read()[key])
        except (KeyError, TypeError):  # not measured yet, or written by another version of this code
            return None

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            return dict(data["entries"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _write(self, entries: dict[str, dict]) -> None:
        cpu = cpu_identity()
        header = {
            "model": cpu.model,
            "capability": cpu.capability,
            "torch": cpu.torch_version,
            "isa_env": dict(cpu.isa_env),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"cpu": header, "entries": entries}, indent=1, sort_keys=True))
        except OSError as e:  # a read-only cache only costs a calibration per process
            log.debug("could not write the kernel calibration cache %s: %s", self.path, e)


CALIBRATIONS = CalibrationCache()

# ---------------------------------------------------------------------------------------------------------
# Decoding: F.linear or the same product as a bmm over row blocks of the weight.

ROW_BLOCKS = 8
MAX_DECODE_ROWS = 4  # beyond a few rows the product is a GEMM again and MKL's own kernel wins everywhere
DECODE_KERNELS = ("linear", "bmm")
_ROUNDS, _MIN_ROUNDS, _ROUND_BUDGET_S = 5, 3, 1.0
_MARGIN = 0.05  # bmm must win by this much: F.linear is the default, and the safe one on unknown CPUs
_CLEAR_CUT = 0.15  # a choice is written to disk only when one kernel wins by this much (see CalibrationCache)
_POOL_MAX_COPIES = 32  # enough to overflow a 32 MiB L3 with a 768x768 fp32 weight; more calls cost time


def linear_by_row_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a few rows of ``x``, computed as ``bmm`` over blocks of ``weight``'s rows.

    A bmm is parallelised over its batch, so every core streams a share of the weight; MKL's GEMV may not.
    The bias is added by the same call (``baddbmm``) where the rows split evenly: one pass less over the
    output, which for a 768-wide layer is a measurable share of its time.
    """
    out_features, in_features = weight.shape
    n_rows = x.numel() // in_features
    n_blocked = out_features // ROW_BLOCKS * ROW_BLOCKS
    # Each tensor op costs ~1-3 us in Python: a decode step makes 49 of these calls, so views are few.
    columns = x.reshape(1, n_rows, in_features).transpose(1, 2).expand(ROW_BLOCKS, -1, -1)
    if n_blocked == out_features:
        blocks = weight.view(ROW_BLOCKS, -1, in_features)
        if bias is None:
            y = torch.bmm(blocks, columns)
        else:
            y = torch.baddbmm(bias.view(ROW_BLOCKS, -1, 1), blocks, columns)
        y = y.view(out_features, n_rows)
        return (y if n_rows == 1 else y.t()).view(*x.shape[:-1], out_features)
    blocks = weight[:n_blocked].view(ROW_BLOCKS, -1, in_features)
    y = torch.bmm(blocks, columns).view(n_blocked, n_rows).t()
    # the last out_features % 8 rows (e.g. the unpadded 50257-row head)
    y = torch.cat([y, F.linear(x.reshape(n_rows, in_features), weight[n_blocked:])], dim=1)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], out_features)


@dataclass(frozen=True)
class DecodeChoice:
    """The decode kernel picked for one shape class, with the per-product times that decided it."""

    kernel: str
    linear_us: float
    bmm_us: float

    def clear_cut(self) -> bool:
        """One kernel is faster by ``_CLEAR_CUT``: worth remembering for other processes on this CPU."""
        return min(self.linear_us, self.bmm_us) < (1 - _CLEAR_CUT) * max(self.linear_us, self.bmm_us)


def _bucket(n: int) -> int:
    """Round up to a power of two: shapes of one bucket behave alike, so they share a calibration."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def decode_shape_class(weight: torch.Tensor, rows: int, has_bias: bool) -> str:
    return _shape_class(*weight.shape, weight.dtype, rows, has_bias, torch.get_num_threads())


@functools.lru_cache(maxsize=1024)
def _shape_class(
    out_features: int, in_features: int, dtype: torch.dtype, rows: int, bias: bool, threads: int
) -> str:
    """The key of a decode calibration; cached, because it is asked for by every Linear at every token."""
    name = str(dtype).removeprefix("torch.")
    return (
        f"decode/{name}/out{_bucket(out_features)}/in{_bucket(in_features)}/rows{rows}/"
        f"{'bias' if bias else 'nobias'}/threads{threads}"
    )


def _streaming_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``weight`` that together overflow the last-level cache, as a whole model's weights do.

    Timing one small matrix again and again measures the cache, not memory: on the AMD EPYC this was
    written on, F.linear wins for a cached 2304x768 fp32 weight and loses by 1.4x once it streams.
    """
    nbytes = weight.numel() * weight.element_size()
    copies = min(_POOL_MAX_COPIES, math.ceil(2 * last_level_cache_bytes() / nbytes))
    if copies <= 1:
        return [weight]
    # Separate allocations, like a model's parameters: slices of one big copy timed differently here
    # (F.linear and bmm even on a 768x3072 weight, where bmm is 9% faster apart and 15% inside a model).
    return [weight.clone() for _ in range(copies)]


def _each(product: Callable, x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None) -> None:
    for w in weights:
        product(x, w, bias)


@torch.no_grad()
def calibrate_decode(weight: torch.Tensor, rows: int, has_bias: bool) -> DecodeChoice:
    """Time F.linear against the row-block bmm for ``rows`` rows times ``weight`` (interleaved, best of 5)."""
    weights = _streaming_copies(weight.detach())
    x = torch.full((rows, weight.shape[1]), 0.01, dtype=weight.dtype)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if has_bias else None
    products = {"linear": F.linear, "bmm": linear_by_row_blocks}
    start = time.perf_counter()
    seconds = best_interleaved(
        {name: functools.partial(_each, product, x, weights, bias) for name, product in products.items()},
        _ROUNDS,
        min_rounds=_MIN_ROUNDS,
        budget_s=_ROUND_BUDGET_S,
    )
    best = {name: s / len(weights) for name, s in seconds.items()}
    kernel = "bmm" if best["bmm"] < (1 - _MARGIN) * best["linear"] else "linear"
    choice = DecodeChoice(kernel, best["linear"] * 1e6, best["bmm"] * 1e6)
    log.info(
        "decode kernel for %s: %s (F.linear %.0f us, row-block bmm %.0f us per product; %.2f s)",
        decode_shape_class(weight, rows, has_bias),
        kernel,
        choice.linear_us,
        choice.bmm_us,
        time.perf_counter() - start,
    )
    return choice


def decode_kernel(weight: torch.Tensor, rows: int, has_bias: bool) -> str:
    """ "bmm" or "linear" for ``rows`` rows times ``weight`` on this CPU: forced by the env, else measured."""
    forced = os.environ.get(DECODE_KERNEL_ENV, "auto")
    if forced in DECODE_KERNELS:
        return forced
    if forced != "auto":
        raise UserError(f"{DECODE_KERNEL_ENV}={forced!r} is not a decode kernel; use auto, linear or bmm")
    key = decode_shape_class(weight, rows, has_bias)
    measure = functools.partial(calibrate_decode, weight, rows, has_bias)
    return CALIBRATIONS.lookup(key, DecodeChoice, measure, persist=DecodeChoice.clear_cut).kernel


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) whose few-row products on CPU take the kernel
    measured fastest on this machine (see the module docstring); everything else is ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each attribute read is a dict look-up: once per call
        if 0 < x.numel() <= MAX_DECODE_ROWS * self.in_features and self._row_blocks_win(x, weight):
            return linear_by_row_blocks(x, weight, bias)
        return F.linear(x, weight, bias)

    def _row_blocks_win(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
            and weight.is_contiguous()
            and decode_kernel(weight, x.numel() // self.in_features, self.bias is not None) == "bmm"
        )
