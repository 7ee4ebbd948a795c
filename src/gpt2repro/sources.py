"""Corpus readers for ``gpt2repro prepare``: each yields documents (``str``) one at a time, never the corpus.

* ``embedded_documents``: the Python Language Reference topics shipped inside CPython (``pydoc_data.topics``),
  a real English corpus present on every machine, one document per topic.
* ``file_documents``: ``.txt`` (one document per file, or per blank-line-separated paragraph), ``.jsonl`` (a
  ``text`` field per line) and ``.parquet`` (a ``text`` column), given as files, directories or globs.
  Directories and globs pick only those three suffixes; a file named explicitly with another suffix (e.g.
  WikiText's ``.raw``) is read as plain text.
* ``fineweb_documents``: FineWeb-Edu streamed with Hugging Face ``datasets`` (or a local copy of its parquet
  or jsonl files through the same code).
"""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from gpt2repro.errors import UserError

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z")
FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_SUBSETS = ("sample-10BT", "sample-100BT", "sample-350BT")


class Continuation(str):
    """A piece of a long document that continues the piece before it (so no ``<|endoftext|>`` in front)."""


# Where GPT-2's pre-tokenizer splits no matter what surrounds the cut: after a newline between two non-space
# characters, or before a space between two non-space characters (its pre-token, `` ?\p{L}+``, `` ?\p{N}+``
# or `` ?[^\s\p{L}\p{N}]+``, starts at that space; the pre-token before it cannot take a space). Python's \s
# covers all of Unicode's White_Space, so \S only admits cuts that the Rust regex agrees with. Cutting a long
# document there and tokenizing the pieces gives exactly the tokens of the whole text (tests check it on real
# text), while no worker ever holds a huge document's token list.
_SAFE_SPLIT = re.compile(r"(?<=\S\n)(?=\S)|(?<=\S)(?= \S)")
MAX_PIECE_CHARS = 1 << 22
READ_BLOCK_BYTES = 1 << 22


def _safe_split_point(text: str, limit: int) -> int | None:
    """The last safe split position in ``text[limit // 2 : limit]``, searching backwards from ``limit``."""
    span = 4096
    while True:
        start = max(limit // 2, limit - span)
        last = None
        for match in _SAFE_SPLIT.finditer(text, start, limit):
            last = match.start()
        if last or start == limit // 2:
            return last or None
        span *= 8


def document_pieces(fragments: Iterable[str], *, continued: bool = False) -> Iterator[str]:
    """One document given as consecutive ``fragments``, re-cut into pieces of at most ~MAX_PIECE_CHARS.

    Every piece but the first is a ``Continuation`` (the first too when ``continued``). Text with no safe
    split point for 2 x MAX_PIECE_CHARS characters is cut hard (its tokens may then differ at that cut).
    """
    parts: list[str] = []
    size = 0
    for fragment in fragments:
        parts.append(fragment)
        size += len(fragment)
        while size > MAX_PIECE_CHARS:
            text = "".join(parts)
            cut = _safe_split_point(text, MAX_PIECE_CHARS)
            if cut is None and size <= 2 * MAX_PIECE_CHARS:
                parts = [text]
                break
            cut = cut or MAX_PIECE_CHARS
            yield Continuation(text[:cut]) if continued else text[:cut]
            continued = True
            parts, size = [text[cut:]], size - cut
    text = "".join(parts)
    if text or not continued:
        yield Continuation(text) if continued else text


def embedded_documents() -> Iterator[str]:
    """The Python Language Reference, one document per topic (sorted by topic name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some minimal Python builds strip it
        raise UserError(
            "this Python has no pydoc_data module (the text of --source embedded); use --source files"
        ) from e
    for name in sorted(topics):
        yield topics[name]


def resolve_files(paths: Sequence[str]) -> list[Path]:
    """Files named directly, found (recursively) in directories, or matched by globs, in a stable order."""
    if not paths:
        raise UserError("--source files needs at least one PATH (a file, directory or glob)")
    files: list[Path] = []
    for spec in paths:
        path = Path(spec)
        if any(c in spec for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            found = [p for p in found if p.is_file() and p.suffix in FILE_SUFFIXES]
            if not found:
                raise UserError(f"the glob {spec!r} matches no {'/'.join(FILE_SUFFIXES)} file")
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
            if not found:
                raise UserError(f"directory {path} holds no {'/'.join(FILE_SUFFIXES)} file")
        elif path.is_file():
            if path.suffix in COMPRESSED_SUFFIXES:
                raise UserError(f"{path} is compressed ({path.suffix}); decompress it first")
            found = [path]  # any suffix but .jsonl/.parquet is read as plain text
        else:
            raise UserError(f"{path} does not exist")
        files.extend(found)
    return files


def file_documents(paths: Sequence[str], *, split_on_blank_lines: bool = False) -> Iterator[str]:
    """Documents of local files (see ``resolve_files``), file by file."""
    for path in resolve_files(paths):
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(path)
        elif path.suffix == ".parquet":
            yield from _parquet_documents(path)
        else:
            yield from _txt_documents(path, split_on_blank_lines)


def _not_utf8(path: Path, where: str) -> UserError:
    return UserError(
        f"{path} is not UTF-8 text ({where}): convert it first, e.g. "
        f"`iconv -f latin1 -t utf-8 {path} > out.txt`"
    )


def _txt_documents(path: Path, split_on_blank_lines: bool) -> Iterator[str]:
    if not split_on_blank_lines:
        yield from document_pieces(_decoded_blocks(path))
        return
    paragraph: list[str] = []
    for _, line in _utf8_lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph).rstrip("\r\n")
            paragraph = []
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n")


def _decoded_blocks(path: Path) -> Iterator[str]:
    """The text of a file, decoded in blocks (a multi-byte character may span two blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK_BYTES)
            carried = len(decoder.getstate()[0])  # bytes of a character cut by the previous block
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, f"invalid byte at offset {offset - carried + e.start}") from e
            yield text
            if not block:
                return
            offset += len(block)


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded line) of a UTF-8 file, with one clear error at the first bad line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, f"line {lineno}") from e
            yield lineno, line


