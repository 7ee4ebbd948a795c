"""GPT-2 weights in and out: Hugging Face directories, hub names, and this project's checkpoints.

Hugging Face stores the four projection matrices of a block (``attn.c_attn``, ``attn.c_proj``,
``mlp.c_fc``, ``mlp.c_proj``) as ``Conv1D`` weights of shape (in, out); ours are ``nn.Linear`` (out, in),
so they are transposed on the way in and out. Everything else maps one to one (HF keys may or may not
carry the ``transformer.`` prefix; the causal-mask buffers ``attn.bias``/``attn.masked_bias`` are not
weights and are skipped). Every tensor's shape is checked, and any missing, unexpected or wrong-shaped
tensor is one ``UserError`` naming the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import torch

from gpt2repro.checkpoint import is_run_dir, load_checkpoint, resolve_checkpoint
from gpt2repro.config import EOT_TOKEN_ID, GPT2_VOCAB_SIZE, GPTConfig
from gpt2repro.errors import UserError, typed_first_line
from gpt2repro.hub import download_model
from gpt2repro.sharded_checkpoint import is_sharded_checkpoint, load_tensors_into

log = logging.getLogger("gpt2repro")

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


# ====================================================================== loading
def load_pretrained(
    name_or_dir: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **config_overrides,
):
    """A ``GPT`` from a local HF GPT-2 directory, a hub name, a checkpoint file or a run directory.

    ``config_overrides`` (e.g. ``dropout=0.1``, ``attn_backend="explicit"``, ``vocab_pad_multiple=64``,
    a smaller ``block_size``) change the architecture options that do not alter the released weights.
    """
    source = Path(name_or_dir).expanduser()
    if source.is_file() or is_run_dir(source) or is_sharded_checkpoint(source):
        model = _load_project_checkpoint(source, config_overrides)
    elif source.is_dir():
        model = _load_hf_directory(source, config_overrides)
    else:
        model = _load_hf_directory(download_model(str(name_or_dir)), config_overrides)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    log.info(f"loaded {name_or_dir}: {model.num_params():,} parameters")
    return model


def load_or_init(name_or_dir: str | os.PathLike | None, preset: str | None = None, seed: int = 1337):
    """What the CLI's ``--model X`` / ``--model-preset NAME`` name: saved weights, or a fresh init of a preset
    seeded with ``seed`` (without disturbing the global RNG), for smoke tests and benchmarks."""
    from gpt2repro.model import GPT

    if preset is None:
        return load_pretrained(name_or_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(GPTConfig.preset(preset))
    log.info(f"randomly initialised {preset} (seed {seed}): {model.num_params():,} parameters")
    return model


def hf_config_to_gpt_config(hf: dict, source: str | Path) -> GPTConfig:
    """Map a ``GPT2Config`` dict onto ours, refusing variants whose math differs from GPT-2's."""
    where = f"config {source}"
    model_type = hf.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise UserError(f"{where}: model_type {model_type!r} is not GPT-2 (expected 'gpt2')")
    incompatible = []
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        incompatible.append(f"activation_function={hf['activation_function']!r} (GPT-2 uses gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        incompatible.append("scale_attn_by_inverse_layer_idx=true")
    if not hf.get("scale_attn_weights", True):
        incompatible.append("scale_attn_weights=false")
    if hf.get("add_cross_attention", False):
        incompatible.append("add_cross_attention=true")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        incompatible.append(f"n_inner={hf['n_inner']} (GPT-2's MLP is 4*n_embd={4 * n_embd} wide)")
    if incompatible:
        raise UserError(f"{where} is not GPT-2 compatible: {'; '.join(incompatible)}")
    block_size = hf.get("n_positions", hf.get("n_ctx", 1024))
    return GPTConfig(
        block_size=block_size,
        vocab_size=hf.get("vocab_size", 50257),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def hf_state_dict_to_ours(hf_sd: dict[str, torch.Tensor], config: GPTConfig, source: str | Path) -> dict:
    """HF tensors -> our parameter names and layouts (real vocabulary rows only), every shape checked."""
    expected = _expected_shapes(config)
    ours: dict[str, torch.Tensor] = {}
    unexpected, lm_head = [], None
    for key, tensor in hf_sd.items():
        name = key.removeprefix("transformer.")
        if _MASK_BUFFER.match(name):
            continue
        if name == "lm_head.weight":
            lm_head = tensor
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        conv1d = name.endswith(CONV1D_WEIGHTS)
        want = expected[name][::-1] if conv1d else expected[name]  # in the file's (HF's) layout
        if tuple(tensor.shape) != want:
            raise UserError(
                f"tensor {key!r} in {source} has shape {tuple(tensor.shape)}, expected {want} "
                "for this config (is config.json the one these weights were saved with?)"
            )
        ours[name] = tensor.t() if conv1d else tensor
    if unexpected:
        raise UserError(f"{source} holds tensor(s) GPT-2 does not have: {', '.join(sorted(unexpected)[:5])}")
    missing = [name for name in expected if name not in ours]
    if missing:
        raise UserError(
            f"{source} is missing tensor(s) {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            + " (truncated or partial download? fetch the weights again)"
        )
    if lm_head is not None and not torch.equal(lm_head, ours["wte.weight"]):
        raise UserError(
            f"'lm_head.weight' in {source} differs from 'wte.weight': GPT-2 ties them, "
            "this model cannot hold both"
        )
    return {f"transformer.{name}": tensor for name, tensor in ours.items()}


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our tensor names (without ``transformer.``) and shapes, real vocabulary rows only."""
    C = config.n_embd
    shapes = {"wte.weight": (config.vocab_size, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (C,),
            p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C),
            p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C),
            p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,),
            p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C),
            p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C),
            p + "mlp.c_proj.bias": (C,),
        }
    return shapes | {"ln_f.weight": (C,), "ln_f.bias": (C,)}


def _load_hf_directory(directory: Path, config_overrides: dict):
    from gpt2repro.model import GPT

    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"{directory} is neither a Hugging Face model directory (no config.json) "
            "nor a gpt2repro run directory (no checkpoints/)"
        )
    hf_config = _read_json(config_file)
    config = hf_config_to_gpt_config(hf_config, config_file)
    hf_sd = read_hf_tensors(directory)
    sd = hf_state_dict_to_ours(hf_sd, config, _weights_description(directory))
    config, block_size = _with_overrides(config, config_overrides, config_file)
    with torch.device("meta"):  # no point initialising weights that are overwritten next
        model = GPT(dataclasses.replace(config, vocab_pad_multiple=1))  # the file's rows, padded below
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty made them two tensors
    model.load_state_dict(sd | {"lm_head.weight": sd["transformer.wte.weight"]}, strict=True)
    model.set_vocab_padding(config.vocab_pad_multiple)
    if block_size < config.block_size:
        model.crop_block_size(block_size)
    return model


SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_embd")


def _with_overrides(config: GPTConfig, overrides: dict, source) -> tuple[GPTConfig, int]:
    """Apply options that keep the weights' shapes; returns the config and the block size to crop to."""
    fixed = sorted(k for k in overrides if k in SHAPE_FIELDS and overrides[k] != getattr(config, k))
    if fixed:
        raise UserError(
            f"cannot change {', '.join(fixed)} of the weights in {source}: they fix the tensor shapes"
        )
    block_size = overrides.get("block_size", config.block_size)
    if not isinstance(block_size, int) or not 0 < block_size <= config.block_size:
        raise UserError(
            f"block_size {block_size!r} must be between 1 and the {config.block_size} positions of {source}"
        )
    merged = {**config.to_dict(), **overrides, "block_size": config.block_size}
    return GPTConfig.from_dict(merged), block_size


def read_hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: one ``model.safetensors``/``pytorch_model.bin`` or a sharded index."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return _read_weight_file(directory / name)
    for index_name in SHARD_INDEXES:
        index_file = directory / index_name
        if index_file.is_file():
            weight_map = _read_json(index_file).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index_file} has no 'weight_map'; download it again")
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors |= _read_weight_file(directory / shard)
            return tensors
    raise UserError(f"{directory} has config.json but no weights: expected {' or '.join(WEIGHT_FILES)}")


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"weight file {path} is missing (listed in the shard index); download it again")
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"weight file {path} is unreadable ({typed_first_line(e, 120)}); "
            "it is probably truncated or corrupt: download it again"
        ) from e
    if not isinstance(tensors, dict):
        raise UserError(f"weight file {path} does not hold a dict of tensors")
    return tensors


