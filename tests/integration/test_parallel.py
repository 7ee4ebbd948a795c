"""FSDP2 and resuming anywhere, with real torchrun processes on CPU (gloo).

One module-wide set of runs (6 steps, the same global batch): one process with 4 accumulation steps;
FSDP with 2 ranks x 2 accumulation steps, periodic val loss, HellaSwag, samples and asynchronous sharded
checkpoints; FSDP again with activation checkpointing. Clipping is active in every step (norms > 0.5).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA
from training_helpers import (
    GPT2REPRO,
    TORCHRUN,
    T,
    as_flags,
    assert_same_losses,
    assert_same_parameters,
    final_params,
    run_ok,
    run_overrides,
    tiny_corpus,
    train_log,
)

from gpt2repro import GPT
from gpt2repro.checkpoint import checkpoint_path, list_checkpoints
from gpt2repro.cli import main
from gpt2repro.distributed import DistInfo
from gpt2repro.errors import UserError
from gpt2repro.parallel import resolve_mode
from gpt2repro.sharded_checkpoint import is_sharded_checkpoint

pytestmark = pytest.mark.slow
HELLASWAG = SHARED_DATA / "hellaswag" / "derived-not-original" / "hellaswag_val_full.txt.bz2"
STEPS = dict(
    max_steps=6,
    total_batch=16 * T,
    grad_clip=0.5,
    eval_every=3,
    eval_tokens=512,
    eval_batch=4,
    checkpoint_every=3,
    keep_last=3,
    hellaswag=str(HELLASWAG),
    hellaswag_every=6,
    hellaswag_limit=6,
    sample_every=3,
    num_samples=1,
    sample_tokens=4,
)


def two_ranks(*args: str) -> list[str]:
    return [*TORCHRUN, "--nproc_per_node=2", "-m", "gpt2repro", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    data = tiny_corpus(root / "data")
    runs = {"data": data, "single": root / "single", "fsdp": root / "fsdp", "fsdp_ac": root / "fsdp_ac"}
    run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, runs["single"], **STEPS))])
    run_ok(
        two_ranks(
            "train",
            *as_flags(run_overrides(data, runs["fsdp"], parallel="fsdp", async_checkpoint="true", **STEPS)),
        )
    )
    run_ok(
        two_ranks(
            "train",
            *as_flags(
                run_overrides(
                    data, runs["fsdp_ac"], parallel="fsdp", activation_checkpointing="true", **STEPS
                )
            ),
        )
    )
    return runs


def test_fsdp_two_ranks_equal_one_process(runs):
    fsdp = runs["fsdp"]
    assert [p.name for p in list_checkpoints(fsdp)] == ["step_00000003", "step_00000006"]
    assert all(is_sharded_checkpoint(p) for p in list_checkpoints(fsdp))
    assert sorted(f.name for f in (fsdp / "checkpoints" / "step_00000006").iterdir()) == [
        ".metadata",
        "SHA256SUMS",
        "__0_0.distcp",
        "__1_0.distcp",
        "train_state.pt",
    ]  # every rank wrote its own shards
    assert_same_parameters(final_params(fsdp), final_params(runs["single"]), atol=1e-5)
    assert_same_losses(fsdp, runs["single"])
    assert all(r["grad_norm"] > 0.5 for r in train_log(fsdp) if "grad_norm" in r)  # clipping was active
    evals = {
        k: [r[k] for r in train_log(run) if k in r]
        for run in (fsdp, runs["single"])
        for k in ("val_loss", "hellaswag_acc_norm")
    }
    single_evals = [r for r in train_log(runs["single"]) if "val_loss" in r]
    fsdp_evals = [r for r in train_log(fsdp) if "val_loss" in r]
    assert [r["step"] for r in fsdp_evals] == [3, 6] and evals
    for a, b in zip(fsdp_evals, single_evals, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert fsdp_evals[-1]["hellaswag_acc_norm"] == single_evals[-1]["hellaswag_acc_norm"]
    assert (fsdp / "samples.txt").read_text().count("=== step") == 2


def test_fsdp_with_activation_checkpointing_equals_one_process(runs):
    assert_same_parameters(final_params(runs["fsdp_ac"]), final_params(runs["single"]), atol=1e-5)
    assert_same_losses(runs["fsdp_ac"], runs["single"])


def _resumable_copy(run: Path, dest: Path) -> Path:
    """The run as if killed after its step-3 checkpoint."""
    shutil.copytree(run, dest)
    last = [p for p in list_checkpoints(dest) if p.name.startswith("step_00000006")][0]
    shutil.rmtree(last) if last.is_dir() else last.unlink()
    return dest


def test_resume_fsdp_two_ranks_in_one_process(runs, tmp_path):
    run = _resumable_copy(runs["fsdp"], tmp_path / "run")
    proc = run_ok([*GPT2REPRO, "train", "--out", str(run), "--resume"])
    assert "resuming a 2-process checkpoint with 1 process(es)" in proc.stderr
    assert checkpoint_path(run, 6).is_file()  # one process writes a single file again
    assert_same_parameters(final_params(run), final_params(runs["single"]), atol=1e-5)
    assert_same_losses(run, runs["single"])  # steps 4-6 saw the same batches


def test_resume_one_process_under_ddp_two_ranks_then_fsdp(runs, tmp_path):
    ddp = _resumable_copy(runs["single"], tmp_path / "ddp")
    run_ok(two_ranks("train", "--out", str(ddp), "--resume"))
    assert_same_parameters(final_params(ddp), final_params(runs["single"]), atol=1e-5)
    assert_same_losses(ddp, runs["single"])
    fsdp = _resumable_copy(runs["single"], tmp_path / "fsdp")  # a single-file checkpoint into shards
    run_ok(two_ranks("train", "--out", str(fsdp), "--resume", "--parallel", "fsdp"))
    assert is_sharded_checkpoint(fsdp / "checkpoints" / "step_00000006")
    assert_same_parameters(final_params(fsdp), final_params(runs["single"]), atol=1e-5)


def test_sharded_checkpoint_loads_in_one_cpu_process(runs, tmp_path, capsys):
    fsdp, data = runs["fsdp"], runs["data"]
    model = GPT.from_pretrained(fsdp)
    assert_same_parameters(model.state_dict(), final_params(runs["single"]), atol=1e-5)
    assert main(["sample", "--model", str(fsdp), "--greedy", "--max-new-tokens", "5", "--prompt", "The"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert (
        main(
            [
                "eval",
                "--task",
                "val",
                "--model",
                str(fsdp),
                "--data",
                str(data),
                "--json",
                str(tmp_path / "val.json"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "inspect",
                "--model",
                str(fsdp / "checkpoints" / "step_00000003"),
                "--out",
                str(tmp_path / "pictures"),
            ]
        )
        == 0
    )
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp_path / "hf")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model.eval()(idx)[0], atol=1e-4)
    tuned = tmp_path / "tuned"
    run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, tuned, init_from=str(fsdp), max_steps=1))])
    assert "init from" in (tuned / "log.jsonl").read_text() or list_checkpoints(tuned)


def test_init_from_under_fsdp_loads_into_shards_like_one_process(runs, tmp_path):
    """Rank 0 alone reads the weights; the model is built on the meta device and each rank receives
    its shards: the same training as a single process fine-tuning the same weights."""
    source, data = runs["single"], runs["data"]
    tune = dict(init_from=str(source), max_steps=2, total_batch=16 * T, grad_clip=0.5)
    single = tmp_path / "single"
    run_ok([*GPT2REPRO, "train", *as_flags(run_overrides(data, single, **tune))])
    sharded = tmp_path / "sharded"
    proc = run_ok(two_ranks("train", *as_flags(run_overrides(data, sharded, parallel="fsdp", **tune))))
    assert "init from" in proc.stderr
    assert_same_parameters(final_params(sharded), final_params(single), atol=1e-5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--parallel", "zero3"], "unknown --parallel 'zero3'; choose one of auto, none, ddp, fsdp"),
        (["--parallel", "ddp"], "--parallel ddp needs processes started by torchrun"),
        (["--parallel", "fsdp"], "--parallel fsdp needs processes started by torchrun"),
    ],
)
def test_impossible_parallel_options_are_one_line(runs, tmp_path, capsys, flags, message):
    argv = ["train", *as_flags(run_overrides(runs["data"], tmp_path / "run")), *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fsdp_refuses_fp16_and_none_refuses_several_processes():
    two = DistInfo(rank=0, world_size=2, enabled=True)
    with pytest.raises(UserError, match="--parallel fsdp does not support --dtype fp16"):
        resolve_mode("fsdp", two, "fp16")
    with pytest.raises(UserError, match="would train 2 unrelated copies"):
        resolve_mode("none", two, "fp32")
    assert resolve_mode("auto", two, "fp32") == "ddp"
    assert resolve_mode("auto", DistInfo(), "fp32") == "none"
