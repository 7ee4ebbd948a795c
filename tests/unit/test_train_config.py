"""TrainConfig: presets, command-line overrides, validation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gpt2repro.errors import UserError
from gpt2repro.train import add_arguments
from gpt2repro.train_config import TrainConfig, list_presets, load_preset, resolve
from gpt2repro.train_options import overrides_from_args

REQUIRED = {"data": "d", "out": "o"}


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves(name):
    cfg = resolve(name, REQUIRED)
    assert isinstance(cfg, TrainConfig)
    cfg.grad_accum_steps(1)  # the batch sizes divide


def test_required_presets_exist():
    assert {"tiny", "gpt2-124m"} <= set(list_presets())


def test_gpt2_124m_is_build_nanogpt_recipe():
    cfg = resolve("gpt2-124m", REQUIRED)
    assert (cfg.model, cfg.vocab_pad_multiple, cfg.seq_len, cfg.total_batch) == ("gpt2", 64, 1024, 524288)
    assert (cfg.lr, cfg.min_lr_ratio, cfg.warmup_steps, cfg.lr_floor_step, cfg.max_steps) == (
        6e-4,
        0.1,
        715,
        19073,
        19073,
    )
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip, cfg.seed) == (
        0.9,
        0.95,
        1e-8,
        0.1,
        1.0,
        1337,
    )
    assert cfg.grad_accum_steps(1) == 8 and cfg.grad_accum_steps(8) == 1


def test_command_line_overrides_win_and_are_typed():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--preset",
            "tiny",
            "--data",
            "d",
            "--out",
            "o",
            "--lr",
            "3e-4",
            "--max-steps",
            "1e3",
            "--compile",
            "false",
            "--shuffle",
            "no",
            "--block-size",
            "none",
        ]
    )
    cfg = resolve(args.preset, overrides_from_args(args))
    assert cfg.lr == 3e-4 and cfg.max_steps == 1000 and cfg.compile == "false" and cfg.shuffle is False
    assert cfg.block_size is None
    assert cfg.seq_len == load_preset("tiny")["seq_len"]  # untouched fields keep the preset's value


def test_no_shuffle_flag_means_strictly_sequential():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--preset", "tiny", "--data", "d", "--out", "o"]
    assert resolve("tiny", overrides_from_args(parser.parse_args(base))).shuffle is True
    assert resolve("tiny", overrides_from_args(parser.parse_args([*base, "--no-shuffle"]))).shuffle is False


def test_every_field_has_a_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a for action in parser._actions for a in action.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in flags


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"micro_batch": "3"}, "not a multiple"),
        ({"lr": "fast"}, "lr must be a float"),
        ({"max_steps": "1.5"}, "max-steps must be an int"),
        ({"nonsense": "1"}, "unknown training field"),
        ({"data": ""}, "--data"),
        ({"dtype": "fp8"}, "--dtype"),
        ({"model": "gpt5"}, "unknown --model"),
        ({"min_lr_ratio": "2"}, "min-lr-ratio"),
    ],
)
def test_bad_values_are_clear_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        cfg = resolve("tiny", {**REQUIRED, **overrides})
        cfg.grad_accum_steps(1)


def test_bad_preset_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 'x'\n")
    with pytest.raises(UserError, match="lr must be a float"):
        resolve(str(bad), REQUIRED)
    with pytest.raises(UserError, match="unknown preset"):
        resolve("no-such-preset", REQUIRED)
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n")
    with pytest.raises(UserError, match="cannot read preset"):
        resolve(str(broken), REQUIRED)
