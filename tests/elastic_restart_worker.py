"""torchrun --max-restarts=1 worker: attempt 0 joins the group and its last rank fails; in attempt 1
the last rank joins 3 s late, so the others look up its address while only the previous attempt's is
in the store (whether an early rank dials the late one or waits for its call varies from run to run).
``--plain`` joins with torch's ``init_process_group`` (20-s timeout) instead of
``gpt2repro.distributed.init``."""

import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from gpt2repro import distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
last = rank == int(os.environ["WORLD_SIZE"]) - 1
if attempt == 1 and last:
    time.sleep(3)
if "--plain" in sys.argv:
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
else:
    distributed.init("cpu")
dist.all_reduce(torch.ones(1))
if attempt == 0:
    dist.barrier()
    if last:
        os._exit(1)  # the failure that makes torchrun restart the whole group
    time.sleep(60)  # torchrun stops this rank
print(f"attempt {attempt} rank {rank}: joined", flush=True)
distributed.teardown()
