"""TrainConfig fields document themselves: ``train --help`` (with a preset's values), the preset TOMLs;
``--block-size`` alone sets the sequence length."""

from __future__ import annotations

import dataclasses
import logging
import re

import pytest

from gpt2repro.cli import main
from gpt2repro.prepare import prepare_corpus
from gpt2repro.sources import embedded_documents
from gpt2repro.train import train
from gpt2repro.train_config import (
    CONFIG_DIR,
    TrainConfig,
    field_help,
    list_presets,
    load_preset,
    preset_with_field_docs,
    resolve,
)

REQUIRED = {"data": "d", "out": "o"}
FIELDS = dataclasses.fields(TrainConfig)


def train_help(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no wrapping to undo
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_lines(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help (on the flag's line, or on the next one when the flag is long)."""
    lines, rows = {}, help_text.splitlines()
    for i, row in enumerate(rows):
        match = re.match(r"^\s+(--[\w-]+) [A-Z]+(?:\s{2,}(.*))?$", row)
        if match:
            lines[match[1]] = match[2] if match[2] is not None else rows[i + 1].strip()
    return lines


def test_every_field_has_a_one_line_doc():
    undocumented = [f.name for f in FIELDS if not f.metadata.get("help", "").strip()]
    assert not undocumented, f"fields without a doc: {undocumented}"
    multi_line = [f.name for f in FIELDS if "\n" in f.metadata["help"]]
    assert not multi_line


def test_train_help_shows_every_fields_doc_and_default(capsys, monkeypatch):
    lines = option_lines(train_help(capsys, monkeypatch))
    for f in FIELDS:
        flag = "--" + f.name.replace("_", "-")
        assert flag in lines, f"{flag} missing from train --help"
        assert lines[flag].startswith(field_help(f.name) + " (default "), lines[flag]
        assert "preset" not in lines[flag].split("(default ")[-1]
    assert lines["--max-steps"].endswith("(default 19073)")
    assert lines["--block-size"].endswith("(default none)") and lines["--data"].endswith("(default '')")
    assert lines["--shuffle"].endswith("(default true)")


@pytest.mark.parametrize("preset", ["tiny", "finetune"])
def test_train_help_after_a_preset_shows_its_values(preset, capsys, monkeypatch):
    lines = option_lines(train_help(capsys, monkeypatch, "--preset", preset))
    values = load_preset(preset)
    for f in FIELDS:
        line = lines["--" + f.name.replace("_", "-")]
        default_and_preset = line.removeprefix(field_help(f.name))
        if f.name in values:
            shown = str(values[f.name]).lower() if isinstance(values[f.name], bool) else str(values[f.name])
            assert default_and_preset.endswith(f"; preset {preset}: {shown})"), line
        else:
            assert "; preset" not in default_and_preset, line
    if preset == "tiny":
        assert lines["--max-steps"].endswith("(default 19073; preset tiny: 300)")


def test_train_help_with_an_unknown_preset_is_an_error(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "no-such-preset", "--help"])
    assert exit_info.value.code == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err


@pytest.mark.parametrize("name", list_presets())
def test_preset_comments_are_the_field_docs(name):
    path = CONFIG_DIR / f"{name}.toml"
    text = path.read_text()
    assert preset_with_field_docs(text) == text, (
        f"{path}: each `field = value` line must end in `# <its doc>` (train_config.preset_with_field_docs)"
    )
    assignments = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert assignments and set(load_preset(name)) == {line.split("=")[0].strip() for line in assignments}
    for line in assignments:
        field, comment = line.split("=")[0].strip(), line.split("  # ", 1)[1]
        assert comment == field_help(field)


# ---------------------------------------------------------------- --block-size without --seq-len


def test_block_size_alone_sets_the_sequence_length(caplog):
    with caplog.at_level(logging.INFO, logger="gpt2repro"):
        cfg = resolve("finetune", REQUIRED | {"block_size": "256"})
    assert (cfg.block_size, cfg.seq_len, cfg.grad_accum_steps(1)) == (256, 256, 32)
    assert "--block-size 256 without --seq-len: training on sequences of 256 tokens, not 1024" in caplog.text
    assert resolve("tiny", REQUIRED | {"block_size": 512}).seq_len == 128  # the preset's is already shorter
    assert resolve(None, REQUIRED | {"block_size": 64}).seq_len == 64  # no preset: the default 1024
    explicit = resolve(None, REQUIRED | {"block_size": 64, "seq_len": 32})
    assert explicit.seq_len == 32


def test_a_run_with_block_size_alone_trains(tmp_path):
    """Before: "--seq-len 1024 is longer than the model's context 64"; now it trains on 64-token rows."""
    data = tmp_path / "data"
    prepare_corpus(
        embedded_documents(), data, source_name="embedded", max_tokens=8_000, val_tokens=1_024, workers=1
    )
    overrides = dict(
        model="gpt2-micro",
        block_size=64,
        data=str(data),
        out=str(tmp_path / "run"),
        device="cpu",
        dtype="fp32",
        compile="false",
        micro_batch=2,
        total_batch=128,
        max_steps=1,
        eval_tokens=128,
        num_samples=0,
    )
    result = train(None, overrides)
    assert result["step"] == 1
    assert resolve(None, overrides).seq_len == 64
