"""Preemption and elastic restarts for real: signals sent to running training processes (one process
and ranks under torchrun), and torchrun's own restart of a group that lost a worker to SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from training_helpers import (
    ENV,
    GPT2REPRO,
    TORCHRUN,
    as_flags,
    assert_same_parameters,
    final_params,
    run_ok,
    run_overrides,
    tiny_corpus,
)

from gpt2repro.checkpoint import checkpoint_path, list_checkpoints
from gpt2repro.preemption import EXIT_PREEMPTED, resume_command

pytestmark = pytest.mark.slow
STEPS = 12
# dropout on: the RNG state must survive the stop too
RUN = dict(max_steps=STEPS, dropout=0.1, eval_every=0, checkpoint_every=0, keep_last=5)
# under torchrun each rank has its own dropout stream: compare with one process without dropout
RUN_2 = {**RUN, "dropout": 0.0}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("preempt") / "data")


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, out, **RUN))])
    return out


@pytest.fixture(scope="module")
def uninterrupted_without_dropout(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, out, **RUN_2))])
    return out


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"), text=True)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s"
        time.sleep(0.1)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_checkpoints_the_step_and_resume_is_bit_identical(data, uninterrupted, tmp_path, sig):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    cmd = [*GPT2REPRO, "train", *as_flags(run_overrides(data, out, **RUN))]
    proc = start(cmd, log)
    wait_for(log, "step     4/", proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    err = log.read_text()
    stopped = [line for line in err.splitlines() if line.startswith("gpt2repro train: stopped by")]
    assert len(stopped) == 1 and f"stopped by {sig.name} at step " in stopped[0], err[-2000:]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 4 <= step < STEPS
    assert list_checkpoints(out) == [checkpoint_path(out, step)]
    assert "resume with: gpt2repro train " in stopped[0] and f"--out {out} " in stopped[0]
    assert stopped[0].endswith(" --resume auto")
    run_ok(cmd + ["--resume", "auto"])
    ours, reference = final_params(out), final_params(uninterrupted)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)


def test_second_signal_stops_at_once(data, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start(
        [*GPT2REPRO, "train", *as_flags(run_overrides(data, out, **{**RUN, "max_steps": 10_000}))], log
    )
    wait_for(log, "step     2/", proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(log, "send it again to stop at once", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM


def test_resume_auto_without_a_checkpoint_starts_the_run(data, tmp_path):
    out = tmp_path / "new"
    proc = run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, out, max_steps=2)), "--resume", "auto"])
    assert f"{out} holds no checkpoint yet; starting a new run there" in proc.stderr
    assert checkpoint_path(out, 2).is_file()


def test_sigterm_to_one_rank_under_torchrun_stops_every_rank(data, uninterrupted_without_dropout, tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    args = ["train", *as_flags(run_overrides(data, out, **RUN_2))]
    proc = start([*TORCHRUN, "--nproc_per_node=2", "-m", "gpt2repro", *args], log)
    wait_for(log, "step     4/", proc)
    workers = children(proc.pid)
    assert len(workers) == 2
    subprocess.run(["kill", "-TERM", str(max(workers))], check=True)  # one rank only (the later-started)
    assert proc.wait(timeout=120) != 0  # torchrun reports its workers' exit code 75 as a failure
    err = log.read_text()
    assert f"exitcode  : {EXIT_PREEMPTED}" in err, err[-3000:]
    stopped = [line for line in err.splitlines() if "gpt2repro train: stopped by SIGTERM at step" in line]
    assert stopped and "resume with: torchrun --nproc_per_node=2 -m gpt2repro train" in stopped[0]
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert list_checkpoints(out) == [checkpoint_path(out, step)]
    run_ok([*TORCHRUN, "--nproc_per_node=2", "-m", "gpt2repro", *args, "--resume", "auto"])
    assert_same_parameters(final_params(out), final_params(uninterrupted_without_dropout), atol=1e-5)


def test_elastic_restart_after_a_worker_is_killed(data, uninterrupted_without_dropout, tmp_path):
    """torchrun --max-restarts: a SIGKILLed worker takes the group down, torchrun starts it again, and
    --resume auto continues from the newest complete checkpoint to the end."""
    out, log = tmp_path / "run", tmp_path / "stderr.txt"
    every_2 = {**RUN_2, "checkpoint_every": 2}
    args = ["train", *as_flags(run_overrides(data, out, **every_2)), "--resume", "auto"]
    proc = start([*TORCHRUN, "--nproc_per_node=2", "--max-restarts=2", "-m", "gpt2repro", *args], log)
    wait_for(log, "step     5/", proc)
    subprocess.run(["kill", "-KILL", str(max(children(proc.pid)))], check=True)
    try:  # a good restart finishes in under a minute here; a hung one would hold CI for gloo's 30 min
        returncode = proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for pid in [*children(proc.pid), proc.pid]:
            subprocess.run(["kill", "-KILL", str(pid)], check=False)
        proc.wait()
        pytest.fail("torchrun's restart did not finish in 240 s: " + log.read_text()[-2000:])
    assert returncode == 0, log.read_text()[-3000:]
    err = log.read_text()
    assert "resumed from" in err and f"done: {STEPS} steps" in err
    assert_same_parameters(final_params(out), final_params(uninterrupted_without_dropout), atol=1e-5)


def test_resume_command_replaces_resume_and_names_torchrun(monkeypatch):
    for var in ("LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    argv = ["train", "--preset", "tiny", "--resume", "runs/a", "--out", "runs/a"]
    assert resume_command(argv) == "gpt2repro train --preset tiny --out runs/a --resume auto"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "16")
    assert resume_command(["train", "--resume"]) == (
        "torchrun --nproc_per_node=8 --nnodes=2 -m gpt2repro train --resume auto"
    )
