"""``gpt2repro export``: a directory that ``transformers`` alone uses offline, generating and tokenizing
exactly as gpt2repro does (checked in a fresh process that never imports gpt2repro)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from tiny_run import make_tiny_run

from gpt2repro import GPT, GPTConfig
from gpt2repro.checkpoint import atomic_save
from gpt2repro.cli import main
from gpt2repro.sample import SamplingOptions, stream_tokens
from gpt2repro.tokenizer import EOT, get_tokenizer, tokenizer_files
from gpt2repro.weights import load_pretrained

pytestmark = pytest.mark.slow  # one real training run and one fresh transformers process for the module

PROMPT = "Hello, I'm a language model,"
NEW_TOKENS = 40
HF_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
}
# Text the byte-level BPE must get right besides WikiText: contractions, digits, runs of spaces, accents,
# CJK and emoji (multi-byte tokens), tabs and newlines, and the one special token.
EXTRA_TEXTS = [
    "I'm sure they'll say it's 1,234.56 -- isn't it?",
    "  two  spaces   three",
    "naïve café résumé",
    "日本語のテキスト 🤖🎉",
    "tab\there\nnew line\r\n",
    f"end of doc{EOT}start of the next",
]

# Runs in a fresh interpreter: only transformers, HF_HUB_OFFLINE, an empty HF cache.
HF_SCRIPT = (
    textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer, pipeline
    from transformers.utils import logging
    logging.set_verbosity_error()
    dirs, texts_file, out_file = sys.argv[1:-2], sys.argv[-2], sys.argv[-1]
    texts = json.loads(open(texts_file, encoding="utf-8").read())
    results = {}
    for d in dirs:
        pipe = pipeline("text-generation", model=d, device="cpu")
        text = pipe(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
        ids = pipe.tokenizer(PROMPT, return_tensors="pt").input_ids
        greedy = pipe.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()
        tok = AutoTokenizer.from_pretrained(d)
        encoded = [tok.encode(t) for t in texts]
        results[d] = {"text": text, "ids": greedy, "encoded": encoded,
                      "decoded": [tok.decode(e) for e in encoded], "eos": tok.eos_token_id}
    assert not any(m.startswith("gpt2repro") for m in sys.modules), "transformers alone must do"
    open(out_file, "w", encoding="utf-8").write(json.dumps(results))
""")
    .replace("PROMPT", repr(PROMPT))
    .replace("NEW_TOKENS", str(NEW_TOKENS))
)


def wikitext_lines() -> list[str]:
    lines = []
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        path = SHARED_DATA / "wikitext-2-raw" / name
        assert path.is_file(), f"test data {path} is missing"
        lines += [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    return lines


def random_checkpoint(path: Path) -> Path:
    """A random gpt2-micro whose greedy path wanders (6x projection weights) instead of repeating a token."""
    torch.manual_seed(11)
    model = GPT(GPTConfig.preset("gpt2-micro", block_size=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ".h." in name:
                p.mul_(6)
    atomic_save({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 0}, path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two exports (a checkpoint file, a run directory) and what transformers made of them, offline."""
    root = tmp_path_factory.mktemp("export")
    sources = {"checkpoint": random_checkpoint(root / "random.pt"), "run": make_tiny_run(root)}
    dirs = {}
    for kind, source in sources.items():
        dirs[kind] = root / f"hf-{kind}"
        assert main(["export", str(source), "--out", str(dirs[kind])]) == 0
    texts = wikitext_lines() + EXTRA_TEXTS
    (root / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(root / "empty-hf-home")}
    args = [str(d) for d in dirs.values()] + [str(root / "texts.json"), str(root / "hf.json")]
    done = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, *args],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((root / "hf.json").read_text(encoding="utf-8"))
    return {
        "sources": sources,
        "dirs": dirs,
        "texts": texts,
        "hf": {kind: results[str(d)] for kind, d in dirs.items()},
    }


def test_export_writes_a_complete_hugging_face_directory(exported):
    encoder, vocab = tokenizer_files()
    for kind, directory in exported["dirs"].items():
        assert {p.name for p in directory.iterdir()} == HF_FILES, kind
        assert (directory / "vocab.json").read_bytes() == encoder.read_bytes()
        assert (directory / "merges.txt").read_bytes() == vocab.read_bytes()
        config = json.loads((directory / "config.json").read_text())
        model = load_pretrained(exported["sources"][kind])
        assert (config["n_positions"], config["n_embd"]) == (model.config.block_size, model.config.n_embd)
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        assert tok_config["model_max_length"] == model.config.block_size
        generation = json.loads((directory / "generation_config.json").read_text())
        assert generation["eos_token_id"] == exported["hf"][kind]["eos"] == 50256


@pytest.mark.parametrize("kind", ["checkpoint", "run"])
def test_pipeline_greedy_generation_equals_gpt2repro_sample(exported, kind, capsys):
    source, hf = exported["sources"][kind], exported["hf"][kind]
    capsys.readouterr()
    argv = [
        "sample",
        "--model",
        str(source),
        "--prompt",
        PROMPT,
        "--greedy",
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == hf["text"] + "\n"
    prompt = get_tokenizer().encode(PROMPT)
    model = load_pretrained(source).eval()
    ours = [int(t) for t in stream_tokens(model, torch.tensor([prompt]), NEW_TOKENS, SamplingOptions(0.0))]
    assert hf["ids"] == prompt + ours
    if kind == "checkpoint":
        assert len(set(ours)) > 10, "a greedy path this varied makes the comparison meaningful"


def test_autotokenizer_encodes_wikitext_exactly_as_gpt2repro(exported):
    enc = get_tokenizer()
    texts = exported["texts"]
    assert len(texts) > 5000
    for kind in exported["dirs"]:
        hf = exported["hf"][kind]
        for text, hf_ids, hf_text in zip(texts, hf["encoded"], hf["decoded"], strict=True):
            assert hf_ids == enc.encode(text, allowed_special={EOT}), text
            assert hf_text == text


def test_push_to_hub_offline_is_one_line_and_the_export_stays(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert (
        main(
            [
                "export",
                str(exported["sources"]["checkpoint"]),
                "--out",
                str(out),
                "--push-to-hub",
                "someone/gpt2-micro",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err and "hf upload someone/gpt2-micro" in err
    assert {p.name for p in out.iterdir()} == HF_FILES


def test_push_to_hub_without_a_reachable_hub_is_one_line(exported, tmp_path):
    """A fresh process: huggingface_hub reads HF_ENDPOINT once, when it is imported."""
    env = os.environ | {
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": "http://127.0.0.1:9",  # the discard port
        "HF_TOKEN": "hf_not_a_real_token",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    argv = [
        "export",
        str(exported["dirs"]["checkpoint"]),
        "--out",
        str(tmp_path / "hf"),
        "--push-to-hub",
        "someone/gpt2-micro",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "gpt2repro", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "could not push to someone/gpt2-micro" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_export_refuses_to_overwrite_its_source_or_a_file(exported, tmp_path, capsys):
    directory = exported["dirs"]["checkpoint"]
    assert main(["export", str(directory), "--out", str(directory)]) == 2
    assert "is the source itself" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["export", str(directory), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
