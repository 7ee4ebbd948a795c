"""The public evaluation files: where they live online, their checksums, and a local cache.

Nothing is fetched when ``--data`` is given. Otherwise a file is taken from the cache
(``$XDG_CACHE_HOME/gpt2repro/evals``, default ``~/.cache/...``) or downloaded once and checked by sha256.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.errors import UserError


@dataclass(frozen=True)
class RemoteFile:
    name: str  # file name in the cache
    url: str
    sha256: str  # of the file itself (for a zip member: of the member)
    zip_member: str | None = None


HELLASWAG_VAL = RemoteFile(
    "hellaswag_val.jsonl",
    "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
)
LAMBADA_TEST = RemoteFile(  # OpenAI's version, the one the GPT-2 paper and lm-eval "lambada_openai" use
    "lambada_test.jsonl",
    "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl",
    "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
)
WIKITEXT2_TEST = RemoteFile(
    "wiki.test.raw",
    "https://wikitext.smerity.com/wikitext-2-raw-v1.zip",
    "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08",
    zip_member="wikitext-2-raw/wiki.test.raw",
)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2repro" / "evals"


def fetch(remote: RemoteFile, hint: str) -> Path:
    """The cached copy of ``remote``, downloading it first if needed; ``hint`` says what --data to pass."""
    dest = cache_dir() / remote.name
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(remote.url, timeout=60) as response:
            data = response.read()
        if remote.zip_member:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(remote.zip_member)
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"could not download {remote.url} ({e}); if offline, pass --data {hint}") from e
    digest = hashlib.sha256(data).hexdigest()
    if digest != remote.sha256:
        raise UserError(
            f"{remote.url} gave {remote.name} with sha256 {digest[:12]}…, expected {remote.sha256[:12]}…; "
            f"pass --data {hint} with a verified copy"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(dest)
    return dest
