"""A training run against the faults of its run directory: another writer holding it, and a disk that
fills up between two checkpoints (a real tmpfs)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fs_faults import tmpfs
from training_helpers import as_flags, run_overrides

from gpt2repro.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from gpt2repro.cli import main
from gpt2repro.files import DirectoryLock
from gpt2repro.prepare import prepare_corpus
from gpt2repro.sources import embedded_documents


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "data"
    prepare_corpus(embedded_documents(), path, source_name="embedded", max_tokens=20_000, val_tokens=2_048,
                   workers=1)  # fmt: skip
    return path


def test_a_second_run_on_the_same_out_stops_at_once_naming_the_holder(data, tmp_path, capsys):
    out = tmp_path / "run"
    with DirectoryLock(out, what="run"):  # as a running `gpt2repro train --out run` holds it
        assert main(["train", *as_flags(run_overrides(data, out, max_steps=1))]) == 2
    err = capsys.readouterr().err
    assert f"is in use by PID {os.getpid()}" in err and "Traceback" not in err
    assert not (out / "log.jsonl").exists()
    assert main(["train", *as_flags(run_overrides(data, out, max_steps=1))]) == 0  # released: free again


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_says_which(data, tmp_path, capsys):
    """gpt2-micro's checkpoint (weights + AdamW) is ~40 MB: the first fits on a 64 MB tmpfs, the second
    runs out of space half-way. The run stops with one line naming the checkpoint that was kept, which
    still loads and passes its checksum; no temp file is left behind."""
    with tmpfs(tmp_path / "disk", size="64m") as disk:
        out = disk / "run"
        argv = ["train", *as_flags(run_overrides(data, out, max_steps=4, checkpoint_every=2, keep_last=5))]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        kept = checkpoint_path(out, 2)
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert "no space" in err[0].lower() and f"the previous checkpoint {kept} is intact" in err[0]
        assert list_checkpoints(out) == [kept]
        assert load_checkpoint(kept)["step"] == 2  # verified against its sha256 on the way
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
