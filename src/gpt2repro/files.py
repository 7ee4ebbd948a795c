"""Writing files so that a crash never leaves half of one: the one atomic-write helper of the project.

Every file a user would miss (checkpoints, manifests, shards, JSON results, pictures, downloads) is
written to a temporary name in the destination directory, flushed and fsynced, then renamed over the
target: a reader sees the old file or the new one, never a torn one, even after SIGKILL or a full disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

TEMP_SUFFIX = ".tmp"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows, where directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, encoding: str | None = None) -> Iterator[IO]:
    """``open(path, mode)`` whose result appears at ``path`` only if the ``with`` block completes.

    The temp file is ``.NAME.XXXX.tmp`` next to ``path`` (same file system, so the rename is atomic);
    it is removed on any error, and ``path`` keeps its previous content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object] | bytes | str) -> Path:
    """Write ``path`` atomically: ``write`` is the content (bytes or str) or a function given the file."""
    binary = not isinstance(write, str)
    with atomic_open(path, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
        if callable(write):
            write(f)
        else:
            f.write(write)
    return Path(path)


def is_temp_file(path: str | os.PathLike) -> bool:
    """A leftover of an interrupted :func:`atomic_open` (never a complete file)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)
