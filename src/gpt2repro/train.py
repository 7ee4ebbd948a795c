"""``gpt2repro train``: the GPT-2 training run, one device or many (DDP under torchrun), with exact resume.

Recipe (build-nanogpt's GPT-2 124M, the ``gpt2-124m`` preset): AdamW with decay on >= 2-D tensors only,
warmup + cosine LR, global-norm clipping, gradient accumulation (DDP syncs on the last micro-step
only), bf16 autocast, torch.compile on CUDA. The optimizer step lives in trainer.py, the files of the run
directory in run_writer.py (the README's table lists them), checkpoints in checkpoint.py.

Here: ``train()`` resolves the config and what to resume, then a ``TrainingRun`` (setup in ``__init__``,
the loop in ``run()``) owns the trainer, the loader, the writer and the run's ``RunState``. Exact
resume: a checkpoint holds everything the next step depends on (parameters, AdamW moments, the loader
position of every rank, every RNG state), so on CPU in fp32 a run killed at any point and resumed ends
with bit-identical parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro import checkpoint as ckpt_io
from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.perf import mfu, peak_flops
from gpt2repro.run_writer import RunWriter
from gpt2repro.runtime import autocast, seeded_generator
from gpt2repro.train_config import (
    TrainConfig,
    add_field_arguments,
    overrides_from_args,
    resolve,
    resume_conflicts,
)
from gpt2repro.trainer import Trainer, TrainingDiverged

log = logging.getLogger("gpt2repro")

SAMPLE_PROMPT = "Hello, I'm a language model,"


@dataclass
class RunState:
    """The run's progress beyond the optimizer: saved at the top level of every checkpoint (same keys
    as before this class existed, so older checkpoints resume)."""

    tokens: int = 0
    elapsed: float = 0.0
    val_loss: float | None = None
    val_step: int | None = None
    best_val_loss: float | None = None
    best_step: int | None = None

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> RunState:
        return cls(**{f.name: ckpt.get(f.name, f.default) for f in dataclasses.fields(cls)})

    def to_checkpoint(self) -> dict:
        return dataclasses.asdict(self)

    def update_best(self, step: int) -> None:
        """A checkpoint at ``step`` is the best-val candidate only if it was evaluated at that step."""
        if self.val_loss is not None and self.val_step == step:
            if self.best_val_loss is None or self.val_loss < self.best_val_loss:
                self.best_val_loss, self.best_step = self.val_loss, step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="a preset name (see configs/) or a .toml file")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue from the latest checkpoint of --out (or of a run dir / checkpoint PATH)",
    )
    add_field_arguments(parser)
    parser.add_argument(
        "--no-shuffle",
        dest="field_shuffle",
        action="store_const",
        const="false",
        help="read the data strictly in order (same as --shuffle false)",
    )
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
            raise UserError(
                f"cannot resume {resume_path} with a different {'; '.join(conflicts)}; "
                "drop these options or start a new run with another --out"
            )
    if not Path(cfg.data).is_dir():
        raise UserError(
            f"data directory {cfg.data} does not exist; make it with "
            f"`gpt2repro prepare --source embedded --out {cfg.data}`"
        )
    out = Path(cfg.out)
    if saved is None and ckpt_io.list_checkpoints(out):
        raise UserError(
            f"{out} already holds checkpoints; pass --resume to continue that run or choose another --out"
        )
    info, device = distributed.init(cfg.device)
    try:
        return TrainingRun(cfg, info, device, saved, resume_path).run()
    finally:
        distributed.teardown()


def _resolve_from(saved: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's own config with the command line on top (resuming without repeating --preset)."""
    base = {k: v for k, v in saved["train_config"].items() if k in TrainConfig.__dataclass_fields__}
    return resolve(None, {**base, **overrides})


