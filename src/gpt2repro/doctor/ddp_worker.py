"""One rank of the doctor's DDP (or FSDP, as the spec's config says) check, started by
``python -m torch.distributed.run -m gpt2repro.doctor.ddp_worker SPEC.json RESULT.json``: a few training
steps, then an all-reduce bandwidth measurement; rank 0 writes both to RESULT.json."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def allreduce_bandwidth(device: torch.device, mib: int, iters: int) -> dict:
    """Seconds per all-reduce of ``mib`` MiB of fp32 and the bus bandwidth (nccl-tests' definition:
    algorithm bandwidth x 2(n-1)/n, the traffic each link carries in a ring)."""
    from gpt2repro.doctor.harness import synchronize

    world = dist.get_world_size()
    comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    data = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=comm_device)
    for _ in range(2):  # warm-up: communicator set-up, buffer registration
        dist.all_reduce(data)
    synchronize(comm_device)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(data)
    synchronize(comm_device)
    seconds = (time.perf_counter() - t0) / iters
    algbw = data.numel() * 4 / seconds
    return {
        "mib": mib,
        "seconds": seconds,
        "algbw_gbs": algbw / 1e9,
        "busbw_gbs": algbw * 2 * (world - 1) / world / 1e9,
        "backend": dist.get_backend(),
    }


def main(argv: list[str]) -> int:
    from gpt2repro import distributed
    from gpt2repro.doctor.harness import make_trainer, train_loader
    from gpt2repro.files import atomic_write
    from gpt2repro.train_config import resolve

    spec = json.loads(Path(argv[0]).read_text())
    cfg = resolve(None, spec["config"])
    info, device = distributed.init(cfg.device)
    try:
        trainer = make_trainer(cfg, device, info)
        loader = train_loader(cfg, rank=info.rank, world_size=info.world_size)
        losses = [trainer.train_step(loader.next_batch)["train_loss"] for _ in range(spec["steps"])]
        mib = spec["allreduce_mib"]
        bandwidth = allreduce_bandwidth(device, mib, spec["allreduce_iters"]) if mib else None
        if info.is_main:
            result = {
                "world_size": info.world_size,
                "losses": losses,
                "allreduce": bandwidth,
                "device": str(device),
                "ddp": type(trainer.model).__name__,
            }
            atomic_write(argv[1], json.dumps(result))
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
