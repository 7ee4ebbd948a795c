"""Measured choices, cached: the machinery behind every CPU kernel choice and the CPU peak.

The fastest kernel for a product, and a CPU's matmul peak, differ between CPUs (AMD EPYC or Intel with
AMX, AVX2 or AVX-512) and even between cloud hosts that report the same CPU model (memory bandwidth,
clocks). So they are measured where they run: candidates interleaved, best of several rounds
(``best_interleaved``), and the result cached for the process and on disk under
``hub.cache_root() / "kernels"``, one JSON file per CPU identity (model, torch version, the ISA torch and
its libraries were allowed: ``ATEN_CPU_CAPABILITY`` & co.). Users: gpt2repro.kernels (which kernel runs a
product) and gpt2repro.perf (the peak behind MFU, the CPU training dtype).

Environment: ``GPT2REPRO_KERNEL_CACHE=0`` neither reads nor writes the disk cache (measure afresh in each
process).
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

from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write
from gpt2repro.hub import cache_root

log = logging.getLogger("gpt2repro")

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

    def record(self, key: str, value: object) -> None:
        """Keep a value measured outside ``lookup`` (for the process, and on disk unless switched off)."""
        self._memory[key] = value
        if os.environ.get(KERNEL_CACHE_ENV, "1") != "0":
            self._store(key, value)

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
# A kernel chosen among candidates, forced by an environment variable or measured and cached.

_ROUNDS, _MIN_ROUNDS, _ROUND_BUDGET_S = 5, 3, 1.0
_MARGIN = 0.05  # another kernel must win by this much: the default is the safe one on unknown CPUs
_CLEAR_CUT = 0.15  # a choice is written to disk only when one kernel wins by this much (see CalibrationCache)


@dataclass(frozen=True)
class KernelChoice:
    """The kernel picked for one shape class, with the measured time of every candidate that decided it."""

    kernel: str
    us: dict[str, float]  # microseconds per product, best of the rounds

    def clear_cut(self) -> bool:
        """One kernel is faster by ``_CLEAR_CUT``: worth remembering for other processes on this CPU."""
        return min(self.us.values()) < (1 - _CLEAR_CUT) * max(self.us.values())


def measure_kernels(
    key: str, candidates: dict[str, Callable[[], object]], default: str, products_per_call: int = 1
) -> KernelChoice:
    """Time the candidates (interleaved, best of 5, fewer past a 1-s budget): the fastest, if it beats
    ``default`` by ``_MARGIN``; each candidate makes ``products_per_call`` products per call."""
    start = time.perf_counter()
    seconds = best_interleaved(candidates, _ROUNDS, min_rounds=_MIN_ROUNDS, budget_s=_ROUND_BUDGET_S)
    us = {name: s / products_per_call * 1e6 for name, s in seconds.items()}
    fastest = min(us, key=us.__getitem__)
    kernel = fastest if us[fastest] < (1 - _MARGIN) * us[default] else default
    times = ", ".join(f"{name} {t:.0f} us" for name, t in us.items())
    log.info("kernel for %s: %s (%s per product; %.2f s)", key, kernel, times, time.perf_counter() - start)
    return KernelChoice(kernel, us)


def chosen_kernel(
    env: str,
    kernels: tuple[str, ...],
    key: str,
    measure: Callable[[], KernelChoice],
    persist: Callable[[KernelChoice], bool] | None = KernelChoice.clear_cut,
) -> str:
    """The kernel ``env`` forces (``auto``: none), else the one measured for ``key`` on this CPU (cached;
    only clear cuts go to disk unless ``persist`` says otherwise)."""
    return (
        forced_kernel(env, kernels) or CALIBRATIONS.lookup(key, KernelChoice, measure, persist=persist).kernel
    )


def forced_kernel(env: str, kernels: tuple[str, ...]) -> str | None:
    """The kernel ``env`` forces, None for ``auto`` (or unset); any other value is a mistake to report."""
    forced = os.environ.get(env, "auto")
    if forced in kernels:
        return forced
    if forced != "auto":
        raise UserError(f"{env}={forced!r} is not one of the kernels auto, {', '.join(kernels)}")
    return None
