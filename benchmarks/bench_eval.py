"""HellaSwag examples/s: our batched scorer vs build-nanogpt's one-example-at-a-time loop, same run.

Peer (written here after build-nanogpt's ``hellaswag.py`` method, not copied): each example's 4 candidates
(context + ending) form one right-padded batch of 4; full logits at every position, per-token
cross-entropy, masked sum and mean over the ending tokens.

The official hellaswag_val.jsonl is not available offline, so both modes run on the derived text file
(harness-style contexts/endings) from ../shared/data; the scoring work is the same as on the jsonl.
Random-weight GPT-2 124M (the released weights cannot be downloaded here), CPU, fp32 unless --dtype.

    .venv/bin/python benchmarks/bench_eval.py [--items 500] [--batch-size 16] [--dtype fp32] [--chunk 100]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gpt2repro.calibration import describe_cpu
from gpt2repro.config import GPTConfig
from gpt2repro.evals.hellaswag import candidate_tokens, load_hellaswag, score_hellaswag
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.model import GPT
from gpt2repro.runtime import autocast

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DERIVED = SHARED_DATA / "hellaswag" / "derived-not-original" / "hellaswag_val_full.txt.bz2"


@torch.inference_mode()
def one_example_at_a_time(model: GPT, items, dtype: str, device: torch.device) -> list[tuple[int, int]]:
    """build-nanogpt's way: (pred by summed loss, pred by mean loss) per example, 4 rows per forward."""
    preds = []
    for item in items:
        pairs = candidate_tokens(item, "harness")
        width = max(len(c) + len(e) for c, e in pairs)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, (c, e) in enumerate(pairs):
            tokens[i, : len(c) + len(e)] = torch.tensor(c + e)
            mask[i, len(c) : len(c) + len(e)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(device, dtype):
            logits, _ = model(tokens)
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        shift_mask = mask[:, 1:]
        summed = (losses * shift_mask).sum(dim=1)
        mean = summed / shift_mask.sum(dim=1)
        preds.append((int(summed.argmin()), int(mean.argmin())))  # the .item() syncs, as in build-nanogpt
    return preds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward of the batched scorer")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--chunk", type=int, default=100, help="items per alternation between the two modes")
    p.add_argument("--data", default=str(DERIVED))
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2")).to(device).eval()
    items, style = load_hellaswag(args.data, "harness", limit=args.items)
    print(describe_cpu())
    where = "CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(
        f"HellaSwag, first {len(items)} items of {Path(args.data).name} ({style} style), "
        f"random-weight GPT-2 124M, {where}, {torch.get_num_threads()} CPU threads, {args.dtype}"
    )
    score_hellaswag(model, items[:8], EvalSetup(4, device, args.dtype), style=style)  # warm-up
    one_example_at_a_time(model, items[:2], args.dtype, device)

    # The two modes alternate over chunks of items, so a change in machine load hits both alike.
    peer, ours, t_peer, t_ours = [], [], 0.0, 0.0
    for start in range(0, len(items), args.chunk):
        chunk = items[start : start + args.chunk]
        t0 = time.perf_counter()
        peer += one_example_at_a_time(model, chunk, args.dtype, device)
        t_peer += time.perf_counter() - t0
        t0 = time.perf_counter()
        ours += score_hellaswag(model, chunk, EvalSetup(args.batch_size, device, args.dtype), style=style)
        t_ours += time.perf_counter() - t0
        print(
            f"  {start + len(chunk)}/{len(items)}: {t_peer:.1f}s one at a time, {t_ours:.1f}s batched",
            flush=True,
        )

    # harness acc_norm divides by characters, build-nanogpt's by tokens: compare the acc (summed) predictions
    agree = sum(o.pred == p_[0] for o, p_ in zip(ours, peer, strict=True))
    n = len(items)
    print(f"one example at a time (build-nanogpt): {n / t_peer:8.2f} examples/s ({t_peer:.1f}s)")
    print(f"batched, {args.batch_size} examples/forward (ours): {n / t_ours:8.2f} examples/s ({t_ours:.1f}s)")
    print(f"speed-up: {t_peer / t_ours:.2f}x   (summed-loss predictions agree on {agree}/{n})")


if __name__ == "__main__":
    main()
