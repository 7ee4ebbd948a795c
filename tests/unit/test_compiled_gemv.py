"""The compiled decode product: F.linear's numbers, one kernel per shape, and torch's kernels where inductor
cannot compile (a real missing C++ compiler in a subprocess)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import compiled_gemv, kernels
from gpt2repro.calibration import KernelChoice
from gpt2repro.kernels import Linear

# These compile for real: inductor needs a C++ compiler (CI's machines have one; without one the feature
# falls back, which the tests below that need none check).
requires_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="no C++ compiler for inductor on this machine",
)


@pytest.fixture
def compiling(monkeypatch):
    """A process where compiling has not failed yet (a failure is remembered for the process), nor
    anything been compiled or lost to torch's kernels."""
    monkeypatch.setattr(compiled_gemv, "_UNAVAILABLE", [])
    monkeypatch.setattr(compiled_gemv, "_LEDGER", compiled_gemv._ProcessLedger())


def _one_rounding_of_exact(x, weight, bias) -> torch.Tensor:
    """The fp32 product of the half-precision operands, rounded to their dtype once."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return exact.to(x.dtype)


@requires_cxx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("out_features,bias", [(203, True), (64, False)])
def test_compiled_product_is_f_linear_accumulated_in_fp32(dtype, rows, out_features, bias, compiling):
    """Within one rounding of the exact product (a GEMM with fp32 accumulation returns that, up to
    summation order), and as close to torch's own F.linear as bf16 allows."""
    torch.manual_seed(rows)
    weight = torch.randn(out_features, 96).to(dtype)
    b = torch.randn(out_features).to(dtype) if bias else None
    x = torch.randn(1, rows, 96).to(dtype)
    product = compiled_gemv.compiled_rows(weight, b, rows)
    assert product is not None
    with torch.inference_mode():
        got = product(x)
    expected = _one_rounding_of_exact(x, weight, b)
    assert got.shape == expected.shape == (1, rows, out_features) and got.dtype == dtype
    ulp = torch.finfo(dtype).eps * expected.float().abs().clamp_min(1.0)
    assert ((got.float() - expected.float()).abs() <= ulp).all()
    torch_own = F.linear(x, weight, b).float()
    assert (got.float() - torch_own).abs().max() <= 4 * ulp.max()


@requires_cxx
@pytest.mark.slow
def test_every_shape_gets_its_own_kernel_past_dynamo_s_recompile_limit(compiling):
    """Dynamo stops compiling one function after 8 variants (fullgraph: an error); each shape compiles a
    code object of its own, so a 12-layer model's many shapes all get compiled."""
    shapes = [(8 * (n + 1) + 1, 24) for n in range(10)]
    products = [compiled_gemv.compiled_product(torch.zeros(s, dtype=torch.bfloat16), 1, True) for s in shapes]
    assert all(p is not None for p in products)
    assert len({id(p) for p in products}) == len(shapes)
    again = compiled_gemv.compiled_product(torch.ones(shapes[0], dtype=torch.bfloat16), 1, True)
    assert again is products[0]  # once per shape and process


def test_a_failing_compile_leaves_torch_s_kernels(monkeypatch, caplog, compiling, fresh_cache):
    """Inductor failing (here: a stand-in whose first call raises, as a missing compiler does) is one
    logged line for the whole process, not one per shape; the calibration leaves "compiled" out (and that
    choice off the disk), and a forced "compiled" decodes with F.linear."""
    compiles = []

    def broken(fn, **kwargs):
        def first_call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return compiles.append(fn) or first_call

    monkeypatch.setattr(compiled_gemv, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    weight = torch.randn(40, 16).bfloat16()
    with caplog.at_level(logging.WARNING, logger="gpt2repro"):
        assert compiled_gemv.compiled_product(weight, 1, True) is None
        assert compiled_gemv.compiled_product(torch.randn(24, 16).bfloat16(), 2, False) is None
    assert "No working C++ compiler" in caplog.text and "torch's kernels decode instead" in caplog.text
    assert caplog.text.count("no compiled decode kernel") == 1 and len(compiles) == 1
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    clear_cut = KernelChoice("linear", {"linear": 10.0, "bmm": 50.0})
    monkeypatch.setattr(kernels, "calibrate_decode", lambda *args: clear_cut)
    kernels.decode_kernel(weight, 1, True)
    assert not fresh_cache.path.exists()  # measured without "compiled": this process only
    kernels.decode_kernel(torch.randn(40, 16), 1, True)
    assert fresh_cache.path.exists()  # fp32 has no compiled candidate: a clear cut is kept
    monkeypatch.undo()
    monkeypatch.setattr(compiled_gemv, "_UNAVAILABLE", ["no compiler"])
    choice = kernels.calibrate_decode(weight, 1, True)
    assert set(choice.us) == {"linear", "bmm"}
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "compiled")
    layer = Linear(16, 40).bfloat16()
    x = torch.randn(1, 1, 16).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert layer._decode[1] is None