class TrainingRun:
    """One run: trainer, loader, writer and state, set up from a config (and a checkpoint to resume)."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: distributed.DistInfo,
        device: torch.device,
        saved: dict | None = None,
        resume_path: Path | None = None,
    ):
        from gpt2repro.data import TokenLoader

        if not info.is_main:
            log.setLevel(logging.WARNING)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.cfg, self.info, self.device = cfg, info, device
        self.trainer = Trainer(cfg, device, info, saved["model_config"] if saved is not None else None)
        self.loader = TokenLoader(
            cfg.data,
            "train",
            cfg.micro_batch,
            cfg.seq_len,
            rank=info.rank,
            world_size=info.world_size,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
        )
        self.writer = RunWriter(Path(cfg.out), info.is_main)
        self.state = RunState()
        self.last_checkpoint = resume_path
        if saved is not None:
            self.trainer.load_state(saved)
            self._restore_rank_state(saved)
            self.state = RunState.from_checkpoint(saved)
        self.writer.start(cfg, resumed=saved is not None)
        self.peak, peak_source = peak_flops(device, self.trainer.dtype)
        self._log_setup(peak_source)
        if saved is not None:
            log.info("resumed from %s at step %d", resume_path, self.trainer.step)

    @property
    def model(self):
        """The plain GPT (no DDP/compile wrapper): what evaluation, sampling and checkpoints use."""
        return self.trainer.raw_model

    def _log_setup(self, peak_source: str) -> None:
        cfg, info, trainer = self.cfg, self.info, self.trainer
        listing = " ".join(f"{k}={v}" for k, v in cfg.to_dict().items())
        log.info(
            "resolved config:\n%s", textwrap.fill(listing, 110, initial_indent="  ", subsequent_indent="  ")
        )
        log.info(
            "device %s | dtype %s | %s processes | %.2fM parameters | context %d | compile %s",
            self.device,
            trainer.dtype,
            info.world_size,
            self.model.num_params() / 1e6,
            self.model.config.block_size,
            trainer.compiled,
        )
        peak = f"{self.peak / 1e12:.3f} TFLOP/s ({peak_source})" if self.peak else peak_source
        log.info(
            "batch %d tokens/step = %d micro x %d seq x %d accum x %d ranks | peak %s",
            cfg.total_batch,
            cfg.micro_batch,
            cfg.seq_len,
            trainer.grad_accum,
            info.world_size,
            peak,
        )

    def _restore_rank_state(self, saved: dict) -> None:
        loaders, rngs = saved["loader"], saved["rng"]
        if len(loaders) != self.info.world_size:
            raise UserError(
                f"the checkpoint was written by {len(loaders)} process(es) but this run has "
                f"{self.info.world_size}; resume with the same number of processes "
                "(--nproc_per_node)"
            )
        self.loader.load_state_dict(loaders[self.info.rank])
        ckpt_io.set_rng_state(rngs[self.info.rank])

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to ``max_steps`` (or the time limit), evaluating, sampling and checkpointing on the way."""
        cfg, trainer = self.cfg, self.trainer
        wall0 = time.perf_counter() - self.state.elapsed
        self.t_start, self.start_step = time.perf_counter(), trainer.step
        while trainer.step < cfg.max_steps:
            t0 = time.perf_counter()
            try:
                stats = trainer.train_step(self.loader.next_batch)
            except TrainingDiverged as e:
                raise TrainingDiverged(
                    f"{e}; last good checkpoint: {self.last_checkpoint or 'none'}"
                ) from None
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step = trainer.step
            self.state.tokens += cfg.total_batch
            self.state.elapsed = time.perf_counter() - wall0
            out_of_time = self._out_of_time()
            last = step == cfg.max_steps or out_of_time
            if step % cfg.log_every == 0 or last or step == self.start_step + 1:
                self._log_step(stats, dt)
            if _due(step, cfg.eval_every, last):
                self.evaluate(last)
            if _due(step, cfg.sample_every, last) and self.info.is_main and cfg.num_samples > 0:
                self.sample()
            if _due(step, cfg.checkpoint_every, last):
                self.save()
            if out_of_time and step < cfg.max_steps:
                log.info(
                    "time limit of %gs reached at step %d/%d: stopping here (--resume continues the run)",
                    cfg.time_limit,
                    step,
                    cfg.max_steps,
                )
                break
        val = self.state.val_loss
        log.info(
            "done: %d steps, %.0f s; val loss %s; run directory %s",
            trainer.step,
            self.state.elapsed,
            f"{val:.4f}" if val is not None else "n/a",
            cfg.out,
        )
        return {"step": trainer.step, "val_loss": val, "checkpoint": str(self.last_checkpoint)}

    def _record(self, **fields) -> dict:
        step = self.trainer.step
        return {"step": step, "tokens": self.state.tokens, "elapsed": round(self.state.elapsed, 3), **fields}

    def _log_step(self, stats: dict, dt: float) -> None:
        cfg, step = self.cfg, self.trainer.step
        tok_s = cfg.total_batch / dt
        util = mfu(tok_s / self.info.world_size, self.model.config, cfg.seq_len, self.peak)
        self.writer.record(self._record(**stats, dt=dt, tokens_per_s=tok_s, mfu=util))
        eta = (time.perf_counter() - self.t_start) / (step - self.start_step) * (cfg.max_steps - step)
        log.info(
            "step %5d/%d | loss %.4f | lr %.2e | norm %.3f | dt %4.0fms | %6.0f tok/s | mfu %s | eta %s",
            step,
            cfg.max_steps,
            stats["train_loss"],
            stats["lr"],
            stats["grad_norm"],
            dt * 1e3,
            tok_s,
            f"{util * 100:.1f}%" if util is not None else "n/a",
            _fmt_time(eta),
        )

    def _out_of_time(self) -> bool:
        """``time_limit`` reached (rank 0's clock decides, so every rank stops at the same step)."""
        if self.cfg.time_limit <= 0:
            return False
        over = time.perf_counter() - self.t_start >= self.cfg.time_limit
        return distributed.any_rank(over and self.info.is_main, self.info, self.device)

    # ------------------------------------------------------------------ evaluation, samples, checkpoints
    def evaluate(self, last: bool) -> None:
        from gpt2repro.evals.val import val_loss

        cfg, info, step = self.cfg, self.info, self.trainer.step
        t0 = time.perf_counter()
        result = val_loss(
            self.model,
            cfg.data,
            batch_size=cfg.eval_batch or cfg.micro_batch,
            seq_len=cfg.seq_len,
            max_tokens=cfg.eval_tokens or None,
            device=self.device,
            dtype=self.trainer.dtype,
            rank=info.rank,
            world_size=info.world_size,
        )
        self.state.val_loss, self.state.val_step = result["loss"], step
        rec = self._record(val_loss=result["loss"])
        msg = f"eval step {step}: val loss {result['loss']:.4f} ({result['tokens']:,} tokens"
        every = cfg.hellaswag_every or cfg.eval_every
        if cfg.hellaswag and _due(step, every, last):
            hella = self._hellaswag()
            rec.update(hella)
            msg += f"; hellaswag acc_norm {hella['hellaswag_acc_norm']:.4f}"
        self.writer.record(rec)
        log.info("%s, %.1fs)", msg, time.perf_counter() - t0)

    def _hellaswag(self) -> dict:
        from gpt2repro.evals.hellaswag import evaluate_hellaswag

        cfg, info = self.cfg, self.info
        res = evaluate_hellaswag(
            self.model,
            cfg.hellaswag,
            limit=cfg.hellaswag_limit,
            batch_size=cfg.eval_batch or cfg.micro_batch,
            device=self.device,
            dtype=self.trainer.dtype,
            rank=info.rank,
            world_size=info.world_size,
            progress=False,
        )
        return {"hellaswag_acc": float(res["acc"]), "hellaswag_acc_norm": float(res["acc_norm"])}

    def sample(self) -> None:
        texts = sample_texts(self.model, self.cfg, self.device, self.trainer.dtype)
        self.writer.samples(self.trainer.step, texts)
        for t in texts:
            log.info("sample: %r", t)

    def save(self) -> Path:
        """Write a checkpoint (every rank's loader and RNG state gathered to rank 0), then prune old ones."""
        cfg, info, step = self.cfg, self.info, self.trainer.step
        loaders = distributed.gather_objects(self.loader.state_dict(), info)
        rngs = distributed.gather_objects(ckpt_io.rng_state(), info)
        path = ckpt_io.checkpoint_path(cfg.out, step)
        if info.is_main:
            self.state.update_best(step)
            ckpt = {**self.trainer.state(), "loader": loaders, "rng": rngs, **self.state.to_checkpoint()}
            ckpt_io.atomic_save(ckpt, path)
            best = self.state.best_step
            keep = {best} if cfg.keep_best and best is not None else set()
            ckpt_io.prune_checkpoints(cfg.out, cfg.keep_last, keep)
            log.info("saved checkpoint %s", path)
        distributed.barrier(info)
        self.last_checkpoint = path
        return path


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def sample_texts(model, cfg: TrainConfig, device: torch.device, dtype: str) -> list[str]:
    """A few continuations of the fixed prompt from a generator seeded by the run seed (reproducible,
    and the training RNG is never touched)."""
    from gpt2repro.sample import SamplingOptions
    from gpt2repro.tokenizer import get_tokenizer

    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)] * cfg.num_samples, device=device)
    with autocast(device, dtype):
        options = SamplingOptions(top_k=50, generator=seeded_generator(cfg.seed, device))
        out = model.generate(prompt, cfg.sample_tokens, options)
    return [enc.decode(row.tolist()) for row in out]
