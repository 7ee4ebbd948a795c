"""CPU kernel choices: the decode Linear equals F.linear whatever it picks; calibrations cached, keyed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import kernels
from gpt2repro.errors import UserError
from gpt2repro.kernels import CalibrationCache, DecodeChoice, Linear


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> CalibrationCache:
    """An empty calibration cache under tmp_path, on a machine that counts as quiet (entries get written)."""
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path))
    monkeypatch.delenv(kernels.KERNEL_CACHE_ENV, raising=False)
    monkeypatch.setattr(kernels, "machine_overloaded", lambda: False)
    monkeypatch.setattr(kernels, "CALIBRATIONS", CalibrationCache())
    return kernels.CALIBRATIONS


@pytest.mark.parametrize("kernel", ["bmm", "linear"])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("out_features,bias", [(2304, True), (50257, False), (13, True)])
def test_decode_linear_equals_f_linear(kernel, rows, out_features, bias, monkeypatch):
    """Whichever kernel the calibration picks (<= 4 rows on CPU), the Linear computes what F.linear does."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, kernel)
    torch.manual_seed(rows)
    layer = Linear(96, out_features, bias=bias)
    if bias:
        torch.nn.init.normal_(layer.bias)
    x = torch.randn(1, rows, 96)
    with torch.no_grad():
        got = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert got.shape == expected.shape == (1, rows, out_features)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel", ["bmm", "linear"])
def test_decode_linear_bf16_and_autograd(kernel, monkeypatch):
    """bf16 weights agree with bf16 F.linear to bf16 rounding; gradients flow through either kernel."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, kernel)
    torch.manual_seed(0)
    layer = Linear(64, 203).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16, requires_grad=True)
    got = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert (got.float() - expected.float()).abs().max().item() <= 2e-2 * expected.float().abs().max().item()
    got.float().sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_forced_kernel_skips_calibration_and_bad_value_is_a_user_error(fresh_cache, monkeypatch):
    def no_calibration(*args):
        raise AssertionError("a forced kernel must not calibrate")

    monkeypatch.setattr(kernels, "calibrate_decode", no_calibration)
    weight = torch.zeros(32, 16)
    for forced in ("bmm", "linear"):
        monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, forced)
        assert kernels.decode_kernel(weight, 1, True) == forced
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "fastest")
    with pytest.raises(UserError, match="GPT2REPRO_DECODE_KERNEL"):
        kernels.decode_kernel(weight, 1, True)


def test_linear_follows_the_calibrated_choice(fresh_cache, monkeypatch):
    """auto: <= 4 rows consult the calibration (once per shape class); 5 rows never do."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    asked, blocked = [], []
    monkeypatch.setattr(
        kernels,
        "calibrate_decode",
        lambda w, rows, bias: asked.append(rows) or DecodeChoice("bmm" if rows == 2 else "linear", 1.0, 1.0),
    )
    real = kernels.linear_by_row_blocks
    monkeypatch.setattr(kernels, "linear_by_row_blocks", lambda *a: blocked.append(a[0].shape) or real(*a))
    layer = Linear(16, 40)
    with torch.no_grad():
        for rows in (1, 2, 2, 5, 1):
            layer(torch.randn(rows, 16))
    assert asked == [1, 2]
    assert blocked == [torch.Size([2, 16])] * 2


def test_calibrate_decode_measures_both_and_picks_by_its_own_times():
    choice = kernels.calibrate_decode(torch.randn(200, 64), 1, True)
    assert choice.kernel in kernels.DECODE_KERNELS
    assert choice.linear_us > 0 and choice.bmm_us > 0
    assert (choice.kernel == "bmm") == (choice.bmm_us < (1 - kernels._MARGIN) * choice.linear_us)


def test_shape_classes_bucket_shapes_and_keep_rows_dtype_bias_threads_apart():
    key = kernels.decode_shape_class
    w = torch.zeros(2304, 768)
    assert key(w, 1, True) == key(torch.zeros(3072, 768), 1, True)  # one power-of-two bucket
    others = {key(w, 2, True), key(w, 1, False), key(w.to(torch.bfloat16), 1, True), key(w, 1, True)}
    assert len(others) == 4
    assert f"threads{torch.get_num_threads()}" in key(w, 1, True)


