"""Checkpoints of a run: atomic writes, finding the latest, loading them back.

A checkpoint of a single-process or DDP run is one ``torch.save`` file
``RUN_DIR/checkpoints/step_XXXXXXXX.pt`` holding a dict (an FSDP run writes a sharded directory
``step_XXXXXXXX/`` instead: sharded_checkpoint.py):

- ``"model"``: the state dict of the *unwrapped* ``GPT`` (no DDP ``module.`` / compile ``_orig_mod.``)
- ``"model_config"``: ``GPTConfig.to_dict()``
- ``"step"``: optimizer steps completed
- and, for training checkpoints, ``"optimizer"``, ``"train_config"``, ``"loader"``, ``"rng"``, ``"val_loss"``

Files are written to a temporary name, fsynced, then renamed: a crash (even SIGKILL) mid-write never
leaves a file that looks complete, and the previous checkpoint stays intact.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from gpt2repro.errors import UserError, first_line, typed_first_line
from gpt2repro.files import atomic_open, atomic_write, is_temp_file
from gpt2repro.sharded_checkpoint import is_sharded_checkpoint, load_train_state

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")  # a file, or a sharded (DCP) directory


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


CHECKSUM_SUFFIX = ".sha256"  # step_XXXXXXXX.pt.sha256 beside a file; SHA256SUMS inside a sharded directory
DIRECTORY_SUMS = "SHA256SUMS"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _checksum_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.name != DIRECTORY_SUMS)


def write_checksum(path: str | os.PathLike) -> None:
    """Record the sha256 of a checkpoint (of each file of a sharded one), written after the data: a
    checkpoint whose bytes changed since is refused on load instead of silently loading garbage."""
    path = Path(path)
    if path.is_dir():
        lines = "".join(f"{_sha256(f)}  {f.name}\n" for f in _checksum_files(path))
        atomic_write(path / DIRECTORY_SUMS, lines)
    else:
        atomic_write(path.with_name(path.name + CHECKSUM_SUFFIX), f"{_sha256(path)}  {path.name}\n")


def verify_checksum(path: str | os.PathLike) -> bool:
    """Raise a one-line UserError if ``path`` does not match its recorded sha256; False when it has no
    record (checkpoints written before checksums existed load as they are)."""
    path = Path(path)
    record = path / DIRECTORY_SUMS if path.is_dir() else path.with_name(path.name + CHECKSUM_SUFFIX)
    if not record.is_file():
        return False
    expected = dict(reversed(line.split("  ", 1)) for line in record.read_text().splitlines() if line)
    files = _checksum_files(path) if path.is_dir() else [path]
    for f in files:
        want = expected.get(f.name)
        got = _sha256(f)
        if want != got:
            raise UserError(
                f"checkpoint {f} is corrupt: its sha256 {got[:12]}... differs from the recorded "
                f"{(want or 'none')[:12]}... ({record.name}); restore it from a copy, or delete "
                f"{path} to fall back to the previous checkpoint"
            )
    return True


def write_failed(e: Exception, path: Path, kept: Path | None) -> UserError:
    """One line for a checkpoint that could not be written; the previous one is untouched. torch's zip
    writer reports a full disk as a RuntimeError ("unexpected pos"), so the cause is looked up."""
    import errno
    import shutil

    from gpt2repro.files import user_error_for

    cause = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None and shutil.disk_usage(path.parent).free < 2**20:
        cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if cause is not None:
        what = str(user_error_for(cause, "write checkpoint", path))
    else:
        what = f"cannot write checkpoint {path} ({first_line(e, 120)})"
    kept_msg = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    return UserError(f"{what}; {kept_msg}: free space or fix the directory, then continue with --resume")


def newest_intact_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes its checksum; each one skipped is logged with why."""
    import logging

    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checksum(path)
            return path
        except UserError as e:
            logging.getLogger("gpt2repro").warning("skipping %s: %s", path.name, e)
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temp files of interrupted writes are ignored)."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in ckpt_dir.iterdir()
        if (m := _NAME.match(p.name)) and (p.is_file() if m.group(2) else is_sharded_checkpoint(p))
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file, with one clear error if it is missing, truncated or not ours."""
    path = Path(path)
    if path.name == "config.json" or path.suffix == ".json":
        raise UserError(
            f"{path} is a run's configuration, not a checkpoint: pass --resume the run directory "
            f"({path.parent}) or one of its checkpoints/step_XXXXXXXX.pt"
        )
    if is_sharded_checkpoint(path):
        verify_checksum(path)
        return load_train_state(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    verify_checksum(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable ({typed_first_line(e, 120)}); "
            "delete it to fall back to the previous checkpoint"
        ) from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a gpt2repro checkpoint (no 'model'/'model_config' entries)")
    return ckpt


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the latest checkpoint of a run directory."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        raise UserError(
            f"{path} is a run's configuration, not a checkpoint: pass --resume the run directory "
            f"({path.parent}) or one of its checkpoints/step_XXXXXXXX.pt"
        )
    if path.is_file() or is_sharded_checkpoint(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise UserError(f"{path} holds no checkpoint (expected {path / CHECKPOINT_DIR}/step_XXXXXXXX.pt)")
    return latest


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CHECKPOINT_DIR).is_dir()


# ---------------------------------------------------------------------- training helpers
def rng_state() -> dict:
    """Every RNG a training step may draw from (dropout, shuffling): python, numpy, torch CPU and CUDA."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int, keep_steps: set[int] = frozenset()) -> None:
    """Delete all checkpoints but the ``keep_last`` newest and those of ``keep_steps`` (e.g. best val).

    The newest one always survives when nothing else would: a run must stay resumable."""
    ckpts = list_checkpoints(run_dir)
    newest = set(ckpts[-keep_last:]) if keep_last > 0 else set()
    if ckpts and not newest and not any(checkpoint_step(p) in keep_steps for p in ckpts):
        newest = {ckpts[-1]}
    for path in ckpts:
        if path not in newest and checkpoint_step(path) not in keep_steps:
            remove_checkpoint(path)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file, or a sharded directory (renamed aside first: never half a checkpoint
    under a complete-looking name)."""
    if path.is_dir():
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        path.with_name(path.name + CHECKSUM_SUFFIX).unlink(missing_ok=True)


def remove_partial_writes(run_dir: str | os.PathLike) -> list[Path]:
    """Delete temp files left by a checkpoint write that was killed (they are never complete)."""
    ckpt_dir = Path(run_dir) / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        return []
    stale = [p for p in ckpt_dir.glob(".step_*") if is_temp_file(p) or p.is_dir()]  # staging/deleting dirs
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def checkpoint_step(path: str | os.PathLike) -> int | None:
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None
