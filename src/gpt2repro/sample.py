"""Autoregressive sampling: KV-cached decoding, temperature, top-k, top-p, greedy.

``stream_tokens`` is the one decoding loop; ``GPT.generate`` and the ``gpt2repro sample`` command both
use it. Randomness comes only from the ``torch.Generator`` passed in, so sampling never disturbs (or
depends on) the global RNG a training run is using.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2repro.errors import UserError
from gpt2repro.runtime import evaluation_mode

log = logging.getLogger("gpt2repro")


def check_max_new_tokens(max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is picked: one object for ``GPT.generate``, the CLI and the trainer's samples.

    ``temperature=0`` is greedy; ``top_k``/``top_p`` keep the likeliest tokens; draws come from
    ``generator`` only (never the global RNG, so sampling mid-training changes nothing). With
    ``stop_token``, a row that emitted it keeps emitting it and generation ends once all rows have.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    use_cache: bool = True
    stop_token: int | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k <= 0):
            raise UserError(f"top_k must be a positive integer (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose probability ≥ top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from the last-position logits (B, V) -> (B, 1)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = F.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:  # e.g. MPS has no torch.Generator
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def stream_tokens(
    model, idx: torch.Tensor, max_new_tokens: int, options: SamplingOptions = SamplingOptions()
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, shape (B, 1), ``max_new_tokens`` times (or until all stopped).

    The prompt is prefilled once into a KV cache, then one token at a time is fed. A prompt longer than
    the context is cropped from the left (with a warning); once the context is full, the window slides
    and the cache is rebuilt from the most recent tokens.
    """
    check_max_new_tokens(max_new_tokens)
    if idx.dim() != 2 or idx.size(1) == 0:
        raise UserError(f"prompt must be token ids of shape (batch, time>=1), got shape {tuple(idx.shape)}")
    block_size = model.config.block_size
    if idx.size(1) > block_size:
        log.warning(
            "prompt of %d tokens is longer than the context (%d); keeping its last %d tokens",
            idx.size(1),
            block_size,
            block_size,
        )
        idx = idx[:, -block_size:]
    B, T = idx.shape
    with evaluation_mode(model) as model:
        # All tokens so far in one pre-allocated buffer (no per-step torch.cat of the whole context).
        tokens = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=idx.device)
        tokens[:, :T] = idx
        length = T
        stop_token = options.stop_token
        done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device) if stop_token is not None else None
        cache = None
        for _ in range(max_new_tokens):
            window = tokens[:, max(0, length - block_size) : length]
            if not options.use_cache:
                logits, _ = model(window, last_only=True)
            elif cache is None or cache.length >= block_size:
                # prefill (again, once the window is full: positions shift, so old keys are stale)
                cache = model.new_cache(B)
                logits, _ = model(window, cache=cache, last_only=True)
            else:
                logits, _ = model(tokens[:, length - 1 : length], cache=cache)
            token = next_token(
                logits[:, -1, :], options.temperature, options.top_k, options.top_p, options.generator
            )
            if done is not None:
                token = torch.where(done, torch.full_like(token, stop_token), token)
                done |= token == stop_token
            tokens[:, length : length + 1] = token
            length += 1
            yield token
            if done is not None and bool(done.all()):
                return


# ====================================================================== the `gpt2repro sample` command
DEFAULT_PROMPT = "Hello, I'm a language model,"


def _optional_int(text: str) -> int | None:
    """An integer, or ``none`` for no limit (argparse type of ``--top-k``)."""
    if text.lower() in ("none", "off"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        default="gpt2",
        help="Hugging Face GPT-2 directory, hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, org/name), "
        "checkpoint file or run directory of this project (default: gpt2)",
    )
    source.add_argument("--model-preset", metavar="NAME", help="a randomly initialised preset (smoke tests)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help='text to continue; "" starts a new document')
    parser.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens per sample (default 100)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the sampling RNG (default 42)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=_optional_int, default=50, help="keep the k likeliest (50; none)")
    parser.add_argument("--top-p", type=float, default=None, help="keep the top tokens of total prob. >= p")
    parser.add_argument("--greedy", action="store_true", help="take the likeliest token (= --temperature 0)")
    parser.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|>")
    parser.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument(
        "--dtype", default="auto", help="fp32, bf16, fp16 or auto (fp32 on CPU; bf16 on GPUs that have it)"
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context per token")


def run(args: argparse.Namespace) -> int:
    from gpt2repro.config import EOT_TOKEN_ID, GPT2_VOCAB_SIZE
    from gpt2repro.runtime import inference_precision, pick_device, sampling_dtype, seeded_generator
    from gpt2repro.tokenizer import EOT, get_tokenizer
    from gpt2repro.weights import load_or_init

    _check_arguments(args)
    temperature = 0.0 if args.greedy else args.temperature
    options = SamplingOptions(
        temperature,
        args.top_k,
        args.top_p,
        use_cache=not args.no_cache,
        stop_token=EOT_TOKEN_ID if args.stop_at_eot else None,
    )
    device = pick_device(args.device)
    dtype = sampling_dtype(args.dtype, device)
    model = load_or_init(args.model, args.model_preset, args.seed)
    if model.config.vocab_size > GPT2_VOCAB_SIZE:
        raise UserError(
            f"the model has {model.config.vocab_size} tokens; the GPT-2 tokenizer only {GPT2_VOCAB_SIZE}"
        )
    model.to(device).eval()
    log.info(f"sampling on {device} in {dtype}")

    enc = get_tokenizer()
    prompt_ids = enc.encode(args.prompt, allowed_special={EOT}) or [EOT_TOKEN_ID]
    context = model.config.block_size
    if len(prompt_ids) > context:  # said here as a log line, so stream_tokens never needs to warn
        log.warning(
            f"--prompt is {len(prompt_ids)} tokens, longer than the model's context ({context}): "
            f"the model sees only its last {context} tokens"
        )
        prompt_ids = prompt_ids[-context:]
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    options = dataclasses.replace(options, generator=seeded_generator(args.seed, device))
    precision = inference_precision(model, device, dtype)
    try:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                sys.stdout.write(f"{chr(10) if i else ''}--- sample {i + 1}/{args.num_samples} ---\n")
            with precision:
                print_sample(model, enc, args.prompt, idx, args.max_new_tokens, options)
    except BrokenPipeError:  # `gpt2repro sample ... | head`: the reader left, nothing went wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Each number by its option name; nan and inf pass ``<``/``>`` tests, so they are refused first."""
    for name in ("temperature", "top_p"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 means greedy), got {args.temperature}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be a positive integer (or none), got {args.top_k}")
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def print_sample(
    model, enc, prompt: str, idx: torch.Tensor, max_new_tokens: int, options: SamplingOptions
) -> None:
    """Write the prompt, then each token's text as soon as it is complete UTF-8 (flushed: a live stream)."""
    out = sys.stdout
    out.write(prompt)
    out.flush()
    text = Utf8Stream()
    for token in stream_tokens(model, idx, max_new_tokens, options):
        token_id = int(token)
        if token_id == options.stop_token:
            break
        out.write(text.push(enc.decode_single_token_bytes(token_id)))
        out.flush()
    out.write(text.finish() + "\n")
    out.flush()


class Utf8Stream:
    """Bytes of tokens in, text out as soon as it is valid UTF-8.

    A GPT-2 token can end in the middle of a multi-byte character (emoji, CJK): those bytes are held
    back until the character is complete; bytes that never form one become U+FFFD, as ``decode`` does.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)
