"""Training hyper-parameters: one dataclass, TOML presets under ``configs/``, ``--field value`` overrides.

Resolution order: dataclass defaults < preset TOML < command-line ``--field value``. Every field can be
overridden (``--lr 3e-4``, ``--micro-batch 8``, ``--compile false``); the resolved config is printed and
saved with the run as ``RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.config import PRESETS as MODEL_PRESETS
from gpt2repro.errors import UserError
from gpt2repro.files import read_text_file

log = logging.getLogger("gpt2repro")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMPILE_CHOICES = ("auto", "true", "false")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
TRACKERS = ("tensorboard", "wandb")


def _field(default: object, doc: str):
    """A TrainConfig field with its one-line doc: ``train --help`` and the preset TOMLs show the same text."""
    return dataclasses.field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults = build-nanogpt's GPT-2 124M reproduction)."""

    # ---- model
    model: str = _field("gpt2", f"architecture preset: {', '.join(MODEL_PRESETS)}")
    init_from: str = _field("scratch", "scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | HF or run dir")
    block_size: int | None = _field(None, "context length; none = the model preset's (or loaded weights')")
    n_layer: int | None = _field(None, "transformer blocks; none = the model preset's")
    n_head: int | None = _field(None, "attention heads per block; none = the model preset's")
    n_embd: int | None = _field(None, "embedding width; none = the model preset's")
    vocab_pad_multiple: int = _field(64, "pad the vocabulary to a multiple (50257 -> 50304): faster matmuls")
    dropout: float = _field(0.0, "dropout on attention and residual paths (GPT-2 pretraining: 0)")
    activation_checkpointing: bool = _field(False, "recompute activations in the backward pass: less memory")
    # ---- data and run directory
    data: str = _field("", "directory of prepared token shards (gpt2repro prepare)")
    out: str = _field("", "run directory (config.json, log.jsonl, samples.txt, checkpoints/)")
    shuffle: bool = _field(True, "shuffle the order of training sequences (per epoch, seeded)")
    # ---- batch
    seq_len: int = _field(1024, "tokens per training sequence; with --block-size N alone: min(preset's, N)")
    micro_batch: int = _field(64, "sequences per forward/backward pass on each process")
    total_batch: int = _field(524288, "tokens per optimizer step = micro_batch * seq_len * accum * ranks")
    # ---- optimisation
    max_steps: int = _field(19073, "optimizer steps of the whole run")
    lr: float = _field(6e-4, "peak learning rate, reached after warmup")
    min_lr_ratio: float = _field(0.1, "the cosine decays to lr * min_lr_ratio")
    warmup_steps: int = _field(715, "steps of linear warmup to lr")
    lr_decay_steps: int | None = _field(None, "step where the cosine reaches its floor; none = max_steps")
    weight_decay: float = _field(0.1, "AdamW weight decay, on >= 2-D tensors only (matmuls, embeddings)")
    beta1: float = _field(0.9, "AdamW beta1")
    beta2: float = _field(0.95, "AdamW beta2")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this; 0 disables")
    seed: int = _field(1337, "seed of the initial weights, the data order and the samples")
    # ---- precision and speed
    dtype: str = _field(
        "auto", "auto (bf16 where native or measured faster) | fp32 | bf16 | fp16 (CUDA, with loss scaling)"
    )
    compile: str = _field("auto", "torch.compile: auto (on for CUDA, off on CPU) | true | false")
    device: str = _field("auto", "auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps")
    parallel: str = _field("auto", "auto (ddp under torchrun, else none) | none | ddp | fsdp (FSDP2 shards)")
    async_checkpoint: bool = _field(False, "fsdp: write sharded checkpoints in the background (async_save)")
    # ---- evaluation, logging, checkpoints
    eval_every: int = _field(250, "steps between val-loss evaluations (0 = only at the end)")
    eval_tokens: int = _field(10_485_760, "tokens of the fixed val set (all ranks together)")
    eval_batch: int | None = _field(None, "sequences per eval forward pass; none = micro_batch")
    log_every: int = _field(1, "steps between log records (the first and last steps are always logged)")
    log_to: str = _field("none", "trackers beside log.jsonl: tensorboard, wandb, tensorboard,wandb or none")
    wandb_project: str = _field("gpt2repro", "W&B project (with --log-to wandb)")
    wandb_run_name: str = _field("", "W&B run name; empty = the run directory's name")
    time_limit: float = _field(0.0, "seconds of training per invocation, then finish early (0 = no limit)")
    checkpoint_every: int = _field(5000, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _field(2, "checkpoints kept besides the best-val one")
    keep_best: bool = _field(True, "also keep the checkpoint with the best val loss")
    sample_every: int = _field(250, "steps between text samples (0 = only at the end)")
    sample_tokens: int = _field(32, "tokens per sample")
    num_samples: int = _field(4, "samples each time (0 = none)")
    hellaswag: str = _field("", "path to HellaSwag val data (empty = skip)")
    hellaswag_every: int | None = _field(None, "steps between HellaSwag evaluations; none = eval_every")
    hellaswag_limit: int | None = _field(None, "HellaSwag examples per evaluation; none = all")

    # ------------------------------------------------------------------ derived values
    @property
    def log_targets(self) -> tuple[str, ...]:
        """``log_to`` as tracker names (``"tensorboard,wandb"`` -> both); UserError for an unknown one."""
        names = tuple(dict.fromkeys(n.strip().lower() for n in self.log_to.split(",") if n.strip()))
        if names in ((), ("none",)):
            return ()
        unknown = [n for n in names if n not in TRACKERS]
        if unknown:
            raise UserError(
                f"--log-to {self.log_to!r}: unknown tracker {unknown[0]!r}; choose "
                f"{', '.join(TRACKERS)}, a comma list of them, or none"
            )
        return names

    @property
    def lr_floor_step(self) -> int:
        return self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps

    def model_overrides(self) -> dict:
        """GPTConfig fields this config sets on top of the model preset."""
        over = {"vocab_pad_multiple": self.vocab_pad_multiple, "dropout": self.dropout}
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None:
                over[name] = getattr(self, name)
        return over

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step, with a clear error when the batch sizes do not divide."""
        per_step = self.micro_batch * self.seq_len * world_size
        if self.total_batch % per_step != 0:
            raise UserError(
                f"--total-batch {self.total_batch} is not a multiple of micro_batch * seq_len * world_size = "
                f"{self.micro_batch} * {self.seq_len} * {world_size} = {per_step}; "
                "change --total-batch or --micro-batch"
            )
        return self.total_batch // per_step

    def validate(self) -> None:
        """Refuse, by option name, every value that cannot work, before anything is built or trained."""
        if self.model not in MODEL_PRESETS:
            raise UserError(f"unknown --model {self.model!r}; choose one of {', '.join(MODEL_PRESETS)}")
        _check_finite(self)
        _check_signs(self)
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0 and self.eps > 0):
            raise UserError("--beta1/--beta2 must be in [0, 1) and --eps positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.compile not in COMPILE_CHOICES:
            raise UserError(f"--compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile!r}")
        if not self.data:
            raise UserError("no training data: pass --data DIR (a directory made by `gpt2repro prepare`)")
        if not self.out:
            raise UserError("no run directory: pass --out RUN_DIR")
        _check_context(self)
        self.grad_accum_steps(1)  # --total-batch a multiple of micro_batch * seq_len, said before any work

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


POSITIVE = ("seq_len", "micro_batch", "total_batch", "max_steps", "vocab_pad_multiple", "log_every",
            "sample_tokens")  # fmt: skip
POSITIVE_OR_NONE = ("block_size", "n_layer", "n_head", "n_embd", "eval_batch", "lr_decay_steps",
                    "hellaswag_limit", "hellaswag_every")  # fmt: skip
NON_NEGATIVE = ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_tokens", "checkpoint_every",
                "keep_last", "sample_every", "num_samples", "seed", "time_limit")  # fmt: skip


def _check_signs(cfg: TrainConfig) -> None:
    for name in POSITIVE + POSITIVE_OR_NONE:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise UserError(f"--{flag_name(name)} must be positive, got {value}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{flag_name(name)} must be >= 0, got {getattr(cfg, name)}")


def _check_finite(cfg: TrainConfig) -> None:
    """inf and nan pass every ``<``/``>`` test the wrong way (``--lr inf`` would fail at step 2)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{flag_name(f.name)} must be a finite number, got {value}")


def _check_context(cfg: TrainConfig) -> None:
    """--seq-len must fit the model's context (where it is known before the weights are loaded)."""
    from gpt2repro.config import GPTConfig
    from gpt2repro.hub import HUB_ALIASES

    gpt2_context = GPTConfig.__dataclass_fields__["block_size"].default  # the released models' 1024
    if cfg.block_size is not None:
        context, where = cfg.block_size, "--block-size"
    elif cfg.init_from == "scratch":
        context = MODEL_PRESETS[cfg.model].get("block_size", gpt2_context)
        where = f"the {cfg.model} preset's context"
    elif cfg.init_from in HUB_ALIASES:
        context, where = gpt2_context, f"{cfg.init_from}'s context"
    else:
        return  # a checkpoint directory: its context is known once it is read
    if cfg.seq_len > context:
        raise UserError(
            f"--seq-len {cfg.seq_len} is longer than the model's context ({where}: {context} tokens); "
            "lower --seq-len or give a larger --block-size"
        )


# ---------------------------------------------------------------------- presets and overrides
def flag_name(name: str) -> str:
    """The command-line spelling of a config field (``micro_batch`` -> ``micro-batch``)."""
    return name.replace("_", "-")


def _field_types() -> dict[str, type]:
    """Field name -> its base type (``int | None`` -> int)."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        t = hints[f.name]
        if isinstance(t, types.UnionType):
            t = next(a for a in typing.get_args(t) if a is not type(None))
        out[f.name] = t
    return out


FIELD_TYPES = _field_types()


def _optional(name: str) -> bool:
    hint = typing.get_type_hints(TrainConfig)[name]
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def coerce(name: str, value: object, source: str) -> object:
    """Convert a TOML value or a command-line string to the field's type, or raise a clear UserError."""
    if name not in FIELD_TYPES:
        known = ", ".join(FIELD_TYPES)
        raise UserError(f"unknown training field {name!r} in {source}; known fields: {known}")
    t = FIELD_TYPES[name]
    if isinstance(value, str) and value.lower() in ("none", "null") and _optional(name):
        return None
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if t is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = value.replace("_", "")
                if "e" in value.lower() and float(value).is_integer():  # 5e5
                    return int(float(value))
                return int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t is str:
            if isinstance(value, bool) and name == "compile":
                return "true" if value else "false"
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    article = "an" if t is int else "a"
    raise UserError(f"{source}: {flag_name(name)} must be {article} {t.__name__}, got {value!r}")


def preset_path(name: str) -> Path:
    """A preset name (``tiny``, ``gpt2-124m``) or a path to a TOML file."""
    as_path = Path(name)
    if as_path.suffix == ".toml" or as_path.is_file():
        if not as_path.is_file():
            raise UserError(f"preset file {as_path} does not exist")
        return as_path
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(list_presets())} or a .toml file")
    return path


