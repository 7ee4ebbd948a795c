"""The model a training run starts from: a fresh preset, or pretrained weights to fine-tune.

``train`` calls :func:`initial_model` with its resolved config. From scratch, the architecture is the
``model`` preset plus any overrides. Otherwise (``init_from`` = a released GPT-2 name, a local Hugging Face
directory, or a run directory / checkpoint of this project) the *weights only* are loaded: the optimizer is
fresh and the step count starts at 0 (unlike ``--resume``). The architecture then comes from the checkpoint,
so an override that contradicts it is an error rather than a silent mismatch; what may legitimately change
for fine-tuning is applied on top: a shorter context (cropped position embeddings), dropout, vocabulary
padding for speed, attention backend and activation checkpointing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn

from gpt2repro.config import PRESETS, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.model import GPT

log = logging.getLogger("gpt2repro")

SCRATCH = "scratch"
RELEASED_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Fields that fix the shape of the weights: a loaded checkpoint decides them.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "layer_norm_eps")
# ``model`` values meaning "whatever the checkpoint is".
AUTO_MODEL = (None, "", "auto")


def initial_model(cfg: Any) -> GPT:
    """Build the model a run starts from (on CPU, fp32); ``cfg`` is the trainer's resolved config.

    Reads ``init_from``, ``model``, ``block_size``, ``dropout``, ``vocab_pad_multiple``,
    ``activation_checkpointing`` and any ``GPTConfig`` field overrides (``None`` = not given).
    """
    source = str(_get(cfg, "init_from") or SCRATCH)
    if source == SCRATCH:
        model = _from_scratch(cfg)
    else:
        model = _from_pretrained(cfg, source)
    model.activation_checkpointing = bool(_get(cfg, "activation_checkpointing", False))
    return model


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    """A field of the trainer's config (dataclass, namespace or dict), ``default`` when absent."""
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def _from_scratch(cfg: Any) -> GPT:
    name = _get(cfg, "model")
    if name in AUTO_MODEL:
        raise UserError(
            "training from scratch needs a model preset: pass --model NAME or --init-from a checkpoint"
        )
    fields = GPTConfig.__dataclass_fields__
    overrides = {k: v for k in fields if (v := _get(cfg, k)) is not None}
    model = GPT(GPTConfig.preset(name, **overrides))
    log.info(
        "init from scratch: model %s, %.2fM parameters, context %d",
        name, model.num_params() / 1e6, model.config.block_size,
    )
    return model


def _from_pretrained(cfg: Any, source: str) -> GPT:
    model = GPT.from_pretrained(source)
    loaded = model.config
    _check_compatible(cfg, source, loaded)

    block_size = _get(cfg, "block_size")
    if block_size is not None and block_size != loaded.block_size:
        if block_size > loaded.block_size:
            raise UserError(
                f"--block-size {block_size} is larger than the context of {source} ({loaded.block_size}); "
                f"a pretrained position embedding cannot grow: use --block-size {loaded.block_size} or less"
            )
        log.info("cropping the context of %s from %d to %d", source, loaded.block_size, block_size)
        model.crop_block_size(block_size)

    model.set_dropout(float(_get(cfg, "dropout", 0.0) or 0.0))
    pad_multiple = _get(cfg, "vocab_pad_multiple")
    if pad_multiple is not None:
        set_vocab_padding(model, int(pad_multiple))
    backend = _get(cfg, "attn_backend")
    if backend is not None:
        model.set_attention_backend(backend)
    log.info(
        "init from %s (weights only; fresh optimizer, step 0): %.2fM parameters, "
        "%d layers, %d heads, %d dims, context %d, dropout %g",
        source, model.num_params() / 1e6, loaded.n_layer, loaded.n_head, loaded.n_embd,
        model.config.block_size, model.config.dropout,
    )
    return model


def _check_compatible(cfg: Any, source: str, loaded: GPTConfig) -> None:
    """Raise a ``UserError`` naming every architecture option that contradicts the loaded checkpoint."""
    conflicts = []
    for name in SHAPE_FIELDS:
        wanted = _get(cfg, name)
        if wanted is not None and wanted != getattr(loaded, name):
            conflicts.append(f"--{name.replace('_', '-')} {wanted} (checkpoint: {getattr(loaded, name)})")
    preset = _get(cfg, "model")
    if preset not in AUTO_MODEL and preset != source:
        if preset not in PRESETS:
            raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
        shape = {k: v for k, v in PRESETS[preset].items() if k in SHAPE_FIELDS}
        actual = {k: getattr(loaded, k) for k in shape}
        if shape != actual:
            conflicts.append(f"--model {preset} ({_describe(shape)}; checkpoint: {_describe(actual)})")
    if conflicts:
        raise UserError(
            f"--init-from {source}: the architecture comes from the checkpoint, but "
            + "; ".join(conflicts)
            + " contradict(s) it; drop these options (or train from scratch with --init-from scratch)"
        )


def _describe(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())


@torch.no_grad()
def set_vocab_padding(model: GPT, multiple: int) -> None:
    """Re-size the tied embedding/LM-head to a multiple of ``multiple`` rows (50257 -> 50304 for 64).

    The real rows are kept; extra rows are zeros. They can never matter: no token id reaches them on the
    input side, and the model slices its logits to the real vocabulary, so they get no gradient either.
    """
    config = model.config
    if multiple <= 0:
        raise UserError(f"vocab_pad_multiple must be a positive integer, got {multiple}")
    old = model.transformer.wte.weight
    config.vocab_pad_multiple = multiple
    rows = config.padded_vocab_size
    if rows == old.shape[0]:
        return
    weight = torch.zeros(rows, config.n_embd, dtype=old.dtype, device=old.device)
    weight[: config.vocab_size] = old[: config.vocab_size]
    model.transformer.wte.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    model.transformer.wte.num_embeddings = rows
    model.lm_head.weight = model.transformer.wte.weight  # keep the head tied to the embedding
    model.lm_head.out_features = rows
