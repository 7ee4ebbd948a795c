"""Our offline tiktoken encoding vs Hugging Face's GPT2TokenizerFast built from the same two OpenAI files."""

from __future__ import annotations

import hashlib
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2TokenizerFast

from gpt2repro.tokenizer import (
    ENCODER_JSON_SHA256,
    VOCAB_BPE_SHA256,
    get_tokenizer,
    tokenizer_files,
)

CORPORA = [
    "wikitext-2-raw/wiki.test.raw",
    "wikitext-2-raw/wiki.valid.raw",
    "wikitext-2-tokens/test.txt",
    "wikitext-2-tokens/valid.txt",
    "tinyshakespeare/input.txt",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> GPT2TokenizerFast:
    """HF's tokenizer from OpenAI's encoder.json (= HF's vocab.json) and vocab.bpe (= merges.txt)."""
    encoder, vocab = tokenizer_files()
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(encoder, directory / "vocab.json")
    shutil.copy(vocab, directory / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(directory)


def test_files_are_openais():
    for path, expected in zip(tokenizer_files(), (ENCODER_JSON_SHA256, VOCAB_BPE_SHA256), strict=True):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected


def test_vocabulary_and_end_of_text(hf_tokenizer):
    enc = get_tokenizer()
    assert enc.n_vocab == len(hf_tokenizer) == 50257
    assert enc.eot_token == hf_tokenizer.eos_token_id == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"
    assert enc.encode_ordinary("<|endoftext|>") != [50256]  # plain text never becomes the special token


@pytest.mark.parametrize("corpus", CORPORA)
def test_every_line_of_real_text_matches_hf(shared_data, hf_tokenizer, corpus):
    lines = (shared_data / corpus).read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) > 3000
    ours = get_tokenizer().encode_ordinary_batch(lines)
    theirs = hf_tokenizer(lines, add_special_tokens=False)["input_ids"]
    mismatches = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert not mismatches, f"{len(mismatches)} lines differ, first: {lines[mismatches[0]]!r}"
    enc = get_tokenizer()
    assert enc.decode_batch(ours) == lines


# Any Unicode scalar value (surrogates cannot be UTF-8 encoded, so no tokenizer can see them).
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
# Text built from the pieces the pre-tokenizer regex cares about: contractions, spaces, digits, letters.
tricky_text = st.lists(
    st.sampled_from(
        [
            "'s",
            "'t",
            "'re",
            "'ve",
            "'m",
            "'ll",
            "'d",
            "'S",
            " ",
            "  ",
            "\n",
            "\t",
            "\u00a0",
            "\u3000",
            "a",
            "Z",
            "é",
            "日本",
            "42",
            "٣",
            "😀",
            "!",
            "?!",
            "\r\n",
            "<|endoftext|>",
            "x",
        ]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(unicode_text, tricky_text))
def test_fuzzed_unicode_matches_hf_and_round_trips(hf_tokenizer, text):
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert ids == hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert enc.decode(ids) == text
