"""The model a run starts from (initial_model.py): released weights, another run, or scratch (--init-from)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from model_helpers import save_tiny_hf_gpt2, tokens

from gpt2repro.cli import main
from gpt2repro.data import read_shard, shard_paths
from gpt2repro.errors import UserError
from gpt2repro.initial_model import initial_model
from gpt2repro.model import GPT
from gpt2repro.train_config import TrainConfig

transformers = pytest.importorskip("transformers")

SEQ_LEN, MICRO_BATCH = 32, 4


# ---------------------------------------------------------------- starting from pretrained weights
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random GPT-2 saved by Hugging Face itself, as a fine-tuning user would download it."""
    return save_tiny_hf_gpt2(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def one_batch_data(tmp_path_factory):
    """Shards whose train split is exactly one micro-batch: every step sees the same training batch."""
    from gpt2repro.prepare import prepare_corpus
    from gpt2repro.sources import embedded_documents

    path = tmp_path_factory.mktemp("data") / "embedded"
    train_tokens, val_tokens = MICRO_BATCH * SEQ_LEN + 1, 2 * MICRO_BATCH * SEQ_LEN + 1
    prepare_corpus(
        embedded_documents(),
        path,
        source_name="embedded",
        val_tokens=val_tokens,
        max_tokens=val_tokens + train_tokens,
        workers=1,
    )
    return path


def hf_model(path) -> transformers.GPT2LMHeadModel:
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def hf_weights_as_ours(hf: transformers.GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    out = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[name] = tensor.t() if name.endswith(conv1d) else tensor
    return out


def test_loaded_weights_equal_the_directory_and_give_its_logits(hf_dir):
    model = initial_model(TrainConfig(init_from=str(hf_dir), vocab_pad_multiple=64)).eval()
    hf = hf_model(hf_dir)
    ours = model.state_dict()
    for name, tensor in hf_weights_as_ours(hf).items():
        theirs = ours[name][:50257] if name == "transformer.wte.weight" else ours[name]
        torch.testing.assert_close(theirs, tensor, rtol=0, atol=0, msg=name)
    assert ours["transformer.wte.weight"].shape[0] == 50304  # padded for speed...
    assert torch.count_nonzero(ours["transformer.wte.weight"][50257:]) == 0  # ...with rows that never count
    idx = tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_block_size_dropout_and_checkpointing_are_applied_on_top_of_the_weights(hf_dir):
    cfg = TrainConfig(init_from=str(hf_dir), block_size=16, dropout=0.1, activation_checkpointing=True)
    model = initial_model(cfg)
    hf = hf_model(hf_dir)
    assert model.config.block_size == 16
    torch.testing.assert_close(model.transformer.wpe.weight, hf.transformer.wpe.weight[:16], rtol=0, atol=0)
    assert model.config.dropout == 0.1 and model.transformer.h[1].mlp.dropout.p == 0.1
    assert model.activation_checkpointing
    idx = tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx)[0], hf(idx).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_layer=3), r"--n-layer 3 \(checkpoint: 2\)"),
        (dict(n_head=4, n_embd=64), r"--n-head 4 \(checkpoint: 2\); --n-embd 64 \(checkpoint: 32\)"),
        (dict(model="gpt2-micro"), r"--model gpt2-micro \(n_layer=2, n_head=2, n_embd=64; checkpoint: n_l"),
        (dict(block_size=65), r"--block-size 65 is larger than the context of .* \(64\)"),
    ],
)
def test_overrides_that_contradict_the_checkpoint_are_refused(hf_dir, overrides, message):
    with pytest.raises(UserError, match=message):
        initial_model(TrainConfig(init_from=str(hf_dir), **overrides))


def test_from_scratch_builds_the_preset_with_its_overrides():
    model = initial_model(TrainConfig(model="gpt2-micro", n_layer=1, block_size=48, dropout=0.2))
    assert (model.config.n_layer, model.config.n_embd, model.config.block_size) == (1, 64, 48)
    assert model.config.dropout == 0.2 and model.config.padded_vocab_size == 50304


def test_resume_config_rebuilds_the_architecture_without_the_init_source(hf_dir, tmp_path):
    start = initial_model(TrainConfig(init_from=str(hf_dir), block_size=16))
    cfg = TrainConfig(init_from=str(tmp_path / "deleted-since"), dropout=0.1, activation_checkpointing=True)
    rebuilt = initial_model(cfg, resume_config=start.config.to_dict())
    rebuilt.load_state_dict(start.state_dict())  # same shapes: cropped context, padded vocabulary
    assert rebuilt.config.block_size == 16 and rebuilt.config.padded_vocab_size == 50304
    assert rebuilt.config.dropout == 0.1 and rebuilt.transformer.drop.p == 0.1
    assert rebuilt.activation_checkpointing


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _one_batch_flags(one_batch_data) -> list[str]:
    """``train`` flags for one fp32 micro-batch of ``one_batch_data`` a step, without evals or samples."""
    return [
        "--data",
        str(one_batch_data),
        "--seq-len",
        str(SEQ_LEN),
        "--micro-batch",
        str(MICRO_BATCH),
        "--total-batch",
        str(MICRO_BATCH * SEQ_LEN),
        "--dtype",
        "fp32",
        "--eval-every",
        "0",
        "--num-samples",
        "0",
    ]


