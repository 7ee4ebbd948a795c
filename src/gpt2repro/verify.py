"""Is a prepared dataset intact? Every shard against ``manifest.json``'s sha256, and every token id in range.

One pass per shard reads the file once: it hashes the bytes and checks each token id against the
vocabulary (``manifest.json``'s ``vocab_size``, else GPT-2's 50,257) in the same blocks. A shard that
passed is remembered in a stamp, ``DATA_DIR/.verified.json`` (or, when the directory is read-only, a file
under ``hub.cache_root()/verified/``), keyed by the file's size and mtime (ns) and the sha256 it matched:
the next start trusts an unchanged shard without reading it, so a 20 GB FineWeb-Edu directory is hashed
once, not at every start. A shard rewritten or replaced since (new size or mtime) is checked again; bit rot
under an unchanged mtime is not, which is what ``gpt2repro prepare --verify DIR`` (stamps ignored) is for.
Shards of other tools (no manifest, or no sha256 in it) get the token-id check only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt2repro.data import VOCAB_SIZE, bad_token_message, read_shard, shard_paths
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write
from gpt2repro.manifest import MANIFEST_NAME, SPLITS, read_manifest

log = logging.getLogger("gpt2repro")

STAMP_NAME = ".verified.json"
STAMP_VERSION = 1
BLOCK_BYTES = 1 << 24  # even: a block never splits a uint16 token


@dataclass
class VerifyReport:
    """What ``verify_dataset`` checked: tokens per split, and how many shards were read vs remembered."""

    data_dir: Path
    tokens: dict[str, int]
    hashed: int = 0  # shards read (hashed + range-checked) this time
    remembered: int = 0  # shards unchanged since a previous verification (stamp)
    without_checksum: list[str] = field(default_factory=list)  # no sha256 to compare: token ids only
    seconds: float = 0.0
    stamp: Path | None = None  # where the stamp was written (None: nothing new, or not writable)

    @property
    def shards(self) -> int:
        return self.hashed + self.remembered

    def summary(self) -> str:
        counts = ", ".join(f"{n} {split}" for split, n in self.tokens.items())
        text = (
            f"{self.data_dir}: {self.shards} shards intact ({counts} tokens): {self.hashed} read and "
            f"checked, {self.remembered} unchanged since verified, in {self.seconds:.2f}s"
        )
        if self.without_checksum:
            text += f"; {len(self.without_checksum)} without a sha256 in {MANIFEST_NAME} (token ids checked)"
        return text


def verify_dataset(
    data_dir: str | os.PathLike, splits: tuple[str, ...] = SPLITS, *, trust_stamps: bool = True
) -> VerifyReport:
    """Check every shard of ``splits`` (see the module doc); a bad one raises UserError naming it."""
    started = time.perf_counter()
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir) or {"shards": []}
    expected = {s["name"]: s.get("sha256") for s in manifest["shards"]}
    vocab = manifest.get("vocab_size", VOCAB_SIZE)
    known = _load_stamp(data_dir)
    report = VerifyReport(data_dir, {})
    for split in splits:
        report.tokens[split] = 0
        for path in shard_paths(data_dir, split):
            st = path.stat()
            want = expected.get(path.name)
            entry = known.get(path.name)
            key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            if trust_stamps and _still_valid(entry, key, want, vocab):
                report.remembered += 1
            else:
                tokens, sha256, top = _check_shard(path, want, vocab)
                entry = known[path.name] = {**key, "tokens": tokens, "sha256": sha256, "max_token": top}
                report.hashed += 1
            if want is None:
                report.without_checksum.append(path.name)
            report.tokens[split] += entry["tokens"]
    if report.hashed:
        present = {p.name for p in data_dir.iterdir()}
        report.stamp = _save_stamp(data_dir, {n: e for n, e in known.items() if n in present})
    report.seconds = time.perf_counter() - started
    return report


def _still_valid(entry: dict | None, key: dict, want: str | None, vocab: int) -> bool:
    """A stamp entry vouches for a shard whose size and mtime are unchanged and that matched ``want``."""
    if not isinstance(entry, dict) or any(entry.get(k) != v for k, v in key.items()):
        return False
    if want is not None and entry.get("sha256") != want:
        return False
    top, tokens = entry.get("max_token"), entry.get("tokens")
    return isinstance(top, int) and top < vocab and isinstance(tokens, int)


def _check_shard(path: Path, want: str | None, vocab: int) -> tuple[int, str, int]:
    """(tokens, sha256, largest token id) of one shard, read once; raises UserError naming it if bad."""
    count = len(read_shard(path))  # validates the header and the size
    data_offset = path.stat().st_size - 2 * count
    digest, top = hashlib.sha256(), 0
    with open(path, "rb") as f:
        digest.update(f.read(data_offset))
        while block := f.read(BLOCK_BYTES):
            digest.update(block)
            ids = np.frombuffer(block, dtype="<u2", count=len(block) // 2)
            top = max(top, int(ids.max()) if len(ids) else 0)
            if top >= vocab:
                raise UserError(bad_token_message(path, top, vocab))
    got = digest.hexdigest()
    if want is not None and got != want:
        raise UserError(
            f"{path} does not match the sha256 in {MANIFEST_NAME} (expected {want[:12]}…, got {got[:12]}…): "
            f"the file changed or is corrupt; re-create the dataset with "
            f"`gpt2repro prepare --overwrite --out {path.parent}`"
        )
    return count, got, top


# ---------------------------------------------------------------- the stamp
def _stamp_paths(data_dir: Path) -> list[Path]:
    """Next to the data, else a per-user file named after the directory (for read-only datasets)."""
    from gpt2repro.hub import cache_root

    resolved = str(data_dir.resolve())
    key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return [data_dir / STAMP_NAME, cache_root() / "verified" / f"{data_dir.resolve().name}-{key}.json"]


def _load_stamp(data_dir: Path) -> dict[str, dict]:
    """The remembered shards (an unreadable or foreign stamp is ignored: the shards are checked again)."""
    for path in _stamp_paths(data_dir):
        try:
            stamp = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(stamp, dict) and stamp.get("version") == STAMP_VERSION:
            shards = stamp.get("shards")
            if isinstance(shards, dict) and stamp.get("data_dir") == str(data_dir.resolve()):
                return shards
    return {}


def _save_stamp(data_dir: Path, shards: dict[str, dict]) -> Path | None:
    stamp = {"version": STAMP_VERSION, "data_dir": str(data_dir.resolve()), "shards": shards}
    text = json.dumps(stamp, indent=1) + "\n"
    errors = []
    for path in _stamp_paths(data_dir):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return atomic_write(path, text)
        except OSError as e:
            errors.append(f"{path}: {e.strerror}")
    log.warning(
        "could not remember the verified shards (%s); the next start checks them again", "; ".join(errors)
    )
    return None
