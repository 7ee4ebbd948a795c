"""Exact resume for real: processes killed with SIGKILL (mid-step and mid-checkpoint-write), then resumed,
end with parameters bit-identical to an uninterrupted run (CPU, fp32, dropout on so RNG state matters)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import ENV, as_flags, run_overrides

from gpt2repro import GPT
from gpt2repro.checkpoint import checkpoint_path, latest_checkpoint, list_checkpoints, load_checkpoint
from gpt2repro.prepare import prepare_corpus
from gpt2repro.sources import embedded_documents

STEPS = 14
HANG_AT = 9  # the checkpoint write that gets killed

# Runs the real CLI, but the checkpoint write of step >= HANG_AT stops half-way (bytes already in the temp
# file) and waits to be killed.
HANGING_WRITER = f"""
import sys, time, torch
real_save = torch.save
def hanging_save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step", 0) >= {HANG_AT}:
        f.write(b"PK half a checkpoint")
        f.flush()
        print("WRITE-STARTED", flush=True)
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = hanging_save
from gpt2repro.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_cmd(data: Path, out: Path) -> list[str]:
    fields = run_overrides(
        data,
        out,
        max_steps=STEPS,
        warmup_steps=3,
        dropout=0.1,
        eval_every=5,
        checkpoint_every=3,
        keep_last=2,
        sample_every=10,
        num_samples=1,
        sample_tokens=4,
    )
    return ["train", *as_flags(fields)]


def logged_steps(run: Path) -> list[int]:
    path = run / "log.jsonl"
    if not path.exists():
        return []
    return [
        r["step"]
        for line in path.read_text().splitlines()
        if line.endswith("}") and "train_loss" in (r := json.loads(line))
    ]


def last_per_step(run: Path) -> dict[int, float]:
    """What readers of a resumed run's log do: keep the last training record of each step."""
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            out[rec["step"]] = rec["train_loss"]
    return out


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    data = tmp_path / "data"
    prepare_corpus(
        embedded_documents(), data, source_name="embedded", max_tokens=30_000, val_tokens=2_048, workers=1
    )
    cli = [sys.executable, "-m", "gpt2repro"]

    # A: the uninterrupted run
    straight = tmp_path / "straight"
    done = subprocess.run(
        [*cli, *train_cmd(data, straight)], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # B: SIGKILL in the middle of training (checkpoints every 3 steps; killed at step 5 or 6)
    run = tmp_path / "killed"
    log_file = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([*cli, *train_cmd(data, run)], env=ENV, stdout=log_file, stderr=log_file)
    try:
        wait_for(lambda: max(logged_steps(run), default=0) >= 5, proc, "step 5")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(logged_steps(run))
    assert killed_at < STEPS

    # C: resume, and SIGKILL it in the middle of writing the step-9 checkpoint
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_WRITER, "train", "--out", str(run), "--resume"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
    )
    try:
        wait_for(
            lambda: list((run / "checkpoints").glob(f".{checkpoint_path(run, HANG_AT).name}.*.tmp")),
            proc,
            "the step-9 checkpoint write",
        )
        assert proc.stdout.readline().strip() == "WRITE-STARTED"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # the half-written file is invisible and the previous checkpoint loads
    assert latest_checkpoint(run) == checkpoint_path(run, 6)
    assert load_checkpoint(latest_checkpoint(run))["step"] == 6
    assert GPT.from_pretrained(run).config.n_layer == 2

    # D: resume again, to the end
    resumed = subprocess.run(
        [*cli, "train", "--out", str(run), "--resume"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step 6" in resumed.stderr
    assert not list((run / "checkpoints").glob(".*.tmp"))  # the partial write was cleaned up
    assert [p.name for p in list_checkpoints(run)] == ["step_00000012.pt", "step_00000014.pt"]

    a = load_checkpoint(checkpoint_path(straight, STEPS))
    b = load_checkpoint(checkpoint_path(run, STEPS))
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resuming"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # the resumed log (last record per step) has exactly the uninterrupted run's losses
    assert last_per_step(run) == last_per_step(straight)
    assert (run / "samples.txt").read_text().count(f"=== step {STEPS}") >= 1


# The last commit before the run's state became a typed object (train.py split into TrainingRun, Trainer,
# RunWriter): its checkpoints must still resume.
CHECKPOINT_FORMAT_COMMIT = "cf1d1cd"


def test_checkpoint_written_by_the_code_before_the_restructure_resumes_bit_identically(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    old_src = tmp_path / "old"
    old_src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", CHECKPOINT_FORMAT_COMMIT, "src"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(old_src)], input=archive, check=True)
    data, run = tmp_path / "data", tmp_path / "run"
    prepare_corpus(
        embedded_documents(), data, source_name="embedded", max_tokens=20_000, val_tokens=2_048, workers=1
    )
    cmd = train_cmd(data, run)
    cmd[cmd.index("--max-steps") + 1] = "6"
    old_env = {**ENV, "PYTHONPATH": str(old_src / "src")}
    subprocess.run([sys.executable, "-m", "gpt2repro", *cmd], env=old_env, check=True, capture_output=True)
    reference = load_checkpoint(checkpoint_path(run, 6))["model"]
    checkpoint_path(run, 6).unlink()  # the old code's step-3 checkpoint is now the newest
    resumed = subprocess.run(
        [sys.executable, "-m", "gpt2repro", "train", "--out", str(run), "--resume"],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoint_path(run, 3)} at step 3" in resumed.stderr
    final = load_checkpoint(checkpoint_path(run, 6))["model"]
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference)
