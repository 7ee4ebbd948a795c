"""The compiled decode product: F.linear's numbers, one kernel per shape, and torch's kernels where inductor
cannot compile (a real missing C++ compiler in a subprocess)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import compiled_gemv, kernels
from gpt2repro.calibration import KernelChoice
from gpt2repro.kernels import Linear


def _one_rounding_of_exact(x, weight, bias) -> torch.Tensor:
    """The fp32 product of the half-precision operands, rounded to their dtype once."""
    exact = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return exact.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("out_features,bias", [(203, True), (64, False)])
def test_compiled_product_is_f_linear_accumulated_in_fp32(dtype, rows, out_features, bias):
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


def test_every_shape_gets_its_own_kernel_past_dynamo_s_recompile_limit():
    """Dynamo stops compiling one function after 8 variants (fullgraph: an error); each shape compiles a
    code object of its own, so a 12-layer model's many shapes all get compiled."""
    shapes = [(8 * (n + 1) + 1, 24) for n in range(10)]
    products = [compiled_gemv.compiled_product(torch.zeros(s, dtype=torch.bfloat16), 1, True) for s in shapes]
    assert all(p is not None for p in products)
    assert len({id(p) for p in products}) == len(shapes)
    again = compiled_gemv.compiled_product(torch.ones(shapes[0], dtype=torch.bfloat16), 1, True)
    assert again is products[0]  # once per shape and process


def test_a_failing_compile_leaves_torch_s_kernels(monkeypatch, caplog):
    """Inductor failing (here: a stand-in whose first call raises, as a missing compiler does) is one
    logged line; the calibration leaves "compiled" out and a forced "compiled" decodes with F.linear."""

    def broken(fn, **kwargs):
        def first_call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return first_call

    monkeypatch.setattr(compiled_gemv, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    weight = torch.randn(40, 16).bfloat16()
    with caplog.at_level(logging.WARNING, logger="gpt2repro"):
        assert compiled_gemv.compiled_product(weight, 1, True) is None
    assert "No working C++ compiler" in caplog.text and "torch's kernels decode instead" in caplog.text
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
        layer = Linear(32, 48).bfloat16()
        x = torch.randn(1, 1, 32).bfloat16()
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


def test_calibration_offers_compiled_for_half_precision_weights_only(fresh_cache):
    half = kernels.calibrate_decode(torch.randn(200, 64).bfloat16(), 1, True)
    assert set(half.us) == {"linear", "bmm", "compiled"} and min(half.us.values()) > 0
    assert half.kernel == min(half.us, key=half.us.__getitem__) or half.kernel == "linear"
    full = kernels.calibrate_decode(torch.randn(200, 64), 1, True)
    assert set(full.us) == {"linear", "bmm"}
    key = kernels.decode_shape_class
    assert key(torch.zeros(8, 8, dtype=torch.bfloat16), 1, True).endswith("/linear+bmm+compiled")
    assert key(torch.zeros(8, 8), 1, True).endswith("/threads" + str(torch.get_num_threads()))


def test_linear_decodes_through_the_compiled_product_where_measured_fastest(fresh_cache, monkeypatch):
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
    assert isinstance(layer._decode[1], compiled_gemv.CompiledRows)
    expected = _one_rounding_of_exact(x, layer.weight, layer.bias)
    assert (got.float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max()
    with torch.no_grad():
        layer.weight.mul_(2)  # the compiled product reads the live weight
        assert torch.allclose(layer(x).float(), 2 * got.float() - layer.bias.float(), atol=0.1)
    layer.float()
    assert layer._decode is None
    layer(x.float().requires_grad_()).sum().backward()  # autograd: F.linear, never the compiled product
    assert layer._decode[1] is None and layer.weight.grad is not None


def test_decoding_reuses_the_kernel_compiled_at_first_use():
    """Compiled inside decoding's inference_mode, for parameters made outside it: the next call is served
    by that kernel, not compiled again (dynamo guards on how each tensor was made)."""
    from torch._dynamo.utils import counters

    layer = Linear(40, 72).bfloat16()
    with torch.inference_mode():
        product = compiled_gemv.compiled_rows(layer.weight, layer.bias, 1)
        graphs = counters["stats"]["unique_graphs"]
        got = product(torch.ones(1, 1, 40).bfloat16())
    assert counters["stats"]["unique_graphs"] == graphs
    expected = _one_rounding_of_exact(torch.ones(1, 1, 40).bfloat16(), layer.weight, layer.bias)
    assert torch.allclose(got.float(), expected.float(), rtol=1e-2, atol=1e-2)
