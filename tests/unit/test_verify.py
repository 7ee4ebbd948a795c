"""verify.py: every shard against manifest.json's sha256 and the vocabulary, once, then remembered."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from fs_faults import tmpfs

from gpt2repro import prepare
from gpt2repro.cli import main
from gpt2repro.data import HEADER_BYTES, read_shard, shard_paths
from gpt2repro.errors import UserError
from gpt2repro.manifest import read_manifest
from gpt2repro.verify import STAMP_NAME, verify_dataset

DOCS = [f"document {i}: " + "some words and numbers 12345 " * (i % 7 + 1) for i in range(60)]


@pytest.fixture
def data_dir(tmp_path):
    prepare.prepare_corpus(DOCS, tmp_path / "data", shard_tokens=300, val_tokens=250, workers=1)
    return tmp_path / "data"


def poke(path, index: int, value: int) -> None:
    """Overwrite token ``index`` of a shard in place (size unchanged; mtime restored: only the bytes say)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(HEADER_BYTES + 2 * index)
        f.write(int(value).to_bytes(2, "little"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_first_check_reads_every_shard_then_the_stamp_remembers(data_dir):
    manifest = read_manifest(data_dir)
    first = verify_dataset(data_dir)
    assert first.tokens == manifest["num_tokens"]
    assert (first.hashed, first.remembered) == (len(manifest["shards"]), 0)
    assert first.stamp == data_dir / STAMP_NAME and first.without_checksum == []
    second = verify_dataset(data_dir)
    assert (second.hashed, second.remembered, second.stamp) == (0, len(manifest["shards"]), None)
    assert second.tokens == first.tokens
    # A shard rewritten (new mtime) is read again, and its corruption is found.
    shard = shard_paths(data_dir, "train")[1]
    tokens = np.array(read_shard(shard))
    poke(shard, 3, (int(tokens[3]) + 1) % 50256)
    assert verify_dataset(data_dir).remembered == len(manifest["shards"])  # same size and mtime: trusted
    os.utime(shard)
    with pytest.raises(UserError, match=rf"{shard} does not match the sha256 in manifest.json"):
        verify_dataset(data_dir)
    with pytest.raises(UserError, match=rf"{shard} does not match the sha256"):
        verify_dataset(data_dir, trust_stamps=False)


def test_every_split_is_checked_and_token_ids_are_range_checked(data_dir):
    val = shard_paths(data_dir, "val")[0]
    poke(val, 7, 50257)
    os.utime(val)
    with pytest.raises(UserError, match=rf"{val} contains token id 50257 >= 50257"):
        verify_dataset(data_dir)
    assert verify_dataset(data_dir, splits=("train",)).tokens == {
        "train": read_manifest(data_dir)["num_tokens"]["train"]
    }


def test_manifest_vocab_size_is_the_bound(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    biggest = max(int(read_shard(p).max()) for s in ("train", "val") for p in shard_paths(data_dir, s))
    manifest["vocab_size"] = biggest
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"contains token id {biggest} >= {biggest}"):
        verify_dataset(data_dir)


def test_shards_without_a_manifest_are_range_checked_only(data_dir):
    (data_dir / "manifest.json").unlink()
    report = verify_dataset(data_dir)
    assert len(report.without_checksum) == report.hashed > 0
    assert "without a sha256" in report.summary()


def test_read_only_directory_remembers_in_the_user_cache(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path / "cache"))

    def copy_dataset(mount):
        for p in data_dir.iterdir():
            if p.is_file() and not p.name.startswith("."):
                (mount / p.name).write_bytes(p.read_bytes())

    with tmpfs(tmp_path / "ro", size="4m", read_only=True, populate=copy_dataset) as ro:
        first = verify_dataset(ro)
        assert first.stamp is not None and first.stamp.is_relative_to(tmp_path / "cache")
        assert verify_dataset(ro).hashed == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"][1].pop("split"), r"manifest.json:\d+: shards\[1\] \(\S+\) needs a 'split'"),
        (lambda m: m["shards"][0].update(tokens=-1), r"shards\[0\] \(\S+\) needs 'tokens'"),
        (lambda m: m["shards"][0].update(sha256="xyz"), r"'sha256' that is not 64 lowercase hex"),
        (lambda m: m["shards"].append(m["shards"][0]), r"lists \S+ a second time"),
        (lambda m: m.update(vocab_size=0), r"manifest.json:1: 'vocab_size' must be an integer"),
        (lambda m: m.pop("shards"), r"manifest.json:1: not a manifest"),
    ],
)
def test_manifest_schema_errors_name_the_file_and_line(data_dir, edit, message):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    edit(manifest)
    (data_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(UserError, match=message):
        verify_dataset(data_dir)


def test_schema_error_line_is_the_entry_line(data_dir):
    text = (data_dir / "manifest.json").read_text()
    manifest = json.loads(text)
    del manifest["shards"][2]["split"]
    text = json.dumps(manifest, indent=2)
    (data_dir / "manifest.json").write_text(text)
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if manifest["shards"][2]["name"] in ln) - 1
    with pytest.raises(UserError, match=rf"manifest.json:{line}: shards\[2\]"):
        read_manifest(data_dir)
    (data_dir / "manifest.json").write_text(text[:-30])
    with pytest.raises(UserError, match=r"manifest.json:\d+: not valid JSON"):
        read_manifest(data_dir)


def test_prepare_verify_on_demand_ignores_stamps(data_dir, capsys):
    assert main(["prepare", "--verify", str(data_dir)]) == 0
    assert main(["prepare", "--verify", str(data_dir)]) == 0  # stamp written, but still re-read
    assert "0 unchanged since verified" in capsys.readouterr().out
    shard = shard_paths(data_dir, "train")[0]
    tokens = np.array(read_shard(shard))
    poke(shard, 0, (int(tokens[0]) + 1) % 50256)  # mtime restored: only a re-hash can tell
    assert main(["prepare", "--verify", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{shard} does not match the sha256" in err
