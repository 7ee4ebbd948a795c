"""Shard format, the TokenLoader's exactness/shuffling/resume/distributed contract, val batches, bad input."""

from __future__ import annotations

import hashlib
import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.data import (
    DOC_SHUFFLE_WINDOW,
    TokenLoader,
    read_shard,
    shard_paths,
    val_batches,
    write_shard,
)
from gpt2repro.errors import UserError

EOT = EOT_TOKEN_ID


def llmc_shard_bytes(tokens: list[int] | np.ndarray, *, magic=20240520, version=1, count=None) -> bytes:
    """An llm.c shard built by hand from its documented layout: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, version, len(tokens) if count is None else count)
    return header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes()


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_documents(num_docs: int, seed: int = 0) -> list[np.ndarray]:
    """Documents ``[EOT, ids…]`` whose non-EOT ids are all distinct: every token position is identifiable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, num_docs)
    ids = rng.permutation(np.arange(EOT))[: lengths.sum()]
    docs, start = [], 0
    for n in lengths:
        docs.append(np.concatenate([[EOT], ids[start : start + n]]).astype(np.uint16))
        start += n
    return docs


def write_dataset(tmp_path, stream: np.ndarray, cuts: list[int], *, val: np.ndarray | None = None):
    """Train shards holding ``stream`` cut at ``cuts`` (documents may span shards), plus a val shard."""
    bounds = [0, *cuts, len(stream)]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        write_shard(tmp_path / f"t_train_{i + 1:06d}.bin", stream[a:b])
    write_shard(tmp_path / "t_val_000000.bin", stream[:500] if val is None else val)
    return tmp_path


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    monkeypatch.setattr("gpt2repro.data.MAX_OPEN_SHARDS", 2)  # shard memory maps are closed and reopened
    docs = make_documents(120)
    stream = np.concatenate(docs)
    # Uneven shards: cuts inside documents and one exactly on a document boundary.
    eots = np.flatnonzero(stream == EOT)
    cuts = [401, int(eots[eots > 900][0]), 1700]
    assert stream[401] != EOT and stream[1700] != EOT
    return write_dataset(tmp_path, stream, cuts), stream


def global_stream(data_dir, world_size: int, batch_size: int, seq_len: int, steps: int, **kw):
    """All ranks' x and y, in rank order per step, flattened: the token stream the job as a whole saw."""
    loaders = [
        TokenLoader(data_dir, "train", batch_size, seq_len, rank=r, world_size=world_size, **kw)
        for r in range(world_size)
    ]
    xs, ys = [], []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == y.dtype == torch.int64
            xs.append(x.flatten())
            ys.append(y.flatten())
    return torch.cat(xs).numpy(), torch.cat(ys).numpy(), loaders


