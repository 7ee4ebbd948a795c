"""The optimizer step: model, AdamW, gradient accumulation, clipping, mixed precision, DDP.

``Trainer`` knows nothing of files, data or the run directory (train.py drives it), so tests and
``gpt2repro doctor`` can drive one directly. Its ``state()`` is what a checkpoint needs to continue the
optimisation exactly: parameters, AdamW moments, the loss scaler and the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2repro import distributed
from gpt2repro.config import GPTConfig
from gpt2repro.errors import UserError, first_line
from gpt2repro.initial_model import SCRATCH, initial_model
from gpt2repro.model import GPT
from gpt2repro.optim import lr_at, make_optimizer, set_lr
from gpt2repro.parallel import (
    clip_grad_norm,
    gradient_sync,
    is_sharded,
    parallelize,
    resolve_mode,
    shard_model,
    uses_autocast,
)
from gpt2repro.runtime import autocast, keep_freed_cpu_memory, parse_dtype
from gpt2repro.sharded_checkpoint import (
    broadcast_full_into_shards,
    full_optimizer_state,
    load_full_into_shards,
    load_tensors_into,
)
from gpt2repro.train_config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(UserError):
    """The loss became NaN/inf: stop before the optimizer step corrupts the parameters."""


class Trainer:
    """Model, optimizer and the optimizer step; knows nothing of files, so tests can drive it directly.

    ``raw_model`` is the plain ``GPT`` (sharded in place under FSDP) that evaluation, sampling and
    checkpoints use; ``model`` is what the step calls (compiled and/or DDP-wrapped).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        dist_info: distributed.DistInfo | None = None,
        resume_config: dict | None = None,
    ):
        self.cfg = cfg
        self.device = device
        self.dist = dist_info or distributed.DistInfo()
        self.dtype = parse_dtype(cfg.dtype, device)
        self.mode = resolve_mode(cfg.parallel, self.dist, self.dtype)
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        self.compiled = use_compile(cfg.compile, device)
        if device.type == "cpu":
            keep_freed_cpu_memory()
        self.raw_model = self._build_model(resume_config)
        if cfg.seq_len > self.raw_model.config.block_size:
            raise UserError(
                f"--seq-len {cfg.seq_len} is longer than the model's context "
                f"{self.raw_model.config.block_size}; lower --seq-len or raise --block-size"
            )
        if is_sharded(self.raw_model):
            self.model = self.raw_model
        else:
            self.model = parallelize(self.raw_model, self.mode, device, self.dtype, self.compiled)
        self.optimizer = make_optimizer(  # after sharding: under FSDP each rank updates its shards only
            self.raw_model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            device=device,
        )
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype == "fp16" else None
        self.step = 0

    @property
    def autocast_dtype(self) -> str:
        """The forward's autocast precision (FSDP on CUDA casts through its policy instead)."""
        return self.dtype if uses_autocast(self.mode, self.device, self.dtype) else "fp32"

    def _build_model(self, resume_config: dict | None) -> GPT:
        cfg = self.cfg
        if self.mode == "fsdp" and resume_config is None and cfg.init_from != SCRATCH:
            return self._pretrained_into_shards()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        return initial_model(cfg, resume_config=resume_config).to(self.device)

    def _pretrained_into_shards(self) -> GPT:
        """``--init-from`` under FSDP: rank 0 alone reads the weights; every rank builds the model on the
        meta device (no memory), shards it, and receives only its own shards."""
        full = initial_model(self.cfg) if self.dist.is_main else None
        config = distributed.broadcast_object(full.config.to_dict() if full is not None else None, self.dist)
        with torch.device("meta"):
            model = GPT(GPTConfig.from_dict(config))
        model.activation_checkpointing = self.cfg.activation_checkpointing
        shard_model(model, self.device, self.dtype, self.compiled)
        model.to_empty(device=self.device)
        broadcast_full_into_shards(model, full.state_dict() if full is not None else None)
        return model

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(
            step,
            max_lr=c.lr,
            min_lr_ratio=c.min_lr_ratio,
            warmup_steps=c.warmup_steps,
            decay_steps=c.lr_floor_step,
        )

    def train_step(self, next_batch: Callable[[], Batch]) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns loss, grad norm and lr."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            last = micro == self.grad_accum - 1
            with gradient_sync(self.model, self.mode, enabled=last):
                with autocast(self.device, self.autocast_dtype):
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
        grad_norm = clip_grad_norm(self.raw_model, max_norm)
        lr = self.lr(self.step)
        set_lr(self.optimizer, lr)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"train_loss": loss_value, "grad_norm": grad_norm, "lr": lr}

    # ------------------------------------------------------------------ checkpoint state
    def train_state(self) -> dict:
        """Everything but the tensors: what a sharded checkpoint keeps in ``train_state.pt``."""
        return {
            "model_config": self.raw_model.config.to_dict(),
            "step": self.step,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "train_config": self.cfg.to_dict(),
        }

    def state(self) -> dict:
        """A single-file checkpoint's model/optimizer part (whole tensors; not for FSDP runs)."""
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.train_state(),
        }

    def load_state(self, ckpt: dict) -> None:
        """Continue from a checkpoint of any mode and width: a sharded one (DCP reshards it) or a single
        file (loaded as is, or sharded into this run's FSDP model)."""
        try:
            if "sharded_path" in ckpt:
                load_tensors_into(Path(ckpt["sharded_path"]), self.raw_model, self.optimizer)
            elif is_sharded(self.raw_model):
                plain = self._plain_copy(ckpt)
                optim_sd = full_optimizer_state(plain, self._plain_optimizer(plain, ckpt))
                load_full_into_shards(self.raw_model, self.optimizer, plain.state_dict(), optim_sd)
            else:
                self.raw_model.load_state_dict(ckpt["model"])
                self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"the checkpoint does not match this model/optimizer ({first_line(e)}); "
                "resume with the run's original model options"
            ) from e
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])

    def _plain_copy(self, ckpt: dict) -> GPT:
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    def _plain_optimizer(self, plain: GPT, ckpt: dict) -> torch.optim.Optimizer:
        c = self.cfg
        opt = make_optimizer(
            plain,
            lr=c.lr,
            weight_decay=c.weight_decay,
            betas=(c.beta1, c.beta2),
            eps=c.eps,
            device=torch.device("cpu"),
        )
        opt.load_state_dict(ckpt["optimizer"])
        return opt


def use_compile(choice: str, device: torch.device) -> bool:
    """``auto`` compiles on CUDA only: on CPU, inductor's compile time (minutes on 2 cores) outweighs
    its gain for a short run; ``--compile true`` forces it."""
    if choice == "auto":
        return device.type == "cuda"
    return choice == "true"
