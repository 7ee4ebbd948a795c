"""torch.distributed set-up for ``torchrun``: NCCL on CUDA, gloo on CPU; a no-op for a single process.

``torchrun --nproc_per_node=N -m gpt2repro train …`` sets RANK, WORLD_SIZE, LOCAL_RANK (and the
rendezvous variables for multi-node); ``init()`` reads them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2repro.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def info_from_env() -> DistInfo:
    """This process's place as torchrun announced it, before (or without) joining the process group."""
    if not launched_by_torchrun():
        return DistInfo()
    try:
        rank, world, local = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError as e:
        raise UserError("RANK/WORLD_SIZE/LOCAL_RANK are malformed; launch with torchrun") from e
    return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=True)


def init(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; return this process's rank info and device.

    Each CUDA process takes ``cuda:LOCAL_RANK``; CPU processes use gloo.
    """
    from gpt2repro.runtime import pick_device

    if not launched_by_torchrun():
        return DistInfo(), pick_device(device_name)
    info = info_from_env()
    local = info.local_rank
    device = pick_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        store = _attempt_store(info)
        if store is not None:
            kwargs.update(store=store, rank=info.rank, world_size=info.world_size)
        dist.init_process_group(backend=backend, **kwargs)
    return info, device


def _attempt_store(info: DistInfo) -> dist.Store | None:
    """torchrun's store, in a namespace of this restart's own, when torchrun shares its store.

    torchrun (``--max-restarts``) keeps one store for all the attempts of a run, and the workers of a
    restart then read the previous attempt's keys: gloo connects to the dead ranks' addresses
    (``connectFullMesh ... Connection refused``) or never pairs (a hang until the 30-minute timeout),
    NCCL gets the previous unique id (pytorch/pytorch#135712). Every rank of an attempt has the same
    ``TORCHELASTIC_RESTART_COUNT`` while the nodes restart together; a run whose nodes join at
    different times should set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (then this returns None).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout

    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        info.world_size,
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(f"gpt2repro/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)


# How long teardown releases the GIL so that the groups' worker threads can drop their finished work.
_WORKER_DRAIN_SECONDS = 0.1


def teardown() -> None:
    """Destroy the process groups, then pause with the GIL released before the interpreter exits.

    DDP and FSDP keep their group alive in C++ after ``destroy_process_group`` (its gloo worker threads
    keep running), and a worker that drops the last collective's tensors needs the GIL: once the
    interpreter is finalizing, that thread is killed inside C++ and the process aborts after all its
    work is done (SIGABRT, ``terminate called without an active exception``: torchrun then reports a
    failed run). ``tests/integration/test_distributed.py`` reproduces it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(_WORKER_DRAIN_SECONDS)


def _collective_device(device: torch.device | str) -> torch.device:
    """gloo reduces CPU tensors only; NCCL needs them on this rank's GPU."""
    return torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(device)


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average ``t`` over ranks in place (identity for a single process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def sum_across_ranks(
    values: Sequence[float], device: torch.device | str = "cpu", world_size: int | None = None
) -> list[float]:
    """Add per-rank totals (losses x counts, token counts, log-likelihoods) over all processes, in
    float64 so that summing millions of per-token terms loses nothing. Identity on one process, and
    for ``world_size=1``: work that every rank did whole (e.g. evaluating an FSDP model) is not summed."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def max_across_ranks(value: float, info: DistInfo, device: torch.device | str = "cpu") -> float:
    """The largest ``value`` of any rank, on every rank (e.g. a stop signal number, 0 for none)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=_collective_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def any_rank(flag: bool, info: DistInfo, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on at least one: ranks must agree on when to stop."""
    return bool(max_across_ranks(float(flag), info, device))


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's ``obj`` (e.g. its loader position and RNG state), in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    objs = [None] * info.world_size
    dist.all_gather_object(objs, obj)
    return objs


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's ``obj`` on every rank (e.g. the configuration of weights only rank 0 has read)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
