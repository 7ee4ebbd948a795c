"""The command line: every mistake is one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2repro.cli import main

REPO = Path(__file__).resolve().parents[2]
MICRO = ["--model-preset", "gpt2-micro", "--max-new-tokens", "3"]


def run_main(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-preset", "gpt2-micro", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--model-preset", "gpt2-micro", "--max-new-tokens", "-4"], "--max-new-tokens must be at least 1"),
        ([*MICRO, "--num-samples", "0"], "--num-samples must be at least 1"),
        ([*MICRO, "--top-k", "0"], "--top-k must be a positive integer"),
        ([*MICRO, "--top-k", "-2"], "--top-k must be a positive integer"),
        ([*MICRO, "--top-p", "0"], "--top-p must be in (0, 1]"),
        ([*MICRO, "--top-p", "1.01"], "--top-p must be in (0, 1]"),
        ([*MICRO, "--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--model-preset", "gpt2-huge"], "unknown model preset 'gpt2-huge'"),
        ([*MICRO, "--dtype", "fp8"], "unknown dtype 'fp8'"),
        ([*MICRO, "--dtype", "fp16", "--device", "cpu"], "fp16 is for CUDA GPUs"),
        ([*MICRO, "--device", "tpu9"], "unknown device 'tpu9'"),
    ],
)
def test_sample_bad_options(capsys, args, message):
    code, err = run_main(capsys, ["sample", *args])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gpt2repro sample: error: ")
    assert message in err


def test_sample_missing_or_corrupt_weights(capsys, tmp_path):
    code, err = run_main(capsys, ["sample", "--model", str(tmp_path / "nothing" / "here")])
    assert code == 2 and "neither an existing file or directory nor a hub model name" in err
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    code, err = run_main(capsys, ["sample", "--model", str(tmp_path)])
    assert code == 2 and err.count("\n") == 1 and "model.safetensors is unreadable" in err


def test_sample_without_reachable_weights_says_how_to_get_them(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    code, err = run_main(capsys, ["sample", "--model", "gpt2", "--prompt", "hi"])
    assert code == 2 and err.count("\n") == 1
    assert "huggingface-cli download openai-community/gpt2" in err
    assert "pass DIR where you passed 'gpt2'" in err


@pytest.mark.parametrize("argv", [[], ["fly"], ["sample", "--top-k", "many"], ["sample", "--bogus"]])
def test_argument_errors_exit_2(capsys, argv):
    code, err = run_main(capsys, argv)
    assert code == 2 and "usage:" in err and "Traceback" not in err


def test_help_lists_the_sample_command_and_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "sample" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["sample", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for option in (
        "--model",
        "--prompt",
        "--num-samples",
        "--max-new-tokens",
        "--seed",
        "--temperature",
        "--top-k",
        "--top-p",
        "--greedy",
        "--stop-at-eot",
        "--device",
        "--dtype",
        "--no-cache",
    ):
        assert option in out


def test_real_processes_console_script_and_module(tmp_path):
    """The installed ``gpt2repro`` script and ``python -m gpt2repro``: output, exit codes, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2REPRO_CACHE": str(tmp_path)}
    script = Path(sys.executable).with_name("gpt2repro")
    ok = subprocess.run(
        [str(script), "sample", *MICRO, "--num-samples", "2", "--prompt", "Hi"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("Hi") == 2 and "--- sample 2/2 ---" in ok.stdout
    assert "parameters" in ok.stderr and "sampling on cpu" in ok.stderr  # count, device and dtype logged
    bad = subprocess.run(
        [sys.executable, "-m", "gpt2repro", "sample", "--model", "gpt2-xl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    assert "huggingface-cli download openai-community/gpt2-xl" in bad.stderr
