"""One training run: setup (``TrainingRun.__init__``) and the loop (``run``), torchtitan's split.

``TrainingRun`` owns the ``Trainer`` (model, optimizer, step), the ``TokenLoader``, the ``RunWriter``
and the ``RunState`` (tokens seen, wall time, last and best validation loss); evaluation, samples and
checkpoints take nothing but the run. Every rank runs the same loop; rank 0 alone writes files, except
the shards of an FSDP checkpoint, which every rank writes.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro import checkpoint as ckpt_io
from gpt2repro import distributed
from gpt2repro.calibration import describe_cpu
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.perf import mfu, peak_flops
from gpt2repro.preemption import Preempted, StopSignals, resume_command, signal_name
from gpt2repro.run_writer import RunWriter
from gpt2repro.runtime import (
    autocast,
    enable_tf32,
    format_memory,
    memory_stats,
    sampling_dtype,
    seeded_generator,
)
from gpt2repro.sharded_checkpoint import PendingSave, start_save
from gpt2repro.train_config import TrainConfig
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
        enable_tf32(device)
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
        self.pending_save: PendingSave | None = None
        self._gloo_group = None
        if saved is not None:
            self.trainer.load_state(saved)
            self._restore_rank_state(saved)
            self.state = RunState.from_checkpoint(saved)
        self.writer.start(cfg, resumed=saved is not None, step=self.trainer.step)
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
        if self.device.type == "cpu":
            log.info("%s", describe_cpu())
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
        """The loader's position is global (the same on every rank), so it continues at any world size;
        each rank takes its own RNG state, or rank 0's when the run has grown (dropout then differs)."""
        loaders, rngs = saved["loader"], saved["rng"]
        rank, world = self.info.rank, self.info.world_size
        if len(loaders) != world:
            log.info(
                "resuming a %d-process checkpoint with %d process(es): the token stream continues "
                "exactly; gradients are reduced in another order",
                len(loaders),
                world,
            )
        self.loader.load_state_dict(loaders[0])
        ckpt_io.set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])

    # ------------------------------------------------------------------ the loop
    def run(self, signals: StopSignals | None = None, argv: list[str] | None = None) -> dict:
        """Train to ``max_steps`` (or the time limit, or a stop signal), evaluating, sampling and
        checkpointing on the way."""
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
            self.state.tokens += cfg.total_batch
            self.state.elapsed = time.perf_counter() - wall0
            self._finish_pending_save(wait=False)
            if not self._after_step(stats, dt):
                break
            stop = distributed.max_across_ranks(signals.received if signals else 0, self.info, self.device)
            if stop:
                self._stop_for_signal(int(stop), argv)
        self._finish_pending_save(wait=True)
        self.writer.close()
        val = self.state.val_loss
        log.info(
            "done: %d steps, %.0f s; val loss %s; run directory %s",
            trainer.step,
            self.state.elapsed,
            f"{val:.4f}" if val is not None else "n/a",
            cfg.out,
        )
        return {"step": trainer.step, "val_loss": val, "checkpoint": str(self.last_checkpoint)}

    def _after_step(self, stats: dict, dt: float) -> bool:
        """Log, evaluate, sample and checkpoint as due; False when the time limit ends the run here."""
        cfg, step = self.cfg, self.trainer.step
        out_of_time = self._out_of_time()
        last = step == cfg.max_steps or out_of_time
        if step % cfg.log_every == 0 or last or step == self.start_step + 1:
            self._log_step(stats, dt)
        if _due(step, cfg.eval_every, last):
            self.evaluate(last)
        # Under FSDP every rank takes part in each forward pass, so every rank samples (rank 0 writes).
        if _due(step, cfg.sample_every, last) and cfg.num_samples > 0 and (self.info.is_main or self.sharded):
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
            return False
        return True

    def _stop_for_signal(self, signum: int, argv: list[str] | None) -> None:
        """Checkpoint the step every rank has finished (unless just saved), then raise ``Preempted``."""
        step = self.trainer.step
        if ckpt_io.checkpoint_step(self.last_checkpoint or "") != step:
            self.save(use_async=False)
        self._finish_pending_save(wait=True)
        raise Preempted(
            f"stopped by {signal_name(signum)} at step {step}; resume with: {resume_command(argv)}"
        )

    def _record(self, **fields) -> dict:
        step = self.trainer.step
        return {"step": step, "tokens": self.state.tokens, "elapsed": round(self.state.elapsed, 3), **fields}

    def _log_step(self, stats: dict, dt: float) -> None:
        cfg, step = self.cfg, self.trainer.step
        tok_s = cfg.total_batch / dt
        util = mfu(tok_s / self.info.world_size, self.model.config, cfg.seq_len, self.peak)
        memory = memory_stats(self.device, reset_peak=True)
        self.writer.record(self._record(**stats, dt=dt, tokens_per_s=tok_s, mfu=util, **memory))
        eta = (time.perf_counter() - self.t_start) / (step - self.start_step) * (cfg.max_steps - step)
        log.info(
            "step %5d/%d | loss %.4f | lr %.2e | norm %.3f | dt %4.0fms | %6.0f tok/s | mfu %s | %s | eta %s",
            step,
            cfg.max_steps,
            stats["train_loss"],
            stats["lr"],
            stats["grad_norm"],
            dt * 1e3,
            tok_s,
            f"{util * 100:.1f}%" if util is not None else "n/a",
            format_memory(memory),
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

        cfg, _info, step = self.cfg, self.info, self.trainer.step
        t0 = time.perf_counter()
        result = val_loss(
            self.model, cfg.data, self.eval_setup, seq_len=cfg.seq_len, max_tokens=cfg.eval_tokens or None
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

        cfg, _info = self.cfg, self.info
        res = evaluate_hellaswag(self.model, cfg.hellaswag, self.eval_setup, limit=cfg.hellaswag_limit)
        return {"hellaswag_acc": float(res["acc"]), "hellaswag_acc_norm": float(res["acc_norm"])}

    def sample(self) -> None:
        texts = sample_texts(self.model, self.cfg, self.device, self.trainer.dtype)
        self.writer.samples(self.trainer.step, texts)
        for t in texts:
            log.info("sample: %r", t)

    @property
    def sharded(self) -> bool:
        return self.trainer.mode == "fsdp"

    @property
    def eval_setup(self) -> EvalSetup:
        """How evaluation splits its work over the ranks. An FSDP model needs every rank in every forward
        pass, so there each rank evaluates everything (and nothing is summed across ranks)."""
        rank, world = (0, 1) if self.sharded else (self.info.rank, self.info.world_size)
        return EvalSetup(
            self.cfg.eval_batch or self.cfg.micro_batch, self.device, self.trainer.dtype, rank, world
        )

    def save(self, use_async: bool | None = None) -> Path:
        """Checkpoint this step: every rank's loader and RNG state gathered to rank 0, the tensors as one
        file from rank 0 or, under FSDP, as shards from every rank (in the background with
        ``--async-checkpoint``); the newest ``keep_last`` and the best-val one are kept."""
        cfg, info, step = self.cfg, self.info, self.trainer.step
        loaders = distributed.gather_objects(self.loader.state_dict(), info)
        rngs = distributed.gather_objects(ckpt_io.rng_state(), info)
        self.state.update_best(step)
        extra = {"loader": loaders, "rng": rngs, **self.state.to_checkpoint()}
        path = ckpt_io.checkpoint_path(cfg.out, step)
        self._finish_pending_save(wait=True)  # one write at a time
        if self.sharded:
            path = path.with_suffix("")  # a directory of shards
            use_async = cfg.async_checkpoint if use_async is None else use_async
            self.pending_save = start_save(
                path,
                self.model,
                self.trainer.optimizer,
                {**self.trainer.train_state(), **extra},
                use_async=use_async,
                process_group=self._checkpoint_group() if use_async else None,
            )
            self._finish_pending_save(wait=not use_async)
        elif info.is_main:
            try:
                ckpt_io.atomic_save({**self.trainer.state(), **extra}, path)
                ckpt_io.write_checksum(path)
            except (OSError, RuntimeError) as e:  # a full disk surfaces as either
                raise ckpt_io.write_failed(e, path, self.last_checkpoint) from e
            self._checkpoint_done(path)
        distributed.barrier(info)
        self.last_checkpoint = path
        return path

    def _checkpoint_group(self):
        """async_save's background collectives need a group of their own (the loop's collectives go on
        meanwhile on the default one), on CPU (gloo), also when the default is NCCL."""
        if self._gloo_group is None:
            import torch.distributed as dist

            self._gloo_group = dist.new_group(backend="gloo")
        return self._gloo_group

    def _finish_pending_save(self, wait: bool) -> None:
        pending = self.pending_save
        if pending is None or not (wait or pending.done()):
            return
        self.pending_save = None
        self._checkpoint_done(pending.finish())

    def _checkpoint_done(self, path: Path) -> None:
        if not self.info.is_main:
            return
        best = self.state.best_step
        keep = {best} if self.cfg.keep_best and best is not None else set()
        ckpt_io.prune_checkpoints(self.cfg.out, self.cfg.keep_last, keep)
        log.info("saved checkpoint %s", path)


def _due(step: int, every: int, last: bool) -> bool:
    return last or (every > 0 and step % every == 0)


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def sample_texts(model, cfg: TrainConfig, device: torch.device, dtype: str) -> list[str]:
    """A few continuations of the fixed prompt from a generator seeded by the run seed (reproducible,
    and the training RNG is never touched). On CPU in sampling's own dtype (``runtime.sampling_dtype``:
    fp32), not under the training's bf16 autocast, which converts every weight again at every token
    (gpt2, 4 samples of 32 tokens on machine E: 2.8-2.9 s under bf16 autocast, 1.9-2.5 s in fp32)."""
    from gpt2repro.sample import SamplingOptions
    from gpt2repro.tokenizer import get_tokenizer

    enc = get_tokenizer()
    prompt = torch.tensor([enc.encode(SAMPLE_PROMPT)] * cfg.num_samples, device=device)
    with autocast(device, sampling_dtype(None, device) if device.type == "cpu" else dtype):
        options = SamplingOptions(top_k=50, generator=seeded_generator(cfg.seed, device))
        out = model.generate(prompt, cfg.sample_tokens, options)
    return [enc.decode(row.tolist()) for row in out]
