"""CPU kernel choices: the decode Linear equals F.linear whatever it picks; calibrations cached, keyed."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from gpt2repro import attention_kernels, calibration, kernels
from gpt2repro.calibration import KernelChoice
from gpt2repro.errors import UserError
from gpt2repro.kernels import Linear


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
    """bf16 weights agree with bf16 F.linear to bf16 rounding; under autograd it is F.linear itself (the
    row blocks serve decoding), so gradients are F.linear's."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, kernel)
    torch.manual_seed(0)
    layer = Linear(64, 203).to(torch.bfloat16)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        got = layer(x)
    expected = F.linear(x, layer.weight, layer.bias)
    assert (got.float() - expected.float()).abs().max().item() <= 2e-2 * expected.float().abs().max().item()
    x.requires_grad_(True)
    layer(x).float().sum().backward()
    grad_x, grad_w = x.grad, layer.weight.grad
    x.grad = layer.weight.grad = None
    F.linear(x, layer.weight, layer.bias).float().sum().backward()
    assert torch.equal(grad_x, x.grad) and torch.equal(grad_w, layer.weight.grad)


def test_remembered_row_blocks_follow_the_weight_and_the_conditions(monkeypatch):
    """The per-module memory of the decode product never serves a stale weight: an in-place update shows,
    a replaced parameter or new storage (``.data =``) is noticed, and so are a changed env and dtype."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    torch.manual_seed(0)
    layer = Linear(32, 72)
    x = torch.randn(1, 1, 32)

    def check() -> None:
        with torch.no_grad():
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)

    check()
    first = layer._decode[1]
    assert isinstance(first, kernels.RowBlocks)
    with torch.no_grad():
        layer.weight.mul_(3)  # in place: the remembered views see it
    check()
    assert layer._decode[1] is first
    layer.weight = torch.nn.Parameter(torch.randn(72, 32))
    check()
    original, layer = layer, copy.deepcopy(layer)  # a copy made after decoding computes with its own weight
    with torch.no_grad():
        layer.weight.add_(1)
    check()
    layer = original
    layer.weight.data = torch.randn(72, 32)
    check()
    layer.bias.data = torch.randn(72)
    check()
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "linear")
    check()
    assert layer._decode[1] is None
    layer.double()
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    x = x.double()
    check()
    assert layer._decode[1].blocks.dtype == torch.float64


def test_remembered_row_blocks_on_an_odd_tail_with_bias_and_after_a_layout_change(monkeypatch):
    """The uneven case (out % 8 rows go by mm, bias included) is remembered too, and a weight given new
    strides on the same storage (``t_()``) is noticed."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    torch.manual_seed(1)
    layer = Linear(24, 75)
    torch.nn.init.normal_(layer.bias)
    with torch.no_grad():
        for rows in (1, 1, 3, 3):
            x = torch.randn(1, rows, 24)
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
        square = Linear(24, 24)
        x = torch.randn(1, 1, 24)
        square(x)
        square.weight.t_()  # same storage, same identity, new strides
        assert torch.allclose(square(x), F.linear(x, square.weight, square.bias), atol=1e-6)


def test_a_trainable_bias_alone_gets_its_gradient(monkeypatch):
    """A frozen weight with a trainable bias is autograd too: F.linear, even after a no_grad decode."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    layer = Linear(16, 40)
    layer.weight.requires_grad_(False)
    x = torch.randn(1, 1, 16)
    with torch.no_grad():
        layer(x)
    layer(x).sum().backward()
    assert layer.bias.grad is not None and torch.allclose(layer.bias.grad, torch.ones(40))


def test_moves_copies_and_pickles_drop_the_remembered_views(monkeypatch):
    """``.to()`` and friends forget the views (they would keep the old storage alive); a deepcopy or a
    pickle carries none (nor the calibration cache)."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "bmm")
    layer = Linear(16, 40)
    with torch.no_grad():
        layer(torch.randn(1, 16))
    assert layer._decode is not None
    assert copy.deepcopy(layer)._decode is None
    assert pickle.loads(pickle.dumps(layer))._decode is None
    layer.to(torch.float64)
    assert layer._decode is None
    x = torch.randn(1, 16, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias))


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
        lambda w, rows, bias: (
            asked.append(rows) or KernelChoice("bmm" if rows == 2 else "linear", {"linear": 1.0, "bmm": 1.0})
        ),
    )
    real = kernels.RowBlocks.__call__
    monkeypatch.setattr(
        kernels.RowBlocks, "__call__", lambda self, x: blocked.append(x.shape) or real(self, x)
    )
    layer = Linear(16, 40)
    with torch.no_grad():
        for rows in (1, 2, 2, 5, 1):
            layer(torch.randn(rows, 16))
    assert asked == [1, 2]
    assert blocked == [torch.Size([2, 16])] * 2


