"""Weights in and out: HF directories (all layouts), the hub, our checkpoints, and every bad file."""

from __future__ import annotations

import functools
import http.server
import json
import logging
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from hf_reference import SMALL, random_hf_model
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from gpt2repro import GPT, GPTConfig, UserError
from gpt2repro.checkpoint import atomic_save, checkpoint_path

CONFIG = GPTConfig(**SMALL)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(CONFIG, seed=3)


@pytest.fixture
def hf_dir(hf_model, tmp_path) -> Path:
    directory = tmp_path / "hf"
    hf_model.save_pretrained(directory)
    return directory


def tokens(B=2, T=24, seed=0):
    return torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(seed))


def same_logits(ours: GPT, hf: GPT2LMHeadModel, tol: float = 1e-5) -> bool:
    x = tokens()
    with torch.no_grad():
        return (ours.eval()(x)[0] - hf.eval()(x).logits).abs().max().item() <= tol


def rewrite_safetensors(directory: Path, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------------------- round trips
def test_hf_to_ours_to_hf_is_bit_exact(hf_model, hf_dir, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="gpt2repro"):
        ours = GPT.from_pretrained(hf_dir)
    assert f"{ours.num_params():,} parameters" in caplog.text
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert same_logits(ours, hf_model)

    out = tmp_path / "export"
    ours.save_pretrained(out)
    original, exported = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(exported) == set(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    reloaded, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    x = tokens(seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x).logits, hf_model(x).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["activation_function"] == "gelu_new"
    shape = (config["n_positions"], config["n_embd"], config["n_layer"], config["vocab_size"])
    assert shape == (160, 64, 2, 50257)


def test_export_drops_padded_rows_and_survives_torch_compile_wrapper(hf_model, hf_dir, tmp_path):
    padded = GPT.from_pretrained(hf_dir, vocab_pad_multiple=64)
    assert padded.transformer.wte.weight.shape[0] == 50304
    wrapped = torch.nn.Module()
    wrapped._orig_mod = padded  # what torch.compile's OptimizedModule looks like from outside
    from gpt2repro.weights import save_pretrained

    save_pretrained(wrapped, tmp_path / "out")
    assert load_file(tmp_path / "out" / "model.safetensors")["transformer.wte.weight"].shape == (50257, 64)
    assert same_logits(GPT.from_pretrained(tmp_path / "out"), hf_model)


def test_openai_style_bin_without_prefix_with_mask_buffers(hf_model, tmp_path):
    """Like the released gpt2 pytorch_model.bin: no 'transformer.' prefix, mask buffers, no lm_head."""
    directory = tmp_path / "bin"
    hf_model.save_pretrained(directory)
    (directory / "model.safetensors").unlink()
    sd = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
    del sd["lm_head.weight"]
    n = CONFIG.block_size
    for i in range(CONFIG.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(sd, directory / "pytorch_model.bin")
    assert same_logits(GPT.from_pretrained(directory), hf_model)


def test_sharded_safetensors_with_index_and_untied_copy_of_head(hf_model, hf_dir):
    tensors = load_file(hf_dir / "model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()  # some exports write the head too
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, hf_dir / shard, metadata={"format": "pt"})
    (hf_dir / "model.safetensors").unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert same_logits(GPT.from_pretrained(hf_dir), hf_model)


def test_overrides_dtype_and_context_crop(hf_model, hf_dir):
    ours = GPT.from_pretrained(hf_dir, dtype=torch.bfloat16, block_size=64, attn_backend="explicit")
    assert ours.transformer.wpe.weight.shape == (64, 64) and ours.config.block_size == 64
    assert ours.transformer.wte.weight.dtype == torch.bfloat16
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert ours.transformer.h[0].attn.backend == "explicit"
    with pytest.raises(UserError, match="block_size 999"):
        GPT.from_pretrained(hf_dir, block_size=999)
    with pytest.raises(UserError, match="n_layer"):
        GPT.from_pretrained(hf_dir, n_layer=3)


def test_project_checkpoint_file_and_run_dir(hf_model, hf_dir, tmp_path):
    ours = GPT.from_pretrained(hf_dir)
    run_dir = tmp_path / "run"
    state = {f"_orig_mod.{k}": v for k, v in ours.state_dict().items()}  # saved from a compiled model
    config = ours.config.to_dict()
    atomic_save({"model": state, "model_config": config, "step": 5}, checkpoint_path(run_dir, 5))
    atomic_save({"model": ours.state_dict(), "model_config": config, "step": 9}, checkpoint_path(run_dir, 9))
    for source in (run_dir, checkpoint_path(run_dir, 5)):
        loaded = GPT.from_pretrained(source)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        assert same_logits(loaded, hf_model)
    bad = checkpoint_path(run_dir, 20)
    sd = ours.state_dict()
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:10]
    atomic_save({"model": sd, "model_config": ours.config.to_dict(), "step": 20}, bad)
    with pytest.raises(UserError, match=r"transformer\.wpe\.weight.*step_00000020\.pt"):
        GPT.from_pretrained(run_dir)  # latest = the bad one
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        GPT.from_pretrained(bad)


# ---------------------------------------------------------------------------- bad files
def test_missing_tensor_is_named(hf_dir):
    rewrite_safetensors(hf_dir, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(UserError, match=r"missing tensor\(s\) h\.1\.mlp\.c_fc\.bias") as e:
        GPT.from_pretrained(hf_dir)
    assert "model.safetensors" in str(e.value)


def test_unexpected_tensor_is_named(hf_dir):
    rewrite_safetensors(hf_dir, lambda t: t.__setitem__("transformer.h.0.attn.q_attn.weight", torch.zeros(2)))
    with pytest.raises(UserError, match=r"transformer\.h\.0\.attn\.q_attn\.weight"):
        GPT.from_pretrained(hf_dir)


def test_wrong_shape_is_named(hf_dir):
    name = "transformer.h.0.attn.c_attn.weight"
    rewrite_safetensors(hf_dir, lambda t: t.__setitem__(name, torch.zeros(64, 64)))
    with pytest.raises(UserError, match=r"'transformer\.h\.0\.attn\.c_attn\.weight'.*\(64, 64\).*\(64, 192"):
        GPT.from_pretrained(hf_dir)


def test_config_of_another_size_is_caught_by_shapes(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "n_embd": 128}))
    with pytest.raises(UserError, match="shape"):
        GPT.from_pretrained(hf_dir)


def test_differing_lm_head_is_refused(hf_dir):
    rewrite_safetensors(hf_dir, lambda t: t.__setitem__("lm_head.weight", torch.zeros(50257, 64)))
    with pytest.raises(UserError, match="lm_head.weight"):
        GPT.from_pretrained(hf_dir)


def test_truncated_weight_file(hf_dir):
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"model\.safetensors is unreadable"):
        GPT.from_pretrained(hf_dir)


