"""GPT-2 token shards on disk and the loader that streams them into training.

Shard format (llm.c's, so shards are interchangeable with llm.c and modded-nanogpt): a header of 256
little-endian int32 (``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count, the rest zero), then
the tokens as uint16. build-nanogpt's ``.npy`` shards (``np.save`` of a 1-D uint16 array) are read too.
A prepared directory holds ``*train*.bin`` and ``*val*.bin`` shards plus ``manifest.json``.

The loader's stream, precisely (this is what makes "every token exactly once per epoch" testable):

* **Epoch stream.** Epoch ``e`` is the concatenation of the train shards in that epoch's order; with
  ``shuffle=True`` the shard order is a permutation seeded by ``(seed, e)``, and inside each shard the
  documents (a document starts at an ``<|endoftext|>`` token; tokens before a shard's first EOT are the tail
  of a document split across shards and count as one document) are permuted within consecutive windows of
  ``DOC_SHUFFLE_WINDOW`` tokens, seeded by ``(seed, e, shard)``. ``shuffle=False`` is the shards in name
  order, untouched. Every epoch stream is a permutation of the same ``N`` tokens.
* **Infinite stream.** The epoch streams are concatenated: epoch 0, epoch 1, … Nothing is dropped at shard or
  epoch ends; a batch that straddles the end of an epoch simply continues into the next one (carry over).
* **Windows.** Window ``k`` is the ``B*T+1`` tokens at positions ``[k*B*T, k*B*T + B*T + 1)`` of the infinite
  stream; ``x`` is its first ``B*T`` tokens and ``y`` its last ``B*T`` (consecutive windows overlap by one
  token), so every token of every epoch is in exactly one ``x`` and is the target after its predecessor.
* **Ranks.** Step ``s`` of rank ``r`` of ``W`` reads window ``s*W + r``: the ``W`` ranks' batches stacked in
  rank order are exactly the batch of one process with batch size ``W*B``.
* **State.** The whole position is one integer, the stream position of the next step (plus the seed and
  shuffle flag), so a resumed loader yields exactly the batches an uninterrupted one would, even with a
  different world size or batch size.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2repro.config import EOT_TOKEN_ID
from gpt2repro.errors import UserError
from gpt2repro.manifest import MANIFEST_NAME, SPLITS, read_manifest

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VOCAB_SIZE = EOT_TOKEN_ID + 1  # GPT-2 token ids are 0..50256
# Documents are shuffled within windows of this many tokens of a shard (~16 MB of uint16): reads stay local in
# the memory map while the order within a window is fully random.
DOC_SHUFFLE_WINDOW = 1 << 23
MAX_OPEN_SHARDS = 8

PathLike = str | os.PathLike


def write_shard(path: PathLike, tokens: np.ndarray | list[int]) -> str:
    """Write ``tokens`` as an llm.c shard at ``path`` (temp file + rename); returns the file's sha256."""
    path = Path(path)
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"write_shard expects a 1-D token array, got shape {array.shape}")
    if array.size and (int(array.min()) < 0 or int(array.max()) >= VOCAB_SIZE):
        raise UserError(
            f"cannot write {path}: token ids must be in [0, {VOCAB_SIZE}) for GPT-2, "
            f"got range [{int(array.min())}, {int(array.max())}]"
        )
    array = np.ascontiguousarray(array, dtype="<u2")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, array.size)
    digest = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            for part in (header.tobytes(), memoryview(array).cast("B")):
                digest.update(part)
                f.write(part)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def read_shard(path: PathLike) -> np.ndarray:
    """The tokens of an llm.c ``.bin`` or build-nanogpt ``.npy`` shard as a read-only uint16 memory map."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard {path} does not exist: check the path or re-run `gpt2repro prepare`")
    if path.suffix == ".npy":
        return _read_npy_shard(path)
    size = path.stat().st_size
    redo = "re-create it with `gpt2repro prepare`"
    if size < HEADER_BYTES:
        raise UserError(
            f"{path} is not a token shard: {size} bytes is shorter than the {HEADER_BYTES}-byte header; "
            f"{redo}"
        )
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise UserError(f"{path} is not a token shard (header magic {magic}, expected {SHARD_MAGIC}); {redo}")
    if version != SHARD_VERSION:
        raise UserError(
            f"{path} is shard version {version}; only version {SHARD_VERSION} (uint16 GPT-2 tokens) is "
            f"supported; {redo}"
        )
    if count < 0 or HEADER_BYTES + 2 * count != size:
        raise UserError(
            f"{path} is truncated or corrupt: its header says {count} tokens "
            f"({HEADER_BYTES + 2 * count} bytes) but the file has {size} bytes; {redo}"
        )
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def _read_npy_shard(path: Path) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable .npy token shard ({e}); re-create it") from e
    if array.ndim != 1 or array.dtype != np.uint16:
        raise UserError(
            f"{path} holds a {array.dtype} array of shape {array.shape}; a .npy shard must be a 1-D "
            "uint16 array (build-nanogpt's format)"
        )
    return array


def bad_token_message(path: PathLike, token: int, vocab_size: int = VOCAB_SIZE) -> str:
    return (
        f"{path} contains token id {token} >= {vocab_size} (the vocabulary): the file is corrupt or was made "
        "with another tokenizer; re-create it with `gpt2repro prepare`"
    )


def shard_paths(data_dir: PathLike, split: str) -> list[Path]:
    """The ``split`` shards of ``data_dir`` (``*train*.bin``/``.npy`` or ``*val*``), sorted by name."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(
            f"data directory {data_dir} does not exist: create it with "
            f"`gpt2repro prepare --source embedded --out {data_dir}` (or --source files/fineweb-edu)"
        )
    paths = sorted(
        p
        for p in data_dir.iterdir()
        if split in p.name and p.suffix in (".bin", ".npy") and not p.name.startswith(".") and p.is_file()
    )
    if not paths:
        raise UserError(
            f"no {split} shards (*{split}*.bin or *{split}*.npy) in {data_dir}: "
            f"run `gpt2repro prepare … --out {data_dir}` first"
        )
    _check_manifest(data_dir, split, paths)
    return paths


