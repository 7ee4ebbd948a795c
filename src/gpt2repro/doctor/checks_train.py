"""The training rows: torch.compile time, speed (ms/step, tokens/s, MFU, peak memory) and a short run on
real tokens (the embedded corpus) whose loss must fall well below ln(50257)."""

from __future__ import annotations

import gc
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace

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
from gpt2repro.doctor.runner import failing_call, known_fix


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
        out_of_memory = False
        try:
            return _short_run(ctx, sizes), notes
        except torch.cuda.OutOfMemoryError:
            if ctx.device.type != "cuda" or sizes.micro_batch == 1:
                raise
            out_of_memory = True
        if out_of_memory:  # outside the except block: its traceback no longer holds the trainer
            notes.append(f"B={sizes.micro_batch} ran out of memory")
            sizes = with_batch(sizes, sizes.micro_batch // 2)
            gc.collect()
            torch.compiler.reset()
            torch.cuda.empty_cache()


def _train_even_if_compile_fails(ctx: DoctorContext) -> tuple[ShortRun, list[str], Row | None]:
    """The short run; if the compiled one raises, a failed ``torch.compile`` row and an eager run, so that
    a broken compiler (no triton, no C compiler) still leaves every other row measured."""
    compile_failure = None
    try:
        run, notes = _run_fitting_memory(ctx)
        return run, notes, None
    except Exception as e:
        if not ctx.sizes.compile:
            raise
        compile_failure = failed(
            "torch.compile",
            failing_call(e),
            "the compiled training step raised; the other rows ran eager",
            fix=known_fix(f"{type(e).__name__}: {e}"),
        )
    gc.collect()
    torch.compiler.reset()
    ctx.sizes = replace(ctx.sizes, compile=False, compile_skip_reason="torch.compile failed (see its row)")
    run, notes = _run_fitting_memory(ctx)
    return run, [*notes, "eager: torch.compile failed"], compile_failure


def check_training(ctx: DoctorContext) -> list[Row]:
    """Rows ``torch.compile``, ``training speed`` and ``training loss`` from one short run."""
    run, notes, compile_failure = _train_even_if_compile_fails(ctx)
    ctx.trained = TrainedRun(run.trainer, run.losses)
    nominal = 8 if ctx.quick else 16
    if ctx.device.type == "cuda" and run.sizes.micro_batch < nominal:
        notes.append(f"B={run.sizes.micro_batch} instead of {nominal}: picked by free GPU memory")
    return [
        compile_failure or _compile_row(run, run.trainer.compiled),
        _speed_row(ctx, run, notes),
        _loss_row(run),
    ]


def _speed_row(ctx: DoctorContext, run: ShortRun, notes: list[str]) -> Row:
    from gpt2repro.perf import mfu, peak_flops

    trainer, s = run.trainer, run.sizes
    raw = trainer.raw_model
    step = run.steady_seconds
    tok_s = s.batch_tokens / step
    peak, _ = peak_flops(ctx.device, trainer.dtype)
    util = mfu(tok_s, raw.config, s.seq_len, peak)
    fused = bool(trainer.optimizer.defaults.get("fused"))
    figure = (
        f"{step * 1e3:.1f} ms/step; {tok_s:,.0f} tok/s; MFU {f'{util:.1%}' if util is not None else 'n/a'}"
        f"; peak mem {run.peak_memory_gib:.2f} GiB ({run.memory_kind}); {s.model} B={s.micro_batch} "
        f"T={s.seq_len} {trainer.dtype}; AdamW {'fused' if fused else 'foreach'}; "
        f"vocab {raw.config.padded_vocab_size}"
    )
    metrics = dict(
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
        compiled=trainer.compiled,
    )
    if ctx.device.type == "cuda" and not fused:
        row = failed(
            "training speed",
            "gpt2repro.optim.make_optimizer",
            "AdamW fell back to foreach: this torch has no fused AdamW for CUDA",
            fix="upgrade torch (fused AdamW is in every CUDA build since 2.0)",
            figure=figure,
            **metrics,
        )
    else:
        row = passed("training speed", figure, "; ".join(notes), **metrics)
    row.seconds = sum(run.step_seconds)
    return row


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
