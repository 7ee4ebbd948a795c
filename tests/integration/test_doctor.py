"""``gpt2repro doctor``: the real CPU run (every row passes or is skipped with a reason), the JSON schema and
Markdown it writes, the rendering, and a failing check turning into a failed row and exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from gpt2repro import GPT, GPTConfig
from gpt2repro.doctor import CHECKS, checks_train, execute
from gpt2repro.doctor.checks_dist import _root_cause, torchrun_command
from gpt2repro.doctor.checks_env import build_runs_on
from gpt2repro.doctor.checks_eval import check_compiled_matches_eager, check_generation
from gpt2repro.doctor.checks_train import check_training
from gpt2repro.doctor.harness import GIB, DoctorContext, TrainedRun, batch_for_memory, sizes_for
from gpt2repro.doctor.report import (
    FAIL,
    PASS,
    SCHEMA,
    SKIPPED,
    Report,
    Row,
    failed,
    passed,
    render_markdown,
    render_table,
    skipped,
    to_json,
)
from gpt2repro.doctor.runner import Check, known_fix
from gpt2repro.errors import UserError

ROW_KEYS = {"name", "status", "figure", "detail", "call", "fix", "seconds", "metrics"}
EXPECTED_ROWS = [
    "environment",
    "MFU peak",
    "attention kernel",
    "torch.compile",
    "training speed",
    "training loss",
    "evaluation",
    "compiled = eager",
    "generation KV cache",
    "fp16 + GradScaler",
    "checkpoint resume",
    "DDP",
    "all-reduce bandwidth",
    "FSDP",
]
CUDA_ONLY = ["fp16 + GradScaler"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The doctor's token shards of the embedded corpus, prepared once for the tests that train."""
    return DoctorContext(CPU, True, sizes_for(CPU, quick=True), tmp_path_factory.mktemp("doctor")).corpus()


