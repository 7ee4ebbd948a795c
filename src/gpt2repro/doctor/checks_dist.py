"""Rows about many processes: DDP (the doctor starts torchrun itself: NCCL with every visible GPU, or two
gloo processes on CPU) against a single-process run, all-reduce bandwidth, and FSDP2 (``--parallel
fsdp``) against the same single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import torch

from gpt2repro.doctor.harness import DoctorContext, make_trainer, train_config, train_loader
from gpt2repro.doctor.report import Failure, Metric, Row, failed, passed, skipped, verdict
from gpt2repro.doctor.runner import known_fix

CPU_PROCESSES = 2


def _world(ctx: DoctorContext) -> tuple[int, str] | str:
    """(processes, backend), or why DDP is not run on this device."""
    if ctx.device.type == "cuda":
        return torch.cuda.device_count(), "nccl"
    if ctx.device.type == "cpu":
        return CPU_PROCESSES, "gloo"
    return f"DDP runs on CUDA (NCCL) or CPU (gloo), not {ctx.device.type}"


def _reference_losses(ctx: DoctorContext, world: int, per_rank: int, steps: int) -> list[float]:
    """One process with the ranks' batches stacked (micro-batch world x per_rank): what DDP must equal."""
    sizes = replace(ctx.sizes, micro_batch=world * per_rank)
    cfg = train_config(ctx, sizes, compile="false")
    trainer, loader = make_trainer(cfg, ctx.device), train_loader(cfg)
    losses = [trainer.train_step(loader.next_batch)["train_loss"] for _ in range(steps)]
    del trainer
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return losses


def torchrun_command(world: int, *target: str) -> list[str]:
    """``torchrun`` of ``world`` local processes. ``--tee=3`` has torchrun copy each worker's output line by
    line behind its rank: two workers failing at once wrote into one stream character by character
    ('ValueErrorValueError: : the causethe cause'), which hid the very message this report quotes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        "--tee=3",
        *target,
    ]


def _launch(ctx: DoctorContext, world: int, spec: dict, timeout: float) -> tuple[dict | None, str]:
    spec_path, result_path = ctx.workdir / "ddp_spec.json", ctx.workdir / "ddp_result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = torchrun_command(world, "-m", "gpt2repro.doctor.ddp_worker", str(spec_path), str(result_path))
    env = dict(os.environ)
    if ctx.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # two processes on a few cores: no oversubscription
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return None, f"torchrun did not finish in {timeout:.0f} s: {err[-600:]}"
    if proc.returncode != 0 or not result_path.is_file():
        return None, f"torchrun exited {proc.returncode}: {_root_cause(proc.stderr + proc.stdout)}"
    return json.loads(result_path.read_text()), ""


def _root_cause(output: str) -> str:
    """The error lines of a failed torchrun: the child's exception or abort message and the exit code
    torchrun saw (a worker killed by a signal prints no exception), not the launcher's traceback."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    launcher = ("ChildFailedError", "raise ", "elastic/", "error_file", "traceback :")
    markers = ("Error", "error:", "NCCL", "terminate called", "Signal ", "exitcode")
    errors = [ln for ln in lines if any(m in ln for m in markers) and not any(x in ln for x in launcher)]
    return " | ".join(dict.fromkeys(errors[-4:] or lines[-4:]))[-900:]


