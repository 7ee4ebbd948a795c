"""Tokens/s of `gpt2repro prepare` vs a one-process tiktoken `encode_ordinary` loop, same documents, same run.

Documents: the text files in ../shared/data (tinyshakespeare, WikiText-2 raw and tokenized, the FineWeb-Edu
sample; ~6 MB), one document per blank-line-separated paragraph. `prepare` is timed end to end (reading the
files, tokenizing on all cores, writing shards with sha256, manifest); the peer only tokenizes a list in RAM.
The load average is printed too: on a shared machine the other processes decide how many cores are free.

    .venv/bin/python benchmarks/bench_prepare.py [--repeats 3] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from gpt2repro.calibration import describe_cpu
from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.prepare import available_cores, prepare_corpus
from gpt2repro.sources import file_documents
from gpt2repro.tokenizer import get_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FILES = [
    "tinyshakespeare/input.txt",
    "wikitext-2-raw/wiki.test.raw",
    "wikitext-2-raw/wiki.valid.raw",
    "wikitext-2-tokens/test.txt",
    "wikitext-2-tokens/valid.txt",
    "fineweb-edu-sample/fineweb_sample.txt",
]


def tiktoken_loop(documents: list[str]) -> int:
    """The peer: one process, one `encode_ordinary` call per document (build-nanogpt's inner loop)."""
    enc = get_tokenizer()
    tokens: list[int] = []
    for doc in documents:
        tokens.append(EOT_TOKEN_ID)
        tokens.extend(enc.encode_ordinary(doc))
    return len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--workers", type=int, default=None, help="prepare's workers (default: all cores)")
    args = parser.parse_args()
    print(describe_cpu())
    paths = [str(SHARED_DATA / f) for f in FILES]
    documents = list(file_documents(paths, split_on_blank_lines=True))
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    cores = args.workers or available_cores()
    get_tokenizer()  # build the BPE once, outside both timings

    peer_seconds, ours_seconds, peer_cpu, ours_cpu = [], [], [], []
    num_tokens = 0
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), cpu_seconds()
        num_tokens = tiktoken_loop(documents)
        peer_seconds.append(time.perf_counter() - start)
        peer_cpu.append(cpu_seconds() - cpu)
        with tempfile.TemporaryDirectory() as out:
            start, cpu = time.perf_counter(), cpu_seconds()
            manifest = prepare_corpus(
                file_documents(paths, split_on_blank_lines=True), out, source_name="bench", workers=cores
            )
            ours_seconds.append(time.perf_counter() - start)
            ours_cpu.append(cpu_seconds() - cpu)
        assert sum(manifest["num_tokens"].values()) == num_tokens, "prepare and the peer disagree on tokens"

    peer, ours = num_tokens / min(peer_seconds), num_tokens / min(ours_seconds)
    print(f"corpus: {len(FILES)} files, {megabytes:.1f} MB, {len(documents)} documents, {num_tokens:,} tok")
    print(f"tiktoken encode_ordinary loop, 1 process: {peer:,.0f} tokens/s (best of {args.repeats})")
    print(f"gpt2repro prepare, {cores} workers: {ours:,.0f} tokens/s (best of {args.repeats}, end to end)")
    print(f"ratio prepare / tiktoken loop: {ours / peer:.2f}x with {cores} worker processes")
    print(
        f"tokens per CPU-second (all processes): loop {num_tokens / min(peer_cpu):,.0f}, "
        f"prepare {num_tokens / min(ours_cpu):,.0f}"
    )
    print(f"cores: {os.cpu_count()} on the machine, load average {os.getloadavg()[0]:.1f} while measuring")


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (prepare's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
