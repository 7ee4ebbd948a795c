"""The model a training run starts from: a fresh preset, or pretrained weights to fine-tune.

``train`` calls :func:`initial_model` with its resolved config. From scratch, the architecture is the
``model`` preset plus any overrides. Otherwise (``init_from`` = a released GPT-2 name, a local Hugging Face
directory, or a run directory / checkpoint of this project) the *weights only* are loaded: the optimizer is
fresh and the step count starts at 0 (unlike ``--resume``). The architecture then comes from the checkpoint,
so an override that contradicts it (``--n-layer``/``--n-head``/``--n-embd``, a ``--model`` preset of
another shape, a larger ``--block-size``) is an error rather than a silent mismatch; the default ``--model``
(not chosen by anyone) is simply not used. What may legitimately change for fine-tuning is applied on top:
a shorter context (cropped position embeddings), dropout, vocabulary padding for speed, activation
checkpointing."""

from __future__ import annotations

import logging

from gpt2repro.config import PRESETS, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.model import GPT
from gpt2repro.train_config import TrainConfig

log = logging.getLogger("gpt2repro")

SCRATCH = "scratch"
# Overrides that would change the shape of the weights: a loaded checkpoint decides them.
SHAPE_OVERRIDES = ("n_layer", "n_head", "n_embd")


def initial_model(cfg: TrainConfig, *, resume_config: dict | None = None) -> GPT:
    """Build the model a run starts from (on CPU, fp32), as ``cfg.init_from`` says.

    When resuming, pass the checkpoint's ``model_config`` as ``resume_config``: its architecture is rebuilt
    (the trainer then loads the checkpoint's weights) without going back to ``init_from``, which may be a
    download or a directory that is gone by now.
    """
    if resume_config is not None:
        model = GPT(GPTConfig.from_dict(resume_config))
        model.set_dropout(cfg.dropout)
    elif cfg.init_from == SCRATCH:
        model = GPT(GPTConfig.preset(cfg.model, **cfg.model_overrides()))
        log.info(
            "init from scratch: model %s, %.2fM parameters, context %d",
            cfg.model,
            model.num_params() / 1e6,
            model.config.block_size,
        )
    else:
        model = _from_pretrained(cfg)
    model.activation_checkpointing = cfg.activation_checkpointing
    return model


def _from_pretrained(cfg: TrainConfig) -> GPT:
    source = cfg.init_from
    try:
        model = GPT.from_pretrained(source)
    except UserError as e:
        raise UserError(f"--init-from {source}: {e}") from e
    loaded = model.config
    _check_compatible(cfg, loaded)
    if cfg.block_size is not None and cfg.block_size != loaded.block_size:
        if cfg.block_size > loaded.block_size:
            raise UserError(
                f"--block-size {cfg.block_size} is larger than the context of {source} "
                f"({loaded.block_size}); a pretrained position embedding cannot grow: "
                f"use --block-size {loaded.block_size} or less"
            )
        log.info("cropping the context of %s from %d to %d", source, loaded.block_size, cfg.block_size)
        model.crop_block_size(cfg.block_size)
    model.set_dropout(cfg.dropout)
    model.set_vocab_padding(cfg.vocab_pad_multiple)
    log.info(
        "init from %s (weights only: fresh optimizer, step 0): %.2fM parameters, "
        "%d layers, %d heads, %d dims, context %d, dropout %g",
        source,
        model.num_params() / 1e6,
        loaded.n_layer,
        loaded.n_head,
        loaded.n_embd,
        model.config.block_size,
        model.config.dropout,
    )
    return model


def _check_compatible(cfg: TrainConfig, loaded: GPTConfig) -> None:
    """Raise one ``UserError`` naming every architecture option that contradicts the loaded weights."""
    conflicts = [
        f"--{name.replace('_', '-')} {getattr(cfg, name)} (checkpoint: {getattr(loaded, name)})"
        for name in SHAPE_OVERRIDES
        if getattr(cfg, name) is not None and getattr(cfg, name) != getattr(loaded, name)
    ]
    preset = {k: v for k, v in PRESETS[cfg.model].items() if k in SHAPE_OVERRIDES}
    actual = {k: getattr(loaded, k) for k in preset}
    if preset != actual:
        if cfg.model == _DEFAULT_MODEL:  # not chosen by the user: nothing contradicts
            log.info("the architecture comes from %s, not the default --model %s", cfg.init_from, cfg.model)
        else:
            conflicts.append(f"--model {cfg.model} ({_describe(preset)}; checkpoint: {_describe(actual)})")
    if conflicts:
        raise UserError(
            f"--init-from {cfg.init_from}: the architecture comes from the checkpoint, but "
            + "; ".join(conflicts)
            + " contradict(s) it; drop these options (or pass the checkpoint's own values)"
        )


_DEFAULT_MODEL = TrainConfig.__dataclass_fields__["model"].default


def _describe(shape: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shape.items())
