"""RunWriter.start: a new run never deletes what it did not write; faults are one line."""

from __future__ import annotations

import json
import logging

import pytest
from fs_faults import tmpfs

from gpt2repro.errors import UserError
from gpt2repro.run_writer import RunWriter
from gpt2repro.train_config import TrainConfig

EARLIER = {"log.jsonl": '{"step": 1}\n', "samples.txt": "=== step 1\n", "config.json": '{"lr": 1}\n'}


def test_a_new_run_moves_an_earlier_runs_files_aside(tmp_path, caplog):
    for name, text in EARLIER.items():
        (tmp_path / name).write_text(text)
    cfg = TrainConfig(data="d", out=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="gpt2repro"):
        RunWriter(tmp_path, active=True).start(cfg, resumed=False)
    [aside] = tmp_path.glob("previous-*")
    assert {p.name: p.read_text() for p in aside.iterdir()} == EARLIER
    assert not (tmp_path / "log.jsonl").exists() and not (tmp_path / "samples.txt").exists()
    assert json.loads((tmp_path / "config.json").read_text()) == cfg.to_dict()
    assert f"moved them to {aside}" in caplog.text
    (tmp_path / "log.jsonl").write_text("second\n")
    RunWriter(tmp_path, active=True).start(cfg, resumed=False)  # a second time: another folder
    assert len(list(tmp_path.glob("previous-*"))) == 2


def test_a_resumed_run_keeps_its_log(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 1}\n')
    RunWriter(tmp_path, active=True).start(TrainConfig(data="d", out=str(tmp_path)), resumed=True)
    assert (tmp_path / "log.jsonl").read_text() == '{"step": 1}\n' and not list(tmp_path.glob("previous-*"))


def test_a_read_only_run_directory_is_one_line(tmp_path):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        with pytest.raises(UserError, match=rf"cannot write the run directory {ro / 'run'}: .*read-only"):
            RunWriter(ro / "run", active=True).start(TrainConfig(data="d", out=str(ro)), resumed=False)
