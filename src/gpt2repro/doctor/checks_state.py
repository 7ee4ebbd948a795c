"""Rows about training state: fp16 with GradScaler (CUDA), and checkpoint save -> resume -> the next step."""

from __future__ import annotations

import math

import torch

from gpt2repro.doctor.harness import DoctorContext, make_trainer, train_config, train_loader, with_batch
from gpt2repro.doctor.report import Failure, Row, failed, passed, skipped, verdict

OVERFLOW_SCALE = 2.0**40  # loss x 2^40 overflows fp16 (max 65504) in the backward pass


def _fixed_batch(cfg):
    batch = train_loader(cfg).next_batch()
    return lambda: batch


def _fp16_against_fp32(ctx: DoctorContext):
    """(fp16 trainer, its fixed batch, its first finite gradient norm, fp32's norm on the same weights and
    batch). Steps whose scaled gradients overflow are skipped, so the weights stay those fp32 saw."""
    sizes = with_batch(ctx.sizes, min(4, ctx.sizes.micro_batch))
    reference = make_trainer(train_config(ctx, sizes, dtype="fp32", compile="false"), ctx.device)
    cfg = train_config(ctx, sizes, dtype="fp16", compile="false")
    batch = _fixed_batch(cfg)
    ref_norm = reference.train_step(batch)["grad_norm"]
    del reference
    trainer = make_trainer(cfg, ctx.device)
    if trainer.scaler is None:
        return trainer, batch, None, ref_norm
    norms = (trainer.train_step(batch)["grad_norm"] for _ in range(4))
    return trainer, batch, next((n for n in norms if math.isfinite(n)), None), ref_norm


def _overflowing_step(trainer, batch) -> tuple[float, bool]:
    """One step at a loss scale that overflows fp16: (its gradient norm, whether the weights stayed)."""
    trainer.scaler.update(new_scale=OVERFLOW_SCALE)
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    overflow_norm = trainer.train_step(batch)["grad_norm"]
    untouched = all(torch.equal(a, p) for a, p in zip(before, trainer.raw_model.parameters(), strict=True))
    return overflow_norm, untouched


def check_fp16(ctx: DoctorContext) -> list[Row]:
    """fp16 autocast + GradScaler: steps; the gradient norm is the unscaled one (clipped after unscale_);
    an overflowing step is skipped (parameters untouched) and the scale backs off."""
    name = "fp16 + GradScaler"
    if ctx.device.type != "cuda":
        return [skipped(name, "no CUDA: fp16 with loss scaling is the path for GPUs without bf16")]
    ctx.release_training()
    trainer, batch, norm, ref_norm = _fp16_against_fp32(ctx)
    if trainer.scaler is None:
        return [failed(name, "gpt2repro.train.Trainer", "--dtype fp16 built no GradScaler")]
    if norm is None:
        return [
            failed(name, "Trainer.train_step", "4 fp16 steps in a row overflowed", fix="use --dtype bf16")
        ]
    ratio = norm / ref_norm
    overflow_norm, untouched = _overflowing_step(trainer, batch)
    scale = trainer.scaler.get_scale()
    figure = (
        f"grad norm {norm:.3f} = fp32's {ref_norm:.3f} x {ratio:.3f} (unscaled before clipping); overflow "
        f"at scale 2^40: step {'skipped' if untouched else 'APPLIED'}, scale -> {scale:.3g}"
    )
    metrics = dict(grad_norm=norm, fp32_grad_norm=ref_norm, overflow_grad_norm=overflow_norm,
                   overflow_skipped=untouched, scale_after=scale)  # fmt: skip
    if not 0.9 <= ratio <= 1.1:
        why = f"the fp16 gradient norm is {ratio:.3g}x the fp32 one: clipping sees scaled gradients"
        call = "GradScaler.unscale_ before clip_grad_norm_ in Trainer.train_step"
        return [failed(name, call, why, figure=figure, **metrics)]
    if not (untouched and scale < OVERFLOW_SCALE and not math.isfinite(overflow_norm)):
        why = "an overflowing fp16 step changed the weights or did not lower the scale"
        return [failed(name, "GradScaler.step/update in Trainer.train_step", why, figure=figure, **metrics)]
    return [passed(name, figure, **metrics)]


def _max_param_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def check_checkpoint(ctx: DoctorContext) -> list[Row]:
    """Train k steps, save a checkpoint (atomic file on this device's tensors), resume it in a new trainer:
    the next step's loss and the parameters after it equal the uninterrupted run's."""
    from gpt2repro.checkpoint import atomic_save, checkpoint_path, load_checkpoint, rng_state, set_rng_state

    ctx.release_training()
    cfg = train_config(ctx, compile="false")
    steps = ctx.sizes.resume_steps
    original, loader = make_trainer(cfg, ctx.device), train_loader(cfg)
    for _ in range(steps):
        original.train_step(loader.next_batch)
    path = checkpoint_path(ctx.workdir / "resume", steps)
    atomic_save({**original.state(), "loader": [loader.state_dict()], "rng": [rng_state()]}, path)
    loss_uninterrupted = original.train_step(loader.next_batch)["train_loss"]

    saved = load_checkpoint(path)
    resumed, resumed_loader = make_trainer(cfg, ctx.device), train_loader(cfg)
    resumed.load_state(saved)
    resumed_loader.load_state_dict(saved["loader"][0])
    set_rng_state(saved["rng"][0])
    loss_resumed = resumed.train_step(resumed_loader.next_batch)["train_loss"]
    loss_diff = abs(loss_resumed - loss_uninterrupted)
    param_diff = _max_param_diff(original.raw_model, resumed.raw_model)
    exact = loss_diff == 0 and param_diff == 0
    mib = path.stat().st_size / 2**20
    figure = (
        f"step {steps + 1} loss {loss_resumed:.6f} vs {loss_uninterrupted:.6f}: |diff| {loss_diff:.1e}, "
        f"params |diff| {param_diff:.1e}{' (bit-identical)' if exact else ''}; {mib:.0f} MiB checkpoint"
    )
    metrics = dict(loss_diff=loss_diff, param_diff=param_diff, bit_identical=exact, checkpoint_mib=mib)
    # CPU kernels are deterministic (the README promises bit-exact resume there); GPU kernels are not quite.
    tol = 0.0 if ctx.device.type == "cpu" else 1e-3 * abs(loss_uninterrupted)
    differs = None
    if loss_diff > tol or (ctx.device.type == "cpu" and param_diff > 0):
        differs = Failure(
            "Trainer.state/load_state + checkpoint.atomic_save/load_checkpoint",
            f"the resumed step differs from the uninterrupted one (tolerance {tol:.1e})",
            fix="report it: some state (optimizer, RNG, loader) is not saved or not restored",
        )
    return [verdict("checkpoint resume", figure, differs, **metrics)]
