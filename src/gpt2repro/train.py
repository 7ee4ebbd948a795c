"""``gpt2repro train``: the GPT-2 training loop, one device or many (DDP under torchrun), with exact resume.

Recipe (build-nanogpt's GPT-2 124M, the ``gpt2-124m`` preset): AdamW with decay on >= 2-D tensors only,
warmup + cosine LR, global-norm clipping, gradient accumulation (DDP syncs on the last micro-step
only), bf16 autocast, torch.compile on CUDA. Rank 0 alone writes the run directory:

    RUN_DIR/config.json   resolved TrainConfig
    RUN_DIR/log.jsonl     one JSON record per logged step / evaluation; a resumed run *appends*, so
                          readers keep the last record of each (step, kind)
    RUN_DIR/samples.txt   periodic samples from a fixed prompt and a seeded generator
    RUN_DIR/checkpoints/  step_XXXXXXXX.pt (model, optimizer, loader, RNG states, ...), written atomically

Exact resume: a checkpoint holds everything the next step depends on (parameters, AdamW moments,
the loader position of every rank, every RNG state), so on CPU in fp32 a run killed at any point and
resumed ends with bit-identical parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from gpt2repro import checkpoint as ckpt_io
from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.optim import lr_at, make_optimizer, set_lr
from gpt2repro.perf import mfu, peak_flops
from gpt2repro.run_writer import RunWriter
from gpt2repro.runtime import autocast, keep_freed_cpu_memory, parse_dtype, seeded_generator
from gpt2repro.train_config import (
    TrainConfig,
    add_field_arguments,
    overrides_from_args,
    resolve,
    resume_conflicts,
)

log = logging.getLogger("gpt2repro")

SAMPLE_PROMPT = "Hello, I'm a language model,"
Batch = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(UserError):
    """The loss became NaN/inf: stop before the optimizer step corrupts the parameters."""


def build_model(cfg: TrainConfig, resume_config: dict | None = None):
    """The model a run starts from (fine-tuning's ``initial_model`` knows every ``init_from``). A resumed
    run rebuilds the checkpoint's architecture instead of going back to ``init_from`` (which may be gone)."""
    from gpt2repro.finetune import initial_model

    return initial_model(cfg, resume_config=resume_config)


class Trainer:
    """Model, optimizer and the optimizer step; knows nothing of files, so tests can drive it directly."""

    def __init__(self, cfg: TrainConfig, device: torch.device, dist_info: distributed.DistInfo | None = None,
                 resume_config: dict | None = None):
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or distributed.DistInfo()
        self.dtype = parse_dtype(cfg.dtype, device)
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        if device.type == "cpu":
            keep_freed_cpu_memory()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.raw_model = build_model(cfg, resume_config).to(device)
        if cfg.seq_len > self.raw_model.config.block_size:
            raise UserError(
                f"--seq-len {cfg.seq_len} is longer than the model's context "
                f"{self.raw_model.config.block_size}; lower --seq-len or raise --block-size"
            )
        self.optimizer = make_optimizer(
            self.raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps, device=device,
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == "fp16" else None
        self.compiled = use_compile(cfg.compile, device)
        model = torch.compile(self.raw_model) if self.compiled else self.raw_model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            model = DDP(model, device_ids=ids)
        self.model = model  # what the training step calls; eval/sampling/checkpoints use raw_model
        self.step = 0

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, max_lr=c.lr, min_lr_ratio=c.min_lr_ratio, warmup_steps=c.warmup_steps,
                     decay_steps=c.lr_floor_step)

    def train_step(self, next_batch: Callable[[], Batch]) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns loss, grad norm and lr."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    _, loss = self.model(x, y)
                loss = loss / self.grad_accum  # the mean over micro-steps, as one big batch would give
                loss_sum += loss.detach()
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        distributed.all_reduce_mean(loss_sum, self.dist)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"loss is {loss_value} at step {self.step + 1}: stopped before the optimizer step, "
                "parameters untouched; resume from the last checkpoint with a lower --lr (or --dtype fp32)"
            )
        if self.scaler:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)
        lr = self.lr(self.step)
        set_lr(self.optimizer, lr)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"train_loss": loss_value, "grad_norm": float(grad_norm), "lr": lr}

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "model_config": self.raw_model.config.to_dict(),
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "train_config": self.cfg.to_dict(),
        }

    def load_state(self, ckpt: dict) -> None:
        try:
            self.raw_model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"the checkpoint does not match this model/optimizer ({str(e).splitlines()[0][:160]}); "
                "resume with the run's original model options"
            ) from e
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])


