"""What every check shares: the sizes for this device, the working directory, the prepared corpus, and
the few calls into the project's training/data APIs (kept here, in one place, so that a reshaped API is
adapted once and not in every check).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gpt2repro.config import GPT2_VOCAB_SIZE

LN_VOCAB = math.log(GPT2_VOCAB_SIZE)  # 10.82: the loss of a model that knows nothing
GIB = 1024**3
VAL_TOKENS = 20_000  # val split of the doctor's corpus: a few eval batches even at T=1024


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: the model and batch of the training row, steps, eval and DDP sizes."""

    model: str
    seq_len: int
    micro_batch: int
    train_steps: int
    lr: float
    warmup_steps: int
    compile: bool
    loss_target: float  # the short run's final loss must be below this
    eval_batches: int = 2
    hellaswag_items: int = 8
    gen_tokens: int = 16
    resume_steps: int = 3
    ddp_steps: int = 3
    allreduce_mib: int = 64
    compile_skip_reason: str = ""

    @property
    def batch_tokens(self) -> int:
        return self.micro_batch * self.seq_len


# Memory of one 1024-token gpt2 (124M) training sequence in bf16 with flash attention (activations,
# logits and their gradient) is ~0.6 GiB; 1 GiB leaves room for the allocator and compile workspaces.
GPT2_GIB_PER_SEQUENCE = 1.0
GPT2_FIXED_GIB = 4.0  # weights, gradients, AdamW moments, CUDA context, compile


def batch_for_memory(free_bytes: int, largest: int) -> int:
    """The largest power of two <= ``largest`` whose gpt2 training step fits in ``free_bytes``."""
    fits = int((free_bytes / GIB - GPT2_FIXED_GIB) / GPT2_GIB_PER_SEQUENCE)
    batch = largest
    while batch > 1 and batch > fits:
        batch //= 2
    return batch


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    """GPUs: gpt2 124M at T=1024 (B=16, 8 with --quick, less when memory is short). CPU/MPS: tiny models."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        batch = batch_for_memory(free, 8 if quick else 16)
        return Sizes(
            model="gpt2",
            seq_len=1024,
            micro_batch=batch,
            train_steps=100 if quick else 250,
            lr=6e-4,
            warmup_steps=20,
            compile=True,
            loss_target=0.6 * LN_VOCAB,
            eval_batches=4,
            gen_tokens=32,
            ddp_steps=4 if quick else 8,
            allreduce_mib=64 if quick else 256,
            resume_steps=3,
        )
    no_compile = (
        ""
        if not quick
        else (
            "--quick on CPU skips torch.compile (inductor compiles for minutes on a few cores); "
            "run without --quick to time it"
        )
    )
    if device.type == "mps":
        no_compile = "torch.compile is not exercised on MPS (inductor's MPS backend is experimental)"
    # Positional: model, seq_len, micro_batch, train_steps, lr, warmup_steps, compile, loss_target.
    if quick or device.type == "mps":
        micro = Sizes("gpt2-micro", 64, 8, 40, 3e-3, 5, False, 0.7 * LN_VOCAB, ddp_steps=2, allreduce_mib=4)
        return replace(micro, resume_steps=1, compile_skip_reason=no_compile)
    return Sizes("gpt2-tiny", 128, 8, 150, 2e-3, 15, True, 0.6 * LN_VOCAB, ddp_steps=4, allreduce_mib=16)


@dataclass
class TrainedRun:
    """The training row's trainer and losses, which the evaluation and generation rows reuse."""

    trainer: object  # gpt2repro.train.Trainer
    losses: list[float]