def test_a_missing_cxx_compiler_in_a_real_process_falls_back():
    """A real inductor failure (no C++ compiler, caches off so nothing compiled earlier is reused): the
    process decodes with torch's kernels and says why in one line."""
    script = textwrap.dedent(
        """
        import logging, torch, torch.nn.functional as F
        from gpt2repro.kernels import Linear
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        for layer in (Linear(32, 48).bfloat16(), Linear(48, 32).bfloat16()):
            x = torch.randn(1, 1, layer.in_features).bfloat16()
            with torch.no_grad():
                assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
            assert layer._decode[1] is None
        print("decoded")
        """
    )
    env = {
        **os.environ,
        "CXX": "/bin/false",
        "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
        kernels.DECODE_KERNEL_ENV: "compiled",
    }
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "decoded" in done.stdout
    assert "no compiled decode kernel here" in done.stderr and "C++ compiler" in done.stderr
    assert done.stderr.count("no compiled decode kernel") == 1  # one line, not one per shape


@requires_cxx
def test_calibration_offers_compiled_for_half_precision_weights_only(fresh_cache, compiling):
    half = kernels.calibrate_decode(torch.randn(200, 64).bfloat16(), 1, True)
    assert set(half.us) == {"linear", "bmm", "compiled"} and min(half.us.values()) > 0
    assert half.kernel == min(half.us, key=half.us.__getitem__) or half.kernel == "linear"
    full = kernels.calibrate_decode(torch.randn(200, 64), 1, True)
    assert set(full.us) == {"linear", "bmm"}
    key = kernels.decode_shape_class
    assert key(torch.zeros(8, 8, dtype=torch.bfloat16), 1, True).endswith("/linear+bmm+compiled")
    assert key(torch.zeros(8, 8), 1, True).endswith("/threads" + str(torch.get_num_threads()))


