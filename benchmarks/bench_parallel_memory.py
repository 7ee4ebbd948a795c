"""Per-rank memory of one training step under DDP and FSDP (2 gloo ranks on CPU, the same run), and the
per-GPU memory table of the README computed from it.

    .venv/bin/python benchmarks/bench_parallel_memory.py [--model gpt2] [--seq-len 128]

Part 1 (measured): torchrun starts 2 CPU processes per mode; each builds the real ``Trainer`` (gpt2 124M,
AdamW, vocabulary padded to 50304), runs one warm-up step (AdamW allocates its moments), then one
measured step. Each rank reports the bytes of the parameters, gradients and AdamW state it holds (its
local shards under FSDP, counted from the tensors themselves) and its peak RSS of the measured step.
FSDP's parameters + gradients + AdamW state per rank should be ~1/W of DDP's.

Part 2 (measured): the activation memory a step keeps per token for backward, counted exactly with
``saved_tensors_hooks`` (parameters excluded) in bf16 autocast, with and without activation
checkpointing, for 1- and 2-layer models of each size's width (per-layer cost = the difference).

Part 3 (computed, not measured): per-GPU memory to train gpt2 / medium / large / xl on 8 GPUs at
micro-batch 16 x 1024 tokens: 16 bytes per parameter (fp32 weights 4 + gradients 4 + AdamW 8), divided by
8 under FSDP, plus the bf16 copies of the weights in use (DDP: all of them, autocast's cache; FSDP: two
gathered blocks plus the root), plus activations per token x tokens. CUDA context and allocator
fragmentation (typically 1-3 GB) are not included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPUS, MICRO_BATCH, SEQ = 8, 16, 1024


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1)) / 1024


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # a DTensor's own shard
        total += t.numel() * t.element_size()
    return total


def worker(mode: str, model: str, seq_len: int, out: str) -> None:
    """One rank under torchrun: warm-up step, then the measured one."""
    import torch
    import torch.distributed as dist

    from gpt2repro import distributed
    from gpt2repro.train_config import TrainConfig
    from gpt2repro.trainer import Trainer

    info, device = distributed.init("cpu")
    cfg = TrainConfig(
        model=model,
        data="-",
        out="-",
        parallel=mode,
        seq_len=seq_len,
        micro_batch=1,
        total_batch=2 * seq_len,
        dtype="fp32",
        compile="false",
        device="cpu",
    )
    trainer = Trainer(cfg, device, info)
    gen = torch.Generator().manual_seed(info.rank)

    def batch():
        x = torch.randint(0, 50257, (1, seq_len), generator=gen)
        return x, x

    trainer.train_step(batch)
    params = _local_bytes(trainer.raw_model.parameters())
    optim = _local_bytes(t for s in trainer.optimizer.state.values() for t in s.values() if t.dim() > 0)
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    trainer.train_step(batch)
    peak = _status_mib("VmHWM")
    row = {
        "rank": info.rank,
        "params_mib": params / 2**20,
        "grads_mib": params / 2**20,
        "adamw_mib": optim / 2**20,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
    }
    rows = distributed.gather_objects(row, info)
    if info.is_main:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    distributed.teardown()


def measure_mode(mode: str, args: argparse.Namespace) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            __file__,
            "--worker",
            mode,
            "--model",
            args.model,
            "--seq-len",
            str(args.seq_len),
            "--out",
            f.name,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the {mode} ranks failed:\n{done.stderr[-3000:]}")
        return json.load(open(f.name))


def saved_bytes_per_token(preset: str, n_layer: int, checkpointing: bool, seq_len: int = 256) -> float:
    """Bytes autograd keeps for backward per token (bf16 autocast, CPU), parameters excluded."""
    import torch

    from gpt2repro.config import GPTConfig
    from gpt2repro.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, n_layer=n_layer, vocab_pad_multiple=64)).train()
    model.activation_checkpointing = checkpointing
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.numel())
        if t.data_ptr() not in params and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    x = torch.randint(0, 50257, (1, seq_len))
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        _, loss = model(x, x)
    return total / seq_len


def activation_table() -> dict[str, dict[str, float]]:
    """Per size: activation bytes per token for the whole model, with and without checkpointing."""
    from gpt2repro.config import GPTConfig

    table = {}
    for preset in PRESETS:
        n_layer = GPTConfig.preset(preset).n_layer
        row = {}
        for ckpt in (False, True):
            one, two = saved_bytes_per_token(preset, 1, ckpt), saved_bytes_per_token(preset, 2, ckpt)
            row["ac" if ckpt else "plain"] = one + (n_layer - 1) * (two - one)
        table[preset] = row
    return table


def computed_gib(preset: str, mode: str, acts: dict[str, float]) -> float:
    import torch

    from gpt2repro.config import GPTConfig
    from gpt2repro.model import GPT

    with torch.device("meta"):
        model = GPT(GPTConfig.preset(preset, vocab_pad_multiple=64))
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer.h[0].parameters())
    state = 16 * n / (GPUS if mode != "ddp" else 1)
    bf16_weights = 2 * n if mode == "ddp" else 2 * (2 * block + (n - len(model.transformer.h) * block))
    act = acts["ac" if mode == "fsdp+AC" else "plain"] * MICRO_BATCH * SEQ
    return (state + bf16_weights + act) / 2**30


def print_header() -> None:
    import platform

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = re.search(r"^model name\s*:\s*(.*)$", flags, re.MULTILINE)
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if re.search(rf"\b{f}\b", flags)]
    print(
        f"CPU: {model.group(1) if model else platform.processor()} | ISA: {' '.join(isa) or 'none'} | "
        f"{os.cpu_count()} cores | load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.seq_len, args.out)
        return
    print_header()
    print(f"part 1, measured: one step of {args.model}, micro-batch 1 x {args.seq_len}, fp32, 2 gloo ranks")
    print(
        f"{'mode':6}{'rank':>5}{'params':>10}{'grads':>10}{'AdamW':>10}{'p+g+AdamW':>11}{'RSS before':>12}"
        f"{'peak RSS':>10}"
    )
    totals = {}
    for mode in ("ddp", "fsdp"):
        for r in measure_mode(mode, args):
            state = r["params_mib"] + r["grads_mib"] + r["adamw_mib"]
            totals.setdefault(mode, []).append(state)
            print(
                f"{mode:6}{r['rank']:>5}{r['params_mib']:>7.0f} MiB{r['grads_mib']:>6.0f} MiB"
                f"{r['adamw_mib']:>6.0f} MiB{state:>7.0f} MiB{r['rss_before_mib']:>8.0f} MiB"
                f"{r['peak_rss_mib']:>6.0f} MiB"
            )
    ratio = max(totals["fsdp"]) / max(totals["ddp"])
    print(f"FSDP / DDP parameters+gradients+AdamW per rank: {ratio:.3f} (1/W = {1 / 2:.3f})")
    print("part 2, measured: activations kept for backward per token (bf16 autocast)")
    acts = activation_table()
    for preset, row in acts.items():
        print(
            f"  {preset:12} {row['plain'] / 2**10:8.1f} KiB/token, "
            f"with checkpointing {row['ac'] / 2**10:7.1f}"
        )
    print(f"part 3, computed: GiB per GPU, {GPUS} GPUs, micro-batch {MICRO_BATCH} x {SEQ} tokens, bf16")
    print(f"| model | {' | '.join(('ddp', 'fsdp', 'fsdp+AC'))} |\n|---|---|---|---|")
    for preset in PRESETS:
        cells = [f"{computed_gib(preset, mode, acts[preset]):.1f}" for mode in ("ddp", "fsdp", "fsdp+AC")]
        print(f"| {preset} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