def check_distributed(ctx: DoctorContext) -> list[Row]:
    """Rows ``DDP`` and ``all-reduce bandwidth`` from one torchrun launch, then ``FSDP``."""
    world = _world(ctx)
    if isinstance(world, str):
        return [skipped("DDP", world), skipped("all-reduce bandwidth", world), skipped("FSDP", world)]
    ctx.release_training()
    n, backend = world
    s = ctx.sizes
    per_rank = max(1, s.micro_batch // n)  # the ranks together see the training row's batch
    reference = _reference_losses(ctx, n, per_rank, s.ddp_steps)
    spec = _worker_spec(ctx, n, backend, per_rank)
    timeout = 180.0 if ctx.device.type == "cpu" else (240.0 if ctx.quick else 420.0)
    result, error = _launch(ctx, n, spec, timeout)
    if result is None:
        call = f"python -m torch.distributed.run --nproc_per_node={n} ({backend})"
        fix = known_fix(error)
        return [
            failed("DDP", call, error, fix=fix),
            skipped("all-reduce bandwidth", "the DDP launch failed"),
            skipped("FSDP", "the DDP launch failed: FSDP uses the same process group"),
        ]
    tol = 1e-5 if ctx.device.type == "cpu" else 2e-2
    ddp = _parity_row(
        "DDP",
        "DistributedDataParallel gradient all-reduce (Trainer.train_step)",
        tol,
        result["losses"],
        reference,
        f"{n} processes ({backend}) x B={per_rank}",
        f"1 process x B={n * per_rank}",
        fix="report it: gradients are not averaged as one big batch would give",
        world=dict(world_size=n, backend=backend),
        logged=dict(ddp_losses=json.dumps(result["losses"]), reference_losses=json.dumps(reference)),
    )
    rows = [ddp, _bandwidth_row(result)]
    fsdp_spec = {**spec, "config": {**spec["config"], "parallel": "fsdp"}, "allreduce_mib": 0}
    fsdp, error = _launch(ctx, n, fsdp_spec, timeout)
    if fsdp is None:
        call = f"python -m torch.distributed.run --nproc_per_node={n} ... --parallel fsdp"
        return [*rows, failed("FSDP", call, error, fix=known_fix(error))]
    fsdp_row = _parity_row(
        "FSDP",
        "fully_shard + Trainer.train_step (--parallel fsdp)",
        tol,
        fsdp["losses"],
        reference,
        f"{n} ranks ({backend}), fully_shard per block",
        "1 process",
        fix="report it with this table",
        world=dict(world_size=n),
        logged=dict(fsdp_losses=json.dumps(fsdp["losses"])),
    )
    return [*rows, fsdp_row]


def _worker_spec(ctx: DoctorContext, n: int, backend: str, per_rank: int) -> dict:
    """What each torchrun worker trains (the training row's config at ``per_rank`` sequences) and times."""
    s = ctx.sizes
    cfg = train_config(
        ctx,
        replace(s, micro_batch=per_rank),
        compile="false",
        total_batch=n * per_rank * s.seq_len,
        device="cuda" if ctx.device.type == "cuda" else "cpu",
    )
    return {
        "config": {k: v for k, v in cfg.to_dict().items() if v is not None},
        "steps": s.ddp_steps,
        "allreduce_mib": s.allreduce_mib,
        "allreduce_iters": 10 if backend == "nccl" else 3,
    }


def _parity_row(
    name: str,
    call: str,
    tol: float,
    losses: list[float],
    reference: list[float],
    runs: str,
    baseline: str,
    *,
    fix: str,
    world: dict[str, Metric],
    logged: dict[str, str],
) -> Row:
    """Row ``name``: the step losses of ``runs`` must equal the single process's (``baseline``,
    ``reference``) within ``tol``, relative; ``world`` and ``logged`` frame the metrics, in that order."""
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))
    figure = (
        f"{runs}: {len(losses)} step losses = {baseline} within {worst:.1e} relative (tol {tol:.0e}); "
        f"last {losses[-1]:.4f} vs {reference[-1]:.4f}"
    )
    drift = (
        Failure(call, f"the {name} losses drift from the single-process run", fix) if worst > tol else None
    )
    return verdict(name, figure, drift, **world, max_rel_diff=worst, **logged)


def _bandwidth_row(result: dict) -> Row:
    bw, n = result["allreduce"], result["world_size"]
    figure = (
        f"{bw['mib']} MiB fp32 all-reduce ({bw['backend']}, {n} ranks): {bw['seconds'] * 1e3:.2f} ms; "
        f"bus bandwidth {bw['busbw_gbs']:.1f} GB/s; algorithm bandwidth {bw['algbw_gbs']:.1f} GB/s"
    )
    note = "one rank: no traffic between devices, the bus bandwidth is 0 by definition" if n == 1 else ""
    return passed("all-reduce bandwidth", figure, note, **bw)
