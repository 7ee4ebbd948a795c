"""AdamW with GPT-2's parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on tensors with >= 2 dims (matmul weights, embeddings); none on biases and LayerNorm.

    Tied tensors (wte / lm_head) appear once: ``named_parameters`` de-duplicates them.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW, fused where this torch build has a fused kernel for ``device`` (else foreach)."""
    groups = param_groups(model, weight_decay)
    kwargs = dict(lr=lr, betas=betas, eps=eps)
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, *, max_lr: float, min_lr_ratio: float, warmup_steps: int, decay_steps: int) -> float:
    """build-nanogpt's schedule: linear warmup to ``max_lr`` over ``warmup_steps`` (step 0 gets
    max_lr/warmup), cosine decay to ``max_lr * min_lr_ratio`` at ``decay_steps``, constant after."""
    min_lr = max_lr * min_lr_ratio
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
