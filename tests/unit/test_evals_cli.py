"""``gpt2repro eval``: table + JSON equal to the library functions, model directories, val loss, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gpt2repro.cli import main
from gpt2repro.config import GPTConfig
from gpt2repro.data import write_shard
from gpt2repro.evals.hellaswag import evaluate_hellaswag
from gpt2repro.evals.lambada import evaluate_lambada
from gpt2repro.evals.perplexity import document_perplexity, read_text
from gpt2repro.evals.scoring import EvalSetup
from gpt2repro.evals.wikitext import harness_perplexity, split_pages
from gpt2repro.model import GPT

DERIVED = "hellaswag/derived-not-original/hellaswag_val_full.txt.bz2"
CPU = ["--device", "cpu", "--dtype", "fp32", "--no-progress"]
NEWLINE_BEFORE_TARGET = (426, 1053, 2881, 3047, 3977, 4351, 4462)  # LAMBADA lines where the styles differ


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


def test_wikitext2_harness_style_json_names_its_conventions(tmp_path, shared_data):
    pages = split_pages(read_text(shared_data / "wikitext-2-raw" / "wiki.test.raw"))
    text_path = tmp_path / "wiki.txt"
    text_path.write_text("\n".join(page[:300] for page in pages[:3]))
    out = tmp_path / "wt.json"
    args = ["eval", "--model-preset", "gpt2-micro", "--task", "wikitext2", "--data", str(text_path)]
    rc = main([*args, "--style", "harness", "--context", "32", "--batch-size", "3", "--json", str(out), *CPU])
    assert rc == 0
    result = json.loads(out.read_text())
    expected = harness_perplexity(preset_model(), text_path.read_text(), EvalSetup(batch_size=3), context=32)
    assert result["style"] == "harness" and result["pages"] == 3 and result["n"] == expected["n"]
    for key in ("ppl", "loss", "word_ppl", "bpb", "byte_ppl"):
        assert result[key] == pytest.approx(expected[key], rel=1e-5)
    for key in ("context", "stride", "document_split", "detokenizer", "first_token", "normalisation"):
        assert result[key] == expected[key]
    assert result["examples_per_s"] > 0 and result["tokens_per_s"] > 0
    rc = main([*args, "--style", "paper", "--stride", "16", "--context", "32", "--json", str(out), *CPU])
    paper = json.loads(out.read_text())
    assert rc == 0 and paper["style"] == "paper" and paper["stride"] == 16 and paper["detokenizer"] == "none"


def test_lambada_default_is_paper_style_and_harness_is_selectable(tmp_path, shared_data):
    lines = (shared_data / "lambada" / "lambada_test.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "seven.jsonl"
    path.write_text("".join(lines[i] + "\n" for i in NEWLINE_BEFORE_TARGET))
    results = {}
    for style in ("auto", "paper", "harness"):
        out = tmp_path / f"{style}.json"
        args = ["--task", "lambada", "--data", str(path), "--style", style, "--json", str(out)]
        assert main(["eval", "--model-preset", "gpt2-micro", *args, *CPU]) == 0
        results[style] = json.loads(out.read_text())
    timing = ("elapsed_s", "examples_per_s")
    assert {k: v for k, v in results["auto"].items() if k not in timing} == {
        k: v for k, v in results["paper"].items() if k not in timing
    }
    expected = evaluate_lambada(preset_model(), path, style="harness")
    assert results["harness"]["style"] == "harness" and results["harness"]["n"] == 7
    assert results["harness"]["ppl"] == pytest.approx(expected["ppl"], rel=1e-5)
    assert results["harness"]["target_tokens"] > results["paper"]["target_tokens"]
    assert results["harness"]["examples_per_s"] > 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create files in: chmod 555, or /sys for root (who ignores mode bits)."""
    if os.geteuid() == 0:
        yield Path("/sys")
        return
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


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
        (
            ["--task", "hellaswag", "--batch-size", "0", "--data", "DERIVED"],
            "--batch-size must be a positive",
        ),
        (["--task", "wikitext2", "--stride", "0", "--data", "WIKI"], "--stride must be a positive integer"),
        (["--task", "wikitext2", "--context", "0", "--data", "WIKI"], "--context must be a positive integer"),
        (["--task", "wikitext2", "--context", "4096", "--data", "WIKI"], "--context 4096 is longer than"),
        (
            ["--task", "wikitext2", "--style", "harness", "--context", "4096", "--data", "WIKI"],
            "--context 4096 is longer than the model's block size 128",
        ),
        (["--task", "val", "--context", "4096", "--data", "TMP"], "--context 4096 is longer than"),
        (
            ["--task", "wikitext2", "--style", "harness", "--stride", "8", "--data", "WIKI"],
            "--stride applies",
        ),
        (["--task", "lambada", "--stride", "8", "--data", "MISSING.jsonl"], "--stride applies"),
        (["--task", "lambada", "--context", "8", "--data", "MISSING.jsonl"], "--context applies"),
        (["--task", "hellaswag", "--style", "paper", "--data", "DERIVED"], "--style paper does not apply"),
        (["--task", "lambada", "--style", "completion"], "--style completion does not apply"),
        (["--task", "val", "--style", "harness", "--data", "TMP"], "--style harness does not apply"),
        (["--task", "lambada", "--data", "BINARY"], "binary.jsonl:2: not UTF-8"),
        (["--task", "wikitext2", "--data", "BINARY"], "binary.jsonl:2: not UTF-8"),
        (
            ["--task", "lambada", "--data", "LAMBADA", "--json", "UNDER_FILE"],
            "notes.txt is a file, not a dir",
        ),
        (["--task", "lambada", "--data", "LAMBADA", "--json", "TMP"], "is a directory"),
        (
            ["--task", "lambada", "--data", "LAMBADA", "--json", "READ_ONLY"],
            "result.json: cannot write there",
        ),
    ],
)
def test_errors_are_one_line_exit_2(extra, message, tmp_path, shared_data, read_only_dir, capsys):
    (tmp_path / "wiki.txt").write_text(" = A = \n One two three . \n")
    (tmp_path / "binary.jsonl").write_bytes(b'{"text": "one two"}\n\x00\xff\xfe\x89PNG\n')
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "one.jsonl").write_text('{"text": "one two"}\n')
    placeholders = {
        "MISSING.jsonl": tmp_path / "MISSING.jsonl",
        "DERIVED": shared_data / DERIVED,
        "WIKI": tmp_path / "wiki.txt",
        "BINARY": tmp_path / "binary.jsonl",
        "LAMBADA": tmp_path / "one.jsonl",
        "TMP": tmp_path,
        "UNDER_FILE": tmp_path / "notes.txt" / "result.json",
        "READ_ONLY": read_only_dir / "result.json",
    }
    extra = [str(placeholders.get(a, a)) for a in extra]
    rc = main(["eval", "--model-preset", "gpt2-micro", *extra, *CPU])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    if "--json" in extra:
        assert not Path(extra[extra.index("--json") + 1]).is_file()  # nothing half-written