def test_an_empty_weight_file_is_named_with_torchs_error(hf_dir):
    """A .bin download stopped at 0 bytes: torch.load raises EOFError with no message."""
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(hf_dir)
    assert str(e.value).startswith(f"weight file {hf_dir / 'pytorch_model.bin'} is unreadable (EOFError); ")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"model_type": "llama"}, "model_type 'llama'"),
    ],
)
def test_incompatible_configs_are_refused(hf_dir, change, message):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=message):
        GPT.from_pretrained(hf_dir)


def test_missing_or_broken_files(hf_dir, tmp_path):
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        GPT.from_pretrained(hf_dir)
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no weights"):
        GPT.from_pretrained(hf_dir)
    with pytest.raises(UserError, match="no config.json"):
        GPT.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="neither an existing file or directory nor a hub model name"):
        GPT.from_pretrained(tmp_path / "no" / "such" / "dir")


# ---------------------------------------------------------------------------- the hub
def test_hub_name_offline_says_how_to_get_the_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        GPT.from_pretrained("gpt2-medium")
    message = str(e.value)
    assert "openai-community/gpt2-medium" in message
    assert "huggingface-cli download openai-community/gpt2-medium" in message
    assert "pass DIR where you passed" in message
    assert "\n" not in message


def test_hub_download_with_urllib_then_from_cache(hf_model, hf_dir, monkeypatch, tmp_path):
    """Without huggingface_hub, files come from HF_ENDPOINT/<repo>/resolve/main/<file> (a local server)."""
    served = tmp_path / "served"
    shutil.copytree(hf_dir, served / "someone" / "tiny-gpt2" / "resolve" / "main")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails -> plain urllib
    try:
        assert same_logits(GPT.from_pretrained("someone/tiny-gpt2"), hf_model)
    finally:
        server.shutdown()
        server.server_close()
    cached = tmp_path / "cache" / "hub" / "someone--tiny-gpt2"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]
    assert same_logits(GPT.from_pretrained("someone/tiny-gpt2"), hf_model)  # server gone: from the cache
