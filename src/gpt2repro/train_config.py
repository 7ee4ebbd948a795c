"""Training hyper-parameters: one dataclass, TOML presets under ``configs/``, ``--field value`` overrides.

Resolution order: dataclass defaults < preset TOML < command-line ``--field value``. Every field can be
overridden (``--lr 3e-4``, ``--micro-batch 8``, ``--compile false``); the resolved config is printed and
saved with the run as ``RUN_DIR/config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.config import PRESETS as MODEL_PRESETS
from gpt2repro.errors import UserError
from gpt2repro.files import read_text_file

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
COMPILE_CHOICES = ("auto", "true", "false")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a training run depends on (defaults = build-nanogpt's GPT-2 124M reproduction)."""

    # ---- model
    model: str = "gpt2"  # GPTConfig preset name (config.PRESETS)
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | DIR (weights only)
    block_size: int | None = None  # context length; None = the model preset's (or checkpoint's)
    n_layer: int | None = None  # architecture overrides of the preset (None = preset's)
    n_head: int | None = None
    n_embd: int | None = None
    vocab_pad_multiple: int = 64  # 50257 -> 50304 rows: faster matmuls, padded logits never used
    dropout: float = 0.0
    activation_checkpointing: bool = False
    # ---- data and run directory
    data: str = ""  # directory of prepared shards (gpt2repro prepare)
    out: str = ""  # run directory
    shuffle: bool = True  # shuffle the order of training sequences (per epoch, seeded)
    # ---- batch: total_batch tokens per optimizer step = micro_batch * seq_len * grad_accum * world_size
    seq_len: int = 1024
    micro_batch: int = 64
    total_batch: int = 524288
    # ---- optimisation
    max_steps: int = 19073
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 715
    lr_decay_steps: int | None = None  # the step where the cosine reaches its floor; None = max_steps
    weight_decay: float = 0.1  # on >= 2-D tensors only (matmul weights, embeddings)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    seed: int = 1337
    # ---- precision and speed
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16: CUDA only, with loss scaling)
    compile: str = "auto"  # auto (on for CUDA, off on CPU) | true | false
    device: str = "auto"
    parallel: str = "auto"  # auto (ddp under torchrun, else none) | none | ddp | fsdp (FSDP2 shards)
    async_checkpoint: bool = False  # fsdp: write sharded checkpoints in the background (dcp.async_save)
    # ---- evaluation, logging, checkpoints
    eval_every: int = 250  # steps between val-loss evaluations (0 = only at the end)
    eval_tokens: int = 10_485_760  # tokens of the fixed val set (all ranks together)
    eval_batch: int | None = None  # sequences per eval forward pass; None = micro_batch
    log_every: int = 1
    time_limit: float = 0.0  # seconds of training per invocation; when reached, finish early (0 = no limit)
    checkpoint_every: int = 5000  # 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the best-val one
    keep_best: bool = True
    sample_every: int = 250  # 0 = only at the end
    sample_tokens: int = 32
    num_samples: int = 4
    hellaswag: str = ""  # path to HellaSwag val data (empty = skip)
    hellaswag_every: int | None = None  # None = eval_every
    hellaswag_limit: int | None = None  # examples per evaluation; None = all

    # ------------------------------------------------------------------ derived values
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
        positive = ["seq_len", "micro_batch", "total_batch", "max_steps", "vocab_pad_multiple", "log_every",
                    "sample_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{_flag(name)} must be positive, got {getattr(self, name)}")
        for name in ("block_size", "n_layer", "n_head", "n_embd", "eval_batch", "lr_decay_steps",
                     "hellaswag_limit", "hellaswag_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{_flag(name)} must be positive, got {value}")
        nonneg = ["warmup_steps", "weight_decay", "grad_clip", "eval_every", "eval_tokens",
                  "checkpoint_every", "keep_last", "sample_every", "num_samples", "seed", "time_limit"]
        for name in nonneg:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
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


def _check_finite(cfg: TrainConfig) -> None:
    """inf and nan pass every ``<``/``>`` test the wrong way (``--lr inf`` would fail at step 2)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{_flag(f.name)} must be a finite number, got {value}")


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
def _flag(name: str) -> str:
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
    raise UserError(f"{source}: {_flag(name)} must be {article} {t.__name__}, got {value!r}")


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
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    """``--field-name VALUE`` for every TrainConfig field (strings here; typed in ``resolve``)."""
    group = parser.add_argument_group("training fields (override the preset)")
    for f in dataclasses.fields(TrainConfig):
        default = f.default
        group.add_argument(
            f"--{_flag(f.name)}", dest=f"field_{f.name}", default=None,
            metavar=FIELD_TYPES[f.name].__name__.upper(), help=f"default {default!r}",
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, str]:
    return {f.name: getattr(args, f"field_{f.name}") for f in dataclasses.fields(TrainConfig)
            if getattr(args, f"field_{f.name}", None) is not None}


def format_config(cfg: TrainConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


# Fields that cannot change when a run is resumed: the parameters' shapes and the data stream's geometry.
RESUME_FIXED = ("model", "n_layer", "n_head", "n_embd", "block_size", "vocab_pad_multiple", "seq_len",
                "micro_batch", "total_batch", "seed", "shuffle")


def resume_conflicts(saved: dict, cfg: TrainConfig) -> list[str]:
    """Fields of ``cfg`` that differ from the checkpoint's config in a way that breaks resuming."""
    current = cfg.to_dict()
    conflicts = []
    for name in RESUME_FIXED:
        if name in saved and saved[name] != current[name]:
            conflicts.append(f"{_flag(name)} ({saved[name]!r} -> {current[name]!r})")
    return conflicts
