"""``gpt2repro eval``: table + JSON equal to the library functions, model directories, val loss, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2repro.cli import main
from gpt2repro.config import GPTConfig
from gpt2repro.data import write_shard
from gpt2repro.evals.hellaswag import evaluate_hellaswag
from gpt2repro.evals.perplexity import document_perplexity
from gpt2repro.model import GPT

DERIVED = "hellaswag/derived-not-original/hellaswag_val_full.txt.bz2"
CPU = ["--device", "cpu", "--dtype", "fp32", "--no-progress"]


def preset_model(seed: int = 1337) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("gpt2-micro")).eval()


def test_hellaswag_table_and_json(tmp_path, shared_data, capsys):
    out = tmp_path / "res" / "hellaswag.json"
    rc = main(
        [
            "eval",
            "--model-preset",
            "gpt2-micro",
            "--task",
            "hellaswag",
            "--data",
            str(shared_data / DERIVED),
            "--limit",
            "6",
            "--batch-size",
            "4",
            "--json",
            str(out),
            *CPU,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    expected = evaluate_hellaswag(preset_model(), shared_data / DERIVED, limit=6)
    assert result["task"] == "hellaswag" and result["n"] == 6 and result["style"] == "harness"
    assert result["acc"] == expected["acc"] and result["acc_norm"] == expected["acc_norm"]
    table = capsys.readouterr().out
    assert "acc_norm" in table and f"{expected['acc_norm']:.4f}" in table


def test_wikitext2_on_a_saved_model_directory(tmp_path, shared_data):
    model = preset_model(seed=3)
    model.save_pretrained(tmp_path / "model")
    text_path = tmp_path / "wiki.txt"
    text_path.write_text(
        (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:1500]
    )
    out = tmp_path / "wt.json"
    rc = main(
        [
            "eval",
            "--model",
            str(tmp_path / "model"),
            "--task",
            "wikitext2",
            "--data",
            str(text_path),
            "--stride",
            "32",
            "--json",
            str(out),
            *CPU,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    expected = document_perplexity(model, text_path.read_text(), stride=32)
    assert result["task"] == "wikitext2" and result["n"] == expected["n"]
    for key in ("ppl", "loss", "word_ppl", "bpb"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5)


def test_val_loss_task(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50257, size=3000).astype(np.uint16)
    data = tmp_path / "shards"
    data.mkdir()
    write_shard(data / "tiny_val_000000.bin", tokens)
    out = tmp_path / "val.json"
    B, T, limit = 2, 32, 512
    rc = main(
        [
            "eval",
            "--model-preset",
            "gpt2-micro",
            "--task",
            "val",
            "--data",
            str(data),
            "--batch-size",
            str(B),
            "--context",
            str(T),
            "--limit",
            str(limit),
            "--json",
            str(out),
            *CPU,
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    model, t = preset_model(), torch.from_numpy(tokens.astype(np.int64))
    with torch.inference_mode():
        losses = []
        for step in range(limit // (B * T)):  # consecutive B*T-token batches, targets shifted by one
            chunk = t[step * B * T : (step + 1) * B * T + 1]
            logits, _ = model(chunk[:-1].view(B, T))
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), chunk[1:], reduction="sum"))
    assert result["task"] == "val" and result["n"] == limit
    assert result["loss"] == pytest.approx(float(sum(losses)) / limit, rel=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--task", "hellaswag", "--data", "MISSING.jsonl"], "does not exist"),
        (
            ["--task", "hellaswag", "--style", "completion", "--data", "DERIVED"],
            "supports only --style harness",
        ),
        (["--task", "lambada", "--data", "MISSING.jsonl"], "does not exist"),
        (["--task", "val"], "--task val needs --data"),
        (
            ["--task", "lambada", "--limit", "0", "--data", "MISSING.jsonl"],
            "--limit must be a positive integer",
        ),
    ],
)
def test_errors_are_one_line_exit_2(extra, message, tmp_path, shared_data, capsys):
    extra = [
        str(tmp_path / a) if a == "MISSING.jsonl" else str(shared_data / DERIVED) if a == "DERIVED" else a
        for a in extra
    ]
    rc = main(["eval", "--model-preset", "gpt2-micro", *extra, *CPU])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