def _weights_description(directory: Path) -> str:
    for name in WEIGHT_FILES + SHARD_INDEXES:
        if (directory / name).is_file():
            return str(directory / name)
    return str(directory)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object")
    return data


def _load_project_checkpoint(path: Path, config_overrides: dict):
    from gpt2repro.model import GPT

    ckpt_file = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_file)
    try:
        config = GPTConfig.from_dict(ckpt["model_config"])
    except (TypeError, AttributeError) as e:
        raise UserError(f"checkpoint {ckpt_file} has an invalid model_config ({e})") from e
    config, block_size = _with_overrides(config, config_overrides, ckpt_file)
    model = GPT(config)
    if "sharded_path" in ckpt:  # an FSDP run's shards, assembled into whole tensors by DCP
        load_tensors_into(ckpt_file, model)
    else:
        _load_checked(model, ckpt["model"], ckpt_file)
    if block_size < config.block_size:
        model.crop_block_size(block_size)
    return model


def _load_checked(model, state_dict: dict, ckpt_file: Path) -> None:
    """``load_state_dict`` with every missing, unexpected or wrong-shaped tensor named."""
    sd = {_strip_wrappers(k): v for k, v in state_dict.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt_file} does not match its model_config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in sd.items():
        if tensor.shape != expected[name].shape:
            raise UserError(
                f"tensor {name!r} in checkpoint {ckpt_file} has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(sd)


def _strip_wrappers(key: str) -> str:
    """Drop the prefixes torch.compile (``_orig_mod.``) and DDP (``module.``) add to parameter names."""
    for prefix in ("_orig_mod.", "module."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


# ====================================================================== saving
def save_pretrained(model, directory: str | os.PathLike) -> None:
    """A Hugging Face GPT-2 directory that ``transformers`` uses as is, offline: ``config.json``,
    ``model.safetensors``, ``generation_config.json`` and the GPT-2 tokenizer files.

    Keys and layouts are Hugging Face's (``transformer.`` prefix, Conv1D transposes), padded vocabulary
    rows are dropped, and the tied head is not written (HF re-ties ``lm_head`` to ``wte``, exactly as
    its own ``save_pretrained`` does). Every file is written atomically: an interrupted save leaves the
    previous file or the new one, never half a weight file.
    """
    from safetensors.torch import save as safetensors_bytes

    from gpt2repro.files import atomic_write
    from gpt2repro.runtime import unwrap
    from gpt2repro.tokenizer import save_hf_tokenizer

    model = unwrap(model)
    config: GPTConfig = model.config
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = hf_tensors(model)
    dtype = next(iter(tensors.values())).dtype
    atomic_write(directory / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    hf_config = gpt_config_to_hf(config, dtype)
    atomic_write(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")
    generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if k in hf_config}
    atomic_write(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    if config.vocab_size == GPT2_VOCAB_SIZE:
        save_hf_tokenizer(directory, model_max_length=config.block_size)
    else:
        log.info(f"no tokenizer written: the model has {config.vocab_size} tokens, GPT-2's {GPT2_VOCAB_SIZE}")
    log.info(f"saved {model.num_params():,} parameters to {directory} (Hugging Face GPT-2 format)")


def hf_tensors(model) -> dict[str, torch.Tensor]:
    """The model's tensors under HF GPT-2's names and layouts (real vocabulary rows, no tied head)."""
    config: GPTConfig = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().cpu()
        if name == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        if name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        tensors[name] = tensor.contiguous()
    return tensors


def gpt_config_to_hf(config: GPTConfig, dtype: torch.dtype = torch.float32) -> dict:
    """A ``GPT2Config`` dict for ``GPT2LMHeadModel`` with this architecture."""
    hf = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "layer_norm_epsilon": config.layer_norm_eps,
        "attn_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.vocab_size > EOT_TOKEN_ID:
        hf |= {"bos_token_id": EOT_TOKEN_ID, "eos_token_id": EOT_TOKEN_ID}
    return hf
