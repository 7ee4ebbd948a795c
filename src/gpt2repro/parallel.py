"""How the model is spread over processes: one copy (``none``), replicas (``ddp``) or shards (``fsdp``).

torchtitan's "parallelize" step, written once: ``parallelize`` applies torch.compile, DDP or FSDP2
(``fully_shard`` on every ``Block``, then on the root, which holds the tied wte/lm_head as one
parameter); ``gradient_sync`` skips the gradient reduction of non-final micro-steps in both; the
global gradient norm is the same call for replicated and sharded gradients. PyTorch's own engine, no
home-made sharding: memory per rank for parameters + gradients + AdamW state falls as 1/world_size.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

from gpt2repro.distributed import DistInfo
from gpt2repro.errors import UserError

PARALLEL_MODES = ("auto", "none", "ddp", "fsdp")


def resolve_mode(choice: str, info: DistInfo, dtype: str) -> str:
    """``auto`` -> ddp under torchrun, none for one process; refuse what cannot work, in one line."""
    if choice not in PARALLEL_MODES:
        raise UserError(f"unknown --parallel {choice!r}; choose one of {', '.join(PARALLEL_MODES)}")
    if choice == "auto":
        return "ddp" if info.enabled else "none"
    if choice in ("ddp", "fsdp") and not info.enabled:
        raise UserError(
            f"--parallel {choice} needs processes started by torchrun: "
            f"`torchrun --nproc_per_node=N -m gpt2repro train ... --parallel {choice}` "
            "(a single process trains with --parallel none)"
        )
    if choice == "none" and info.world_size > 1:
        raise UserError(
            f"--parallel none with {info.world_size} processes would train {info.world_size} unrelated "
            "copies; use --parallel ddp or fsdp (or launch one process)"
        )
    if choice == "fsdp" and dtype == "fp16":
        raise UserError(
            "--parallel fsdp does not support --dtype fp16 (its loss scaler does not handle sharded "
            "gradients here): use --dtype bf16 or fp32, or --parallel ddp"
        )
    return choice


def uses_autocast(mode: str, device: torch.device, dtype: str) -> bool:
    """FSDP on CUDA casts through its MixedPrecisionPolicy instead of autocast."""
    return not (mode == "fsdp" and device.type == "cuda" and dtype == "bf16")


def parallelize(model: nn.Module, mode: str, device: torch.device, dtype: str, compile: bool) -> nn.Module:
    """The module the training step calls. ``model`` itself stays the plain GPT for evaluation and
    checkpoints (FSDP2 shards it in place: its parameters become DTensors)."""
    if mode == "fsdp":
        shard_model(model, device, dtype, compile)
        return model
    wrapped = torch.compile(model) if compile else model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(wrapped, device_ids=ids)
    return wrapped


def shard_model(model: nn.Module, device: torch.device, dtype: str, compile: bool = False) -> None:
    """``fully_shard`` every block, then the root (embeddings, final LayerNorm, tied head); on CUDA in
    bf16 the policy computes in bf16 and reduces gradients in fp32. Compiled per block, as torchtitan
    does: one small graph reused by every layer instead of one graph of the whole model."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The root returns its logits sliced to the real vocabulary (a view); nothing modifies them in place,
    # which is what FSDP's warning about returned views is about.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if device.type == "cuda" and dtype == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, mode: str, enabled: bool):
    """Reduce gradients only on the last micro-step of an accumulation (the others just accumulate)."""
    if mode == "fsdp":
        model.set_requires_gradient_sync(enabled)
    elif mode == "ddp" and not enabled:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global-norm clipping; over sharded gradients the norm is a DTensor reduced over every shard."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