def test_calibration_cache_round_trip_on_disk(fresh_cache, tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return DecodeChoice("bmm", 10.0, 5.0)

    assert fresh_cache.lookup("decode/x", DecodeChoice, measure) == DecodeChoice("bmm", 10.0, 5.0)
    assert fresh_cache.lookup("decode/x", DecodeChoice, measure).kernel == "bmm"  # this process: memory
    assert fresh_cache.path.parent == tmp_path / "kernels"
    data = json.loads(fresh_cache.path.read_text())
    assert data["cpu"]["torch"] == torch.__version__
    assert data["entries"]["decode/x"] == {"kernel": "bmm", "linear_us": 10.0, "bmm_us": 5.0}
    # a new process (fresh memory) reads the disk and does not measure again
    assert CalibrationCache().lookup("decode/x", DecodeChoice, measure).kernel == "bmm"
    assert len(calls) == 1


def test_close_calls_are_measured_again_by_each_process(fresh_cache, monkeypatch):
    """Only a clear-cut choice goes to disk; a close call on disk (an older version) is measured again."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    close, clear = DecodeChoice("linear", 100.0, 97.0), DecodeChoice("bmm", 100.0, 60.0)
    assert not close.clear_cut() and clear.clear_cut()
    measured = []

    def calibrate(weight, rows, bias):
        measured.append(rows)
        return close if rows == 1 else clear

    monkeypatch.setattr(kernels, "calibrate_decode", calibrate)
    weight = torch.zeros(64, 32)
    for _process in range(2):  # a new process: a fresh memory over the same disk
        fresh_cache.clear_memory()
        assert kernels.decode_kernel(weight, 1, True) == "linear"
        assert kernels.decode_kernel(weight, 2, True) == "bmm"
    assert measured == [1, 2, 1]
    entries = json.loads(fresh_cache.path.read_text())["entries"]
    assert [key.split("/")[4] for key in entries] == ["rows2"]
    close_key = kernels.decode_shape_class(weight, 1, True)
    fresh_cache._write({**entries, close_key: {"kernel": "linear", "linear_us": 100.0, "bmm_us": 99.0}})
    fresh_cache.clear_memory()
    kernels.decode_kernel(weight, 1, True)
    assert measured == [1, 2, 1, 1]


def test_cache_is_keyed_by_cpu_identity(fresh_cache, monkeypatch):
    """Another ISA (ATEN_CPU_CAPABILITY & co.) or torch version is another file: measured again."""
    fresh_cache.lookup("decode/x", DecodeChoice, lambda: DecodeChoice("bmm", 2.0, 1.0))
    first = fresh_cache.path
    kernels.cpu_identity.cache_clear()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "SSE4_2")
    try:
        second = CalibrationCache()
        assert second.path != first
        assert (
            second.lookup("decode/x", DecodeChoice, lambda: DecodeChoice("linear", 1.0, 2.0)).kernel
            == "linear"
        )
        assert json.loads(second.path.read_text())["cpu"]["isa_env"] == {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    finally:
        kernels.cpu_identity.cache_clear()


def test_overloaded_machine_corrupt_file_and_disabled_disk(fresh_cache, monkeypatch):
    monkeypatch.setattr(kernels, "machine_overloaded", lambda: True)
    fresh_cache.lookup("decode/x", DecodeChoice, lambda: DecodeChoice("bmm", 2.0, 1.0))
    assert not fresh_cache.path.exists()  # measured under load: kept for this process only
    monkeypatch.setattr(kernels, "machine_overloaded", lambda: False)
    fresh_cache.path.parent.mkdir(parents=True)
    fresh_cache.path.write_text("{not json")
    assert CalibrationCache().lookup(
        "decode/x", DecodeChoice, lambda: DecodeChoice("linear", 1.0, 2.0)
    ).kernel == ("linear")
    assert json.loads(fresh_cache.path.read_text())["entries"]["decode/x"]["kernel"] == "linear"
    monkeypatch.setenv(kernels.KERNEL_CACHE_ENV, "0")
    assert (
        CalibrationCache().lookup("decode/x", DecodeChoice, lambda: DecodeChoice("bmm", 2.0, 1.0)).kernel
        == "bmm"
    )
    assert json.loads(fresh_cache.path.read_text())["entries"]["decode/x"]["kernel"] == "linear"  # untouched


def test_describe_cpu_names_model_isa_threads_and_load():
    line = kernels.describe_cpu()
    cpu = kernels.cpu_identity()
    assert cpu.model in line and f"{torch.get_num_threads()} torch threads" in line and "load average" in line
    for _, name in kernels.ISA_FLAGS:
        assert f"{name}:" in line
    assert ("AVX2:yes" in line) == ("avx2" in cpu.flags)


def test_best_interleaved_warms_up_alternates_the_order_and_stops_at_the_budget():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    seconds = kernels.best_interleaved(candidates, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then turns in alternating order
    assert set(seconds) == {"a", "b"} and all(0 <= s < 1 for s in seconds.values())
    calls.clear()
    kernels.best_interleaved(candidates, 5, min_rounds=2, budget_s=0.0)  # over budget: min_rounds only
    assert calls == ["a", "b", "a", "b", "b", "a"]