def use_compile(choice: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only: on CPU, inductor's compile time (minutes on 2 cores) outweighs
    its gain for a short run; ``--compile true`` forces it."""
    if choice == "auto":
        return device.type == "cuda"
    return choice == "true"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="a preset name (see configs/) or a .toml file")
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
        help="continue from the latest checkpoint of --out (or of a run dir / checkpoint PATH)",
    )
    add_field_arguments(parser)
    parser.add_argument("--no-shuffle", dest="field_shuffle", action="store_const", const="false",
                        help="read the data strictly in order (same as --shuffle false)")
    parser.epilog = "Example: gpt2repro train --preset tiny --data data/embedded --out runs/tiny"


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    train(args.preset, overrides, resume=args.resume)
    return 0


def _find_resume(resume: str | None, out: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        if not out:
            raise UserError("--resume needs --out RUN_DIR (or --resume PATH, a run directory or checkpoint)")
        return ckpt_io.latest_checkpoint(out)
    return ckpt_io.resolve_checkpoint(resume)


def train(preset: str | None, overrides: dict, *, resume: str | None = None) -> dict:
    """Run (or continue) a training run; returns the final metrics. Library entry point of the CLI."""
    resume_path = _find_resume(resume, overrides.get("out"))
    saved = None
    if resume_path is not None:
        saved = ckpt_io.load_checkpoint(resume_path)
        if "optimizer" not in saved or "train_config" not in saved:
            raise UserError(f"{resume_path} holds weights only (no optimizer/loader state): cannot resume it")
        if not overrides.get("out"):
            overrides = {**overrides, "out": str(resume_path.parent.parent)}
    cfg = resolve(preset, overrides) if (preset or saved is None) else _resolve_from(saved, overrides)
    if saved is not None:
        conflicts = resume_conflicts(saved["train_config"], cfg)
        if conflicts:
            raise UserError(f"cannot resume {resume_path} with a different {'; '.join(conflicts)}; "
                            "drop these options or start a new run with another --out")
    if not Path(cfg.data).is_dir():
        raise UserError(f"data directory {cfg.data} does not exist; make it with "
                        f"`gpt2repro prepare --source embedded --out {cfg.data}`")
    out = Path(cfg.out)
    if saved is None and ckpt_io.list_checkpoints(out):
        raise UserError(f"{out} already holds checkpoints; pass --resume to continue that run "
                        "or choose another --out")
    info, device = distributed.init(cfg.device)
    try:
        return _train(cfg, info, device, saved, resume_path)
    finally:
        distributed.teardown()


def _resolve_from(saved: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's own config with the command line on top (resuming without repeating --preset)."""
    base = {k: v for k, v in saved["train_config"].items() if k in TrainConfig.__dataclass_fields__}
    return resolve(None, {**base, **overrides})


def _train(cfg: TrainConfig, info, device: torch.device, saved: dict | None, resume_path) -> dict:
    from gpt2repro.data import TokenLoader

    if not info.is_main:
        log.setLevel(logging.WARNING)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(cfg, device, info, saved["model_config"] if saved is not None else None)
    loader = TokenLoader(cfg.data, "train", cfg.micro_batch, cfg.seq_len, rank=info.rank,
                         world_size=info.world_size, shuffle=cfg.shuffle, seed=cfg.seed)
    writer = RunWriter(Path(cfg.out), info.is_main)
    progress = {"tokens": 0, "elapsed": 0.0, "best_val_loss": None, "best_step": None, "val_loss": None,
                "val_step": None}
    if saved is not None:
        trainer.load_state(saved)
        _restore_rank_state(saved, loader, info)
        progress.update({k: saved.get(k, progress[k]) for k in progress})
    writer.start(cfg, resumed=saved is not None)

    raw = trainer.raw_model
    peak, peak_source = peak_flops(device, trainer.dtype)
    listing = " ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
    log.info("resolved config:\n%s", textwrap.fill(listing, 110, initial_indent="  ", subsequent_indent="  "))
    log.info("device %s | dtype %s | %s processes | %.2fM parameters | context %d | compile %s",
             device, trainer.dtype, info.world_size, raw.num_params() / 1e6, raw.config.block_size,
             trainer.compiled)
    log.info("batch %d tokens/step = %d micro x %d seq x %d accum x %d ranks | peak %s",
             cfg.total_batch, cfg.micro_batch, cfg.seq_len, trainer.grad_accum, info.world_size,
             f"{peak / 1e12:.3f} TFLOP/s ({peak_source})" if peak else peak_source)
    if saved is not None:
        log.info("resumed from %s at step %d", resume_path, trainer.step)

    last_ckpt = resume_path
    wall0 = time.perf_counter() - progress["elapsed"]
    t_start, start_step = time.perf_counter(), trainer.step
    while trainer.step < cfg.max_steps:
        t0 = time.perf_counter()
        try:
            stats = trainer.train_step(loader.next_batch)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; last good checkpoint: {last_ckpt or 'none'}") from None
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step = trainer.step
        progress["tokens"] += cfg.total_batch
        progress["elapsed"] = time.perf_counter() - wall0
        tok_s = cfg.total_batch / dt
        util = mfu(tok_s / info.world_size, raw.config, cfg.seq_len, peak)
        out_of_time = _out_of_time(cfg, t_start, info)
        last = step == cfg.max_steps or out_of_time
        if step % cfg.log_every == 0 or last or step == start_step + 1:
            rec = {"step": step, "tokens": progress["tokens"], "elapsed": round(progress["elapsed"], 3),
                   **stats, "dt": dt, "tokens_per_s": tok_s, "mfu": util}
            writer.record(rec)
            eta = (time.perf_counter() - t_start) / (step - start_step) * (cfg.max_steps - step)
            log.info("step %5d/%d | loss %.4f | lr %.2e | norm %.3f | dt %4.0fms | %6.0f tok/s | mfu %s"
                     " | eta %s",
                     step, cfg.max_steps, stats["train_loss"], stats["lr"], stats["grad_norm"], dt * 1e3,
                     tok_s, f"{util * 100:.1f}%" if util is not None else "n/a", _fmt_time(eta))
        if _due(step, cfg.eval_every, last):
            _evaluate(trainer, cfg, info, device, writer, progress, step, last)
        if _due(step, cfg.sample_every, last) and info.is_main and cfg.num_samples > 0:
            texts = sample_texts(raw, cfg, device, trainer.dtype)
            writer.samples(step, texts)
            for t in texts:
                log.info("sample: %r", t)
        if _due(step, cfg.checkpoint_every, last):
            last_ckpt = _save(trainer, cfg, info, loader, writer, progress, step)
        if out_of_time and step < cfg.max_steps:
            log.info("time limit of %gs reached at step %d/%d: stopping here (--resume continues the run)",
                     cfg.time_limit, step, cfg.max_steps)
            break
    if info.is_main:
        log.info("done: %d steps, %.0f s; val loss %s; run directory %s", trainer.step, progress["elapsed"],
                 f"{progress['val_loss']:.4f}" if progress["val_loss"] is not None else "n/a", cfg.out)
    return {"step": trainer.step, "val_loss": progress["val_loss"], "checkpoint": str(last_ckpt)}


def _out_of_time(cfg: TrainConfig, t_start: float, info) -> bool:
    """``time_limit`` reached (rank 0's clock decides, so every rank stops at the same step)."""
    if cfg.time_limit <= 0:
        return False
    flag = torch.tensor(float(time.perf_counter() - t_start >= cfg.time_limit))
    if info.enabled:
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _evaluate(trainer: Trainer, cfg: TrainConfig, info, device, writer: RunWriter, progress: dict, step: int,
              last: bool) -> None:
    from gpt2repro.evals.scoring import EvalSetup
    from gpt2repro.evals.val import val_loss

    t0 = time.perf_counter()
    setup = EvalSetup.for_process(info, device, trainer.dtype, batch_size=cfg.eval_batch or cfg.micro_batch)
    result = val_loss(trainer.raw_model, cfg.data, setup, seq_len=cfg.seq_len,
                      max_tokens=cfg.eval_tokens or None)
    rec = {"step": step, "tokens": progress["tokens"], "elapsed": round(progress["elapsed"], 3),
           "val_loss": result["loss"]}
    progress["val_loss"], progress["val_step"] = result["loss"], step
    msg = f"eval step {step}: val loss {result['loss']:.4f} ({result['tokens']:,} tokens"
    hella = _hellaswag(trainer, cfg, info, device, step, last)
    if hella:
        rec.update(hella)
        msg += f"; hellaswag acc_norm {hella['hellaswag_acc_norm']:.4f}"
    writer.record(rec)
    log.info("%s, %.1fs)", msg, time.perf_counter() - t0)


def _hellaswag(trainer: Trainer, cfg: TrainConfig, info, device, step: int, last: bool) -> dict | None:
    every = cfg.hellaswag_every or cfg.eval_every
    if not cfg.hellaswag or not _due(step, every, last):
        return None
    try:
        from gpt2repro.evals.hellaswag import evaluate_hellaswag
    except ImportError:
        log.warning("HellaSwag evaluation is not available in this build; skipping")
        return None
    from gpt2repro.evals.scoring import EvalSetup

    setup = EvalSetup.for_process(info, device, trainer.dtype, batch_size=cfg.eval_batch or cfg.micro_batch)
    res = evaluate_hellaswag(trainer.raw_model, cfg.hellaswag, setup, limit=cfg.hellaswag_limit)
    return {"hellaswag_acc": float(res["acc"]), "hellaswag_acc_norm": float(res["acc_norm"])}


def sample_texts(model, cfg: TrainConfig, device: torch.device, dtype: str) -> list[str]:
    """A few continuations of the fixed prompt from a generator seeded by the run seed (reproducible,
    and the training RNG is never touched)."""
    from gpt2repro.tokenizer import get_tokenizer

    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)] * cfg.num_samples, device=device)
    with autocast(device, dtype):
        gen = seeded_generator(cfg.seed, device)
        out = model.generate(prompt, cfg.sample_tokens, top_k=50, generator=gen)
    return [enc.decode(row.tolist()) for row in out]