def _check_manifest(data_dir: Path, split: str, paths: list[Path]) -> None:
    """Shards left over from another run must not be mixed silently into a prepared dataset."""
    manifest = read_manifest(data_dir)
    if manifest is None:
        return
    listed = sorted(s["name"] for s in manifest["shards"] if s["split"] == split)
    found = [p.name for p in paths]
    if listed != found:
        extra, missing = sorted(set(found) - set(listed)), sorted(set(listed) - set(found))
        raise UserError(
            f"{data_dir / MANIFEST_NAME} does not match the {split} shards on disk (not listed: {extra}, "
            f"missing: {missing}); remove stray files or re-run "
            f"`gpt2repro prepare --overwrite --out {data_dir}`"
        )


class _ShardStream:
    """Some shards concatenated, in a per-epoch (optionally shuffled) order; see the module doc."""

    def __init__(self, paths: list[Path], *, shuffle: bool, seed: int):
        self.paths = paths
        self.sizes = np.array([len(read_shard(p)) for p in paths], dtype=np.int64)  # validates every header
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.num_tokens = int(self.sizes.sum())
        self.shuffle = shuffle
        self.seed = seed
        self._orders: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._layouts: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def tokens(self, shard: int) -> np.ndarray:
        """The memory map of one shard; only the few most recent stay open (each holds a file descriptor)."""
        if shard not in self._open:
            self._open[shard] = read_shard(self.paths[shard])
            while len(self._open) > MAX_OPEN_SHARDS:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard indices in this epoch's order, their start positions in the epoch stream + the end)."""
        if epoch not in self._orders:
            n = len(self.paths)
            order = (
                np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
            )
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
            self._orders[epoch] = (order, starts)
            while len(self._orders) > 2:
                self._orders.popitem(last=False)
        return self._orders[epoch]

    def _doc_layout(self, epoch: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(segment start positions in the shuffled shard + the end, source index minus shuffled position)."""
        key = (epoch, shard)
        if key not in self._layouts:
            tokens = self.tokens(shard)
            seg_starts = np.flatnonzero(tokens == EOT_TOKEN_ID)
            if len(seg_starts) == 0 or seg_starts[0] != 0:
                seg_starts = np.concatenate([[0], seg_starts])
            seg_lens = np.diff(np.append(seg_starts, len(tokens)))
            rng = np.random.default_rng([self.seed, epoch, 1, shard])
            order = np.lexsort((rng.random(len(seg_starts)), seg_starts // DOC_SHUFFLE_WINDOW))
            cum = np.concatenate([[0], np.cumsum(seg_lens[order])])
            self._layouts[key] = (cum, seg_starts[order] - cum[:-1])
            while len(self._layouts) > 4:
                self._layouts.popitem(last=False)
        return self._layouts[key]

    def _read_shard_range(self, epoch: int, shard: int, a: int, b: int) -> np.ndarray:
        tokens = self.tokens(shard)
        if not self.shuffle:
            return tokens[a:b]
        cum, delta = self._doc_layout(epoch, shard)
        i0 = int(np.searchsorted(cum, a, side="right")) - 1
        i1 = int(np.searchsorted(cum, b, side="left"))
        if i1 - i0 == 1:  # inside one document: a plain slice
            return tokens[a + delta[i0] : b + delta[i0]]
        counts = np.minimum(cum[i0 + 1 : i1 + 1], b) - np.maximum(cum[i0:i1], a)
        return tokens[np.arange(a, b) + np.repeat(delta[i0:i1], counts)]

    def read(self, position: int, length: int) -> np.ndarray:
        """``length`` tokens of the infinite stream from ``position`` (epoch ``position // num_tokens``)."""
        out = np.empty(length, dtype=np.uint16)
        filled = 0
        while filled < length:
            epoch, offset = divmod(position + filled, self.num_tokens)
            order, starts = self.epoch_order(epoch)
            k = int(np.searchsorted(starts, offset, side="right")) - 1
            take = min(length - filled, int(starts[k + 1]) - offset)
            a = offset - int(starts[k])
            chunk = self._read_shard_range(epoch, int(order[k]), a, a + take)
            if int(chunk.max()) >= VOCAB_SIZE:
                raise UserError(bad_token_message(self.paths[order[k]], int(chunk.max())))
            out[filled : filled + take] = chunk
            filled += take
        return out

    def locate(self, position: int) -> tuple[int, str, int]:
        """(epoch, shard file name, offset in the shard's epoch order) of a stream position (for humans)."""
        epoch, offset = divmod(position, self.num_tokens)
        order, starts = self.epoch_order(epoch)
        k = int(np.searchsorted(starts, offset, side="right")) - 1
        return epoch, self.paths[order[k]].name, offset - int(starts[k])


def _to_batch(window: np.ndarray, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(window.astype(np.int64))
    return t[:-1].view(batch_size, seq_len), t[1:].view(batch_size, seq_len)


def _check_batch_options(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world size {world_size}")


class TokenLoader:
    """Batches ``(x, y)`` of shape ``(B, T)`` (int64, CPU) from memory-mapped shards; see the module doc."""

    def __init__(
        self,
        data_dir: PathLike,
        split: str,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 1337,
    ):
        _check_batch_options(batch_size, seq_len, rank, world_size)
        if not isinstance(seed, int) or seed < 0:
            raise UserError(f"the data seed must be a non-negative integer, got {seed!r}")
        self.data_dir = Path(data_dir)
        self.split = split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self._stream = _ShardStream(shard_paths(data_dir, split), shuffle=shuffle, seed=seed)
        need = world_size * batch_size * seq_len + 1
        if self._stream.num_tokens < need:
            raise UserError(
                f"{self.data_dir} has {self._stream.num_tokens} {split} tokens but one step needs "
                f"world_size*B*T+1 = {world_size}*{batch_size}*{seq_len}+1 = {need}: lower the batch size "
                "or sequence length, or prepare more data"
            )
        self.position = 0  # stream position of the next step's first token (rank 0's window)

    @property
    def num_tokens(self) -> int:
        """Tokens in one epoch."""
        return self._stream.num_tokens

    @property
    def epoch(self) -> int:
        """The epoch that the next batch starts in."""
        return self.position // self._stream.num_tokens

    @property
    def shuffle(self) -> bool:
        return self._stream.shuffle

    @property
    def seed(self) -> int:
        return self._stream.seed

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_per_batch = self.batch_size * self.seq_len
        start = self.position + self.rank * tokens_per_batch
        window = self._stream.read(start, tokens_per_batch + 1)
        self.position += self.world_size * tokens_per_batch
        return _to_batch(window, self.batch_size, self.seq_len)

    def state_dict(self) -> dict:
        """Plain types only. ``position`` is what matters; epoch/shard/offset are for humans."""
        epoch, shard, offset = self._stream.locate(self.position)
        return {
            "version": 1,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": epoch,
            "shard": shard,
            "shard_offset": offset,
            "num_tokens": self.num_tokens,
            "num_shards": len(self._stream.paths),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken (its seed and shuffle flag override the arguments)."""
        try:
            position, seed, shuffle = int(state["position"]), int(state["seed"]), bool(state["shuffle"])
            num_tokens, num_shards = int(state["num_tokens"]), int(state["num_shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(
                f"the saved data-loader state is incomplete ({e!r}); it was not made by TokenLoader"
            ) from e
        if (num_tokens, num_shards) != (self.num_tokens, len(self._stream.paths)):
            raise UserError(
                f"the saved loader state is for {num_tokens} {self.split} tokens in {num_shards} shards, "
                f"but {self.data_dir} has {self.num_tokens} tokens in {len(self._stream.paths)} shards: "
                "resume with the data directory the run started with"
            )
        if (seed, shuffle) != (self.seed, self.shuffle):
            self._stream = _ShardStream(self._stream.paths, shuffle=shuffle, seed=seed)
        self.position = position


def val_batches(
    data_dir: PathLike,
    batch_size: int,
    seq_len: int,
    *,
    max_tokens: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation batches: the same fixed tokens on every call, never shuffled.

    The val stream (val shards in name order) is cut into global steps of ``world_size*B*T`` tokens exactly as
    the train stream is; as many whole steps as fit (keeping the one extra target token), at most
    ``max_tokens // (world_size*B*T)`` of them when ``max_tokens`` is given (but at least one).
    """
    _check_batch_options(batch_size, seq_len, rank, world_size)
    stream = _ShardStream(shard_paths(data_dir, "val"), shuffle=False, seed=0)
    tokens_per_batch = batch_size * seq_len
    steps = (stream.num_tokens - 1) // (world_size * tokens_per_batch)
    if steps == 0:
        raise UserError(
            f"{data_dir} has {stream.num_tokens} val tokens but one validation step needs world_size*B*T+1 = "
            f"{world_size * tokens_per_batch + 1}: lower the batch size, or prepare with more --val-tokens"
        )
    if max_tokens is not None:
        steps = min(steps, max(1, max_tokens // (world_size * tokens_per_batch)))

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(steps):
            start = (step * world_size + rank) * tokens_per_batch
            yield _to_batch(stream.read(start, tokens_per_batch + 1), batch_size, seq_len)

    return batches()
