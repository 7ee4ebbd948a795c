"""GPTConfig: the released sizes' parameter counts, the padded vocabulary, and the checks."""

from __future__ import annotations

import pytest
import torch

from gpt2repro.config import PRESETS, GPTConfig
from gpt2repro.errors import UserError
from gpt2repro.model import GPT

# Parameter counts of OpenAI's released checkpoints (tied head counted once), as transformers reports them.
RELEASED = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_presets_have_the_released_parameter_counts(name):
    with torch.device("meta"):  # no memory: only shapes are counted
        model = GPT(GPTConfig.preset(name, vocab_pad_multiple=64))
    assert model.num_params() == RELEASED[name]  # padded rows are not counted
    assert model.num_params(exclude_padding=False) == RELEASED[name] + 47 * model.config.n_embd


def test_padding_and_head_dim():
    config = GPTConfig.preset("gpt2", vocab_pad_multiple=64)
    assert (config.padded_vocab_size, config.vocab_size, config.head_dim) == (50304, 50257, 64)
    assert GPTConfig.preset("gpt2").padded_vocab_size == 50257


def test_dict_round_trip_and_unknown_fields():
    config = GPTConfig.preset("gpt2-micro", dropout=0.1, attn_backend="explicit")
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**config.to_dict(), "n_kv_head": 2})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(n_embd=100, n_head=3), "must be divisible by n_head"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
        (dict(attn_backend="flash3"), "choose one of"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
    ],
)
def test_impossible_configs_are_one_clear_error(fields, message):
    with pytest.raises(UserError) as e:
        GPTConfig(**fields).validate()
    assert message in str(e.value)


def test_unknown_preset_names_the_choices():
    with pytest.raises(UserError, match="gpt2-micro"):
        GPTConfig.preset("gpt3")
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt2-tiny", "gpt2-micro"} <= set(PRESETS)
