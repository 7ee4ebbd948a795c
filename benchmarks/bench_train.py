"""Training-step throughput and MFU: gpt2repro vs Hugging Face ``GPT2LMHeadModel``, same run, same settings.

One step = forward + backward + global-norm clip + fused AdamW (build-nanogpt's groups and
hyper-parameters) under autocast in --dtype (default: the trainer's auto choice, bf16 where the hardware
has native bf16 matmul). CPU: GPT-2 124M at B=4, T=256; MFU against the measured matmul peak of this
CPU in that dtype (gpt2repro.perf). CUDA: B=16, T=1024, both models compiled, MFU against the
data-sheet peak. The two models alternate in rounds so a busy machine slows both alike. HF runs without
dropout, like the recipe (GPT2Config's default is 0.1), and in the same process, so it shares the
allocator setting our trainer makes (runtime.keep_freed_cpu_memory).

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--rounds 2] [--device cpu|cuda] [--dtype auto]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpt2repro.calibration import describe_cpu
from gpt2repro.config import GPTConfig
from gpt2repro.optim import make_optimizer
from gpt2repro.perf import flops_per_token, peak_flops
from gpt2repro.runtime import autocast, parse_dtype, pick_device
from gpt2repro.train_config import TrainConfig
from gpt2repro.trainer import Trainer


def ours(batch: int, seq: int, device: torch.device, compile_: bool, dtype: str):
    cfg = TrainConfig(
        model="gpt2",
        data="-",
        out="-",
        seq_len=seq,
        micro_batch=batch,
        total_batch=batch * seq,
        dtype=dtype,
        compile=str(compile_).lower(),
        device=str(device),
    )
    trainer = Trainer(cfg, device)

    def step(x, y):
        trainer.train_step(lambda: (x, y))

    return step, trainer.raw_model.config


def hugging_face(batch: int, seq: int, device: torch.device, compile_: bool, dtype: str):
    import transformers

    # No dropout: the recipe (and our model in this run) has none; GPT2Config defaults to 0.1.
    hf_config = transformers.GPT2Config(
        n_positions=1024, n_embd=768, n_layer=12, n_head=12, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
    opt = make_optimizer(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, device=device)
    fwd = torch.compile(model) if compile_ else model

    def step(x, y):
        with autocast(device, dtype):
            loss = fwd(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, GPTConfig.preset("gpt2")


def timed(step, x, y, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    args = parser.parse_args()
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    batch, seq = (16, 1024) if on_gpu else (4, 256)
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    print(describe_cpu())
    dtype = parse_dtype(args.dtype, device)
    peak, source = peak_flops(device, dtype)
    print(
        f"device {device} | threads {torch.get_num_threads()} | B={batch} T={seq} {dtype} | "
        f"compile {on_gpu} | peak {peak / 1e12:.3f} TFLOP/s ({source})"
    )

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 50257, (batch, seq), generator=gen).to(device)
    y = torch.randint(0, 50257, (batch, seq), generator=gen).to(device)
    contenders = {
        "gpt2repro": ours(batch, seq, device, on_gpu, dtype),
        "hf GPT2LMHeadModel": hugging_face(batch, seq, device, on_gpu, dtype),
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for step, _ in contenders.values():
        timed(step, x, y, args.warmup, device)
    for _ in range(args.rounds):
        for name, (step, _) in contenders.items():
            times[name].append(timed(step, x, y, args.steps, device))

    tokens = batch * seq
    results, mfus = {}, {}
    for name, (_, config) in contenders.items():
        dt = statistics.median(times[name])
        tok_s = tokens / dt
        mfu = tok_s * flops_per_token(config, seq) / peak if peak else float("nan")
        results[name], mfus[name] = tok_s, mfu
        print(
            f"{name:>20}: {dt * 1e3:8.1f} ms/step | {tok_s:9.1f} tokens/s | MFU {mfu * 100:5.1f}% "
            f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in times[name])} ms)"
        )
    print(f"speed-up gpt2repro / HF: {results['gpt2repro'] / results['hf GPT2LMHeadModel']:.2f}x")
    # Both models run the same matmuls; the speed-up is bounded by how far HF is from the peak.
    hf_mfu = mfus["hf GPT2LMHeadModel"]
    print(
        f"ceiling (gpt2repro at 100% MFU): {1 / hf_mfu:.2f}x HF; "
        f"1.4x HF (issue 13) needs {1.4 * hf_mfu * 100:.0f}% MFU"
    )


if __name__ == "__main__":
    main()
