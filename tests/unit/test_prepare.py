"""`gpt2repro prepare`: sources, tokens vs the reference tokenizer, shards, manifest, crash safety."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpt2repro import dataset_out, prepare, sources
from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.data import TokenLoader, read_shard, shard_paths, val_batches
from gpt2repro.errors import UserError
from gpt2repro.files import LOCK_NAME
from gpt2repro.tokenizer import EOT, get_tokenizer
from gpt2repro.verify import verify_dataset

DOCS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "Naïve café — 日本語のテキスト, emoji 🙂 and tabs\tand CRLF\r\nline endings.",
    "A document that mentions <|endoftext|> as plain text is still one document.",
    "  leading spaces, trailing newline\n\n",
    "x",
    "Numbers 1234567890 and punctuation!?;: " * 20,
]


def run_prepare(*argv: str) -> int:
    """The `gpt2repro prepare` sub-command exactly as the CLI wires it (add_arguments + run)."""
    parser = argparse.ArgumentParser()
    prepare.add_arguments(parser)
    return prepare.run(parser.parse_args([*argv, "--no-progress"]))


def reference_tokens(docs: list[str]) -> np.ndarray:
    enc = get_tokenizer()
    return np.array([t for doc in docs for t in [EOT_TOKEN_ID, *enc.encode_ordinary(doc)]], dtype=np.uint16)


def split_tokens(out: Path, split: str) -> np.ndarray:
    return np.concatenate([read_shard(p) for p in shard_paths(out, split)])


def listing(out: Path) -> list[str]:
    """The names in ``out``, sorted, without the lock file that ``prepare`` keeps there (DirectoryLock)."""
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)


def assert_no_dataset(out: Path) -> None:
    """Nothing is left in ``out``: no shard, no manifest, no staging directory."""
    if out.exists():
        assert listing(out) == []


def test_files_round_trip_in_order(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"doc_{i:02d}.txt").write_bytes(doc.encode("utf-8"))
    out = tmp_path / "out"
    assert run_prepare("--source", "files", str(corpus), "--out", str(out), "--shard-tokens", "50",
                       "--val-tokens", "30", "--workers", "2") == 0  # fmt: skip
    expected = reference_tokens(DOCS)
    val, train = split_tokens(out, "val"), split_tokens(out, "train")
    assert len(val) == 30
    np.testing.assert_array_equal(np.concatenate([val, train]), expected)
    assert get_tokenizer().decode(np.concatenate([val, train]).tolist()) == "".join(EOT + d for d in DOCS)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "files" and manifest["tokenizer"] == "gpt2"
    assert manifest["num_documents"] == len(DOCS)
    assert manifest["num_tokens"] == {"train": len(expected) - 30, "val": 30}
    names = [s["name"] for s in manifest["shards"]]
    assert names[0] == "files_val_000000.bin" and names[1] == "files_train_000001.bin"
    assert all(s["tokens"] <= 50 for s in manifest["shards"])
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest() == shard["sha256"]
    assert verify_dataset(out).tokens == manifest["num_tokens"]

    loader = TokenLoader(out, "train", 2, 16, shuffle=False)
    x, y = loader.next_batch()
    np.testing.assert_array_equal(x.flatten().numpy(), train[:32])
    np.testing.assert_array_equal(y.flatten().numpy(), train[1:33])
    (vx, _), *_ = val_batches(out, 1, 29)
    np.testing.assert_array_equal(vx.flatten().numpy(), val[:29])


def test_both_encoding_paths_give_the_reference_tokens():
    enc = get_tokenizer()
    old_tiktoken = types.SimpleNamespace(encode_ordinary=enc.encode_ordinary)  # no encode_to_numpy (< 0.8)
    for doc in DOCS:
        for encoder in (enc, old_tiktoken):
            assert prepare._encode_ordinary(encoder, doc).tolist() == enc.encode_ordinary(doc)


def test_embedded_source_is_offline_and_large():
    docs = list(sources.embedded_documents())
    from pydoc_data.topics import topics

    assert len(docs) == len(topics) and all(isinstance(d, str) and d for d in docs)
    enc = get_tokenizer()
    assert sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=2)) > 100_000


def test_embedded_prepare_via_cli(tmp_path):
    out = tmp_path / "emb"
    assert run_prepare("--source", "embedded", "--out", str(out), "--workers", "2") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["num_tokens"]["train"] + manifest["num_tokens"]["val"]
    assert total > 100_000
    assert manifest["num_tokens"]["val"] == total // 10  # small corpus: val is 10 %, not 10,485,760 tokens
    np.testing.assert_array_equal(
        np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")]),
        reference_tokens(list(sources.embedded_documents())),
    )


def test_workers_and_batching_do_not_change_the_shards(tmp_path, shared_data, monkeypatch):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    docs = text.split("\n\n")
    monkeypatch.setattr(prepare, "BATCH_CHARS", 5_000)  # many batches in flight, reordering would show
    one = prepare.prepare_corpus(docs, tmp_path / "one", shard_tokens=7_000, workers=1)
    two = prepare.prepare_corpus(iter(docs), tmp_path / "two", shard_tokens=7_000, workers=2)
    assert [s["sha256"] for s in one["shards"]] == [s["sha256"] for s in two["shards"]]
    assert one["num_documents"] == len(docs) and len(one["shards"]) > 5
    np.testing.assert_array_equal(
        np.concatenate([split_tokens(tmp_path / "two", "val"), split_tokens(tmp_path / "two", "train")]),
        reference_tokens(docs),
    )


def test_long_documents_are_tokenized_in_pieces_with_the_tokens_of_the_whole(
    tmp_path, shared_data, monkeypatch
):
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 3_000)  # ~150 cuts in real text, in both code paths
    monkeypatch.setattr(sources, "READ_BLOCK_BYTES", 1_001)  # multi-byte characters span blocks
    wiki = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:300_000]
    fineweb = (shared_data / "fineweb-edu-sample" / "fineweb_sample.txt").read_text(encoding="utf-8")[
        :200_000
    ]
    (tmp_path / "a.raw").write_text(wiki, encoding="utf-8")  # streamed from disk in pieces
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": fineweb}) + "\n")  # cut in memory
    out = tmp_path / "out"
    assert (
        run_prepare(
            "--source", "files", str(tmp_path / "a.raw"), str(tmp_path / "b.jsonl"), "--out", str(out)
        )
        == 0
    )
    tokens = np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")])
    np.testing.assert_array_equal(tokens, reference_tokens([wiki, fineweb]))
    assert json.loads((out / "manifest.json").read_text())["num_documents"] == 2
    pieces = list(sources.document_pieces([wiki]))
    assert "".join(pieces) == wiki and len(pieces) > 100 and all(len(p) <= 3_000 for p in pieces)
    assert not isinstance(pieces[0], sources.Continuation)
    assert all(isinstance(p, sources.Continuation) for p in pieces[1:])
    no_split_point = "日本語" * 3_000  # cut hard, but nothing is lost
    assert "".join(sources.document_pieces([no_split_point])) == no_split_point
    (tmp_path / "bad.txt").write_bytes("é".encode() * 1_000 + b"\xff")
    with pytest.raises(UserError, match="invalid byte at offset 2000"):
        list(sources.file_documents([str(tmp_path / "bad.txt")]))


def test_txt_jsonl_parquet_globs_and_blank_line_split(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\n\n  \npara two\n\npara three")
    (tmp_path / "b.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 2}\n')
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "id": [1, 2, 3]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored: not a corpus file type")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "d.txt").write_text("nested file\n\nas one document")
    whole = [
        "para one\nstill one\n\n\n  \npara two\n\npara three",
        "json one",
        "json two",
        "pq one",
        "pq two",
    ]
    assert list(sources.file_documents([str(tmp_path / "*.*")])) == whole
    assert list(sources.file_documents([str(tmp_path)])) == [*whole, "nested file\n\nas one document"]
    assert list(sources.file_documents([str(tmp_path / "**" / "*.txt")], split_on_blank_lines=True)) == [
        "para one\nstill one", "para two", "para three", "nested file", "as one document"
    ]  # fmt: skip


def test_fineweb_edu_code_path_offline(tmp_path):
    texts = [f"FineWeb-Edu style document number {i}. " * (i % 7 + 1) for i in range(200)]
    table = pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(200)], "score": [3.0] * 200})
    pq.write_table(table, tmp_path / "000_00000.parquet")
    assert list(sources.fineweb_documents(data_files=[str(tmp_path / "000_00000.parquet")])) == texts
    out = tmp_path / "edu"
    files = str(tmp_path / "*.parquet")
    argv = ["--source", "fineweb-edu", "--data-files", files, "--out", str(out), "--max-tokens", "1000"]
    assert run_prepare(*argv, "--val-tokens", "100", "--workers", "2") == 0
    tokens = np.concatenate([split_tokens(out, "val"), split_tokens(out, "train")])
    np.testing.assert_array_equal(tokens, reference_tokens(texts)[:1000])  # an exact prefix
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] == "fineweb-edu" and manifest["source_info"]["max_tokens"] == 1000
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:3]))
    assert list(sources.fineweb_documents(data_files=[str(tmp_path / "rows.jsonl")])) == texts[:3]
    (tmp_path / "001_00000.parquet").write_bytes(b"cut off mid-download")
    with pytest.raises(
        UserError, match=r"reading local files .* failed after 200 documents .*check the files"
    ):
        list(sources.fineweb_documents(data_files=[files]))
    with pytest.raises(UserError, match="must be all .parquet or all .jsonl"):
        list(sources.fineweb_documents(data_files=[str(tmp_path / "rows.jsonl"), files]))


def test_explicit_val_tokens_and_max_tokens(tmp_path):
    manifest = prepare.prepare_corpus(DOCS * 5, tmp_path / "o", val_tokens=123, max_tokens=500, workers=1)
    assert manifest["num_tokens"] == {"val": 123, "train": 377}


def test_existing_output_is_refused_then_overwritten(tmp_path):
    out = tmp_path / "out"
    first = prepare.prepare_corpus(DOCS, out, workers=1, shard_tokens=10)
    with pytest.raises(UserError, match=r"already holds a prepared dataset.*--overwrite"):
        prepare.prepare_corpus(DOCS[:2], out, workers=1)
    manifest = prepare.prepare_corpus(DOCS[:2], out, workers=1, overwrite=True)
    assert len(manifest["shards"]) == 2 < len(first["shards"])
    assert manifest["num_documents"] == 2
    on_disk = listing(out)
    assert on_disk == sorted(["manifest.json", *(s["name"] for s in manifest["shards"])])


def test_interrupted_run_leaves_nothing_that_looks_valid_and_restarts_cleanly(tmp_path):
    out = tmp_path / "out"

    def documents_then_interrupt():
        yield from DOCS * 10
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_corpus(documents_then_interrupt(), out, shard_tokens=40, workers=2)
    assert_no_dataset(out)
    # A run killed hard (no cleanup at all) leaves its staging directory with whole and half-written shards.
    staging = out / dataset_out.STAGING_DIR
    staging.mkdir()
    (staging / "corpus_train_000001.bin").write_bytes(b"a whole shard")
    (staging / ".corpus_train_000002.bin.tmp").write_bytes(b"half a shard")
    manifest = prepare.prepare_corpus(DOCS, out, shard_tokens=40, workers=1)
    expected = ["manifest.json", *(s["name"] for s in manifest["shards"])]
    assert listing(out) == sorted(expected)
    TokenLoader(out, "train", 1, 8)


def test_shards_without_a_manifest_are_refused_unless_overwrite(tmp_path):
    np.save(tmp_path / "edufineweb_train_000001.npy", np.zeros(10, dtype=np.uint16))  # another tool's shard
    (tmp_path / "notes.txt").write_text("kept")
    with pytest.raises(UserError, match=r"already holds 1 token shards without a manifest.json.*--overwrite"):
        prepare.prepare_corpus(DOCS, tmp_path, workers=1)
    assert (tmp_path / "edufineweb_train_000001.npy").exists()
    manifest = prepare.prepare_corpus(DOCS, tmp_path, workers=1, overwrite=True)
    expected = ["manifest.json", "notes.txt", *(s["name"] for s in manifest["shards"])]
    assert listing(tmp_path) == sorted(expected)


# ---- bad input: one clear error naming the file and what to do, and no output that looks valid ----


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="corpus is empty"):
        run_prepare("--source", "files", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out"))
    assert_no_dataset(tmp_path / "out")


def test_corpus_too_small_for_both_splits(tmp_path):
    with pytest.raises(UserError, match="too few for both a val split"):
        prepare.prepare_corpus(["hi"], tmp_path / "out", val_tokens=10, workers=1)
    assert_no_dataset(tmp_path / "out")


@pytest.mark.parametrize(("name", "split"), [("bad.txt", False), ("bad.txt", True), ("bad.jsonl", False)])
def test_non_utf8_text(tmp_path, name, split):
    path = tmp_path / name
    body = "caf\xe9 in Latin-1" if name.endswith(".txt") else '{"text": "caf\xe9"}'
    path.write_bytes(("fine first line\n\n" if split else "").encode() + body.encode("latin-1"))
    argv = ["--source", "files", str(path), "--out", str(tmp_path / "out")]
    with pytest.raises(UserError, match=rf"{path} is not UTF-8 text .*iconv"):
        run_prepare(*argv, *(["--split-on-blank-lines"] if split else []))
    assert_no_dataset(tmp_path / "out")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"x.jsonl:2 is not valid JSON"),
        ("x.jsonl", b'{"body": "no text"}\n', r"x.jsonl:1 has no string 'text' field"),
        ("x.parquet", b"not parquet at all", r"x.parquet is not a readable parquet file"),
        ("x.txt.gz", b"\x1f\x8b\x08\x00", r"x.txt.gz is compressed \(.gz\); decompress it first"),
        ("x.raw", b"\x1f\x8b\x08\x00\xff", r"x.raw is not UTF-8 text \(invalid byte at offset 1\)"),
    ],
)
def test_malformed_files(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        run_prepare("--source", "files", str(tmp_path / name), "--out", str(tmp_path / "out"))
    assert_no_dataset(tmp_path / "out")


def test_parquet_without_text_column(tmp_path):
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "x.parquet")
    with pytest.raises(UserError, match=r"x.parquet has no 'text' column \(columns: content\)"):
        list(sources.file_documents([str(tmp_path / "x.parquet")]))


@pytest.mark.parametrize("name", ["interval", "my/corpus", ""])
def test_source_names_that_would_confuse_the_loader(tmp_path, name):
    with pytest.raises(UserError, match="cannot prefix shard names"):
        prepare.prepare_corpus(DOCS, tmp_path, source_name=name, workers=1)
    assert_no_dataset(tmp_path)


def test_missing_paths_and_bad_options(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(UserError, match="does not exist"):
        run_prepare("--source", "files", str(tmp_path / "missing.txt"), "--out", out)
    with pytest.raises(UserError, match="matches no"):
        run_prepare("--source", "files", str(tmp_path / "*.txt"), "--out", out)
    with pytest.raises(UserError, match="needs at least one PATH"):
        run_prepare("--source", "files", "--out", out)
    with pytest.raises(UserError, match="only for --source files"):
        run_prepare("--source", "embedded", "stray.txt", "--out", out)
    with pytest.raises(UserError, match="--shard-tokens must be a positive integer"):
        run_prepare("--source", "embedded", "--out", out, "--shard-tokens", "0")
    assert_no_dataset(tmp_path / "out")


def test_cli_reports_user_errors_with_exit_code_2(tmp_path, capsys):
    from gpt2repro.cli import main

    assert (
        main(["prepare", "--source", "files", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.txt does not exist" in err[0]


# ---- never delete before success: the previous dataset survives any failed rebuild ----


def snapshot(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in listing(out) if (out / name).is_file()}


def test_overwrite_with_bad_input_keeps_the_previous_dataset(tmp_path, capsys):
    from gpt2repro.cli import main

    out = tmp_path / "out"
    prepare.prepare_corpus(DOCS, out, workers=1, shard_tokens=40)
    before = snapshot(out)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n" * 2000 + "caf\xe9".encode("latin-1"))  # fails after shards are staged
    code = main(
        [
            "prepare",
            "--source",
            "files",
            str(bad),
            "--out",
            str(out),
            "--overwrite",
            "--shard-tokens",
            "40",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 2 and "is not UTF-8 text" in capsys.readouterr().err
    assert snapshot(out) == before and listing(out) == sorted(before)
    assert verify_dataset(out, trust_stamps=False).tokens == json.loads(before["manifest.json"])["num_tokens"]


def test_overwrite_on_a_full_disk_keeps_the_previous_dataset(tmp_path, capsys):
    from fs_faults import fill, tmpfs

    from gpt2repro.cli import main

    with tmpfs(tmp_path / "mnt", size="2m") as mnt:
        out = mnt / "data"
        prepare.prepare_corpus(DOCS, out, workers=1, shard_tokens=40)
        before = snapshot(out)
        fill(mnt)
        code = main(
            [
                "prepare",
                "--source",
                "embedded",
                "--out",
                str(out),
                "--overwrite",
                "--max-tokens",
                "200000",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"cannot write the dataset into {out}: no space left on the device" in err
        assert f"the previous dataset in {out} is intact" in err
        assert snapshot(out) == before and listing(out) == sorted(before)  # staging removed too
        verify_dataset(out, trust_stamps=False)


def test_read_only_output_is_one_line(tmp_path, capsys):
    from fs_faults import tmpfs

    from gpt2repro.cli import main

    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        code = main(["prepare", "--source", "embedded", "--out", str(ro / "data"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1
        assert f"{ro / 'data'}: the file system is read-only" in err


def test_a_rebuild_killed_at_any_rename_leaves_the_old_or_the_new_dataset(tmp_path, monkeypatch):
    """Renames are the steps of a rebuild (staged shards, staged manifest, then the swap): killed before
    the swap, the old dataset stands; killed during it, the next run finishes it; never a mix."""
    real_replace = os.replace
    seen = set()
    for kill_at in range(100):  # every rename in turn, until one run gets through
        out = tmp_path / f"out{kill_at}"
        prepare.prepare_corpus(DOCS, out, workers=1, shard_tokens=40)
        moves = []

        def killed(src, dst, kill_at=kill_at, moves=moves):
            if len(moves) == kill_at:
                raise KeyboardInterrupt  # stands for SIGKILL between two renames of the swap
            moves.append(src)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", killed)
        try:
            prepare.prepare_corpus(DOCS[:2], out, workers=1, overwrite=True)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        if not finished:
            with pytest.raises(UserError, match="already holds a prepared dataset"):  # swap finished first
                prepare.prepare_corpus(DOCS, out, workers=1)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_documents"] in (len(DOCS), 2), kill_at  # the old one or the new one
        seen.add((finished, manifest["num_documents"]))
        assert listing(out) == sorted(["manifest.json", *(s["name"] for s in manifest["shards"])]), kill_at
        verify_dataset(out, trust_stamps=False)
        if finished:
            break
    # interrupted in the build (old one kept), in the swap (finished by the next run), then not at all
    assert seen == {(False, len(DOCS)), (False, 2), (True, 2)}
