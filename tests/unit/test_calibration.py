"""Measured choices, cached: per process and on disk, keyed by CPU identity; forced by the environment."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2repro import calibration
from gpt2repro.calibration import CalibrationCache, KernelChoice
from gpt2repro.errors import UserError


def test_calibration_cache_round_trip_on_disk(fresh_cache, tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return KernelChoice("bmm", {"linear": 10.0, "bmm": 5.0})

    assert fresh_cache.lookup("decode/x", KernelChoice, measure) == KernelChoice(
        "bmm", {"linear": 10.0, "bmm": 5.0}
    )
    assert fresh_cache.lookup("decode/x", KernelChoice, measure).kernel == "bmm"  # this process: memory
    assert fresh_cache.path.parent == tmp_path / "kernels"
    data = json.loads(fresh_cache.path.read_text())
    assert data["cpu"]["torch"] == torch.__version__
    assert data["entries"]["decode/x"] == {"kernel": "bmm", "us": {"linear": 10.0, "bmm": 5.0}}
    # a new process (fresh memory) reads the disk and does not measure again
    assert CalibrationCache().lookup("decode/x", KernelChoice, measure).kernel == "bmm"
    assert len(calls) == 1


def test_cache_is_keyed_by_cpu_identity(fresh_cache, monkeypatch):
    """Another ISA (ATEN_CPU_CAPABILITY & co.) or torch version is another file: measured again."""
    fresh_cache.lookup("decode/x", KernelChoice, lambda: KernelChoice("bmm", {"linear": 2.0, "bmm": 1.0}))
    first = fresh_cache.path
    calibration.cpu_identity.cache_clear()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    try:
        second = CalibrationCache()
        assert second.path != first
        assert (
            second.lookup(
                "decode/x", KernelChoice, lambda: KernelChoice("linear", {"linear": 1.0, "bmm": 2.0})
            ).kernel
            == "linear"
        )
        assert json.loads(second.path.read_text())["cpu"]["isa_env"] == {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    finally:
        calibration.cpu_identity.cache_clear()


def test_overloaded_machine_corrupt_file_and_disabled_disk(fresh_cache, monkeypatch):
    monkeypatch.setattr(calibration, "machine_overloaded", lambda: True)
    fresh_cache.lookup("decode/x", KernelChoice, lambda: KernelChoice("bmm", {"linear": 2.0, "bmm": 1.0}))
    assert not fresh_cache.path.exists()  # measured under load: kept for this process only
    monkeypatch.setattr(calibration, "machine_overloaded", lambda: False)
    fresh_cache.path.parent.mkdir(parents=True)
    fresh_cache.path.write_text("{not json")
    assert CalibrationCache().lookup(
        "decode/x", KernelChoice, lambda: KernelChoice("linear", {"linear": 1.0, "bmm": 2.0})
    ).kernel == ("linear")
    assert json.loads(fresh_cache.path.read_text())["entries"]["decode/x"]["kernel"] == "linear"
    monkeypatch.setenv(calibration.KERNEL_CACHE_ENV, "0")
    assert (
        CalibrationCache()
        .lookup("decode/x", KernelChoice, lambda: KernelChoice("bmm", {"linear": 2.0, "bmm": 1.0}))
        .kernel
        == "bmm"
    )
    assert json.loads(fresh_cache.path.read_text())["entries"]["decode/x"]["kernel"] == "linear"  # untouched


def test_describe_cpu_names_model_isa_threads_and_load():
    line = calibration.describe_cpu()
    cpu = calibration.cpu_identity()
    assert cpu.model in line and f"{torch.get_num_threads()} torch threads" in line and "load average" in line
    for _, name in calibration.ISA_FLAGS:
        assert f"{name}:" in line
    assert ("AVX2:yes" in line) == ("avx2" in cpu.flags)


def test_best_interleaved_warms_up_alternates_the_order_and_stops_at_the_budget():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    seconds = calibration.best_interleaved(candidates, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then turns in alternating order
    assert set(seconds) == {"a", "b"} and all(0 <= s < 1 for s in seconds.values())
    calls.clear()
    calibration.best_interleaved(candidates, 5, min_rounds=2, budget_s=0.0)  # over budget: min_rounds only
    assert calls == ["a", "b", "a", "b", "b", "a"]


def test_measure_kernels_keeps_the_default_unless_another_wins_by_the_margin(monkeypatch):
    times = {"default": 1.0, "other": 0.97}
    monkeypatch.setattr(calibration, "best_interleaved", lambda candidates, *a, **k: dict(times))
    candidates = {"default": lambda: None, "other": lambda: None}
    assert calibration.measure_kernels("k", candidates, "default").kernel == "default"  # within 5%
    times["other"] = 0.5
    choice = calibration.measure_kernels("k", candidates, "default", products_per_call=4)
    assert choice.kernel == "other" and choice.us == {"default": 0.25e6, "other": 0.125e6}


def test_chosen_kernel_is_forced_by_its_variable_and_rejects_unknown_names(fresh_cache, monkeypatch):
    def no_measurement():
        raise AssertionError("a forced kernel must not be measured")

    monkeypatch.setenv("SOME_KERNEL", "b")
    assert calibration.chosen_kernel("SOME_KERNEL", ("a", "b"), "k", no_measurement) == "b"
    monkeypatch.setenv("SOME_KERNEL", "fastest")
    with pytest.raises(UserError, match="SOME_KERNEL='fastest' is not one of the kernels auto, a, b"):
        calibration.chosen_kernel("SOME_KERNEL", ("a", "b"), "k", no_measurement)
    monkeypatch.setenv("SOME_KERNEL", "auto")
    close = KernelChoice("a", {"a": 1.0, "b": 1.01})
    assert calibration.chosen_kernel("SOME_KERNEL", ("a", "b"), "k", lambda: close) == "a"
    assert not fresh_cache.path.exists()  # a close call stays in this process...
    assert calibration.chosen_kernel("SOME_KERNEL", ("a", "b"), "k2", lambda: close, persist=None) == "a"
    assert list(json.loads(fresh_cache.path.read_text())["entries"]) == ["k2"]  # ...unless told to persist
