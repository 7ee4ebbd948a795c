"""CPU kernel choices, made by measuring the candidates on the machine where they run.

The same product can be fastest through different kernels on different CPUs, and no table of CPUs can be
right, so every choice here is a short calibration at first use, cached per shape class
(gpt2repro.calibration):

- Decoding multiplies one to four rows by each weight matrix: a GEMV that MKL streams at under half the
  memory bandwidth on AMD EPYC (where splitting the weight into row blocks and calling ``bmm`` doubles
  decoding) but near full bandwidth on Intel with AMX (where the same ``bmm`` halves it). Half-precision
  weights have a third candidate, a kernel inductor compiles for the shape (gpt2repro.compiled_gemv):
  torch's bf16 GEMVs convert element by element. Candidates are timed on weights that stream from memory
  as a real model's do.
- bf16 products (autocast or bf16 weights): AMX and AVX512-BF16 multiply bf16 natively, several times
  faster than fp32; a CPU without them (AVX2) runs torch's bf16 GEMMs 8x slower than fp32, and the
  backward's ``grad @ weight`` at under 1 GFLOP/s. There the product is computed in fp32 on the
  bf16-rounded operands and rounded to bf16 once: what a bf16 GEMM with fp32 accumulation returns (the
  same numbers up to summation order), at fp32 speed. Likewise attention (gpt2repro.attention_kernels).

Environment: ``GPT2REPRO_DECODE_KERNEL=auto|bmm|linear|compiled`` and
``GPT2REPRO_BF16_KERNEL=auto|native|fp32`` force a kernel (no calibration); ``GPT2REPRO_KERNEL_CACHE=0``
measures afresh in each process.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2repro import calibration, compiled_gemv
from gpt2repro.calibration import last_level_cache_bytes, measure_kernels

DECODE_KERNEL_ENV = "GPT2REPRO_DECODE_KERNEL"
BF16_KERNEL_ENV = "GPT2REPRO_BF16_KERNEL"


def bucket(n: int, cap: int = 1 << 62) -> int:
    """Round up to a power of two (at most ``cap``): shapes of one bucket behave alike, so they share a
    calibration."""
    return min(cap, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# ---------------------------------------------------------------------------------------------------------
# Decoding: F.linear, the same product as a bmm over row blocks of the weight, or (half-precision weights)
# a kernel compiled for the shape.

ROW_BLOCKS = 8
MAX_DECODE_ROWS = 4  # beyond a few rows the product is a GEMM again and MKL's own kernel wins everywhere
DECODE_KERNELS = ("linear", "bmm", "compiled")
_POOL_MAX_COPIES = 32  # enough to overflow a 32 MiB L3 with a 768x768 fp32 weight; more calls cost time


class RowBlocks:
    """``F.linear`` by one weight for a few rows, computed as ``bmm`` over blocks of the weight's rows.

    A bmm is parallelised over its batch, so every core streams a share of the weight; MKL's GEMV may not.
    The bias is added by the same call (``baddbmm``) where the rows split evenly: one pass less over the
    output, which for a 768-wide layer is a measurable share of its time. The views of the weight are made
    once: a decode step makes 49 of these calls, and each tensor op costs ~1-3 us in Python.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        blocked = out_features // ROW_BLOCKS * ROW_BLOCKS
        self.in_features, self.blocked = in_features, blocked
        self.blocks = weight[:blocked].view(ROW_BLOCKS, -1, in_features)
        self.bias_blocks = None if bias is None else bias[:blocked].view(ROW_BLOCKS, -1, 1)
        # the last out_features % 8 rows (e.g. the unpadded 50257-row head) and their bias
        self.tail, self.tail_bias = weight[blocked:], None if bias is None else bias[blocked:].unsqueeze(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        shape = (*x.shape[:-1], self.blocked + self.tail.shape[0])
        if not x.is_contiguous():
            x = x.contiguous()
        # (ROW_BLOCKS, in, rows): every block multiplies the same columns (a stride-0 batch, no copy)
        columns = x.as_strided((ROW_BLOCKS, self.in_features, rows), (0, 1, self.in_features))
        if not self.tail.shape[0]:
            if self.bias_blocks is None:
                y = torch.bmm(self.blocks, columns)
            else:
                y = torch.baddbmm(self.bias_blocks, self.blocks, columns)
            return y.view(shape) if rows == 1 else y.view(-1, rows).t().view(shape)
        y = x.new_empty(shape[-1], rows)  # written in place by both products: no concatenation
        blocked, tail = y[: self.blocked].view(ROW_BLOCKS, -1, rows), y[self.blocked :]
        if self.bias_blocks is None:
            torch.bmm(self.blocks, columns, out=blocked)
            torch.mm(self.tail, columns[0], out=tail)
        else:
            torch.baddbmm(self.bias_blocks, self.blocks, columns, out=blocked)
            torch.addmm(self.tail_bias, self.tail, columns[0], out=tail)
        return y.view(shape) if rows == 1 else y.t().view(shape)


def _layout(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """Where and how the tensors lie: all that views made from them depend on (``.data =``, ``t_()``,
    ``set_()`` or a new parameter change it; the views keep their storage alive, so it is never reused)."""
    where = (weight.data_ptr(), weight.shape, weight.stride(), weight.dtype, weight.device)
    return where if bias is None else (*where, bias.data_ptr(), bias.stride())


def linear_by_row_blocks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows of ``x``, by ``RowBlocks``."""
    return RowBlocks(weight, bias)(x)


def decode_shape_class(weight: torch.Tensor, rows: int, has_bias: bool) -> str:
    return _shape_class(*weight.shape, weight.dtype, rows, has_bias, torch.get_num_threads())


@functools.lru_cache(maxsize=1024)
def _shape_class(
    out_features: int, in_features: int, dtype: torch.dtype, rows: int, bias: bool, threads: int
) -> str:
    """The key of a decode calibration; cached, because it is asked for by every Linear at every token."""
    name = str(dtype).removeprefix("torch.")
    # the candidates are part of the key: a choice made before "compiled" existed is measured again
    candidates = "/linear+bmm+compiled" if dtype in compiled_gemv.HALF_DTYPES else ""
    return (
        f"decode/{name}/out{bucket(out_features)}/in{bucket(in_features)}/rows{rows}/"
        f"{'bias' if bias else 'nobias'}/threads{threads}{candidates}"
    )


def _streaming_copies(weight: torch.Tensor) -> list[torch.Tensor]:
    """Copies of ``weight`` that together overflow the last-level cache, as a whole model's weights do.

    Timing one small matrix again and again measures the cache, not memory: on the AMD EPYC this was
    written on, F.linear wins for a cached 2304x768 fp32 weight and loses by 1.4x once it streams.
    """
    nbytes = weight.numel() * weight.element_size()
    copies = min(_POOL_MAX_COPIES, math.ceil(2 * last_level_cache_bytes() / nbytes))
    if copies <= 1:
        return [weight]
    # Separate allocations, like a model's parameters: slices of one big copy timed differently here
    # (F.linear and bmm even on a 768x3072 weight, where bmm is 9% faster apart and 15% inside a model).
    return [weight.clone() for _ in range(copies)]


def _each(products: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> None:
    for product in products:
        product(x)


@torch.no_grad()
def calibrate_decode(weight: torch.Tensor, rows: int, has_bias: bool) -> calibration.KernelChoice:
    """Time F.linear, the row-block bmm and, for half-precision weights, the compiled product for ``rows``
    rows times ``weight`` (interleaved, best of 5; compiling is not timed)."""
    # tensors made as decoding's are (dynamo guards on it): parameters outside inference_mode, x inside
    with torch.inference_mode(False):
        weights = _streaming_copies(weight.detach())
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype) if has_bias else None
    with torch.inference_mode():
        x = torch.full((rows, weight.shape[1]), 0.01, dtype=weight.dtype)
    # each candidate as the model runs it: F.linear, or a RowBlocks / CompiledRows made once per weight
    products = {
        "linear": [functools.partial(F.linear, weight=w, bias=bias) for w in weights],
        "bmm": [RowBlocks(w, bias) for w in weights],
    }
    half = weight.dtype in compiled_gemv.HALF_DTYPES
    compiled = compiled_gemv.compiled_product(weight, rows, has_bias) if half else None
    if compiled is not None:
        products["compiled"] = [compiled_gemv.CompiledRows(w, bias, compiled) for w in weights]
    candidates = {name: functools.partial(_each, each, x) for name, each in products.items()}
    key = decode_shape_class(weight, rows, has_bias)
    return measure_kernels(key, candidates, "linear", products_per_call=len(weights))


def decode_choice(weight: torch.Tensor, rows: int, has_bias: bool) -> calibration.KernelChoice:
    """The decode kernel measured fastest for ``rows`` rows times ``weight`` on this CPU (cached), with
    every candidate's time."""
    key = decode_shape_class(weight, rows, has_bias)
    measure = functools.partial(calibrate_decode, weight, rows, has_bias)
    half = weight.dtype in compiled_gemv.HALF_DTYPES

    def persist(choice: calibration.KernelChoice) -> bool:
        """Clear cuts go to disk, but not a half-precision one measured without the compiled candidate
        (it failed to compile in that process): with a compiler installed later, it is measured again."""
        return choice.clear_cut() and (not half or "compiled" in choice.us)

    return calibration.CALIBRATIONS.lookup(key, calibration.KernelChoice, measure, persist=persist)


def decode_kernel(weight: torch.Tensor, rows: int, has_bias: bool) -> str:
    """ "linear", "bmm" or "compiled" for ``rows`` rows times ``weight`` on this CPU: forced by the env,
    else measured."""
    forced = calibration.forced_kernel(DECODE_KERNEL_ENV, DECODE_KERNELS)
    return forced or decode_choice(weight, rows, has_bias).kernel


def _decode_product(weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
    """The few-row product forced or measured fastest: a RowBlocks, the compiled product, or None
    (F.linear)."""
    forced = calibration.forced_kernel(DECODE_KERNEL_ENV, DECODE_KERNELS)
    choice = None if forced else decode_choice(weight, rows, bias is not None)
    kernel = forced or choice.kernel
    if kernel == "bmm":
        return RowBlocks(weight, bias)
    if kernel == "compiled":
        return _compiled_when_paid(weight, bias, rows, None if choice is None else choice.us)
    return None


def _compiled_when_paid(weight: torch.Tensor, bias: torch.Tensor | None, rows: int, us: dict | None):
    """The compiled product where it was measured fastest (``us``: the calibration's times): at once
    where the env forces it (no times), else once torch's fastest kernel (run meanwhile) has lost what
    compiling costs (``CompileWhenPaid``)."""
    if us is None:
        return compiled_gemv.compiled_rows(weight, bias, rows)
    eager = min(("linear", "bmm"), key=us.__getitem__)
    product = (
        RowBlocks(weight, bias) if eager == "bmm" else functools.partial(F.linear, weight=weight, bias=bias)
    )
    saving_s = max(0.0, us[eager] - us["compiled"]) / 1e6
    return compiled_gemv.CompileWhenPaid(product, weight, bias, rows, saving_s)


# ---------------------------------------------------------------------------------------------------------
# bf16 products on CPU: torch's own bf16 kernel, or fp32 arithmetic on the bf16-rounded operands.

BF16_KERNELS = ("native", "fp32")
# Calibration problems are at most this large: the choice follows the CPU's kernels (which instructions,
# which layouts have a fast path), not the size, and a CPU without native bf16 takes 6 s for one
# 1024x3072x768 grad @ weight.
BF16_ROWS, BF16_WIDTH, BF16_HEADS, BF16_SEQ = 64, 1024, 8, 256


def computes_in_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """This CPU product multiplies bf16 operands: under bf16 autocast, or on bf16 tensors."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == weight.dtype == torch.bfloat16


def autograd_mode(*tensors: torch.Tensor) -> str:
    """ "train" where a backward pass will follow (its products are part of the choice), else "infer"."""
    return "train" if torch.is_grad_enabled() and any(t.requires_grad for t in tensors) else "infer"


class _LinearInFp32(torch.autograd.Function):
    """``F.linear`` of bf16 operands computed in fp32, each result (forward and backward) rounded to bf16
    once; the bf16 operands are what backward keeps, as a bf16 GEMM's would be."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).bfloat16()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        with torch.autocast("cpu", enabled=False):  # backward may be called inside an autocast region
            flat = grad.reshape(-1, grad.shape[-1]).float()
            if ctx.needs_input_grad[0]:
                grad_x = (flat @ weight.float()).bfloat16().view(x.shape)
            if ctx.needs_input_grad[1]:
                grad_weight = (flat.t() @ x.reshape(-1, x.shape[-1]).float()).bfloat16()
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = flat.sum(0).bfloat16()
        return grad_x, grad_weight, grad_bias


def linear_in_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The bf16 ``F.linear`` (the operands rounded to bf16, as autocast does), computed in fp32."""
    bf16 = torch.bfloat16
    with torch.autocast("cpu", enabled=False):
        return _LinearInFp32.apply(x.to(bf16), weight.to(bf16), None if bias is None else bias.to(bf16))


def run_product(product: Callable, mode: str, inputs: tuple[torch.Tensor, ...], **kwargs) -> None:
    """One calibration call: the product, and in "train" mode its backward to every input."""
    with torch.autocast("cpu", enabled=False), torch.enable_grad() if mode == "train" else torch.no_grad():
        leaves = [t.detach().requires_grad_(mode == "train") for t in inputs]
        out = product(*leaves, **kwargs)
        if mode == "train":
            torch.autograd.grad(out, leaves, torch.ones_like(out))


def bf16_kernel(key: str, measure: Callable[[], calibration.KernelChoice], mode: str) -> str:
    """The bf16 kernel forced or measured for ``key``. A training run resumed in another process must
    multiply as before, so a training choice is always kept on disk, close or not."""
    persist = None if mode == "train" else calibration.KernelChoice.clear_cut
    return calibration.chosen_kernel(BF16_KERNEL_ENV, BF16_KERNELS, key, measure, persist)


def bf16_linear_kernel(rows: int, out_features: int, in_features: int, mode: str) -> str:
    """ "native" or "fp32" for a bf16 (rows x in) @ (in x out) product here, measured on a capped shape."""
    shape = (bucket(rows, BF16_ROWS), bucket(out_features, BF16_WIDTH), bucket(in_features, BF16_WIDTH))
    key = f"bf16/linear/{mode}/rows{shape[0]}/out{shape[1]}/in{shape[2]}/threads{torch.get_num_threads()}"

    def measure() -> calibration.KernelChoice:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape[0], shape[2], generator=gen).bfloat16()
        weight = (torch.randn(shape[1], shape[2], generator=gen) * 0.02).bfloat16()
        products = {"native": lambda x, w: F.linear(x, w), "fp32": lambda x, w: linear_in_fp32(x, w, None)}
        candidates = {
            name: functools.partial(run_product, p, mode, (x, weight)) for name, p in products.items()
        }
        return measure_kernels(key, candidates, "native")

    return bf16_kernel(key, measure, mode)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) whose CPU products take the kernel measured fastest
    on this machine: few-row (decode) products, and bf16 ones (see the module docstring); everything else
    is ``F.linear``."""

    _decode: tuple | None = None  # (conditions and layout, the product or None) of the last few-row call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias  # each attribute read is a dict look-up: once per call
        if x.numel() <= MAX_DECODE_ROWS * self.in_features:
            product = self._few_row_product(x, weight, bias) if x.numel() else None
            return F.linear(x, weight, bias) if product is None else product(x)
        if x.device.type == "cpu" and computes_in_bf16(x, weight) and self._fp32_wins(x, weight):
            return linear_in_fp32(x, weight, bias)
        return F.linear(x, weight, bias)

    def _few_row_product(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The row-block or compiled product for this few-row call where one was measured faster, else None
        (F.linear).

        Remembered for the conditions of the call (rows, dtype, device, autograd, autocast, threads, the
        forced kernel, the calibration cache object: ``clear_memory`` does not reach it) and the layout of
        the weight and bias: decoding asks 49 times per token."""
        if torch.compiler.is_compiling():
            return None
        grad = torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        autocast = torch.is_autocast_enabled("cpu")
        conditions = (
            x.numel(),
            x.dtype,
            x.device,
            grad,
            autocast,
            torch.get_num_threads(),
            os.environ.get(DECODE_KERNEL_ENV),
            calibration.CALIBRATIONS,
            *_layout(weight, bias),
        )
        memo = self._decode
        if memo is not None and memo[0] == conditions:
            return memo[1]
        product = None
        if (
            not grad  # these products serve decoding; under autograd, F.linear
            and x.device.type == "cpu"
            and x.dtype == weight.dtype
            and not autocast  # F.linear casts
            and weight.is_contiguous()
        ):
            product = _decode_product(weight, bias, x.numel() // self.in_features)
        self.__dict__["_decode"] = (conditions, product)
        return product

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()``: forget the remembered views, which hold the old storage."""
        self.__dict__.pop("_decode", None)
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the remembered views (and the calibration cache) behind."""
        state = super().__getstate__()
        state.pop("_decode", None)
        return state

    def _fp32_wins(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        rows = x.numel() // self.in_features
        mode = autograd_mode(x, weight)
        return not torch.compiler.is_compiling() and (
            bf16_linear_kernel(rows, self.out_features, self.in_features, mode) == "fp32"
        )
