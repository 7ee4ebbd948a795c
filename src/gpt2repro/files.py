"""Writing files so that a crash never leaves half of one: the one atomic-write helper of the project.

Every file a user would miss (checkpoints, manifests, shards, JSON results, pictures, downloads) is
written to a temporary name in the destination directory, flushed and fsynced, then renamed over the
target: a reader sees the old file or the new one, never a torn one, even after SIGKILL or a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from gpt2repro.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    """The process umask (read without changing it where /proc allows: os.umask is process-wide)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_FILE_MODE = 0o666 & ~_umask()  # the mode open() would give a new file


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
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; others sharing a dataset or run must read it
            os.fchmod(fd, _FILE_MODE)
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


# ---------------------------------------------------------------- environment faults as one line
# errno -> (what happened, how to fix it): the causes a user can act on.
_FREE_SPACE = "free some space or choose another location"
_CHECK_PERMISSIONS = "check the permissions or choose another location"
_OS_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", _FREE_SPACE),
    errno.EDQUOT: ("the disk quota is exhausted", _FREE_SPACE),
    errno.EROFS: ("the file system is read-only", "choose a writable location"),
    errno.EACCES: ("permission denied", _CHECK_PERMISSIONS),
    errno.EPERM: ("operation not permitted", _CHECK_PERMISSIONS),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "fix the path"),
    errno.EISDIR: ("it is a directory, not a file", "give a file name"),
    errno.EEXIST: ("it already exists", "remove it or choose another name"),
    errno.ENOENT: ("it does not exist", "check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (ulimit -n)"),
    errno.EIO: ("an input/output error (a failing disk or a dropped network mount)", "check the device"),
}


def user_error_for(e: OSError, action: str, path: str | os.PathLike | None = None) -> UserError:
    """One line for an OS fault: ``cannot ACTION PATH: CAUSE; FIX`` (PATH defaults to the error's own)."""
    where = path if path is not None else (e.filename if e.filename is not None else "")
    cause, fix = _OS_CAUSES.get(e.errno, (e.strerror or str(e), "check the path and the device"))
    target = f" {where}" if where != "" else ""
    return UserError(f"cannot {action}{target}: {cause} ([Errno {e.errno}] {e.strerror}); {fix}")


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file's content; not UTF-8 or unreadable -> one line naming the file (and line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise user_error_for(e, f"read {what}", path) from e
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}:{line}: {what} is not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at offset "
            f"{e.start}); save it as UTF-8"
        ) from e


# ---------------------------------------------------------------- one writer per directory
LOCK_NAME = ".gpt2repro.lock"


class DirectoryLock:
    """An exclusive, non-blocking OS lock on ``DIR/.gpt2repro.lock``: one writer per directory.

    ``fcntl.flock`` is held by the open file, so the kernel drops it when the process dies (even by
    SIGKILL): a crashed writer never leaves a stale lock. The holder's PID and command are written into
    the file so a second writer can say who holds it. The directory is created if needed. The lock file
    is left in place on release (deleting it would race with a process that has just opened it).
    Where ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, path: str | os.PathLike, what: str = "run", option: str = "--out"):
        self.path, self.what, self.option = Path(path), what, option
        self._fd: int | None = None

    def __enter__(self) -> DirectoryLock:
        if fcntl is None:
            return self
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.option} {self.path} is a file; give a directory")
        lock_file = self.path / LOCK_NAME
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise user_error_for(e, f"create the {self.what} directory", e.filename or self.path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "PID unknown"
            os.close(fd)
            pid, _, command = holder.partition(" ")
            raise UserError(
                f"{self.path} is in use by PID {pid} ({command or 'another gpt2repro process'}); wait for "
                f"it to finish or choose another {self.option}"
            ) from None
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            raise user_error_for(e, "lock", lock_file) from e
        with contextlib.suppress(OSError):  # a full disk: the lock holds, only the holder's name is lost
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {' '.join(sys.argv)[:400]}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None
