"""Everything fetched from the internet, and the one local cache it lands in.

Two kinds of download: released GPT-2 weights from the Hugging Face hub (``huggingface_hub`` when
installed, else its plain ``resolve`` URLs), and the public evaluation files (fixed URLs, sha256-checked).
Both land under :func:`cache_root` and are fetched once; a file appears there only when complete. Offline,
every miss is one line that says which file to copy where (``--data``, or a local model directory).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.errors import UserError, first_line
from gpt2repro.files import atomic_open, atomic_write

log = logging.getLogger("gpt2repro")

# Short names of OpenAI's four released sizes -> their Hugging Face repositories.
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root() -> Path:
    """``$GPT2REPRO_CACHE``, else ``$XDG_CACHE_HOME/gpt2repro``, else ``~/.cache/gpt2repro``."""
    if os.environ.get("GPT2REPRO_CACHE"):
        return Path(os.environ["GPT2REPRO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt2repro"


def hub_repo_id(name: str) -> str | None:
    """``gpt2`` -> ``openai-community/gpt2``; ``org/name`` as is; None for anything else."""
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    return name if _REPO_ID.match(name) else None


def download_model(name: str) -> Path:
    """Download config.json + model.safetensors of a hub repo (once) and return the local directory."""
    repo_id = hub_repo_id(name)
    if repo_id is None:
        raise UserError(
            f"{name!r} is neither an existing file or directory nor a hub model name "
            f"(e.g. {', '.join(HUB_ALIASES)} or org/name)"
        )
    target = cache_root() / "hub" / repo_id.replace("/", "--")
    files = ("config.json", "model.safetensors")
    if all((target / f).is_file() for f in files):
        return target
    try:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise OSError("HF_HUB_OFFLINE is set")
        _check_hub_reachable()
        target.mkdir(parents=True, exist_ok=True)
        for filename in files:
            if not (target / filename).is_file():
                log.info(f"downloading {repo_id}/{filename} to {target}")
                _download_file(repo_id, filename, target)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({first_line(e)}). "
            "On a machine with internet "
            f"run `huggingface-cli download {repo_id} config.json model.safetensors --local-dir DIR` "
            f"(or `hf download ...`), copy DIR here and pass DIR where you passed {name!r}"
        ) from e
    return target


def _download_file(repo_id: str, filename: str, target: Path) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        _download_with_urllib(repo_id, filename, target)
        return
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry chatter would bury our one-line explanation
    try:
        hf_hub_download(repo_id, filename, local_dir=target)
    finally:
        hub_log.setLevel(level)


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _check_hub_reachable() -> None:
    """Fail in a second, not after minutes of retries, when there is no route to the hub."""
    endpoint = _hub_endpoint()
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=15).close()
    except urllib.error.HTTPError:
        pass  # the server answered: reachable
    except (urllib.error.URLError, OSError) as e:
        raise OSError(f"{endpoint} is unreachable: {getattr(e, 'reason', e)}") from e


def _download_with_urllib(repo_id: str, filename: str, target: Path) -> None:
    """Fetch one file from the hub's resolve URL into ``target`` (via a temp name: never half a file)."""
    url = f"{_hub_endpoint()}/{repo_id}/resolve/main/{filename}"
    with urllib.request.urlopen(url, timeout=30) as response, atomic_open(target / filename) as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


# ====================================================================== evaluation files
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


def fetch(remote: RemoteFile, hint: str) -> Path:
    """The cached copy of ``remote``, downloading it first if needed; ``hint`` says what --data to pass."""
    dest = cache_root() / "evals" / remote.name
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
    return atomic_write(dest, data)