def test_calibrate_decode_measures_both_and_picks_by_its_own_times():
    choice = kernels.calibrate_decode(torch.randn(200, 64), 1, True)
    assert choice.kernel in kernels.DECODE_KERNELS
    assert set(choice.us) == {"linear", "bmm"} and min(choice.us.values()) > 0
    assert (choice.kernel == "bmm") == (choice.us["bmm"] < (1 - calibration._MARGIN) * choice.us["linear"])


def test_shape_classes_bucket_shapes_and_keep_rows_dtype_bias_threads_apart():
    key = kernels.decode_shape_class
    w = torch.zeros(2304, 768)
    assert key(w, 1, True) == key(torch.zeros(3072, 768), 1, True)  # one power-of-two bucket
    others = {key(w, 2, True), key(w, 1, False), key(w.to(torch.bfloat16), 1, True), key(w, 1, True)}
    assert len(others) == 4
    assert f"threads{torch.get_num_threads()}" in key(w, 1, True)


def test_close_calls_are_measured_again_by_each_process(fresh_cache, monkeypatch):
    """Only a clear-cut choice goes to disk; a close call on disk (an older version) is measured again."""
    monkeypatch.setenv(kernels.DECODE_KERNEL_ENV, "auto")
    close, clear = (
        KernelChoice("linear", {"linear": 100.0, "bmm": 97.0}),
        KernelChoice("bmm", {"linear": 100.0, "bmm": 60.0}),
    )
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
    fresh_cache._write({**entries, close_key: {"kernel": "linear", "us": {"linear": 100.0, "bmm": 99.0}}})
    fresh_cache.clear_memory()
    kernels.decode_kernel(weight, 1, True)
    assert measured == [1, 2, 1, 1]


def _bf16_round_trip(t: torch.Tensor) -> torch.Tensor:
    return t.detach().bfloat16().float()


