"""files.py: OS faults as one line naming the path and the cause, UTF-8 reads, the directory lock."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from fs_faults import tmpfs

from gpt2repro.errors import UserError
from gpt2repro.files import LOCK_NAME, DirectoryLock, read_text_file, user_error_for


def os_error(action):
    with pytest.raises(OSError) as info:
        action()
    return info.value


def test_real_faults_become_one_line_with_path_and_cause(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (lambda: (a_file / "sub").mkdir(), errno.ENOTDIR, "a part of the path is a file"),
        (lambda: os.mkdir(a_file), errno.EEXIST, "it already exists"),
        (lambda: open(tmp_path, "w"), errno.EISDIR, "it is a directory"),
        (lambda: open(tmp_path / "missing" / "x"), errno.ENOENT, "it does not exist"),
    ]
    for action, code, cause in cases:
        e = os_error(action)
        assert e.errno == code
        message = str(user_error_for(e, "write"))
        assert "\n" not in message and message.startswith(f"cannot write {e.filename}: {cause}")


def test_read_only_and_full_file_systems(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        e = os_error(lambda: (ro / "x").write_text("x"))
        assert str(user_error_for(e, "write", ro / "x")).startswith(
            f"cannot write {ro / 'x'}: the file system is read-only"
        )
    with tmpfs(tmp_path / "full", full=True) as full:
        e = os_error(lambda: (full / "x").write_bytes(b"y" * 100_000))
        message = str(user_error_for(e, "write", full / "x"))
        assert "no space left on the device" in message and "free some space" in message


def test_read_text_file_names_the_line_of_a_bad_byte(tmp_path):
    path = tmp_path / "preset.toml"
    path.write_bytes("lr = 1e-3\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{path}:2: the preset is not UTF-8 text \(invalid byte 0xe9"):
        read_text_file(path, "the preset")
    with pytest.raises(UserError, match=rf"cannot read the preset {tmp_path / 'nope'}: it does not exist"):
        read_text_file(tmp_path / "nope", "the preset")


def test_lock_excludes_a_second_holder_and_is_reusable(tmp_path):
    with DirectoryLock(tmp_path / "d", what="run") as lock:
        assert (tmp_path / "d" / LOCK_NAME).read_text().split()[0] == str(os.getpid())
        with pytest.raises(UserError, match=rf"is in use by PID {os.getpid()} .*choose another --out"):
            DirectoryLock(tmp_path / "d").__enter__()  # flock: a second open file conflicts, same process too
        assert lock is not None
    with DirectoryLock(tmp_path / "d"):
        pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file; give a directory"):
        DirectoryLock(tmp_path / "f").__enter__()


HOLDER = textwrap.dedent("""
    import sys, time
    from gpt2repro.files import DirectoryLock
    with DirectoryLock(sys.argv[1], what="dataset"):
        print("locked", flush=True)
        time.sleep(600)
""")


def test_a_second_prepare_stops_at_once_and_sigkill_frees_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(
            [sys.executable, "-m", "gpt2repro", "prepare", "--source", "embedded", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert f"{out} is in use by PID {holder.pid} (" in second.stderr
        assert "choose another --out" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with DirectoryLock(out):  # the kernel released the dead holder's lock: no stale lock file to remove
        assert (out / LOCK_NAME).read_text().split()[0] == str(os.getpid())


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    from gpt2repro.files import atomic_write

    (tmp_path / "plain").write_text("x")
    atomic_write(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
