"""Where ``gpt2repro prepare`` writes: built aside, swapped in only when complete, one writer at a time.

    OUT/.gpt2repro.lock      held (fcntl.flock) by the prepare writing OUT; a second one stops at once
    OUT/.prepare-partial/    the new shards and manifest.json while they are built
    OUT/.prepare-retired/    the previous dataset during the swap (milliseconds), removed right after

The staging directory is *inside* OUT, not beside it, so it is on the same file system even when OUT is a
mount point: the swap is renames only, it needs no space, and the lock file in OUT stays the same file.
Swap order: old manifest and old shards into ``.prepare-retired/``, new shards into OUT, the new
``manifest.json`` last (the commit), then the retired files are deleted. A build that fails (bad input,
full disk, Ctrl-C) deletes only its staging directory: the previous dataset is never touched before the
new one is complete. A process killed during the swap itself leaves ``.prepare-retired/`` next to a
complete staging directory; the next ``prepare`` on OUT finishes that swap first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from gpt2repro.data import write_shard
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write, fsync_dir, is_temp_file
from gpt2repro.manifest import MANIFEST_NAME, SPLITS, read_manifest
from gpt2repro.verify import STAMP_NAME

log = logging.getLogger(__name__)

STAGING_DIR = ".prepare-partial"
RETIRED_DIR = ".prepare-retired"


class ShardWriter:
    """Cuts the tokens into val, then train shards in the staging directory (see the module doc)."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int):
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.staging = out_dir / STAGING_DIR
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.split = "val"
        self.shards: list[dict] = []

    def write(self, tokens: np.ndarray, split: str) -> None:
        if len(tokens) == 0:
            return
        if split != self.split:
            self._flush()
            self.split = split
        while len(tokens):
            take = min(len(tokens), self.shard_tokens - self.fill)
            self.buffer[self.fill : self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.prefix}_{self.split}_{len(self.shards):06d}.bin"
        self.staging.mkdir(exist_ok=True)
        sha256 = write_shard(self.staging / name, self.buffer[: self.fill])
        self.shards.append({"name": name, "split": self.split, "tokens": self.fill, "sha256": sha256})
        self.fill = 0

    def finish(self) -> list[dict]:
        """Write the last shard; the shards stay in the staging directory until ``publish``."""
        self._flush()
        return self.shards


def existing_dataset(out_dir: Path, overwrite: bool) -> list[Path]:
    """Tidy up after an interrupted run; the files a rebuild will replace (refused without overwrite)."""
    if (out_dir / RETIRED_DIR).exists():
        _finish_swap(out_dir)
        log.info("finished the swap of an interrupted `prepare --overwrite` in %s", out_dir)
    elif (out_dir / STAGING_DIR).exists():
        shutil.rmtree(out_dir / STAGING_DIR)
        log.info("removed the leftovers of an interrupted run from %s", out_dir)
    manifest_path = out_dir / MANIFEST_NAME
    shards = _shard_files(out_dir)
    if not overwrite and manifest_path.exists():
        manifest = read_manifest(out_dir)
        raise UserError(
            f"{out_dir} already holds a prepared dataset ({manifest.get('source', '?')}, "
            f"{sum(s['tokens'] for s in manifest['shards'])} tokens); pass --overwrite to rebuild it "
            "or choose another --out"
        )
    if not overwrite and shards:
        raise UserError(
            f"{out_dir} already holds {len(shards)} token shards without a {MANIFEST_NAME} (e.g. "
            f"{shards[0].name}: another tool's, or an interrupted run's); pass --overwrite to replace them, "
            "or choose another --out"
        )
    return [*([manifest_path] if manifest_path.exists() else []), *shards]


def _shard_files(out_dir: Path) -> list[Path]:
    """What the loader would take for shards (and so what a rebuild must replace)."""
    return [
        p
        for p in sorted(out_dir.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix in (".bin", ".npy")
        and any(split in p.name for split in SPLITS)
    ]


def stage_manifest(out_dir: Path, manifest: dict) -> None:
    atomic_write(out_dir / STAGING_DIR / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")


def publish(out_dir: Path, old_files: list[Path]) -> None:
    """Swap the complete staged dataset in for ``old_files`` (the manifest first, see the module doc)."""
    retired = out_dir / RETIRED_DIR
    retired.mkdir(exist_ok=True)
    for path in old_files:
        os.replace(path, retired / path.name)
    (out_dir / STAMP_NAME).unlink(missing_ok=True)  # it vouched for the old shards
    _finish_swap(out_dir)
    if old_files:
        log.info("--overwrite: replaced %d files of the previous dataset in %s", len(old_files), out_dir)


def _finish_swap(out_dir: Path) -> None:
    """Move the staged files into OUT (manifest last), then delete the retired ones. Idempotent."""
    staging, retired = out_dir / STAGING_DIR, out_dir / RETIRED_DIR
    if (staging / MANIFEST_NAME).exists():
        # Killed while retiring: the old files still in OUT are its manifest and the shards that are
        # not new (not in the staged manifest, or still staged, so the file in OUT is the old one).
        new = {s["name"] for s in read_manifest(staging)["shards"]}
        left = [p for p in _shard_files(out_dir) if p.name not in new or (staging / p.name).exists()]
        for path in [*([out_dir / MANIFEST_NAME] if (out_dir / MANIFEST_NAME).exists() else []), *left]:
            os.replace(path, retired / path.name)
        for path in sorted(staging.iterdir()):
            if path.name != MANIFEST_NAME and not is_temp_file(path):
                os.replace(path, out_dir / path.name)
        os.replace(staging / MANIFEST_NAME, out_dir / MANIFEST_NAME)
        fsync_dir(out_dir)
    elif retired.exists() and not (out_dir / MANIFEST_NAME).exists():
        raise UserError(
            f"{retired} holds a previous dataset but no new one is staged: move its files back into "
            f"{out_dir} (or delete it) and run again"
        )
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)


def discard_staging(out_dir: Path) -> None:
    """After a failed build: only what this run wrote goes (the previous dataset stays as it was)."""
    if not (out_dir / RETIRED_DIR).exists():  # a swap in progress is finished by the next run instead
        shutil.rmtree(out_dir / STAGING_DIR, ignore_errors=True)