@pytest.mark.parametrize("weights", ["fp32 under bf16 autocast", "bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_linear_in_fp32_is_torch_bf16_linear_up_to_rounding(weights, bias, monkeypatch):
    """The fp32 kernel returns bf16 rounded once from exact fp32 arithmetic on the bf16-rounded operands
    (forward and gradients), which is torch's own bf16 F.linear to within its rounding."""
    torch.manual_seed(0)
    ours, ref = Linear(48, 80, bias=bias), Linear(48, 80, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 48)
    if weights == "bf16":
        ours, ref, x = ours.bfloat16(), ref.bfloat16(), x.bfloat16()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(3, 7, 80)
    outputs, in_fp32 = [], []
    real = kernels.linear_in_fp32
    monkeypatch.setattr(kernels, "linear_in_fp32", lambda *a: in_fp32.append(1) or real(*a))
    for kernel, layer, inp in (("fp32", ours, x_ours), ("native", ref, x_ref)):
        monkeypatch.setenv(kernels.BF16_KERNEL_ENV, kernel)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weights != "bf16"):
            y = layer(inp)
        (y.float() * grad_out).sum().backward()
        outputs.append(y)
    y_ours, y_ref = outputs
    assert in_fp32 == [1]  # the forced fp32 kernel ran, the native one did not
    assert y_ours.dtype == y_ref.dtype == torch.bfloat16
    b = _bf16_round_trip(ours.bias) if bias else None
    exact = F.linear(_bf16_round_trip(x), _bf16_round_trip(ours.weight), b)
    assert torch.equal(y_ours, exact.bfloat16())  # one rounding of the exact result
    assert (y_ours.float() - y_ref.float()).abs().max() <= 2**-7 * y_ref.float().abs().max()
    pairs = [(x_ours.grad, x_ref.grad), (ours.weight.grad, ref.weight.grad)]
    pairs += [(ours.bias.grad, ref.bias.grad)] if bias else []
    for got, expected in pairs:
        assert got.dtype == expected.dtype
        assert (got.float() - expected.float()).abs().max() <= 2**-7 * expected.float().abs().max()


def test_bf16_products_follow_the_calibration_and_training_choices_always_persist(fresh_cache, monkeypatch):
    """auto: GEMM-sized bf16 products ask the calibration per (capped) shape class and mode; a close call
    is kept on disk for training (a resumed run must multiply as before) but not for inference."""
    monkeypatch.setenv(kernels.BF16_KERNEL_ENV, "auto")
    asked, in_fp32 = [], []
    close = KernelChoice("fp32", {"native": 100.0, "fp32": 94.0})
    monkeypatch.setattr(kernels, "measure_kernels", lambda key, *a: asked.append(key) or close)
    real = kernels.linear_in_fp32
    monkeypatch.setattr(kernels, "linear_in_fp32", lambda *a: in_fp32.append(a[0].shape) or real(*a))
    layer = Linear(32, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            layer(torch.randn(6, 32))
            layer(torch.randn(1, 32))  # a decode row: not a GEMM, never asked
        layer(torch.randn(6, 32)).float().sum().backward()
        layer(torch.randn(5, 32))
    layer(torch.randn(6, 32))  # fp32, no autocast: no bf16 product
    assert asked == [
        "bf16/linear/infer/rows8/out64/in32/threads" + str(torch.get_num_threads()),
        "bf16/linear/train/rows8/out64/in32/threads" + str(torch.get_num_threads()),
    ]
    assert in_fp32 == [torch.Size([6, 32]), torch.Size([6, 32]), torch.Size([5, 32])]
    assert [key.split("/")[2] for key in json.loads(fresh_cache.path.read_text())["entries"]] == ["train"]


def test_bf16_calibrations_measure_both_kernels_on_capped_shapes(fresh_cache):
    for mode in ("infer", "train"):
        kernel = kernels.bf16_linear_kernel(3000, 50304, 768, mode)
        assert kernel in kernels.BF16_KERNELS
    entries = json.loads(fresh_cache.path.read_text())["entries"]
    train = entries[f"bf16/linear/train/rows64/out1024/in1024/threads{torch.get_num_threads()}"]
    assert set(train["us"]) == {"native", "fp32"} and min(train["us"].values()) > 0
    fastest = min(train["us"], key=train["us"].get)
    expected = (
        fastest if train["us"][fastest] < (1 - calibration._MARGIN) * train["us"]["native"] else "native"
    )
    assert train["kernel"] == expected
    q = torch.randn(1, 2, 300, 16, dtype=torch.bfloat16, requires_grad=True)
    assert attention_kernels._bf16_attention_kernel(q, q, None, True) in kernels.BF16_KERNELS
    assert (
        f"bf16/attention/train/q256/k256/d16/causal/threads{torch.get_num_threads()}"
        in json.loads(fresh_cache.path.read_text())["entries"]
    )


def test_a_bf16_training_step_of_the_model_matches_torch_bf16_kernels(monkeypatch):
    """The whole model under bf16 autocast: loss and every gradient as with torch's own bf16 kernels, to
    within bf16 rounding (the kernels differ only in summation order and where the softmax rounds)."""
    from model_helpers import tiny_model, tokens

    idx = tokens(2, 16)
    results = {}
    for kernel in ("fp32", "native"):
        monkeypatch.setenv(kernels.BF16_KERNEL_ENV, kernel)
        model = tiny_model(n_embd=64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        loss.backward()
        results[kernel] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
    (loss_fp32, grads_fp32), (loss_native, grads_native) = results["fp32"], results["native"]
    assert abs(loss_fp32 - loss_native) <= 1e-2 * loss_native
    for name, expected in grads_native.items():
        error = (grads_fp32[name] - expected).norm() / expected.norm()
        assert error <= 0.03, name
