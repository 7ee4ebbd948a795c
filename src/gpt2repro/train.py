"""``gpt2repro train``: the command, and ``train()``, which decides what to run or resume.

Recipe (build-nanogpt's GPT-2 124M, the ``gpt2-124m`` preset): AdamW with decay on >= 2-D tensors only,
warmup + cosine LR, global-norm clipping, gradient accumulation, bf16 autocast, torch.compile on CUDA,
one process or many under torchrun (``--parallel ddp`` replicas or ``fsdp`` shards: parallel.py).

Where the rest lives: the loop and the run's state in training_run.py, the optimizer step in
trainer.py, the run directory's files in run_writer.py (the README's table lists them), checkpoints
in checkpoint.py / sharded_checkpoint.py, stop signals in preemption.py. Exact resume: a checkpoint
holds everything the next step depends on, so on CPU in fp32 a run killed at any point and resumed
ends with bit-identical parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

from gpt2repro import checkpoint as ckpt_io
from gpt2repro import distributed
from gpt2repro.errors import UserError
from gpt2repro.files import DirectoryLock
from gpt2repro.parallel import resolve_mode
from gpt2repro.preemption import EXIT_PREEMPTED, Preempted, StopSignals
from gpt2repro.train_config import (
    TrainConfig,
    resolve,
    resume_conflicts,
)
from gpt2repro.train_options import add_field_arguments, overrides_from_args
from gpt2repro.training_run import TrainingRun
from gpt2repro.verify import verify_dataset

log = logging.getLogger("gpt2repro")

SAMPLE_PROMPT = "Hello, I'm a language model,"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help="a preset name (see configs/) or a .toml file")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|PATH",
        help="continue from the latest checkpoint of --out (or of a run dir / checkpoint PATH)",
    )
    add_field_arguments(parser)
    parser.add_argument(
        "--no-shuffle",
        dest="field_shuffle",
        action="store_const",
        const="false",
        help="read the data strictly in order (same as --shuffle false)",
    )
    parser.epilog = "Example: gpt2repro train --preset tiny --data data/embedded --out runs/tiny"


def run(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args)
    try:
        train(args.preset, overrides, resume=args.resume, argv=getattr(args, "argv", None))
    except Preempted as stop:
        print(f"gpt2repro train: {stop}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    return 0


def _find_resume(resume: str | None, out: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        if not out:
            raise UserError("--resume needs --out RUN_DIR (or --resume PATH, a run directory or checkpoint)")
        latest = ckpt_io.newest_intact_checkpoint(out)
        if latest is None and ckpt_io.list_checkpoints(out):
            raise UserError(f"no checkpoint of {out} passes its checksum (see above): restore a copy")
        if latest is None:  # a scheduler can always pass --resume auto: the first attempt starts the run
            log.info("--resume: %s holds no checkpoint yet; starting a new run there", out)
        return latest
    return ckpt_io.resolve_checkpoint(resume)


def train(
    preset: str | None, overrides: dict, *, resume: str | None = None, argv: list[str] | None = None
) -> dict:
    """Run (or continue) a training run; returns the final metrics. Library entry point of the CLI.

    Raises ``Preempted`` after checkpointing when a stop signal arrived (``argv``, the command's
    arguments, goes into the resume command it prints)."""
    resume_path = _find_resume(resume, overrides.get("out"))
    saved = None
    if resume_path is not None:
        saved = ckpt_io.load_checkpoint(resume_path)
        if "train_config" not in saved or not ("optimizer" in saved or "sharded_path" in saved):
            raise UserError(f"{resume_path} holds weights only (no optimizer/loader state): cannot resume it")
        if not overrides.get("out"):
            overrides = {**overrides, "out": str(resume_path.parent.parent)}
    cfg = resolve(preset, overrides) if (preset or saved is None) else _resolve_from(saved, overrides)
    if saved is not None:
        conflicts = resume_conflicts(saved["train_config"], cfg)
        if conflicts:
            raise UserError(
                f"cannot resume {resume_path} with a different {'; '.join(conflicts)}; "
                "drop these options or start a new run with another --out"
            )
    if not Path(cfg.data).is_dir():
        raise UserError(
            f"data directory {cfg.data} does not exist; make it with "
            f"`gpt2repro prepare --source embedded --out {cfg.data}`"
        )
    resolve_mode(cfg.parallel, distributed.info_from_env(), cfg.dtype)  # refuse before touching --out
    out = Path(cfg.out)
    with _writer_lock(out):
        if saved is None and ckpt_io.list_checkpoints(out):
            raise UserError(
                f"{out} already holds checkpoints; pass --resume to continue that run or choose another --out"
            )
        info, device = distributed.init(cfg.device)
        try:
            verify_data(cfg.data, info)
            with StopSignals() as signals:
                return TrainingRun(cfg, info, device, saved, resume_path).run(signals, argv)
        finally:
            distributed.teardown()


def _writer_lock(out: Path):
    """Rank 0 (the only writer of the run directory) holds its lock; a second run on it stops at once."""
    return DirectoryLock(out, what="run") if distributed.info_from_env().is_main else contextlib.nullcontext()


def verify_data(data_dir: str, info: distributed.DistInfo) -> None:
    """Every shard checked against the manifest before the first step (rank 0 hashes, remembered by a
    stamp); a failure stops every rank with the same line instead of leaving the others waiting."""
    error = None
    if info.is_main:
        try:
            log.info(verify_dataset(data_dir).summary())
        except UserError as e:
            error = str(e)
    error = distributed.broadcast_object(error, info)
    if error:
        raise UserError(error)


def _resolve_from(saved: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's own config with the command line on top (resuming without repeating --preset)."""
    base = {k: v for k, v in saved["train_config"].items() if k in TrainConfig.__dataclass_fields__}
    if base.get("parallel") in ("ddp", "fsdp") and not distributed.launched_by_torchrun():
        log.info(
            "the checkpoint was written by a --parallel %s run; continuing in one process", base["parallel"]
        )
        base["parallel"] = "auto"
    return resolve(None, {**base, **overrides})
