"""``gpt2repro eval``: one zero-shot task on one model, a table on stdout and optionally a JSON file.

Works on anything ``GPT.from_pretrained`` loads (HF GPT-2 directories, hub names when online, our
checkpoints and run directories), or on a seeded random model of a preset (smoke tests, benchmarks).
Under ``torchrun`` the examples are sharded over the processes; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.evals import hellaswag, lambada, perplexity, val
from gpt2repro.evals.scoring import EvalSetup, safe_exp
from gpt2repro.files import atomic_write, user_error_for
from gpt2repro.runtime import parse_dtype

TASKS = ("hellaswag", "wikitext2", "lambada", "val")
# --style per task: the first is what auto picks (HellaSwag: completion for the jsonl, harness for the
# derived text); "paper" is the GPT-2 paper's definition, "harness" lm-evaluation-harness's
STYLES = {
    "hellaswag": ("completion", "harness"),
    "wikitext2": ("paper", "harness"),
    "lambada": ("paper", "harness"),
    "val": (),
}
# per-task defaults of --batch-size: items (HellaSwag: 4 candidates each), windows, passages, sequences
DEFAULT_BATCH = {
    "hellaswag": hellaswag.DEFAULT_BATCH,
    "wikitext2": perplexity.DEFAULT_BATCH,
    "lambada": lambada.DEFAULT_BATCH,
    "val": val.DEFAULT_BATCH,
}
DEFAULT_VAL_TOKENS = 10_485_760  # build-nanogpt's budget: 20 steps x 524,288 tokens
METRIC_ORDER = ("acc", "acc_norm", "ppl", "loss", "word_ppl", "bpb", "byte_ppl", "token_ppl")


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
        choices=("auto", "paper", "completion", "harness"),
        help="task definition: harness = lm-evaluation-harness (hellaswag, wikitext2, lambada); "
        "paper = the GPT-2 paper's (wikitext2, lambada); completion = build-nanogpt/llm.c (hellaswag). "
        "auto (default): paper for wikitext2/lambada; for hellaswag completion on the official jsonl, "
        "harness on the derived text",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="first N examples (hellaswag, lambada; wikitext2 --style harness: pages) or tokens "
        f"(wikitext2 --style paper, val; val default {DEFAULT_VAL_TOKENS:,})",
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
        help="wikitext2 --style paper sliding-window stride (default 512, or half the context if shorter)",
    )
    p.add_argument(
        "--context",
        type=int,
        help="wikitext2 window / val sequence length (default: model block size, at most 1024)",
    )
    p.add_argument("--json", dest="json_path", help="also write the results as JSON to this file")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="fp32, bf16, fp16 or auto (bf16 where native or measured faster; default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_options(args: argparse.Namespace) -> str:
    """Refuse what cannot mean anything before the model loads; return the style to use."""
    for name in ("limit", "batch_size", "stride", "context"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    styles = STYLES[args.task]
    if args.style == "auto":  # hellaswag sniffs the file: completion for the official jsonl, else harness
        style = styles[0] if styles and args.task != "hellaswag" else "auto"
    elif args.style in styles:
        style = args.style
    else:
        allowed = ", ".join(styles) if styles else "auto (val has one definition)"
        raise UserError(f"--style {args.style} does not apply to --task {args.task}; choose {allowed}")
    if args.stride is not None and (args.task != "wikitext2" or style != "paper"):
        raise UserError(
            "--stride applies only to --task wikitext2 --style paper (harness windows never overlap)"
        )
    if args.context is not None and args.task not in ("wikitext2", "val"):
        raise UserError(f"--context applies to --task wikitext2 and val, not {args.task}")
    return style


def check_json_path(json_path: str | None) -> Path | None:
    """Make sure the result can be written before spending time on the evaluation."""
    if json_path is None:
        return None
    path = Path(json_path)
    if path.is_dir():
        raise UserError(f"--json {path} is a directory; pass a file name such as {path / 'result.json'}")
    blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UserError(f"--json {path}: {blocked} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise UserError(f"--json {path}: cannot write there ({e.strerror or e}); pass a writable path") from e
    return path


def load_model(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from gpt2repro.weights import load_or_init

    return load_or_init(args.model, args.model_preset, args.seed).to(device).eval()


def run_task(args: argparse.Namespace, model: torch.nn.Module, setup: EvalSetup, style: str) -> dict:
    """The metrics dict of ``args.task`` (identical on every rank)."""
    if args.task == "hellaswag":
        from gpt2repro.evals.hellaswag import evaluate_hellaswag

        return evaluate_hellaswag(model, args.data, setup, style=style, limit=args.limit)
    if args.task == "wikitext2":
        from gpt2repro.evals.perplexity import document_perplexity, read_text
        from gpt2repro.evals.wikitext import harness_perplexity
        from gpt2repro.hub import WIKITEXT2_TEST, fetch

        text = read_text(args.data or fetch(WIKITEXT2_TEST, "PATH/wikitext-2-raw/wiki.test.raw"))
        if style == "harness":
            return harness_perplexity(model, text, setup, context=args.context, limit=args.limit)
        return document_perplexity(
            model, text, setup, stride=args.stride, context=args.context, limit=args.limit
        )
    if args.task == "lambada":
        from gpt2repro.evals.lambada import evaluate_lambada
        from gpt2repro.hub import LAMBADA_TEST, fetch

        path = args.data or fetch(LAMBADA_TEST, "PATH/lambada_test.jsonl")
        return evaluate_lambada(model, path, setup, style=style, limit=args.limit)
    return _val_task(args, model, setup)


def _val_task(args: argparse.Namespace, model: torch.nn.Module, setup: EvalSetup) -> dict:
    from gpt2repro.evals.perplexity import resolve_context
    from gpt2repro.evals.val import val_loss
    from gpt2repro.verify import verify_dataset

    if not args.data:
        raise UserError("--task val needs --data DIR, a directory of prepared shards (gpt2repro prepare)")
    if not Path(args.data).is_dir():
        raise UserError(f"--data {args.data} is not a directory of prepared shards (gpt2repro prepare)")
    seq_len = resolve_context(model, args.context)
    verify_dataset(args.data, splits=("val",))  # a damaged shard is named, not scored
    result = val_loss(model, args.data, setup, seq_len=seq_len, max_tokens=args.limit or DEFAULT_VAL_TOKENS)
    loss = result["loss"]
    return {"loss": loss, "ppl": safe_exp(loss), "n": result["tokens"], "seq_len": seq_len}


def throughput(task: str, metrics: dict, elapsed: float) -> dict:
    """examples/s (HellaSwag items, LAMBADA passages, WikiText windows) and scored tokens/s where tokens
    are the unit (wikitext2, val)."""
    elapsed = max(elapsed, 1e-9)
    out = {}
    if task != "val":
        out["examples_per_s"] = round(metrics.get("windows", metrics["n"]) / elapsed, 2)
    if task in ("wikitext2", "val"):
        out["tokens_per_s"] = round(metrics["n"] / elapsed, 1)
    return out


def format_table(result: dict) -> str:
    """Two aligned columns: the headline metrics first, then the other fields."""
    keys = [k for k in METRIC_ORDER if k in result] + [k for k in result if k not in METRIC_ORDER]
    width = max(len(k) for k in keys)
    lines = []
    for k in keys:
        v = result[k]
        if k in ("elapsed_s", "examples_per_s", "tokens_per_s"):
            text = f"{v:.1f}" if k != "examples_per_s" else f"{v:.2f}"
        else:
            text = f"{v:.4f}" if isinstance(v, float) else str(v)
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> None:
    try:
        atomic_write(path, json.dumps(result, indent=2) + "\n")
    except OSError as e:
        raise user_error_for(e, "write the --json result", path) from e


def run(args: argparse.Namespace) -> int:
    style = check_options(args)
    json_path = check_json_path(args.json_path)  # every rank, before any of them joins the group
    info, device = distributed.init(args.device)
    try:
        dtype = parse_dtype(args.dtype, device)
        model = load_model(args, device)
        setup = EvalSetup.for_process(
            info, device, dtype, batch_size=args.batch_size, progress=not args.no_progress
        )
        t0 = time.perf_counter()
        metrics = run_task(args, model, setup, style)
        elapsed = time.perf_counter() - t0
        speed = throughput(args.task, metrics, elapsed)
        result = {
            "task": args.task,
            "n": metrics.pop("n"),
            **metrics,
            "model": args.model or f"preset:{args.model_preset} (random init, seed {args.seed})",
            "device": str(device),
            "dtype": dtype,
            "batch_size": setup.batch(DEFAULT_BATCH[args.task]),
            "world_size": info.world_size,
            "elapsed_s": round(elapsed, 3),
            **speed,
        }
        if info.is_main:
            print(format_table(result))
            if json_path is not None:
                write_json(json_path, result)  # rank 0 only
    finally:
        distributed.teardown()
    return 0