def _gather(obj: object, info) -> list:
    if not info.enabled:
        return [obj]
    objs = [None] * info.world_size
    dist.all_gather_object(objs, obj)
    return objs


def _restore_rank_state(saved: dict, loader, info) -> None:
    loaders, rngs = saved["loader"], saved["rng"]
    if len(loaders) != info.world_size:
        raise UserError(f"the checkpoint was written by {len(loaders)} process(es) but this run has "
                        f"{info.world_size}; resume with the same number of processes (--nproc_per_node)")
    loader.load_state_dict(loaders[info.rank])
    ckpt_io.set_rng_state(rngs[info.rank])


def _save(trainer: Trainer, cfg: TrainConfig, info, loader, writer: RunWriter, progress: dict, step: int):
    """Write a checkpoint (every rank's loader and RNG state gathered to rank 0), then prune old ones."""
    loaders = _gather(loader.state_dict(), info)
    rngs = _gather(ckpt_io.rng_state(), info)
    path = ckpt_io.checkpoint_path(cfg.out, step)
    if info.is_main:
        val = progress["val_loss"]
        if val is not None and progress["val_step"] == step:  # best-val candidates: evaluated at this step
            if progress["best_val_loss"] is None or val < progress["best_val_loss"]:
                progress["best_val_loss"], progress["best_step"] = val, step
        state = trainer.state()
        state.update(loader=loaders, rng=rngs, **progress)
        ckpt_io.atomic_save(state, path)
        keep = {progress["best_step"]} if cfg.keep_best and progress["best_step"] is not None else set()
        ckpt_io.prune_checkpoints(cfg.out, cfg.keep_last, keep)
        log.info("saved checkpoint %s", path)
    distributed.barrier(info)
    return path
