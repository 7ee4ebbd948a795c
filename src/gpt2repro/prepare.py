"""``gpt2repro prepare``: a corpus -> GPT-2 token shards + ``manifest.json``, on all cores, streaming.

Each document becomes ``<|endoftext|>`` followed by its tokens (the GPT-2 convention). The token stream is cut
into shards of ``--shard-tokens``: the first ``--val-tokens`` tokens go to ``<source>_val_000000.bin`` (and
more val shards if needed), the rest to ``<source>_train_000001.bin``, … (llm.c format, see ``data.py``).

Documents longer than ``sources.MAX_PIECE_CHARS`` (4M characters; a big .txt file is one document) are read
and tokenized in pieces cut where GPT-2's pre-tokenizer always splits, so memory stays bounded and the tokens
are exactly those of the whole text.

Without ``--val-tokens`` the val split is ``min(10,485,760, 10% of the corpus)`` tokens; to know whether the
corpus is small, the first ``10 x 10,485,760`` tokens are held in memory (~200 MB) before anything is split.

Crash safety (``dataset_out``): the new dataset is built in ``OUT/.prepare-partial/`` and swapped in only
when complete, ``manifest.json`` last, so an interrupted or failed run (bad input, full disk, Ctrl-C,
SIGKILL) never leaves output that looks complete and never touches the previous dataset. An ``OUT`` that
already holds shards is refused unless ``--overwrite`` is given; then its shards are replaced only after
the new ones are complete. One ``prepare`` at a time per ``OUT`` (an OS lock, ``files.DirectoryLock``).
``gpt2repro prepare --verify DIR`` re-checks a dataset against its manifest (``verify.verify_dataset``).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import multiprocessing
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import AsyncResult
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt2repro import dataset_out, sources
from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.data import SHARD_MAGIC, SHARD_VERSION, SPLITS, VOCAB_SIZE
from gpt2repro.dataset_out import ShardWriter
from gpt2repro.errors import UserError
from gpt2repro.files import DirectoryLock, user_error_for
from gpt2repro.tokenizer import get_tokenizer

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_TOKENS = 10_485_760
SMALL_CORPUS_VAL_FRACTION = 10  # val = 1/10 of a corpus smaller than 10 x DEFAULT_VAL_TOKENS
BATCH_CHARS = 1 << 18  # documents are sent to the workers in batches of about this many characters


def available_cores() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. under a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _encode_documents(texts: list[str]) -> np.ndarray:
    """EOT + tokens of each document, concatenated (runs in a worker process); pieces continuing a long
    document (``sources.Continuation``) get no EOT."""
    enc = get_tokenizer()
    eot = np.array([EOT_TOKEN_ID], dtype=np.uint32)
    parts = []
    for text in texts:
        if not isinstance(text, sources.Continuation):
            parts.append(eot)
        parts.append(_encode_ordinary(enc, text))
    return np.concatenate(parts).astype(np.uint16)


def _encode_ordinary(enc, text: str) -> np.ndarray:
    """``enc.encode_ordinary`` as a uint32 array; tiktoken >= 0.8 builds it without a Python list (~10% less
    CPU). Special-token text such as "<|endoftext|>" stays ordinary text either way."""
    if hasattr(enc, "encode_to_numpy"):
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def _ignore_sigint() -> None:
    """Ctrl-C is handled once, by the parent (which stops the pool), not as a traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _document_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for document in documents:
        if not document:
            continue  # an empty document would be a lone EOT
        pieces = [document]
        if len(document) > sources.MAX_PIECE_CHARS:  # bound a worker's memory: tokenize it in pieces
            continued = isinstance(document, sources.Continuation)
            pieces = sources.document_pieces(pieces, continued=continued)
        for text in pieces:
            batch.append(text)
            chars += len(text)
            if chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def encode_stream(documents: Iterable[str], workers: int) -> Iterator[np.ndarray]:
    """Token arrays of consecutive document batches, in order, tokenized by ``workers`` processes.

    At most ``2 x workers`` batches are in flight, so an endless source (FineWeb) is read only as fast as it
    is tokenized.
    """
    batches = _document_batches(documents)
    if workers <= 1:
        for batch in batches:
            yield _encode_documents(batch)
        return
    get_tokenizer()  # build it once before forking so the workers inherit it
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # multiprocessing.Pool starts every worker now, before the source is first read (and before a streaming
    # source such as HF datasets starts its own threads), and terminates them on exit, also on an early stop.
    with multiprocessing.get_context(method).Pool(workers, initializer=_ignore_sigint) as pool:
        pending: collections.deque[AsyncResult] = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_documents, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_corpus(
    documents: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    source_name: str = "corpus",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_tokens: int | None = None,
    max_tokens: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
    source_info: dict | None = None,
) -> dict:
    """Tokenize ``documents`` into shards in ``out_dir``; returns the manifest (also saved as manifest.json).

    ``val_tokens=None`` means ``min(DEFAULT_VAL_TOKENS, 10% of the corpus)``; ``max_tokens`` keeps only that
    many tokens (a prefix of the token stream).
    """
    for name, value in (
        ("shard_tokens", shard_tokens),
        ("val_tokens", val_tokens),
        ("max_tokens", max_tokens),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", source_name) or any(x in source_name for x in SPLITS):
        raise UserError(
            f"source name {source_name!r} cannot prefix shard names: use letters, digits, '.', '_', '-', "
            "and neither 'train' nor 'val' (the loader finds shards by those words)"
        )
    workers = available_cores() if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    out_dir = Path(out_dir)
    with DirectoryLock(out_dir, what="dataset"):
        old_files = dataset_out.existing_dataset(out_dir, overwrite)
        try:
            writer = ShardWriter(out_dir, source_name, shard_tokens)
            cut = StreamCut(val_tokens, max_tokens, workers, progress)
            manifest = _build(documents, writer, cut)
            manifest.update(source_info=source_info or {}, shard_tokens=shard_tokens)
            dataset_out.stage_manifest(out_dir, manifest)
            dataset_out.publish(out_dir, old_files)
        except BaseException as e:
            dataset_out.discard_staging(out_dir)
            if isinstance(e, OSError):
                kept = f"; the previous dataset in {out_dir} is intact" if old_files else ""
                raise UserError(f"{user_error_for(e, 'write the dataset into', out_dir)}{kept}") from e
            raise
    return manifest


@dataclass(frozen=True)
class StreamCut:
    """How the token stream is read and cut: the val size (None: automatic), the cap on all tokens (None:
    the whole corpus), the tokenizer processes and whether a progress bar is shown."""

    val_tokens: int | None
    max_tokens: int | None
    workers: int
    progress: bool


def _build(documents: Iterable[str], writer: ShardWriter, cut: StreamCut) -> dict:
    """Tokenize into staged shards; the manifest (without source_info and shard_tokens)."""
    started = time.perf_counter()
    source_name = writer.prefix
    total, num_docs, val_count = _split_into_shards(documents, writer, cut)
    if total == 0:
        raise UserError(
            f"the {source_name} corpus is empty: no document with text was found; check the input"
        )
    if total - val_count < 1 or val_count < 1:
        raise UserError(
            f"the {source_name} corpus has {total} tokens, too few for both a val split ({val_count}) "
            "and a train split; give more text or a smaller --val-tokens"
        )
    shards = writer.finish()
    return {
        "format": f"llm.c token shards (magic {SHARD_MAGIC}, version {SHARD_VERSION}, uint16)",
        "source": source_name,
        "tokenizer": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "eot_token": EOT_TOKEN_ID,
        "num_documents": num_docs,
        "num_tokens": {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in SPLITS},
        "shards": shards,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _split_into_shards(documents: Iterable[str], writer: ShardWriter, cut: StreamCut) -> tuple[int, int, int]:
    """Stream tokens into ``writer``: (total tokens, documents, val tokens)."""
    max_tokens = cut.max_tokens
    val_count = cut.val_tokens  # None until known (automatic val size)
    pending: list[np.ndarray] = []  # held only while the automatic val size is undecided
    pending_total = emitted = total = num_docs = 0

    def emit(tokens: np.ndarray) -> None:
        nonlocal emitted
        to_val = max(0, min(len(tokens), val_count - emitted))
        writer.write(tokens[:to_val], "val")
        writer.write(tokens[to_val:], "train")
        emitted += len(tokens)

    bar = tqdm(
        total=max_tokens,
        unit="tok",
        unit_scale=True,
        disable=not cut.progress,
        desc=f"prepare {writer.prefix}",
    )
    with bar:
        for tokens in encode_stream(documents, cut.workers):
            if max_tokens is not None and total + len(tokens) > max_tokens:
                tokens = tokens[: max_tokens - total]
            total += len(tokens)
            num_docs += int(np.count_nonzero(tokens == EOT_TOKEN_ID))
            bar.update(len(tokens))
            if val_count is None:
                pending.append(tokens)
                pending_total += len(tokens)
                if pending_total >= SMALL_CORPUS_VAL_FRACTION * DEFAULT_VAL_TOKENS:
                    val_count = DEFAULT_VAL_TOKENS
                    for part in pending:
                        emit(part)
                    pending.clear()
            else:
                emit(tokens)
            if max_tokens is not None and total >= max_tokens:
                break
    if val_count is None:
        val_count = min(DEFAULT_VAL_TOKENS, total // SMALL_CORPUS_VAL_FRACTION)
        for part in pending:
            emit(part)
    return total, num_docs, val_count


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``gpt2repro prepare``'s arguments, in the order --help lists them."""
    parser.add_argument(
        "paths", nargs="*", metavar="PATH", help="with --source files: files, directories or globs"
    )
    parser.add_argument(
        "--source",
        choices=["embedded", "files", "fineweb-edu"],
        default="embedded",
        help="embedded: the Python Language Reference shipped with CPython (offline); files: local "
        ".txt/.jsonl/.parquet; fineweb-edu: HF datasets streaming (default: %(default)s)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory: shards + manifest.json")
    parser.add_argument(
        "--verify",
        metavar="DIR",
        help="instead of preparing: re-check every shard of DIR against its manifest.json (sha256, "
        "token ids), ignoring the stamps of earlier checks",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        metavar="N",
        help="tokens per shard (default: %(default)s)",
    )
    parser.add_argument(
        "--val-tokens",
        type=int,
        default=None,
        metavar="N",
        help=f"tokens in the val split (default: {DEFAULT_VAL_TOKENS}, or 10%% of a corpus "
        f"smaller than {SMALL_CORPUS_VAL_FRACTION * DEFAULT_VAL_TOKENS})",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, metavar="N", help="keep only the first N tokens of the corpus"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=f"tokenizer processes (default: all {available_cores()} cores; 1: in this process)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_output_and_source_options(parser)


def _add_output_and_source_options(parser: argparse.ArgumentParser) -> None:
    """--overwrite, then the options of one source each (after the general ones in --help)."""
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild DIR: the shards and manifest.json already there are replaced once the new ones "
        "are complete (a failed rebuild leaves them as they were)",
    )
    parser.add_argument(
        "--split-on-blank-lines",
        action="store_true",
        help="files: one document per blank-line-separated paragraph of a .txt (default: per file)",
    )
    parser.add_argument(
        "--subset",
        default="sample-10BT",
        help=f"fineweb-edu: the subset ({', '.join(sources.FINEWEB_SUBSETS)}; default: %(default)s)",
    )
    parser.add_argument(
        "--data-files",
        nargs="+",
        default=None,
        metavar="FILE",
        help="fineweb-edu: read these local parquet/jsonl files (a downloaded copy) instead of the Hub",
    )


def _documents_for(args: argparse.Namespace) -> tuple[Iterable[str], dict]:
    if args.source != "files" and args.paths:
        raise UserError(f"PATH arguments are only for --source files (got {' '.join(args.paths)})")
    if args.source == "embedded":
        return sources.embedded_documents(), {"corpus": "pydoc_data.topics (Python Language Reference)"}
    if args.source == "files":
        files = sources.resolve_files(args.paths)  # fail fast, before any output is touched
        info = {"files": [str(p) for p in files], "split_on_blank_lines": args.split_on_blank_lines}
        return sources.file_documents(args.paths, split_on_blank_lines=args.split_on_blank_lines), info
    info = {"dataset": sources.FINEWEB_DATASET, "subset": args.subset, "data_files": args.data_files}
    return sources.fineweb_documents(args.subset, data_files=args.data_files), info


def _verify(data_dir: str) -> int:
    from gpt2repro.verify import verify_dataset

    print(verify_dataset(data_dir, trust_stamps=False).summary())
    return 0


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        if args.out is not None:
            raise UserError("--verify DIR checks an existing dataset; give it without --out")
        return _verify(args.verify)
    if args.out is None:
        raise UserError("--out DIR is required: the directory to write the shards into (or --verify DIR)")
    documents, info = _documents_for(args)
    info["max_tokens"] = args.max_tokens
    manifest = prepare_corpus(
        documents,
        args.out,
        source_name=args.source,
        shard_tokens=args.shard_tokens,
        val_tokens=args.val_tokens,
        max_tokens=args.max_tokens,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        source_info=info,
    )
    counts = manifest["num_tokens"]
    log.info(
        "%s: %d documents, %d train + %d val tokens in %d shards (%.0f tokens/s)",
        args.out,
        manifest["num_documents"],
        counts["train"],
        counts["val"],
        len(manifest["shards"]),
        (counts["train"] + counts["val"]) / max(manifest["seconds"], 1e-9),
    )
    return 0
