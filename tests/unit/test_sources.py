"""Corpora as documents: the embedded Python reference, local text/JSON-lines files, long documents cut."""

from __future__ import annotations

import json

import pytest

from gpt2repro import sources
from gpt2repro.errors import UserError


def test_embedded_documents_are_the_python_reference_in_topic_order():
    from pydoc_data.topics import topics

    docs = list(sources.embedded_documents())
    assert docs == [topics[name] for name in sorted(topics)]
    assert len(docs) > 50 and all(isinstance(d, str) and d for d in docs)


def test_text_files_whole_or_by_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\nsecond para\n", encoding="utf-8")
    assert list(sources.file_documents([str(path)])) == [path.read_text(encoding="utf-8")]
    assert list(sources.file_documents([str(path)], split_on_blank_lines=True)) == [
        "first para\nline two",
        "second para",
    ]


def test_jsonl_text_fields_and_bad_lines_named(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["x", "y z"])) + "\n")
    assert list(sources.file_documents([str(good)])) == ["x", "y z"]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"b.jsonl:2 has no string 'text' field"):
        list(sources.file_documents([str(bad)]))


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt"):
        list(sources.file_documents([str(path)]))


def test_long_documents_are_cut_into_pieces_that_join_back(monkeypatch):
    monkeypatch.setattr(sources, "MAX_PIECE_CHARS", 100)
    text = "".join(f"sentence number {i}. " for i in range(60))  # ~1.3k characters
    pieces = list(sources.document_pieces([text[:500], text[500:]]))
    assert "".join(pieces) == text
    assert len(pieces) > 5 and all(len(p) <= 200 for p in pieces)
    assert not isinstance(pieces[0], sources.Continuation)
    assert all(isinstance(p, sources.Continuation) for p in pieces[1:])
