"""Peak memory of one GPT-2 training step with and without activation checkpointing, same run.

Default: GPT-2 124M (vocab padded to 50304), micro-batch B=4, T=512, fp32, CPU, AdamW from
``gpt2repro.optim``, one full optimizer step (forward, backward, clip, step, zero_grad).

    .venv/bin/python benchmarks/bench_memory.py [--model gpt2] [--batch 4] [--seq-len 512] [--dtype fp32]

How memory is measured, and why this way:

* CPU tensors have no allocator statistics (``torch.cuda.max_memory_allocated`` has no CPU twin), and
  ``tracemalloc`` does not see torch's allocations, so we read the process's own peak resident set size
  (``VmHWM`` in ``/proc/self/status``).
* Each variant runs in a fresh subprocess: the two peaks can never mix, and neither inherits the other's
  allocator state.
* A warm-up step first allocates what every step keeps (AdamW's moments) and pays one-time costs; then the
  peak is reset (``echo 5 > /proc/self/clear_refs``, Linux) and one more step is measured: that is the
  steady-state peak of a training step. We print it with the resident memory just before the step
  (parameters + optimizer state), and the difference (what the step itself needs on top: activations,
  gradients, temporaries).
* glibc's malloc by default keeps freed blocks of up to tens of MB in its heap, which would make the RSS
  reflect past allocations instead of live tensors. The children run with a fixed
  ``MALLOC_MMAP_THRESHOLD_=65536``, so every tensor bigger than 64 KiB is its own mapping, returned to
  the OS when freed: the resident set then follows the live tensors closely.
* As a cross-check independent of the allocator, each child also counts the bytes autograd saves for the
  backward pass during the forward (``saved_tensors_hooks``, parameters excluded). With checkpointing,
  the tensors of a recomputed block are not kept, only each block's input.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

VARIANTS = ("without checkpointing", "with checkpointing")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(match.group(1)) / 1024


def measure(args: argparse.Namespace, checkpointing: bool) -> dict:
    """In a fresh process: one warm-up step, then the peak RSS of one measured step."""
    import gc

    import torch

    from gpt2repro.config import GPTConfig
    from gpt2repro.model import GPT
    from gpt2repro.optim import make_optimizer
    from gpt2repro.runtime import autocast

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = GPT(GPTConfig.preset(args.model, vocab_pad_multiple=64, block_size=max(args.seq_len, 1024)))
    model.activation_checkpointing = checkpointing
    model.train()
    optimizer = make_optimizer(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device=device)
    x = torch.randint(0, 50257, (args.batch, args.seq_len))
    y = torch.randint(0, 50257, (args.batch, args.seq_len))
    params = {p.data_ptr() for p in model.parameters()}
    saved_bytes = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved_bytes
        if t.data_ptr() not in params:
            saved_bytes += t.numel() * t.element_size()
        return t

    def step(count_saved: bool) -> float:
        t0 = time.perf_counter()
        with autocast(device, args.dtype):
            if count_saved:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    _, loss = model(x, y)
            else:
                _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    step(count_saved=True)  # warm-up: allocates the AdamW moments
    gc.collect()
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    seconds = step(count_saved=False)
    peak = _status_mib("VmHWM")
    return {
        "before_mib": before,
        "peak_mib": peak,
        "step_mib": peak - before,
        "seconds": seconds,
        "saved_mib": saved_bytes / 2**20,
        "params_m": model.num_params() / 1e6,
    }


def run_child(args: argparse.Namespace, checkpointing: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "1" if checkpointing else "0",
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq-len",
        str(args.seq_len),
        "--dtype",
        args.dtype,
    ]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the measuring subprocess failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="GPTConfig preset (default gpt2 = 124M)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args, checkpointing=args.child == "1")))
        return

    from gpt2repro.calibration import describe_cpu

    print(describe_cpu())
    print(
        f"one training step of {args.model}, B={args.batch}, T={args.seq_len}, {args.dtype}, CPU "
        f"({os.cpu_count()} cores); each variant in its own fresh process"
    )
    results = {name: run_child(args, checkpointing=i == 1) for i, name in enumerate(VARIANTS)}
    print(f"{'':24}{'RSS before':>12}{'peak RSS':>12}{'step needs':>12}{'saved acts':>12}{'step time':>11}")
    for name, r in results.items():
        print(
            f"{name:24}{r['before_mib']:>8.0f} MiB{r['peak_mib']:>8.0f} MiB{r['step_mib']:>8.0f} MiB"
            f"{r['saved_mib']:>8.0f} MiB{r['seconds']:>9.2f} s"
        )
    plain, ckpt = (results[name] for name in VARIANTS)
    print(
        f"peak RSS: {ckpt['peak_mib']:.0f} vs {plain['peak_mib']:.0f} MiB, "
        f"{1 - ckpt['peak_mib'] / plain['peak_mib']:.1%} lower with checkpointing "
        f"({plain['peak_mib'] / ckpt['peak_mib']:.2f}x)"
    )
    print(
        f"memory the step needs on top of weights + optimizer state: {ckpt['step_mib']:.0f} vs "
        f"{plain['step_mib']:.0f} MiB, {1 - ckpt['step_mib'] / plain['step_mib']:.1%} lower"
    )
    print(
        f"activations kept for backward: {ckpt['saved_mib']:.0f} vs {plain['saved_mib']:.0f} MiB; "
        f"step time {ckpt['seconds'] / plain['seconds']:.2f}x (one more forward per block; wall time, "
        "noisy on a shared machine)"
    )


if __name__ == "__main__":
    main()