@dataclass
class DoctorContext:
    device: torch.device
    quick: bool
    sizes: Sizes
    workdir: Path
    data_dir: Path | None = None
    trained: TrainedRun | None = None

    def corpus(self) -> Path:
        """Token shards of the embedded corpus (the Python Language Reference), prepared once."""
        if self.data_dir is None:
            from gpt2repro.prepare import prepare_corpus
            from gpt2repro.sources import embedded_documents

            path = self.workdir / "data"
            prepare_corpus(
                embedded_documents(), path, source_name="embedded", val_tokens=VAL_TOKENS, workers=1
            )
            self.data_dir = path
        return self.data_dir

    def release_training(self) -> None:
        """Drop the training row's model and optimizer (the fp16 and DDP rows need the GPU memory)."""
        if self.trained is None:
            return
        self.trained = None
        gc.collect()  # the compiled module sits in reference cycles
        if self.device.type == "cuda":
            torch.compiler.reset()  # compiled graphs and their caches
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------- the project's training API
def train_config(ctx: DoctorContext, sizes: Sizes | None = None, **overrides):
    """A ``TrainConfig`` for ``sizes`` (default: the context's) on the doctor's corpus: one micro-step
    per optimizer step, no evaluation, checkpoint or sample from the trainer itself."""
    from gpt2repro.train_config import resolve

    s = sizes or ctx.sizes
    base = dict(
        model=s.model,
        data=str(ctx.corpus()),
        out=str(ctx.workdir / "run"),
        device=str(ctx.device),
        seq_len=s.seq_len,
        micro_batch=s.micro_batch,
        total_batch=s.batch_tokens,
        max_steps=s.train_steps,
        lr=s.lr,
        warmup_steps=s.warmup_steps,
        compile="true" if s.compile else "false",
        eval_every=0,
        checkpoint_every=0,
        sample_every=0,
        num_samples=0,
    )
    return resolve(None, {**base, **overrides})


def make_trainer(cfg, device: torch.device, dist_info=None):
    """``gpt2repro.trainer.Trainer`` with TF32 set the way ``gpt2repro train`` sets it on CUDA."""
    from gpt2repro.runtime import enable_tf32
    from gpt2repro.trainer import Trainer

    enable_tf32(device)
    return Trainer(cfg, device, dist_info)


def train_loader(cfg, rank: int = 0, world_size: int = 1):
    from gpt2repro.data import TokenLoader

    return TokenLoader(
        cfg.data,
        "train",
        cfg.micro_batch,
        cfg.seq_len,
        rank=rank,
        world_size=world_size,
        shuffle=cfg.shuffle,
        seed=cfg.seed,
    )


def val_batches(ctx: DoctorContext) -> list:
    """``sizes.eval_batches`` fixed validation batches (as many rows as the small val split allows)."""
    from gpt2repro.data import val_batches as batches

    s = ctx.sizes
    rows = max(1, min(s.micro_batch, (VAL_TOKENS - 1) // (s.seq_len * s.eval_batches)))
    return list(batches(ctx.corpus(), rows, s.seq_len, max_tokens=s.eval_batches * rows * s.seq_len))


def val_loss_of(ctx: DoctorContext, model, dtype: str) -> dict:
    """``gpt2repro.evals.val.val_loss`` over the batches of ``val_batches``: {"loss", "tokens"}."""
    from gpt2repro.evals.scoring import EvalSetup
    from gpt2repro.evals.val import val_loss

    batches = val_batches(ctx)
    rows, seq = batches[0][0].shape
    setup = EvalSetup(rows, ctx.device, dtype)
    return val_loss(model, ctx.corpus(), setup, seq_len=seq, max_tokens=len(batches) * rows * seq)


def hellaswag_scores(ctx: DoctorContext, model, items: list, dtype: str) -> list:
    """``score_hellaswag`` the way build-nanogpt scores (completion style)."""
    from gpt2repro.evals.hellaswag import score_hellaswag
    from gpt2repro.evals.scoring import EvalSetup

    return score_hellaswag(model, items, EvalSetup(None, ctx.device, dtype), style="completion")


def training_shaped_val_batch(ctx: DoctorContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One validation batch of the training row's (B, T): a compiled graph runs it without recompiling."""
    from gpt2repro.data import val_batches as batches

    s = ctx.sizes
    return next(iter(batches(ctx.corpus(), s.micro_batch, s.seq_len, max_tokens=s.batch_tokens)))


def with_batch(sizes: Sizes, micro_batch: int) -> Sizes:
    return replace(sizes, micro_batch=micro_batch)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
