"""Real file-system faults for the tests: a small tmpfs that is full, or mounted read-only.

``mount -t tmpfs`` needs root (CAP_SYS_ADMIN); where it fails, the tests that need it are skipped with
the reason ``mount`` gave, never faked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, options: str) -> str | None:
    """Mount a tmpfs at ``path``; the reason it could not be mounted, or None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.name != "posix" or os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path) -> None:
    """Write ``path/filler`` until the file system is full (ENOSPC)."""
    with open(path / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


@contextlib.contextmanager
def tmpfs(
    path: Path, *, size: str = "1m", read_only: bool = False, full: bool = False, populate=None
) -> Iterator[Path]:
    """A real tmpfs at ``path``; ``populate(path)`` runs before it is filled or remounted read-only."""
    reason = mount_tmpfs(path, f"size={size}")
    if reason:
        pytest.skip(reason)
    try:
        if populate is not None:
            populate(path)
        if full:
            fill(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        unmount(path)
