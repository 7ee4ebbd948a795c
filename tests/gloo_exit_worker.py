"""torchrun worker that exits right after a collective, as a training run does.

A DDP wrapper keeps the gloo group alive past ``destroy_process_group``; the last all-reduce is not
waited on, so the group's worker thread holds the last reference to its tensor (in a training run
that happens by chance, when the worker drops a finished work after the main thread); and a long
switch interval keeps the GIL on the main thread. The worker then waits for the GIL until the
interpreter finalizes, and is killed inside C++: the process aborts. ``--plain`` ends with torch's
``destroy_process_group`` alone; otherwise with ``gpt2repro.distributed.teardown``.
"""

import sys

import torch
import torch.distributed as dist

from gpt2repro import distributed

sys.setswitchinterval(10.0)
distributed.init("cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
dist.all_reduce(torch.ones(1000), async_op=True)  # not waited on: the group's worker drops it last
if "--plain" in sys.argv:
    dist.destroy_process_group()
else:
    distributed.teardown()
