"""``manifest.json`` of a prepared dataset: read, and checked entry by entry, with the line at fault.

``gpt2repro prepare`` writes it last; it lists every shard (``name``, ``split``, ``tokens``, ``sha256``),
so the loader can tell a complete dataset from stray files and ``verify.verify_dataset`` can tell an intact
shard from a corrupt one. A directory of another tool (llm.c, build-nanogpt) has none.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gpt2repro.errors import UserError
from gpt2repro.files import read_text_file

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
MAX_VOCAB = 1 << 16  # shards hold uint16 token ids
_SHA256 = re.compile(r"[0-9a-f]{64}")


def read_manifest(data_dir: str | os.PathLike) -> dict | None:
    """``data_dir/manifest.json`` as a dict, or None for directories of other tools (llm.c, build-nanogpt)."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    redo = f"re-run `gpt2repro prepare --overwrite --out {path.parent}`"
    text = read_text_file(path, "the manifest")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); {redo}") from e
    problem = _schema_problem(manifest)
    if problem is not None:
        index, message = problem
        offsets = _shard_offsets(text)
        line = text.count("\n", 0, offsets[index]) + 1 if index is not None and index < len(offsets) else 1
        raise UserError(f"{path}:{line}: {message}; {redo}")
    return manifest


def _schema_problem(manifest: object) -> tuple[int | None, str] | None:
    """(index of the bad shard entry or None, what is wrong), or None when the manifest is well-formed."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        return None, "not a manifest: expected a JSON object with a 'shards' list"
    vocab = manifest.get("vocab_size")
    if vocab is not None and not (_is_int(vocab) and 0 < vocab <= MAX_VOCAB):
        return None, f"'vocab_size' must be an integer in [1, {MAX_VOCAB}], got {vocab!r}"
    seen: set[str] = set()
    for i, shard in enumerate(manifest["shards"]):
        where = f"shards[{i}]"
        if not isinstance(shard, dict):
            return i, f"{where} must be an object, got {shard!r}"
        name = shard.get("name")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name:
            return i, f"{where} needs a 'name' (a file name in this directory), got {name!r}"
        if name in seen:
            return i, f"{where} lists {name} a second time"
        seen.add(name)
        if shard.get("split") not in SPLITS:
            got = repr(shard["split"]) if "split" in shard else "nothing"
            return i, f"{where} ({name}) needs a 'split' of {' or '.join(SPLITS)}, got {got}"
        if not (_is_int(shard.get("tokens")) and shard["tokens"] >= 0):
            return i, f"{where} ({name}) needs 'tokens', a non-negative integer, got {shard.get('tokens')!r}"
        sha = shard.get("sha256")
        if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
            return i, f"{where} ({name}) has a 'sha256' that is not 64 lowercase hex digits: {sha!r}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shard_offsets(text: str) -> list[int]:
    """Character offsets of the entries of the ``"shards"`` list in the JSON text (to name their line)."""
    match = re.search(r'"shards"\s*:\s*\[', text)
    if match is None:
        return []
    decoder, offsets, pos = json.JSONDecoder(), [], match.end()
    try:
        while True:
            pos = len(text) - len(text[pos:].lstrip())
            if text[pos] == "]":
                return offsets
            offsets.append(pos)
            _, pos = decoder.raw_decode(text, pos)
            pos = len(text) - len(text[pos:].lstrip())
            pos += text[pos] == ","
    except (IndexError, ValueError):
        return offsets