def test_fine_tune_through_the_cli_then_load_and_export_the_run(hf_dir, one_batch_data, tmp_path):
    run_dir = tmp_path / "ft"
    args = [
        "train",
        "--preset",
        "finetune",
        "--init-from",
        str(hf_dir),
        "--data",
        str(one_batch_data),
        "--out",
        str(run_dir),
        "--seq-len",
        str(SEQ_LEN),
        "--micro-batch",
        "2",
        "--total-batch",
        str(MICRO_BATCH * SEQ_LEN),
        "--max-steps",
        "5",
        "--lr",
        "3e-3",
        "--dtype",
        "fp32",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--num-samples",
        "0",
        "--activation-checkpointing",
        "true",
    ]
    assert main(args) == 0

    # Step 1's loss is the directory's weights on the (only) training batch: the run started from them.
    train_tokens = np.concatenate([read_shard(p) for p in shard_paths(one_batch_data, "train")])
    x = torch.from_numpy(train_tokens[:-1].astype(np.int64)).view(MICRO_BATCH, SEQ_LEN)
    y = torch.from_numpy(train_tokens[1:].astype(np.int64)).view(MICRO_BATCH, SEQ_LEN)
    with torch.no_grad():
        hf_loss = hf_model(hf_dir)(x, labels=None).logits.flatten(0, 1)
        hf_loss = torch.nn.functional.cross_entropy(hf_loss, y.flatten()).item()
    losses = [r["train_loss"] for r in _log(run_dir) if "train_loss" in r]
    assert [r["step"] for r in _log(run_dir) if "train_loss" in r] == [1, 2, 3, 4, 5]
    assert losses[0] == pytest.approx(hf_loss, abs=1e-4)
    assert losses[-1] < losses[0] - 0.5, losses  # the same batch every step: its loss falls

    model = GPT.from_pretrained(run_dir).eval()
    with torch.no_grad():
        assert model(x, y)[1].item() < losses[-1]  # the saved weights are the trained ones
    export = tmp_path / "export"
    model.save_pretrained(export)
    exported = hf_model(export)
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, model(x)[0], rtol=1e-5, atol=1e-5)


def test_a_run_directory_can_seed_a_new_run_at_step_0(hf_dir, one_batch_data, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*_one_batch_flags(one_batch_data), "--lr", "3e-3"]
    assert (
        main(
            [
                "train",
                "--preset",
                "finetune",
                "--init-from",
                str(hf_dir),
                "--out",
                str(first),
                "--max-steps",
                "2",
                *common,
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--preset",
                "finetune",
                "--init-from",
                str(first),
                "--out",
                str(second),
                "--max-steps",
                "1",
                *common,
            ]
        )
        == 0
    )
    [record] = [r for r in _log(second) if "train_loss" in r]
    assert record["step"] == 1  # a fresh run, not a resume
    first_model = GPT.from_pretrained(first).eval()
    start = initial_model(TrainConfig(init_from=str(first)))
    for name, tensor in first_model.state_dict().items():
        torch.testing.assert_close(start.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    ckpt = torch.load(next((second / "checkpoints").iterdir()), weights_only=False)
    assert ckpt["step"] == 1 and ckpt["train_config"]["init_from"] == str(first)


def test_cli_reports_a_conflict_and_fp16_on_cpu_in_one_line(hf_dir, one_batch_data, tmp_path, capsys):
    base = [
        "train",
        "--preset",
        "finetune",
        "--init-from",
        str(hf_dir),
        "--data",
        str(one_batch_data),
        "--out",
        str(tmp_path / "run"),
        "--seq-len",
        str(SEQ_LEN),
        "--micro-batch",
        str(MICRO_BATCH),
        "--total-batch",
        str(MICRO_BATCH * SEQ_LEN),
        "--device",
        "cpu",
    ]
    assert main([*base, "--n-embd", "48"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--n-embd 48 (checkpoint: 32)" in err
    assert main([*base[:4], str(tmp_path / "missing"), *base[5:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--init-from {tmp_path / 'missing'}: " in err
    assert main([*base, "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fp16 is for CUDA GPUs" in err


def test_resuming_a_fine_tune_does_not_need_the_init_source_any_more(hf_dir, one_batch_data, tmp_path):
    """--resume rebuilds the checkpoint's architecture: the HF directory it started from may be gone."""
    import shutil

    source = tmp_path / "downloaded"
    shutil.copytree(hf_dir, source)
    run = tmp_path / "run"
    common = [*_one_batch_flags(one_batch_data), "--checkpoint-every", "1", "--out", str(run)]
    first = ["train", "--preset", "finetune", "--init-from", str(source), "--max-steps", "1"]
    assert main([*first, *common]) == 0
    shutil.rmtree(source)
    assert main(["train", "--resume", "--max-steps", "2", *common]) == 0
    assert [r["step"] for r in _log(run) if "train_loss" in r] == [1, 2]
