"""A few rows times a weight by a kernel that inductor generates for that one shape: the decode GEMV of
half-precision weights.

torch 2.13's CPU GEMV of bf16/fp16 weights (``F.linear``, ``bmm``) converts and accumulates element by
element: on an AMD EPYC with AVX512-BF16 it streamed bf16 weights at 7-13 GB/s, so a bf16 model decoded
slower than the fp32 one it was meant to speed up. The same product written as a multiply-and-sum in fp32
and compiled by ``torch.compile`` (inductor's C++ backend: vectorised, OpenMP over the output rows)
streamed them at 13-36 GB/s there. It is a candidate of the decode calibration (gpt2repro.kernels) for
half-precision weights, where it competes with torch's kernels by measurement; fp32 weights keep MKL's
GEMV and the row-block ``bmm``, whose speed it matched there, without the compile.

Compiling costs ~1.5 s per shape the first time on a machine (inductor caches the result on disk) and
~4 s per process to load dynamo and inductor. So a process that did not calibrate (the choice came from
disk) compiles only once the torch kernels have lost that much time against the compiled ones
(``CompileWhenPaid``): a short generation never waits for a compile longer than itself.

A machine without a working C++ compiler, dynamo switched off (``TORCHDYNAMO_DISABLE=1``), or any
inductor failure leaves the candidate out for the rest of the process with one logged line: decoding
falls back to torch's kernels.
"""

from __future__ import annotations

import logging
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gpt2repro import calibration
from gpt2repro.errors import first_line

log = logging.getLogger("gpt2repro")

HALF_DTYPES = (torch.bfloat16, torch.float16)

Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
_COMPILED: dict[tuple, Product | None] = {}
_UNAVAILABLE: list[str] = []  # why compiling failed in this process: no other shape is tried after it
_SETUP_KEY = "compile/decode-setup"


@dataclass(frozen=True)
class SetupCost:
    """Seconds the first compile of a process took on this machine, loading dynamo and inductor included."""

    seconds: float


@dataclass
class _ProcessLedger:
    """What compiling costs this process, and what torch's kernels have lost so far by not compiling."""

    compiled_any: bool = False
    expected_setup_s: float | None = None  # from the disk; None: not read yet
    lost_s: float = 0.0


_LEDGER = _ProcessLedger()


def expected_setup_seconds() -> float:
    """What the next compile costs this process: nothing once one succeeded here, else the first-compile
    time measured on this machine (0 where unknown: compiling then measures it)."""
    if _LEDGER.compiled_any:
        return 0.0
    if _LEDGER.expected_setup_s is None:
        unknown = SetupCost(0.0)
        cost = calibration.CALIBRATIONS.lookup(
            _SETUP_KEY, SetupCost, lambda: unknown, persist=lambda c: c.seconds > 0
        )
        _LEDGER.expected_setup_s = cost.seconds
    return _LEDGER.expected_setup_s


def _rows_times_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for 2-D ``x``, accumulated in fp32 and rounded once, as a bf16 GEMM
    with fp32 accumulation is; written so inductor fuses it into one pass over the weight."""
    y = (weight.float() * x.float().unsqueeze(-2)).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _fresh_copy(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps compiled variants per code object and refuses
    more than a handful (with ``fullgraph``, by raising), and a model has many shapes."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def compiled_product(weight: torch.Tensor, rows: int, has_bias: bool) -> Product | None:
    """The compiled product for ``rows`` rows times a weight of this shape and dtype (compiled once per
    process), or None where compiling fails here."""
    if _UNAVAILABLE:
        return None
    key = (tuple(weight.shape), weight.dtype, rows, has_bias, torch.get_num_threads())
    if key not in _COMPILED:
        _COMPILED[key] = _compile(weight, rows, has_bias)
    return _COMPILED[key]


def _give_up(why: Exception | str) -> None:
    """No compiled products for the rest of the process, said once."""
    reason = why if isinstance(why, str) else first_line(why, 300)
    _UNAVAILABLE.append(reason)
    log.warning("no compiled decode kernel here (%s); torch's kernels decode instead", reason)


def _compile(weight: torch.Tensor, rows: int, has_bias: bool) -> Product | None:
    start = time.perf_counter()  # loading dynamo is part of what a first compile costs
    import torch._dynamo

    if torch._dynamo.config.disable:  # torch.compile would return the eager function
        _give_up("dynamo is disabled, TORCHDYNAMO_DISABLE")
        return None
    out_features, in_features = weight.shape
    name = f"rows{rows}_times_{out_features}x{in_features}"
    product = torch.compile(_fresh_copy(_rows_times_weight, name), dynamic=False, fullgraph=True)
    # compile now, where a failure can still be caught, for tensors like decoding's (dynamo guards on how
    # each was made: a mismatch compiles again): parameters made outside inference_mode, x inside it
    with torch.inference_mode(False):  # decoding calls in here under inference_mode
        bias = torch.zeros(out_features, dtype=weight.dtype) if has_bias else None
    try:
        with torch.inference_mode():
            product(torch.zeros(rows, in_features, dtype=weight.dtype), weight.detach(), bias)
    except Exception as e:  # noqa: BLE001 - any inductor failure: the candidate is left out
        _give_up(e)
        return None
    if not _LEDGER.compiled_any:  # the first compile of the process: what the next process would pay
        _LEDGER.compiled_any = True
        calibration.CALIBRATIONS.record(_SETUP_KEY, SetupCost(time.perf_counter() - start))
    return product


def _f_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


class CompiledRows:
    """``F.linear`` by one weight for a few rows, through the compiled product of its shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, product: Product):
        # detached: the compiled code is guarded on requires_grad, and decoding needs no graph
        self.weight, self.product = weight.detach(), product
        self.bias = None if bias is None else bias.detach()
        self.in_features = weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()  # the layout it was compiled for
        try:
            y = self.product(rows, self.weight, self.bias)
        except Exception as e:  # noqa: BLE001 - e.g. a recompile refused: F.linear from now on
            if self.product is _f_linear:
                raise
            _give_up(e)
            self.product = _f_linear
            y = _f_linear(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


class CompileWhenPaid:
    """A few-row product through torch's fastest kernel (``eager``) until the time it has lost against
    the compiled one (``saving_s`` a call, as the calibration measured, summed over every such product of
    the process) reaches what compiling costs here; then through the compiled one. Ski rental: a short
    generation never pays a compile, a long one loses at most the compile's time."""

    def __init__(
        self, eager: Callable, weight: torch.Tensor, bias: torch.Tensor | None, rows: int, saving_s: float
    ):
        self.eager, self.weight, self.bias, self.rows, self.saving_s = eager, weight, bias, rows, saving_s
        self.compiled: Callable | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            _LEDGER.lost_s += self.saving_s
            if _LEDGER.lost_s < expected_setup_seconds():
                return self.eager(x)
            self.compiled = compiled_rows(self.weight, self.bias, self.rows) or self.eager
        return self.compiled(x)


def compiled_rows(weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> CompiledRows | None:
    """A ``CompiledRows`` for ``rows`` rows times ``weight``, or None where compiling fails."""
    product = compiled_product(weight, rows, bias is not None)
    return None if product is None else CompiledRows(weight, bias, product)


def linear_compiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for a few rows of ``x`` by the compiled product (F.linear where
    compiling fails)."""
    rows = x.numel() // weight.shape[1]
    product = compiled_rows(weight, bias, rows)
    return _f_linear(x, weight, bias) if product is None else product(x)
