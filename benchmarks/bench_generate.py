"""Greedy decoding speed on CPU: our KV-cached loop vs Hugging Face ``generate`` vs a no-cache loop.

Random-weight GPT-2 124M (the same weights in both models), batch 1, a short prompt, 256 new tokens.
The bench checks that all three produce the same tokens (in fp32 they do); the figures are tokens per
second of the timed runs.

    .venv/bin/python benchmarks/bench_generate.py [--new-tokens 256] [--repeats 2] [--threads N]
                                                  [--dtype fp32|bf16]

``--dtype bf16`` casts both models' weights to bf16 (as users decode on CPU: ``model.to(torch.bfloat16)``)
and measures the GEMV of bf16 weights as the yardstick; bf16 rounding may make the two models' tokens part.

On a CPU shared with other busy processes, every multi-threaded op waits at its thread barrier for a
descheduled thread (~10 ms per op here), so a decoding step costs "ops x barrier" rather than its
memory traffic; ``--threads 1`` measures the loops themselves.

Decoding one token reads every weight once, so its ceiling is memory bandwidth. The bench prints a
GEMV of the LM head's shape in the models' dtype (F.linear and the row-block bmm of
gpt2repro.kernels, and for bf16/fp16 the compiled product of gpt2repro.compiled_gemv; best of 5) and, for the
decode/GEMV ratio, pairs taken back to back inside one generation: a stream of 4 head GEMVs with each
kernel (the fastest one counts), then ``--chunk`` decode
steps, ``--rounds`` times; the median ratio of the pairs is the figure (the host's bandwidth swings
too much between minutes for one GEMV at the start to be the yardstick). It also times one step's own
products alone (each of the model's Linears called on one row, back to back, with nothing in
between): what a decode step would cost if everything but its GEMVs were free. The decode kernel of
each shape is chosen by calibration (logged); ``GPT2REPRO_DECODE_KERNEL=linear|bmm`` forces one.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from gpt2repro import GPT
from gpt2repro.calibration import best_interleaved, describe_cpu
from gpt2repro.compiled_gemv import HALF_DTYPES, linear_compiled
from gpt2repro.kernels import Linear, linear_by_row_blocks
from gpt2repro.sample import SamplingOptions, stream_tokens
from gpt2repro.tokenizer import get_tokenizer

PROMPT = "Hello, I'm a language model,"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fn) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def gemv_kernels(dtype: torch.dtype) -> dict:
    """The GEMV kernels the decode chooses between for weights of ``dtype``; the yardstick is the fastest."""
    kernels = {"F.linear": F.linear, "row-block bmm": linear_by_row_blocks}
    if dtype in HALF_DTYPES:
        kernels["compiled"] = linear_compiled
    return kernels


def gemv_bandwidth(weight: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """GB/s at which one row times ``weight`` streams the weight: each GEMV kernel, interleaved."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    products = gemv_kernels(weight.dtype)
    kernels = {name: functools.partial(product, x, weight, None) for name, product in products.items()}
    best = dict.fromkeys(kernels, float("inf"))
    with torch.inference_mode():
        for run in kernels.values():
            run()
        for _ in range(repeats):
            for name, run in kernels.items():
                t, _ = timed(run)
                best[name] = min(best[name], t)
    nbytes = weight.numel() * weight.element_size()
    return {name: nbytes / t / 1e9 for name, t in best.items()}


def gemv_stream_bandwidth(weight: torch.Tensor, kernel: str, calls: int = 4) -> float:
    """GB/s of ``calls`` back-to-back products of one row times ``weight``: a stream, as decoding is."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    product = gemv_kernels(weight.dtype)[kernel]
    with torch.inference_mode():
        t, _ = timed(lambda: [product(x, weight, None) for _ in range(calls)])
    return weight.numel() * weight.element_size() * calls / t / 1e9


def paired_bandwidth(model: GPT, idx: torch.Tensor, rounds: int, chunk: int) -> list[tuple[float, float]]:
    """(decode GB/s, GEMV GB/s) of ``rounds`` pairs taken back to back within one greedy generation: a
    stream of the LM head's GEMV (the fastest of the GEMV kernels, 4 products each), then
    ``chunk`` decode steps. On a shared host memory bandwidth swings by 20-30% from one minute to the
    next, so the decode is compared with the bandwidth of the same second, not of the start of the run."""
    head = model.lm_head.weight.detach()
    weight_bytes = weight_bytes_per_token(model)
    steps = stream_tokens(model, idx, rounds * chunk + 1, SamplingOptions(temperature=0))
    next(steps)  # the prefill is not a decode step
    pairs = []
    for _ in range(rounds):
        gemv = max(gemv_stream_bandwidth(head, kernel) for kernel in gemv_kernels(head.dtype))
        t, _ = timed(lambda: [next(steps) for _ in range(chunk)])
        pairs.append((weight_bytes * chunk / t / 1e9, gemv))
    return pairs


def products_alone_seconds(model: GPT, repeats: int = 3) -> float:
    """Seconds of a decode step's Linear calls alone: every Linear of the model on one row, back to back
    (best of ``repeats``), with the kernels the model chose. The GEMV floor of one step."""
    calls = [
        (layer, torch.randn(1, 1, layer.in_features, dtype=layer.weight.dtype))
        for layer in model.modules()
        if isinstance(layer, Linear)
    ]
    with torch.inference_mode():
        return best_interleaved({"alone": lambda: [layer(x) for layer, x in calls]}, repeats)["alone"]


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes of weights a decoding step reads: every matrix (the tied LM head once), not wpe's rows."""
    skip = {id(model.transformer.wpe.weight)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2 and id(p) not in skip)


