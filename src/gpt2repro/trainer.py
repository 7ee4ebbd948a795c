"""The optimizer step: model, AdamW, gradient accumulation, clipping, mixed precision, DDP.

``Trainer`` knows nothing of files, data or the run directory (train.py drives it), so tests and
``gpt2repro doctor`` can drive one directly. Its ``state()`` is what a checkpoint needs to continue the
optimisation exactly: parameters, AdamW moments, the loss scaler and the step count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.initial_model import initial_model
from gpt2repro.optim import lr_at, make_optimizer, set_lr
from gpt2repro.runtime import autocast, keep_freed_cpu_memory, parse_dtype
from gpt2repro.train_config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]


class TrainingDiverged(UserError):
    """The loss became NaN/inf: stop before the optimizer step corrupts the parameters."""


class Trainer:
    """Model, optimizer and the optimizer step; knows nothing of files, so tests can drive it directly."""

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
        self.grad_accum = cfg.grad_accum_steps(self.dist.world_size)
        if device.type == "cpu":
            keep_freed_cpu_memory()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts them)
        self.raw_model = initial_model(cfg, resume_config=resume_config).to(device)
        if cfg.seq_len > self.raw_model.config.block_size:
            raise UserError(
                f"--seq-len {cfg.seq_len} is longer than the model's context "
                f"{self.raw_model.config.block_size}; lower --seq-len or raise --block-size"
            )
        self.optimizer = make_optimizer(
            self.raw_model,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            device=device,
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
