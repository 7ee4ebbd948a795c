"""The training rows: torch.compile time, speed (ms/step, tokens/s, MFU, peak memory) and a short run on
real tokens (the embedded corpus) whose loss must fall well below ln(50257)."""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from gpt2repro.doctor.harness import (
    GIB,
    LN_VOCAB,
    DoctorContext,
    Sizes,
    TrainedRun,
    make_trainer,
    synchronize,
    train_config,
    train_loader,
    with_batch,
)
from gpt2repro.doctor.report import Row, failed, passed, skipped


@dataclass
class ShortRun:
    """What one timed training run measured."""

    trainer: object
    sizes: Sizes
    losses: list[float]
    step_seconds: list[float]
    peak_memory_gib: float
    memory_kind: str

    @property
    def steady_seconds(self) -> float:
        """Median step after the first few (compile, allocator and autotuning warm-up)."""
        warm = min(5, max(1, len(self.step_seconds) // 4))
        return statistics.median(self.step_seconds[warm:] or self.step_seconds)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "max allocated"
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / GIB, "MPS driver allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else 1024**2), "process peak RSS"


def _short_run(ctx: DoctorContext, sizes: Sizes) -> ShortRun:
    cfg = train_config(ctx, sizes)
    trainer = make_trainer(cfg, ctx.device)
    loader = train_loader(cfg)
    _reset_peak_memory(ctx.device)
    losses, times = [], []
    for _ in range(sizes.train_steps):
        t0 = time.perf_counter()
        stats = trainer.train_step(loader.next_batch)
        synchronize(ctx.device)
        times.append(time.perf_counter() - t0)
        losses.append(stats["train_loss"])
    peak, kind = _peak_memory(ctx.device)
    return ShortRun(trainer, sizes, losses, times, peak, kind)


def _run_fitting_memory(ctx: DoctorContext) -> tuple[ShortRun, list[str]]:
    """The short run, halving the batch after a CUDA out-of-memory error (a GPU shared with others)."""
    sizes, notes = ctx.sizes, []
    while True:
        try:
            return _short_run(ctx, sizes), notes
        except torch.cuda.OutOfMemoryError:
            if ctx.device.type != "cuda" or sizes.micro_batch == 1:
                raise
            notes.append(f"B={sizes.micro_batch} ran out of memory")
            sizes = with_batch(sizes, sizes.micro_batch // 2)
            torch.cuda.empty_cache()


def check_training(ctx: DoctorContext) -> list[Row]:
    """Rows ``torch.compile``, ``training speed`` and ``training loss`` from one short run."""
    from gpt2repro.perf import mfu, peak_flops

    run, notes = _run_fitting_memory(ctx)
    trainer, s = run.trainer, run.sizes
    ctx.trained = TrainedRun(trainer, run.losses)
    raw = trainer.raw_model
    step = run.steady_seconds
    tok_s = s.batch_tokens / step
    peak, _ = peak_flops(ctx.device, trainer.dtype)
    util = mfu(tok_s, raw.config, s.seq_len, peak)
    fused = bool(trainer.optimizer.defaults.get("fused"))
    shape = f"{s.model} B={s.micro_batch} T={s.seq_len} {trainer.dtype}"
    rows = [_compile_row(run, trainer.compiled)]
    figure = (
        f"{step * 1e3:.1f} ms/step · {tok_s:,.0f} tok/s · MFU {f'{util:.1%}' if util is not None else 'n/a'}"
        f" · peak mem {run.peak_memory_gib:.2f} GiB ({run.memory_kind}) · {shape} · "
        f"AdamW {'fused' if fused else 'foreach'} · vocab {raw.config.padded_vocab_size}"
    )
    nominal = 8 if ctx.quick else 16
    if ctx.device.type == "cuda" and s.micro_batch < nominal:
        notes.append(f"B={s.micro_batch} instead of {nominal}: picked by free GPU memory")
    detail = "; ".join(notes)
    speed = passed(
        "training speed",
        figure,
        detail,
        ms_per_step=step * 1e3,
        tokens_per_s=tok_s,
        mfu=util,
        peak_memory_gib=run.peak_memory_gib,
        micro_batch=s.micro_batch,
        seq_len=s.seq_len,
        model=s.model,
        dtype=trainer.dtype,
        fused_adamw=fused,
        padded_vocab=raw.config.padded_vocab_size,
    )
    speed.seconds = sum(run.step_seconds)
    if ctx.device.type == "cuda" and not fused:
        speed = failed(
            "training speed",
            "gpt2repro.optim.make_optimizer",
            "AdamW fell back to foreach: this torch has no fused AdamW for CUDA",
            fix="upgrade torch (fused AdamW is in every CUDA build since 2.0)",
            figure=figure,
            **speed.metrics,
        )
    rows += [speed, _loss_row(run)]
    return rows


def _compile_row(run: ShortRun, compiled: bool) -> Row:
    if not run.sizes.compile:
        return skipped("torch.compile", run.sizes.compile_skip_reason or "compile off for this device")
    if not compiled:
        return failed("torch.compile", "gpt2repro.train.use_compile", "the trainer did not compile the model")
    first, steady = run.step_seconds[0], run.steady_seconds
    row = passed(
        "torch.compile",
        f"{first - steady:.1f} s to compile (first step {first:.1f} s, then {steady * 1e3:.1f} ms/step)",
        compile_seconds=first - steady,
    )
    row.seconds = first
    return row


def _loss_row(run: ShortRun) -> Row:
    losses, target = run.losses, run.sizes.loss_target
    final = statistics.fmean(losses[-5:])
    figure = (
        f"loss {losses[0]:.2f} -> {final:.2f} in {len(losses)} steps of {run.sizes.batch_tokens:,} "
        f"embedded-corpus tokens (target < {target:.2f}; ln(50257) = {LN_VOCAB:.2f})"
    )
    metrics = dict(first_loss=losses[0], final_loss=final, target=target, steps=len(losses))
    if not all(math.isfinite(x) for x in losses):
        return failed(
            "training loss", "Trainer.train_step", "a loss was not finite", figure=figure, **metrics
        )
    if final >= target:
        return failed(
            "training loss",
            "Trainer.train_step",
            f"the loss fell only to {final:.2f}, not below {target:.2f}: the model does not learn",
            fix="rerun with --device cpu to see whether the problem is this device's kernels",
            figure=figure,
            **metrics,
        )
    return passed("training loss", figure, **metrics)