def race(ours: GPT, run_ours, run_hf, repeats: int) -> tuple:
    """Alternate the two fast contenders so a change in machine load hits both; keep each one's best.
    Returns our time, tokens and products-alone time of our best run, then HF's time and tokens."""
    t_ours = t_hf = float("inf")
    for _ in range(repeats):
        alone = products_alone_seconds(ours)
        t, out_ours = timed(run_ours)
        if t < t_ours:
            t_ours, alone_then = t, alone
        t, out_hf = timed(run_hf)
        t_hf = min(t_hf, t)
    return t_ours, out_ours, alone_then, t_hf, out_hf


def print_bandwidth(
    ours: GPT, idx: torch.Tensor, args, t_ours: float, best_gemv: float, alone: float
) -> None:
    """The decode's share of the GEMV bandwidth (paired) and of one step spent in its products alone."""
    n = args.new_tokens
    weight_bytes = weight_bytes_per_token(ours)
    pairs = paired_bandwidth(ours, idx, args.rounds, args.chunk)
    ratios = [decode / gemv for decode, gemv in pairs]
    print(
        f"our decode streams the weights at {weight_bytes * n / t_ours / 1e9:.1f} GB/s (best run above); "
        f"paired with the best {args.dtype} GEMV of the LM head in the same second ({args.rounds} rounds of "
        f"{args.chunk} steps): median {statistics.median(ratios):.0%} of the GEMV's bandwidth "
        f"(range {min(ratios):.0%}-{max(ratios):.0%}; decode {statistics.median(d for d, _ in pairs):.1f} "
        f"GB/s, GEMV {statistics.median(g for _, g in pairs):.1f} GB/s, best single GEMV at the start "
        f"{best_gemv:.1f}); load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    step_ms = t_ours / n * 1e3
    n_linears = sum(isinstance(m, Linear) for m in ours.modules())
    print(
        f"one decode step {step_ms:.1f} ms (prefill included); its {n_linears} Linear calls alone, "
        f"back to back: {alone * 1e3:.1f} ms = {alone * 1e3 / step_ms:.0%} "
        f"of the step ({weight_bytes / alone / 1e9:.1f} GB/s)"
    )


def random_twins(dtype: torch.dtype) -> tuple[GPT2LMHeadModel, GPT]:
    """HF's GPT-2 124M with random weights, and ours loaded from it (the same weights), both in ``dtype``."""
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    hf.eval()
    hf.generation_config.eos_token_id = None  # always generate all n tokens, like our loop
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = GPT.from_pretrained(tmp).eval()
    return hf.to(dtype), ours.to(dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-cache-repeats", type=int, default=1, help="0 skips the (slow) no-cache loop")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="the weights of both models")
    parser.add_argument("--rounds", type=int, default=16, help="decode/GEMV pairs for the bandwidth figure")
    parser.add_argument("--chunk", type=int, default=16, help="decode steps per pair")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")  # the decode-kernel calibrations
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)

    hf, ours = random_twins(DTYPES[args.dtype])
    idx = torch.tensor([get_tokenizer().encode(PROMPT)])
    n = args.new_tokens
    if idx.size(1) + args.rounds * args.chunk + 1 > ours.config.block_size:
        parser.error("--rounds x --chunk must fit the context (a re-prefill would land in a timed chunk)")

    def run_ours(new=None):
        return ours.generate(idx, new or n, temperature=0)

    def run_no_cache(new=None):
        return ours.generate(idx, new or n, temperature=0, use_cache=False)

    def run_hf(new=None):
        with torch.inference_mode():
            return hf.generate(
                idx,
                attention_mask=torch.ones_like(idx),
                max_new_tokens=new or n,
                do_sample=False,
                use_cache=True,
                pad_token_id=50256,
            )

    print(describe_cpu())
    print(
        f"GPT-2 124M (random weights), {args.dtype} weights, CPU, {torch.get_num_threads()} threads, "
        f"prompt {idx.size(1)} tokens, {n} new tokens, greedy, batch 1"
    )
    gemv = gemv_bandwidth(ours.lm_head.weight.detach())
    print(
        f"{args.dtype} GEMV of the LM head "
        + "x".join(map(str, ours.lm_head.weight.shape))
        + ": "
        + ", ".join(f"{name} {gbs:.1f} GB/s" for name, gbs in gemv.items())
    )
    for fn in (run_ours, run_hf, run_no_cache)[: 3 if args.no_cache_repeats else 2]:  # warm-up
        fn(8)
    t_ours, out_ours, alone_then, t_hf, out_hf = race(ours, run_ours, run_hf, args.repeats)
    rows = [("gpt2repro (KV cache)", t_ours), ("HF generate (use_cache)", t_hf)]
    same = torch.equal(out_ours, out_hf)
    if args.no_cache_repeats:
        t_nc, out_nc = min((timed(run_no_cache) for _ in range(args.no_cache_repeats)), key=lambda r: r[0])
        same = same and torch.equal(out_ours, out_nc)
        rows.append(("gpt2repro no cache", t_nc))
    for name, t in rows:
        print(f"{name:26s} {n / t:8.1f} tokens/s  ({t:.2f} s)")
    no_cache = f"   vs no cache: {rows[2][1] / t_ours:.2f}x" if len(rows) > 2 else ""
    print(f"speed-up vs HF generate: {t_hf / t_ours:.2f}x{no_cache}   identical tokens: {same}")
    print_bandwidth(ours, idx, args, t_ours, max(gemv.values()), alone_then)


if __name__ == "__main__":
    main()