_ASSIGNMENT = re.compile(r"""^(?P<key>[A-Za-z_]\w*)\s*=\s*(?P<value>"[^"]*"|'[^']*'|[^\s#]+)\s*(?:#.*)?$""")
COMMENT_COLUMN = 30


def preset_with_field_docs(text: str) -> str:
    """A preset TOML whose every ``field = value`` line ends in ``# <the field's doc>``: the presets say
    what each value means in the same words as ``train --help`` (a test keeps the shipped ones so).
    Comment lines (the preset's own notes) and blank lines are kept as they are."""
    lines = []
    for line in text.splitlines():
        match = _ASSIGNMENT.match(line)
        if match and match["key"] in TrainConfig.__dataclass_fields__:
            assignment = f"{match['key']} = {match['value']}"
            line = f"{assignment.ljust(COMMENT_COLUMN - 2)}  # {field_help(match['key'])}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def load_preset(name: str) -> dict:
    path = preset_path(name)
    try:
        raw = tomllib.loads(read_text_file(path, "preset"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"cannot read preset {path}: {e}") from e
    return {key: coerce(key, value, str(path)) for key, value in raw.items()}


def resolve(preset: str | None, overrides: dict[str, object]) -> TrainConfig:
    """Defaults < preset < overrides (strings from the command line or typed values)."""
    values = load_preset(preset) if preset else {}
    for key, value in overrides.items():
        if value is not None:
            values[key] = coerce(key, value, "command line")
    _seq_len_follows_block_size(values, overrides)
    cfg = TrainConfig(**values)
    cfg.validate()
    cfg.log_targets  # noqa: B018 - an unknown --log-to fails here, before any model is built
    return cfg


def _seq_len_follows_block_size(values: dict, overrides: dict) -> None:
    """``--block-size N`` without ``--seq-len`` (cropping a released model to fine-tune it): train on
    sequences of min(preset's seq_len, N) instead of failing on a seq_len longer than the context."""
    block_size = values.get("block_size")
    if block_size is None or overrides.get("block_size") is None or overrides.get("seq_len") is not None:
        return
    seq_len = values.get("seq_len", TrainConfig.__dataclass_fields__["seq_len"].default)
    if isinstance(block_size, int) and 0 < block_size < seq_len:
        msg = "--block-size %d without --seq-len: training on sequences of %d tokens, not %d"
        log.info(msg, block_size, block_size, seq_len)
        values["seq_len"] = block_size


def field_help(name: str) -> str:
    """The one-line doc of a TrainConfig field."""
    return TrainConfig.__dataclass_fields__[name].metadata["help"]


# Fields that cannot change when a run is resumed: the parameters' shapes and the data stream's geometry.
RESUME_FIXED = (
    "model",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
    "vocab_pad_multiple",
    "seq_len",
    "micro_batch",
    "total_batch",
    "seed",
    "shuffle",
)


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields of ``cfg`` that differ from the checkpoint's config in a way that breaks resuming."""
    current = cfg.to_dict()
    conflicts = []
    for name in RESUME_FIXED:
        if name in saved and saved[name] != current[name]:
            conflicts.append(f"{flag_name(name)} ({saved[name]!r} -> {current[name]!r})")
    return conflicts