def test_llmc_shard_layout_matches_hand_written_header(tmp_path):
    tokens = np.array([EOT, 0, 1, 464, 3290, 50255, EOT], dtype=np.uint16)
    by_hand = tmp_path / "by_hand.bin"
    by_hand.write_bytes(llmc_shard_bytes(tokens))
    np.testing.assert_array_equal(read_shard(by_hand), tokens)
    ours = tmp_path / "ours.bin"
    digest = write_shard(ours, tokens.astype(np.int64))
    assert ours.read_bytes() == by_hand.read_bytes()
    assert digest == sha256_of(by_hand)
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_build_nanogpt_npy_shards_are_read(tmp_path):
    docs = make_documents(30, seed=3)
    stream = np.concatenate(docs)
    np.save(tmp_path / "edufineweb_val_000000.npy", stream[:100])
    np.save(tmp_path / "edufineweb_train_000001.npy", stream[:250])
    np.save(tmp_path / "edufineweb_train_000002.npy", stream[250:])
    np.testing.assert_array_equal(read_shard(tmp_path / "edufineweb_train_000002.npy"), stream[250:])
    x, y, _ = global_stream(tmp_path, 1, 2, 16, len(stream) // 32, shuffle=False)
    np.testing.assert_array_equal(x, stream[: len(x)])
    np.testing.assert_array_equal(y, stream[1 : len(x) + 1])


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_train_token_exactly_once_per_epoch(dataset, shuffle, world_size):
    data_dir, stream = dataset
    n = len(stream)
    batch, seq = 2, 13
    steps = 3 * n // (world_size * batch * seq) + 1  # a bit over three epochs, never aligned with their ends
    x, y, loaders = global_stream(data_dir, world_size, batch, seq, steps, shuffle=shuffle, seed=7)
    np.testing.assert_array_equal(y[:-1], x[1:])  # y is x shifted by one, across batches, shards and epochs
    epochs = [x[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:  # every token of the corpus exactly once (ids other than EOT are unique)
        np.testing.assert_array_equal(np.sort(epoch), np.sort(stream))
    if not shuffle:
        for epoch in epochs:
            np.testing.assert_array_equal(epoch, stream)
    else:
        assert not np.array_equal(epochs[0], stream)
        assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert all(loader.epoch == 3 for loader in loaders)


def test_shuffle_keeps_documents_intact_and_permutes_shards(dataset):
    data_dir, stream = dataset
    n = len(stream)
    x, _, _ = global_stream(data_dir, 1, 1, n - 1, 2, shuffle=True, seed=1)
    position = {int(t): i for i, t in enumerate(x[:n]) if t != EOT}
    shards = [read_shard(p) for p in shard_paths(data_dir, "train")]
    for shard in shards:
        starts = [0, *np.flatnonzero(shard == EOT)] if shard[0] != EOT else list(np.flatnonzero(shard == EOT))
        for a, b in zip(starts, [*starts[1:], len(shard)], strict=True):
            segment = shard[a:b]
            ids = [int(t) for t in segment if t != EOT]
            where = [position[t] for t in ids]
            assert where == list(range(where[0], where[0] + len(ids)))  # contiguous and in order
            if segment[0] == EOT:
                assert x[where[0] - 1] == EOT
    # Shards come out in a different order than their names in at least one of a few seeds.
    orders = []
    for seed in range(4):
        loader = TokenLoader(data_dir, "train", 1, 8, seed=seed)
        orders.append(loader.state_dict()["shard"])
    assert len(set(orders)) > 1


def test_document_shuffle_stays_within_windows(tmp_path, monkeypatch):
    monkeypatch.setattr("gpt2repro.data.DOC_SHUFFLE_WINDOW", 64)
    docs = make_documents(60, seed=5)
    stream = np.concatenate(docs)
    write_dataset(tmp_path, stream, [])
    n = len(stream)
    x, _, _ = global_stream(tmp_path, 1, 1, n - 1, 3, shuffle=True, seed=2)
    assert not np.array_equal(x[:n], x[n : 2 * n])  # one shard: only the document order differs per epoch
    x = x[:n]
    # Documents are grouped by the window their start falls in; groups keep their order.
    starts = np.flatnonzero(stream == EOT)
    group_of_id = {int(t): s // 64 for s, d in zip(starts, docs, strict=True) for t in d[1:]}
    groups_seen = [group_of_id[int(t)] for t in x if t != EOT]
    assert groups_seen == sorted(groups_seen)
    assert not np.array_equal(x[: len(stream)], stream)
    assert DOC_SHUFFLE_WINDOW >= 1 << 20  # the real window keeps ~a million tokens' worth of documents mixing


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_together_equal_one_process_with_world_size_times_the_batch(dataset, world_size):
    data_dir, _ = dataset
    batch, seq = 3, 11
    ranks = [
        TokenLoader(data_dir, "train", batch, seq, rank=r, world_size=world_size, seed=5)
        for r in range(world_size)
    ]
    single = TokenLoader(data_dir, "train", world_size * batch, seq, seed=5)
    for _ in range(40):  # crosses shard and epoch boundaries
        parts = [loader.next_batch() for loader in ranks]
        x, y = single.next_batch()
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), y, rtol=0, atol=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_yields_the_uninterrupted_batches(dataset, shuffle):
    data_dir, stream = dataset
    batch, seq, world_size = 2, 17, 2
    reference = [
        TokenLoader(data_dir, "train", batch, seq, rank=r, world_size=2, shuffle=shuffle) for r in (0, 1)
    ]
    expected = [[loader.next_batch() for loader in reference] for _ in range(90)]  # ~2.5 epochs
    for k in (0, 7, len(stream) // (world_size * batch * seq)):  # start, middle, right at an epoch end
        first = TokenLoader(data_dir, "train", batch, seq, rank=0, world_size=2, shuffle=shuffle)
        for _ in range(k):
            first.next_batch()
        state = pickle.loads(pickle.dumps(first.state_dict()))
        json.dumps(state)  # plain types only
        resumed = [
            TokenLoader(data_dir, "train", batch, seq, rank=r, world_size=2, shuffle=shuffle, seed=99)
            for r in (0, 1)
        ]
        for loader in resumed:
            loader.load_state_dict(state)
            assert loader.epoch == first.epoch
        for step in range(k, 90):
            for r, loader in enumerate(resumed):
                x, y = loader.next_batch()
                assert torch.equal(x, expected[step][r][0]) and torch.equal(y, expected[step][r][1])


def test_state_dict_names_the_position(dataset):
    data_dir, _ = dataset
    loader = TokenLoader(data_dir, "train", 4, 100, shuffle=False)
    loader.next_batch()
    state = loader.state_dict()
    assert state["position"] == 400 and state["epoch"] == 0
    assert state["shard"] == "t_train_000001.bin" and state["shard_offset"] == 400
    loader.next_batch()
    assert loader.state_dict()["shard"] == "t_train_000002.bin" and loader.state_dict()["shard_offset"] == 399


def test_shuffle_is_deterministic_given_seed(dataset):
    data_dir, _ = dataset
    a = [TokenLoader(data_dir, "train", 2, 50, seed=3) for _ in range(2)]
    b = TokenLoader(data_dir, "train", 2, 50, seed=4)
    batches = [[loader.next_batch()[0] for _ in range(30)] for loader in (*a, b)]
    assert all(torch.equal(p, q) for p, q in zip(batches[0], batches[1], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(batches[0], batches[2], strict=True))


def test_val_batches_are_fixed_and_split_across_ranks(dataset):
    data_dir, stream = dataset
    val = stream[:500]
    first = list(val_batches(data_dir, 2, 10))
    again = list(val_batches(data_dir, 2, 10))
    assert len(first) == (500 - 1) // 20
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    np.testing.assert_array_equal(torch.cat([x.flatten() for x, _ in first]).numpy(), val[: 20 * len(first)])
    np.testing.assert_array_equal(
        torch.cat([y.flatten() for _, y in first]).numpy(), val[1 : 20 * len(first) + 1]
    )
    ranks = [list(val_batches(data_dir, 1, 10, rank=r, world_size=2)) for r in (0, 1)]
    stacked = [torch.cat([r0[0], r1[0]]) for r0, r1 in zip(*ranks, strict=True)]
    assert all(torch.equal(s, x) for s, (x, _) in zip(stacked, first, strict=True))
    assert len(list(val_batches(data_dir, 2, 10, max_tokens=100))) == 5
    assert len(list(val_batches(data_dir, 2, 10, max_tokens=1))) == 1


# ---- bad input: one clear UserError naming the file and what to do ----


def test_missing_directory(tmp_path):
    with pytest.raises(UserError, match=r"does not exist.*gpt2repro prepare"):
        TokenLoader(tmp_path / "nope", "train", 1, 8)
    with pytest.raises(UserError, match="no val shards"):
        val_batches(tmp_path, 1, 8)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (llmc_shard_bytes([1, 2, 3], magic=12345), r"not a token shard \(header magic 12345"),
        (llmc_shard_bytes([1, 2, 3], version=2), "shard version 2"),
        (llmc_shard_bytes([1, 2, 3], count=4), r"truncated or corrupt: its header says 4 tokens"),
        (llmc_shard_bytes([1, 2, 3])[:-1], "truncated or corrupt"),
        (b"hello", "shorter than the 1024-byte header"),
    ],
)
def test_not_a_shard(tmp_path, content, message):
    path = tmp_path / "x_train_000001.bin"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        TokenLoader(tmp_path, "train", 1, 1)
    assert str(path) in str(info.value) and "gpt2repro prepare" in str(info.value)


def test_npy_of_wrong_dtype(tmp_path):
    np.save(tmp_path / "x_train_000001.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(UserError, match="must be a 1-D uint16 array"):
        read_shard(tmp_path / "x_train_000001.npy")


def test_token_id_outside_the_vocabulary(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    path.write_bytes(llmc_shard_bytes([EOT, 5, 6, 7, 50257, 8, 9, 10, 11]))
    loader = TokenLoader(tmp_path, "train", 1, 4, shuffle=False)
    with pytest.raises(UserError, match=r"x_train_000001.bin contains token id 50257"):
        loader.next_batch()
    with pytest.raises(UserError, match=r"token ids must be in \[0, 50257\)"):
        write_shard(tmp_path / "bad_train.bin", [1, 2, 60000])


def test_batch_larger_than_the_data(dataset):
    data_dir, stream = dataset
    with pytest.raises(UserError, match=r"one step needs world_size\*B\*T\+1"):
        TokenLoader(data_dir, "train", 1, len(stream), world_size=1)
    with pytest.raises(UserError, match="val tokens but one validation step needs"):
        val_batches(data_dir, 1, 500)
    TokenLoader(data_dir, "train", 1, len(stream) - 1)  # exactly enough


def test_stray_shard_not_in_manifest(dataset):
    data_dir, _ = dataset
    shards = [
        {"name": p.name, "split": split, "tokens": len(read_shard(p))}
        for split in ("train", "val")
        for p in shard_paths(data_dir, split)
    ]
    (data_dir / "manifest.json").write_text(json.dumps({"shards": shards}))
    TokenLoader(data_dir, "train", 1, 8)
    write_shard(data_dir / "old_train_000009.bin", [EOT, 1, 2])
    with pytest.raises(
        UserError, match=r"does not match the train shards.*old_train_000009.bin.*--overwrite"
    ):
        TokenLoader(data_dir, "train", 1, 8)


def test_state_from_other_data_is_refused(dataset, tmp_path_factory):
    data_dir, stream = dataset
    other = write_dataset(tmp_path_factory.mktemp("other"), stream[:-5], [])
    state = TokenLoader(other, "train", 1, 8).state_dict()
    with pytest.raises(UserError, match="resume with the data directory the run started with"):
        TokenLoader(data_dir, "train", 1, 8).load_state_dict(state)
    with pytest.raises(UserError, match="not made by TokenLoader"):
        TokenLoader(data_dir, "train", 1, 8).load_state_dict({"step": 3})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    num_docs=st.integers(1, 25),
    cut_fractions=st.lists(st.floats(0, 1), max_size=5),
    batch_size=st.integers(1, 3),
    seq_len=st.integers(1, 9),
    world_size=st.integers(1, 3),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_exactness_property(
    tmp_path_factory, num_docs, cut_fractions, batch_size, seq_len, world_size, shuffle, seed
):
    """Any shard layout (empty and one-token shards included), batch geometry, world size and seed."""
    docs = make_documents(num_docs, seed=seed % 1000)
    stream = np.concatenate(docs)
    n = len(stream)
    if n < world_size * batch_size * seq_len + 1:
        return
    cuts = sorted(int(f * n) for f in cut_fractions)
    data_dir = write_dataset(tmp_path_factory.mktemp("prop"), stream, cuts)
    steps = 2 * n // (world_size * batch_size * seq_len) + 2
    x, y, _ = global_stream(data_dir, world_size, batch_size, seq_len, steps, shuffle=shuffle, seed=seed)
    np.testing.assert_array_equal(y[:-1], x[1:])
    for epoch in (x[:n], x[n : 2 * n]):
        np.testing.assert_array_equal(np.sort(epoch), np.sort(stream))
        if not shuffle:
            np.testing.assert_array_equal(epoch, stream)