@requires_cxx
def test_linear_decodes_through_the_compiled_product_where_measured_fastest(
    fresh_cache, monkeypatch, compiling
):
    """auto: a calibration that picks "compiled" makes the Linear decode through it (remembered, dropped
    by ``.to()``), with F.linear's numbers; autograd and autocast still take F.linear."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    pick = KernelChoice("compiled", {"linear": 100.0, "bmm": 120.0, "compiled": 50.0})
    monkeypatch.setattr(kernels, "calibrate_decode", lambda *args: pick)
    torch.manual_seed(0)
    layer = Linear(48, 80).bfloat16()
    x = torch.randn(1, 1, 48).bfloat16()
    with torch.no_grad():
        got = layer(x)
    assert isinstance(layer._decode[1].compiled, compiled_gemv.CompiledRows)  # no compile cost known yet
    expected = _one_rounding_of_exact(x, layer.weight, layer.bias)
    assert (got.float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max()
    with torch.no_grad():
        layer.weight.mul_(2)  # the compiled product reads the live weight
        assert torch.allclose(layer(x).float(), 2 * got.float() - layer.bias.float(), atol=0.1)
    layer.float()
    assert layer._decode is None
    layer(x.float().requires_grad_()).sum().backward()  # autograd: F.linear, never the compiled product
    assert layer._decode[1] is None and layer.weight.grad is not None


@requires_cxx
def test_decoding_compiles_each_shape_once_calibration_included(fresh_cache, monkeypatch, compiling):
    """The calibration (run inside decoding's inference_mode, on copies of the weight) and the decode
    that follows share one compiled kernel: dynamo guards on how each tensor was made, and a mismatch
    would compile a second time."""
    from torch._dynamo.utils import counters

    real = kernels.measure_kernels

    def measured_then_compiled(key, candidates, default, products_per_call=1):
        real(key, candidates, default, products_per_call)  # every candidate runs, as calibrating does
        return KernelChoice("compiled", {"linear": 100.0, "bmm": 100.0, "compiled": 10.0})

    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    monkeypatch.setattr(kernels, "measure_kernels", measured_then_compiled)
    layer = Linear(40, 72 + torch.get_num_threads()).bfloat16()  # a shape no other test compiled
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for _token in range(3):
            got = layer(torch.ones(1, 1, 40).bfloat16())
    assert isinstance(layer._decode[1].compiled, compiled_gemv.CompiledRows)  # compiled by the calibration
    assert counters["stats"]["unique_graphs"] == graphs + 1
    expected = _one_rounding_of_exact(torch.ones(1, 1, 40).bfloat16(), layer.weight, layer.bias)
    assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


def test_a_compiled_product_that_fails_later_falls_back_to_f_linear(compiling, caplog):
    """A compiled kernel that raises when called (e.g. dynamo refusing one more recompile) turns that
    product into F.linear for good, with the same one line."""

    def refuses(x, weight, bias):
        raise RuntimeError("FailOnRecompileLimitHit: recompile_limit reached")

    weight, bias = torch.randn(24, 8).bfloat16(), torch.randn(24).bfloat16()
    product = compiled_gemv.CompiledRows(weight, bias, refuses)
    x = torch.randn(1, 1, 8).bfloat16()
    with caplog.at_level(logging.WARNING, logger="gpt2repro"):
        assert torch.equal(product(x), F.linear(x, weight, bias))
        assert torch.equal(product(x), F.linear(x, weight, bias))
    assert caplog.text.count("recompile_limit reached") == 1


def test_a_process_compiles_once_torch_s_kernels_have_lost_what_compiling_costs(
    fresh_cache, monkeypatch, compiling
):
    """Ski rental: with compiling known to cost 1 s here and the compiled kernel 0.3 s faster a call,
    torch's kernel runs the first 3 calls and the 4th compiles; the ledger is the process's, so another
    product that starts after that compiles at once."""
    fresh_cache.record(compiled_gemv._SETUP_KEY, compiled_gemv.SetupCost(1.0))
    fresh_cache.clear_memory()  # a new process: the cost comes from the disk
    compiles = []
    monkeypatch.setattr(
        compiled_gemv, "compiled_rows", lambda w, b, rows: compiles.append(rows) or (lambda x: "compiled")
    )
    first = compiled_gemv.CompileWhenPaid(lambda x: "torch", None, None, 1, 0.3)
    assert [first(None) for _ in range(6)] == ["torch"] * 3 + ["compiled"] * 3
    assert compiles == [1]
    later = compiled_gemv.CompileWhenPaid(lambda x: "torch", None, None, 2, 0.3)
    assert later(None) == "compiled" and compiles == [1, 2]


@requires_cxx
def test_the_first_compile_of_a_process_is_what_the_next_one_expects(fresh_cache, monkeypatch, compiling):
    monkeypatch.setattr(compiled_gemv, "_COMPILED", {})
    assert compiled_gemv.expected_setup_seconds() == 0.0  # unknown: compile at once, which measures it
    monkeypatch.setattr(compiled_gemv, "_LEDGER", compiled_gemv._ProcessLedger())
    assert compiled_gemv.compiled_product(torch.zeros(40, 24, dtype=torch.bfloat16), 1, False) is not None
    assert compiled_gemv.expected_setup_seconds() == 0.0  # paid in this process
    recorded = json.loads(fresh_cache.path.read_text())["entries"][compiled_gemv._SETUP_KEY]["seconds"]
    assert recorded > 0
    fresh_cache.clear_memory()  # the next process
    monkeypatch.setattr(compiled_gemv, "_LEDGER", compiled_gemv._ProcessLedger())
    assert compiled_gemv.expected_setup_seconds() == recorded


def test_linear_decodes_with_torch_s_fastest_kernel_until_the_compile_is_paid(
    fresh_cache, monkeypatch, compiling
):
    """A "compiled" choice read from disk, in a process where compiling would cost 100 s: the Linear
    decodes through the faster of torch's kernels (bmm here), with F.linear's numbers, and compiles
    nothing."""
    fresh_cache.record(compiled_gemv._SETUP_KEY, compiled_gemv.SetupCost(100.0))
    fresh_cache.clear_memory()
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    pick = KernelChoice("compiled", {"linear": 100.0, "bmm": 50.0, "compiled": 40.0})
    monkeypatch.setattr(kernels, "calibrate_decode", lambda *args: pick)

    def no_compile(*args):
        raise AssertionError("compiled before it paid")

    monkeypatch.setattr(compiled_gemv, "compiled_rows", no_compile)
    torch.manual_seed(0)
    layer = Linear(48, 80).bfloat16()
    x = torch.randn(1, 1, 48).bfloat16()
    with torch.no_grad():
        outs = [layer(x) for _ in range(5)]
    product = layer._decode[1]
    assert isinstance(product, compiled_gemv.CompileWhenPaid) and isinstance(product.eager, kernels.RowBlocks)
    assert product.saving_s == pytest.approx(10e-6)
    expected = F.linear(x, layer.weight, layer.bias)
    assert all(torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2) for out in outs)