def _jsonl_documents(path: Path) -> Iterator[str]:
    for lineno, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(
                f"{path}:{lineno} is not valid JSON ({e}); each line must be one JSON object"
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(
                f"{path}:{lineno} has no string 'text' field; each line must look like {{\"text\": …}}"
            )
        yield record["text"]


def _parquet_documents(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading .parquet files needs pyarrow: `pip install pyarrow`") from e
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet bytes
        raise UserError(f"{path} is not a readable parquet file ({e})") from e
    if "text" not in parquet.schema_arrow.names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(parquet.schema_arrow.names)})")
    for batch in parquet.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def fineweb_documents(
    subset: str = "sample-10BT", *, dataset: str = FINEWEB_DATASET, data_files: Sequence[str] | None = None
) -> Iterator[str]:
    """FineWeb-Edu's ``text`` column, streamed (nothing is downloaded up front).

    With ``data_files`` (local ``.parquet`` or ``.jsonl`` files of the same schema, e.g. a downloaded copy)
    the same ``datasets`` streaming reader runs on them instead of the Hub.
    """
    try:
        import datasets
    except ImportError as e:
        raise UserError("--source fineweb-edu needs Hugging Face datasets: `pip install datasets`") from e
    files = [str(p) for p in resolve_files(list(data_files))] if data_files else []
    where = f"local files {', '.join(files)}" if files else f"{dataset} subset {subset!r}"
    suffixes = {Path(f).suffix for f in files}
    if files and suffixes not in ({".parquet"}, {".jsonl"}):
        raise UserError(f"--data-files must be all .parquet or all .jsonl, got {', '.join(sorted(suffixes))}")
    try:
        if files:
            builder = "json" if suffixes == {".jsonl"} else "parquet"
            rows = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
        else:
            rows = datasets.load_dataset(dataset, name=subset, split="train", streaming=True)
    except Exception as e:  # network, unknown subset, unreadable files: say which and how to fix
        subsets = ", ".join(FINEWEB_SUBSETS)
        hint = (
            "check them"
            if files
            else f"check the subset ({subsets}) and internet access, or use --data-files"
        )
        raise UserError(f"could not open {where}: {e}; {hint}") from e
    iterator = iter(rows)
    for count in itertools.count():
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as e:  # a dropped connection hours into a download: one line, not a traceback
            retry = "check the files" if files else "run it again"
            raise UserError(f"reading {where} failed after {count} documents ({e}); {retry}") from e
        text = row.get("text")
        if not isinstance(text, str):
            raise UserError(f"a row of {where} has no string 'text' field (keys: {', '.join(row)})")
        yield text
