"""Running the checks: each is a function ``DoctorContext -> list[Row]``; one that raises becomes a failed
row naming the call that raised and, for errors with a known cause, the fix."""

from __future__ import annotations

import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.doctor.report import Row, failed
from gpt2repro.errors import typed_first_line

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/gpt2repro

# (pattern in "ExceptionType: message", what to do about it)
KNOWN_FIXES: list[tuple[str, str]] = [
    (
        r"out of memory|OutOfMemoryError",
        "free GPU memory (nvidia-smi lists other processes) or train with a smaller --micro-batch",
    ),
    (
        r"no kernel image|not compatible with the current PyTorch|sm_\d+ is not compatible",
        "install a torch wheel built for this GPU's compute capability (pytorch.org/get-started)",
    ),
    (
        r"driver version is insufficient|NVIDIA driver",
        "update the NVIDIA driver to one that supports this torch's CUDA version (nvidia-smi shows both)",
    ),
    (
        r"BackendCompilerFailed|InductorError|triton|Triton|CompilationError",
        "torch.compile failed: train with --compile false meanwhile; install the triton this torch expects",
    ),
    (
        r"NCCL|nccl",
        "rerun with NCCL_DEBUG=INFO; without GPU peer-to-peer try NCCL_P2P_DISABLE=1; in a container give it "
        "--ipc=host or --shm-size=16g",
    ),
    (r"Address already in use|EADDRINUSE", "another torchrun holds the port: wait for it or set MASTER_PORT"),
    (
        r"device-side assert|illegal memory access|CUDA error",
        "rerun with CUDA_LAUNCH_BLOCKING=1 to name the failing kernel",
    ),
]


def known_fix(text: str) -> str:
    return next((fix for pattern, fix in KNOWN_FIXES if re.search(pattern, text)), "")


def _library_dirs() -> tuple[Path, ...]:
    import os

    import torch

    return Path(torch.__file__).resolve().parent, Path(os.__file__).resolve().parent


def _where(frame: traceback.FrameSummary) -> str:
    path = Path(frame.filename).resolve()
    for root in (PACKAGE_ROOT.parent, Path.cwd()):
        if path.is_relative_to(root):
            return f"{frame.name} ({path.relative_to(root)}:{frame.lineno})"
    return f"{frame.name} ({path.name}:{frame.lineno})"


def failing_call(error: BaseException) -> str:
    """The innermost frame outside torch and the standard library (this project's call that failed),
    the torch function that raised beneath it if any, and the error itself."""
    frames = traceback.extract_tb(error.__traceback__)[1:]  # [0] is the runner calling the check
    libraries = _library_dirs()
    ours = [f for f in frames if not any(Path(f.filename).resolve().is_relative_to(d) for d in libraries)]
    what = typed_first_line(error, 300)
    if not frames:
        return what
    call = _where((ours or frames)[-1])
    if ours and frames[-1] is not ours[-1]:
        call += f" -> torch {frames[-1].name}"
    return f"{call} raised {what}"


@dataclass(frozen=True)
class Check:
    """A named check; ``name`` labels its failed row when it raises before making its own rows."""

    name: str
    run: Callable[..., list[Row]]


def crashed_row(name: str, error: BaseException) -> Row:
    text = f"{type(error).__name__}: {error}"
    return failed(name, failing_call(error), "the check raised instead of finishing", fix=known_fix(text))


def run_checks(ctx, checks: Sequence[Check], on_row: Callable[[Row], None] | None = None) -> list[Row]:
    """Every check in order, whatever the earlier ones did; a row's time is the check's unless it set one."""
    rows: list[Row] = []
    for check in checks:
        print(f"doctor: {check.name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            made = check.run(ctx)
        except Exception as e:  # every failure is a row; KeyboardInterrupt still stops the doctor
            made = [crashed_row(check.name, e)]
        elapsed = time.perf_counter() - start
        if made and all(r.seconds == 0 for r in made):
            made[0].seconds = elapsed
        for row in made:
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
