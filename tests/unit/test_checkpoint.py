"""Checkpoint files: atomic writes, discovery, pruning, unreadable files."""

from __future__ import annotations

import pytest
import torch

from gpt2repro import checkpoint as ckpt_io
from gpt2repro.errors import UserError


def _write(run_dir, step: int) -> None:
    state = {"model": {}, "model_config": {}, "step": step}
    ckpt_io.atomic_save(state, ckpt_io.checkpoint_path(run_dir, step))


def steps(run_dir) -> list[int]:
    return [ckpt_io.checkpoint_step(p) for p in ckpt_io.list_checkpoints(run_dir)]


def test_latest_ignores_temp_files_of_an_interrupted_write(tmp_path):
    _write(tmp_path, 5)
    _write(tmp_path, 10)
    (tmp_path / "checkpoints" / ".step_00000015.pt.abc.tmp").write_bytes(b"half a checkpoint")
    assert ckpt_io.latest_checkpoint(tmp_path).name == "step_00000010.pt"
    assert ckpt_io.remove_partial_writes(tmp_path)
    assert steps(tmp_path) == [5, 10]


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for s in (1, 2, 3, 4):
        _write(tmp_path, s)
    ckpt_io.prune_checkpoints(tmp_path, keep_last=2, keep_steps={1})
    assert steps(tmp_path) == [1, 3, 4]


@pytest.mark.parametrize("keep_steps", [set(), {99}])
def test_prune_never_deletes_every_checkpoint(tmp_path, keep_steps):
    for s in (1, 2):
        _write(tmp_path, s)
    ckpt_io.prune_checkpoints(tmp_path, keep_last=0, keep_steps=keep_steps)
    assert steps(tmp_path) == [2]


def test_prune_with_keep_last_0_keeps_only_the_best(tmp_path):
    for s in (1, 2, 3):
        _write(tmp_path, s)
    ckpt_io.prune_checkpoints(tmp_path, keep_last=0, keep_steps={2})
    assert steps(tmp_path) == [2]


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    _write(tmp_path, 1)
    path = ckpt_io.checkpoint_path(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(UserError, match="unreadable"):
        ckpt_io.load_checkpoint(path)
    torch.save({"weights": 1}, path)
    with pytest.raises(UserError, match="not a gpt2repro checkpoint"):
        ckpt_io.load_checkpoint(path)