@pytest.mark.slow
def test_cpu_quick_run_passes_every_row_or_skips_with_a_reason(tmp_path):
    json_path, md_path = tmp_path / "doctor.json", tmp_path / "doctor.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # shared CI cores: one thread per process
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2repro",
            "doctor",
            "--device",
            "cpu",
            "--quick",
            "--json",
            str(json_path),
            "--markdown",
            str(md_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout and "Traceback" not in proc.stderr

    doc = json.loads(json_path.read_text())
    assert doc["schema"] == SCHEMA and doc["device"] == "cpu" and doc["quick"] is True and doc["ok"] is True
    assert doc["command"] == "gpt2repro doctor --device cpu --quick"
    rows = {r["name"]: r for r in doc["rows"]}
    assert [r["name"] for r in doc["rows"]] == EXPECTED_ROWS
    for row in doc["rows"]:
        assert set(row) == ROW_KEYS and isinstance(row["metrics"], dict), row
        assert row["status"] in (PASS, SKIPPED), row
        if row["status"] == SKIPPED:
            assert row["detail"], row
        else:
            assert row["figure"], row
    assert doc["counts"] == {
        PASS: sum(r["status"] == PASS for r in doc["rows"]),
        FAIL: 0,
        SKIPPED: sum(r["status"] == SKIPPED for r in doc["rows"]),
    }
    for name in CUDA_ONLY:
        assert rows[name]["status"] == SKIPPED and "no CUDA" in rows[name]["detail"]
    assert "--quick" in rows["torch.compile"]["detail"]
    assert rows["FSDP"]["status"] == PASS and rows["FSDP"]["metrics"]["max_rel_diff"] <= 1e-5
    # the figures behind the passes
    loss = rows["training loss"]["metrics"]
    assert loss["final_loss"] < loss["target"] < 10.82 < loss["first_loss"] + 0.5
    assert rows["checkpoint resume"]["metrics"]["bit_identical"] is True
    assert rows["DDP"]["metrics"]["world_size"] == 2 and rows["DDP"]["metrics"]["backend"] == "gloo"
    assert rows["training speed"]["metrics"]["tokens_per_s"] > 0
    assert rows["MFU peak"]["metrics"]["source"] == "measured"

    md = md_path.read_text()
    assert md.startswith("### `gpt2repro doctor --device cpu --quick` on cpu (--quick)")
    assert "| check | status | figure |" in md
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in md
    assert "no CUDA" in md  # the reasons of skipped rows


def _report() -> Report:
    return Report(
        device="cuda:0",
        quick=False,
        seconds=12.5,
        rows=[
            passed("environment", "torch 2.13 | CUDA 12.6", torch="2.13"),
            skipped("fp16 + GradScaler", "no CUDA: fp16 with loss scaling is the path for GPUs without bf16"),
            failed(
                "attention kernel",
                "F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION)",
                "flash attention unavailable on this GPU: falling back to memory-efficient",
                fix="install an official torch wheel",
            ),
        ],
    )


def test_table_names_the_failing_call_and_the_fix():
    table = render_table(_report(), width=100)
    assert table.splitlines()[0].split() == ["check", "status", "time", "figure"]
    assert "failing call: F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION)" in table
    assert "fix: install an official torch wheel" in table
    assert "why: no CUDA" in table
    assert "1 check(s) FAILED: 1 passed, 1 failed, 1 skipped in 12 s on cuda:0" in table
    assert all(len(line) <= 100 for line in table.splitlines())


def test_json_and_markdown_of_a_report():
    report = _report()
    doc = json.loads(to_json(report))
    assert doc["schema"] == SCHEMA and doc["ok"] is False and doc["counts"] == {PASS: 1, FAIL: 1, SKIPPED: 1}
    assert [r["status"] for r in doc["rows"]] == [PASS, SKIPPED, FAIL]
    assert doc["rows"][0]["metrics"] == {"torch": "2.13"}
    md = render_markdown(report)
    assert "| environment | pass | torch 2.13 \\| CUDA 12.6 |" in md  # a | inside a cell is escaped
    assert "FAILED: 1 passed, 1 failed, 1 skipped" in md
    assert "- **attention kernel** (fail): failing call: F.scaled_dot_product_attention" in md
    assert "fix: install an official torch wheel" in md


def test_a_row_is_pass_fail_or_skipped_with_a_reason():
    with pytest.raises(ValueError, match="must say why"):
        Row("x", SKIPPED)
    with pytest.raises(ValueError, match="status must be one of"):
        Row("x", "ok")


def _fine(ctx) -> list[Row]:
    return [passed("fine", "42")]


def _runs_out_of_memory(ctx) -> list[Row]:
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_failing_check_is_a_failed_row_and_exit_code_1(tmp_path, capsys):
    json_path, md_path = tmp_path / "d.json", tmp_path / "d.md"
    checks = [Check("crashing", _runs_out_of_memory), Check("fine", _fine)]
    code = execute("cpu", quick=True, json_path=str(json_path), markdown_path=str(md_path), checks=checks)
    assert code == 1
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["name"], r["status"]) for r in rows] == [
        ("crashing", FAIL),
        ("fine", PASS),
    ]  # later checks ran
    call = rows[0]["call"]
    assert call.startswith("_runs_out_of_memory (tests/integration/test_doctor.py:")
    assert call.endswith("raised RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "--micro-batch" in rows[0]["fix"]
    out = capsys.readouterr().out
    assert "failing call: _runs_out_of_memory" in out and "1 check(s) FAILED" in out
    assert "| crashing | fail |" in md_path.read_text()
    assert execute("cpu", quick=True, checks=[Check("fine", _fine)]) == 0
    with pytest.raises(UserError, match="does not exist"):  # before any check runs
        execute(
            "cpu",
            quick=True,
            json_path=str(tmp_path / "no" / "d.json"),
            checks=[Check("c", _runs_out_of_memory)],
        )


def test_every_check_has_a_distinct_name():
    names = [c.name for c in CHECKS]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("free_gib, batch", [(139, 16), (24, 16), (16, 8), (8, 4), (5, 1), (2, 1)])
def test_gpu_batch_is_picked_by_free_memory(free_gib, batch):
    assert batch_for_memory(free_gib * GIB, 16) == batch


def test_known_fixes():
    assert "NCCL_DEBUG=INFO" in known_fix("RuntimeError: NCCL error in: ProcessGroupNCCL.cpp, unhandled")
    assert "--compile false" in known_fix("torch._dynamo.exc.BackendCompilerFailed: backend='inductor'")
    assert known_fix("ValueError: something new") == ""


class _BrokenCompiler(torch.nn.Module):
    """What ``torch.compile`` returns where inductor cannot build kernels: the first call raises."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        raise RuntimeError("BackendCompilerFailed: backend='inductor' raised: Cannot find a working triton")


@pytest.mark.slow  # ~25 s on 2 busy cores (measuring the CPU peak for MFU alone takes seconds)
def test_a_broken_torch_compile_fails_its_row_and_the_rest_runs_eager(
    tmp_path, monkeypatch, corpus, one_thread
):
    monkeypatch.setattr(torch, "compile", lambda module, **kw: _BrokenCompiler(module))
    sizes = replace(sizes_for(CPU, quick=True), compile=True, train_steps=3, loss_target=11.0)
    ctx = DoctorContext(CPU, True, sizes, tmp_path, data_dir=corpus)
    compile_row, speed, loss = check_training(ctx)
    assert compile_row.name == "torch.compile" and compile_row.status == FAIL
    assert compile_row.call.startswith("forward (tests/integration/test_doctor.py:")
    assert "--compile false" in compile_row.fix
    assert speed.status == PASS and "eager: torch.compile failed" in speed.detail
    assert speed.metrics["compiled"] is False and loss.status == PASS
    assert ctx.trained is not None and not ctx.sizes.compile
    assert check_compiled_matches_eager(ctx)[0].detail == "torch.compile failed (see its row)"


def test_out_of_memory_halves_the_gpu_batch(tmp_path, monkeypatch):
    tried = []

    def short_run(ctx, sizes):
        tried.append(sizes.micro_batch)
        if sizes.micro_batch > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "ran"

    monkeypatch.setattr(checks_train, "_short_run", short_run)
    sizes = replace(sizes_for(CPU, quick=True), micro_batch=16)
    ctx = DoctorContext(torch.device("cuda", 0), False, sizes, tmp_path)
    assert checks_train._run_fitting_memory(ctx) == (
        "ran",
        ["B=16 ran out of memory", "B=8 ran out of memory"],
    )
    assert tried == [16, 8, 4]


@pytest.mark.parametrize(
    "capability, arch_list, runs",
    [
        ((8, 9), ["sm_80", "sm_86", "sm_90"], True),  # a 4090 runs sm_86 cubins
        ((9, 0), ["sm_80", "sm_90a"], True),
        ((12, 0), ["sm_80", "sm_90"], False),  # a too-old torch for Blackwell
        ((12, 0), ["sm_90", "compute_90"], True),  # ... unless it ships PTX to JIT
        ((7, 0), ["sm_80", "compute_80"], False),
    ],
)
def test_which_gpus_a_torch_build_has_kernels_for(capability, arch_list, runs):
    assert build_runs_on(capability, arch_list) is runs


class _BrokenCacheGPT(GPT):
    """A GPT whose cached decoding emits the wrong token at the third step."""

    def generate(self, idx, max_new_tokens, **kwargs):
        out = super().generate(idx, max_new_tokens, **kwargs)
        if kwargs.get("use_cache", True):
            col = idx.shape[1] + 2
            out[:, col] = (out[:, col] + 1) % 50257
        return out


def test_generation_row_fails_when_the_cache_changes_a_clear_greedy_choice(tmp_path, corpus, one_thread):
    ctx = DoctorContext(CPU, True, sizes_for(CPU, quick=True), tmp_path, data_dir=corpus)
    torch.manual_seed(0)
    model = _BrokenCacheGPT(GPTConfig.preset("gpt2-micro"))
    ctx.trained = TrainedRun(trainer=SimpleNamespace(model=model, dtype="fp32"), losses=[])
    (row,) = check_generation(ctx)
    assert row.status == FAIL and row.metrics["first_difference"] == 8 + 2
    assert row.call == "GPT.generate(use_cache=True) vs use_cache=False" and row.metrics["margin"] > 1e-4


@pytest.mark.parametrize(
    "body, expected",
    [
        ("raise ValueError('the cause')", "ValueError: the cause"),
        ("import os; os.abort()", "exitcode"),  # killed by a signal: no exception, only the exit code
    ],
)
def test_a_failed_torchrun_is_reported_by_its_workers_error(tmp_path, body, expected):
    script = tmp_path / "worker.py"
    script.write_text(body + "\n")
    cmd = torchrun_command(2, str(script))  # as the doctor launches: both workers fail at once
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    cause = _root_cause(proc.stderr + proc.stdout)
    assert expected in cause and "ChildFailedError" not in cause, cause
