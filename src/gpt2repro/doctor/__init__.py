"""``gpt2repro doctor``: one command that exercises every path a GPU run depends on, in minutes.

Run it first on a new machine (an 8xH100 node, a rented 4090, a Mac, a laptop CPU): it checks the
environment, the attention kernels, a short training run (compile time, ms/step, tokens/s, MFU, peak
memory, the loss falling on real tokens), evaluation and generation on the trained model, fp16 with loss
scaling, checkpoint resume, DDP under torchrun and all-reduce bandwidth, and prints one row per check:
pass, fail (with the failing call and the fix where known) or skipped (with why). The exit code is 0
when no row failed, 1 otherwise. ``--json`` and ``--markdown`` write the same report for scripts and
bug reports. See docs/DOCTOR.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gpt2repro.doctor.checks_dist import check_distributed
from gpt2repro.doctor.checks_env import check_attention, check_environment, check_peak
from gpt2repro.doctor.checks_eval import check_compiled_matches_eager, check_evaluation, check_generation
from gpt2repro.doctor.checks_state import check_checkpoint, check_fp16
from gpt2repro.doctor.checks_train import check_training
from gpt2repro.doctor.harness import DoctorContext, sizes_for
from gpt2repro.doctor.report import Report, render_markdown, render_table, to_json
from gpt2repro.doctor.runner import Check, run_checks
from gpt2repro.errors import UserError

# In order: later checks reuse the training row's model, then free it for fp16, checkpoint and DDP.
CHECKS: tuple[Check, ...] = (
    Check("environment", check_environment),
    Check("MFU peak", check_peak),
    Check("attention kernel", check_attention),
    Check("training", check_training),
    Check("evaluation", check_evaluation),
    Check("compiled = eager", check_compiled_matches_eager),
    Check("generation KV cache", check_generation),
    Check("fp16 + GradScaler", check_fp16),
    Check("checkpoint resume", check_checkpoint),
    Check("DDP", check_distributed),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu) | cuda | cuda:N | cpu | mps"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (GPU: B=8, 100 steps; CPU: a 3M model, no torch.compile)",
    )
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the report as JSON")
    parser.add_argument(
        "--markdown",
        metavar="FILE",
        default=None,
        help="also write a short Markdown summary to paste into a bug report",
    )
    parser.epilog = "Example: gpt2repro doctor --quick --json doctor.json --markdown doctor.md"


def _device(name: str) -> torch.device:
    from gpt2repro.runtime import pick_device

    device = pick_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def execute(
    device_name: str = "auto",
    quick: bool = False,
    json_path: str | None = None,
    markdown_path: str | None = None,
    checks: Sequence[Check] = CHECKS,
) -> int:
    """Run ``checks``, print the table, write the requested files; the exit code (0: no row failed)."""
    from gpt2repro.files import atomic_write

    for flag, path in (("--json", json_path), ("--markdown", markdown_path)):
        if path and not Path(path).resolve().parent.is_dir():
            raise UserError(f"{flag} {path}: directory {Path(path).resolve().parent} does not exist")
    device = _device(device_name)
    flags = f" --device {device_name}" + (" --quick" if quick else "")
    report = Report(device=str(device), quick=quick, command=f"gpt2repro doctor{flags}")
    project_log = logging.getLogger("gpt2repro")
    level = project_log.level
    project_log.setLevel(logging.WARNING)  # the trainer's own progress lines would bury the table
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="gpt2repro-doctor-") as tmp:
            ctx = DoctorContext(device, quick, sizes_for(device, quick), Path(tmp))
            report.rows = run_checks(ctx, checks)
            ctx.release_training()
    finally:
        project_log.setLevel(level)
    report.seconds = time.perf_counter() - start
    sys.stdout.write(render_table(report))
    if json_path:
        atomic_write(json_path, to_json(report))
    if markdown_path:
        atomic_write(markdown_path, render_markdown(report))
    return report.exit_code()


def run(args: argparse.Namespace) -> int:
    return execute(args.device, args.quick, args.json, args.markdown)
