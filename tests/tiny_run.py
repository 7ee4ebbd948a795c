"""A real, seconds-long training run for the tests that read run directories (plot, inspect).

Prepares a slice of the embedded corpus, trains gpt2-micro for 6 steps with a checkpoint at step 3, then
simulates a crash after step 6 (its checkpoint removed) and resumes: the log holds steps 4-6 twice, exactly
as a real resumed run leaves it. The run is made once per test process and shared (read-only) by every
test module that asks for it.
"""

from __future__ import annotations

from pathlib import Path

from conftest import SHARED_DATA
from training_helpers import T, run_overrides, tiny_corpus

from gpt2repro.checkpoint import checkpoint_path
from gpt2repro.train import train

MAX_STEPS = 6
HELLASWAG = SHARED_DATA / "hellaswag" / "derived-not-original" / "hellaswag_val_full.txt.bz2"
_made: list[Path] = []


def make_tiny_run(root: Path) -> Path:
    """The run directory (under ``root`` the first time it is made in this process)."""
    if _made and _made[0].is_dir():
        return _made[0]
    assert HELLASWAG.is_file(), f"test data {HELLASWAG} is missing (expected ../shared/data beside the repo)"
    data, run = root / "data", root / "run"
    tiny_corpus(data)
    overrides = run_overrides(
        data,
        run,
        total_batch=4 * T,
        max_steps=MAX_STEPS,
        eval_every=3,
        eval_tokens=256,
        checkpoint_every=3,
        hellaswag=str(HELLASWAG),
        hellaswag_every=MAX_STEPS,
        hellaswag_limit=8,  # logged at the last step
    )
    train(None, overrides)
    checkpoint_path(run, MAX_STEPS).unlink()  # "crashed" after logging step 6, before its checkpoint
    train(None, {"out": str(run)}, resume="auto")
    _made[:] = [run]
    return run
