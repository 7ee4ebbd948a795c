"""``gpt2repro eval``: one zero-shot task on one model, a table on stdout and optionally a JSON file.

Works on anything ``GPT.from_pretrained`` loads (HF GPT-2 directories, hub names when online, our
checkpoints and run directories), or on a seeded random model of a preset (smoke tests, benchmarks).
Under ``torchrun`` the examples are sharded over the processes; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.runtime import parse_dtype

TASKS = ("hellaswag", "wikitext2", "lambada", "val")
# per-task defaults of --batch-size: items (HellaSwag: 4 candidates each), windows, passages, sequences
DEFAULT_BATCH = {"hellaswag": 16, "wikitext2": 4, "lambada": 16, "val": 8}
DEFAULT_VAL_TOKENS = 10_485_760  # build-nanogpt's budget: 20 steps x 524,288 tokens
METRIC_ORDER = ("acc", "acc_norm", "ppl", "loss", "word_ppl", "bpb", "token_ppl")


def add_arguments(p: argparse.ArgumentParser) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--model", help="HF GPT-2 directory, hub name (e.g. gpt2), checkpoint file or run directory"
    )
    which.add_argument(
        "--model-preset", help="random-init model of this preset (gpt2, gpt2-micro, ...), seeded"
    )
    p.add_argument(
        "--seed", type=int, default=1337, help="seed of the --model-preset random init (default 1337)"
    )
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument(
        "--data",
        help="task data: HellaSwag jsonl/derived text, wiki.test.raw, lambada_test.jsonl, "
        "or a prepared shard directory (val); hellaswag/wikitext2/lambada download and cache if omitted",
    )
    p.add_argument(
        "--style",
        default="auto",
        choices=("auto", "completion", "harness"),
        help="HellaSwag scorer: completion (build-nanogpt/llm.c) or harness (lm-evaluation-harness); "
        "auto = completion for the official jsonl, harness for the derived text (default)",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="first N examples (hellaswag, lambada) or tokens (wikitext2, val; "
        f"val default {DEFAULT_VAL_TOKENS:,})",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="examples/windows/sequences per forward pass "
        f"(default {', '.join(f'{k} {v}' for k, v in DEFAULT_BATCH.items())})",
    )
    p.add_argument(
        "--stride",
        type=int,
        help="wikitext2 sliding-window stride (default 512, or half the context if that is shorter)",
    )
    p.add_argument(
        "--context",
        type=int,
        help="wikitext2 window / val sequence length (default: model block size, at most 1024)",
    )
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (bf16 where native, default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from gpt2repro.weights import load_or_init

    return load_or_init(args.model, args.model_preset, args.seed).to(device).eval()


def run_task(args: argparse.Namespace, model, device: torch.device, dtype: str, info) -> dict:
    """The metrics dict of ``args.task`` (identical on every rank)."""
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive integer, got {args.limit}")
    batch_size = args.batch_size or DEFAULT_BATCH[args.task]
    if batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    common = dict(
        batch_size=batch_size, device=device, dtype=dtype, rank=info.rank, world_size=info.world_size
    )
    progress = not args.no_progress
    if args.task == "hellaswag":
        from gpt2repro.evals.hellaswag import evaluate_hellaswag

        return evaluate_hellaswag(
            model, args.data, style=args.style, limit=args.limit, progress=progress, **common
        )
    if args.task == "wikitext2":
        from gpt2repro.evals.perplexity import document_perplexity, read_text
        from gpt2repro.hub import WIKITEXT2_TEST, fetch

        path = args.data or fetch(WIKITEXT2_TEST, "PATH/wikitext-2-raw/wiki.test.raw")
        return document_perplexity(
            model,
            read_text(path),
            stride=args.stride,
            context=args.context,
            limit=args.limit,
            progress=progress,
            **common,
        )
    if args.task == "lambada":
        from gpt2repro.evals.lambada import evaluate_lambada
        from gpt2repro.hub import LAMBADA_TEST, fetch

        path = args.data or fetch(LAMBADA_TEST, "PATH/lambada_test.jsonl")
        return evaluate_lambada(model, path, limit=args.limit, progress=progress, **common)
    from gpt2repro.evals.val import val_loss

    if not args.data:
        raise UserError("--task val needs --data DIR, a directory of prepared shards (gpt2repro prepare)")
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data} is not a directory of prepared shards (gpt2repro prepare)")
    seq_len = args.context or min(model.config.block_size, 1024)
    result = val_loss(
        model, args.data, seq_len=seq_len, max_tokens=args.limit or DEFAULT_VAL_TOKENS, **common
    )
    return {"loss": result["loss"], "ppl": _exp(result["loss"]), "n": result["tokens"], "seq_len": seq_len}


def _exp(x: float) -> float:
    from gpt2repro.evals.scoring import safe_exp

    return safe_exp(x)


def format_table(result: dict) -> str:
    """Two aligned columns: the headline metrics first, then the other fields."""
    keys = [k for k in METRIC_ORDER if k in result] + [k for k in result if k not in METRIC_ORDER]
    width = max(len(k) for k in keys)
    lines = []
    for k in keys:
        v = result[k]
        text = f"{v:.4f}" if isinstance(v, float) and k not in ("elapsed_s",) else str(v)
        if k == "elapsed_s":
            text = f"{v:.1f}"
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    info, device = distributed.init(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
        model = load_model(args, device)
        t0 = time.perf_counter()
        metrics = run_task(args, model, device, dtype, info)
        result = {
            "task": args.task,
            "n": metrics.pop("n"),
            **metrics,
            "model": args.model or f"preset:{args.model_preset} (random init, seed {args.seed})",
            "device": str(device),
            "dtype": dtype,
            "world_size": info.world_size,
            "elapsed_s": round(time.perf_counter() - t0, 3),
        }
        if info.is_main:
            print(format_table(result))
            if args.json_path:
                path = Path(args.json_path)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        distributed.teardown()
    return 0
