"""A built corpus on disk and how training and evaluation read it.

``build_corpus`` (``kilnlm.data``) or ``kiln corpus`` writes ``manifest.json`` (a
``CorpusManifest``) beside shard files of raw little-endian token ids. ``TokenShards`` reads any
slice of a split through memory maps, ``sample_split`` takes an evaluation sample spread over a
split, and ``get_batch`` turns a split into reproducible training batches for any (step, rank).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kilnlm.filters import FilterStats

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardInfo:
    """One file of a split."""

    file: str
    """File name relative to the corpus directory."""
    n_tokens: int


@dataclass
class SplitInfo:
    """One split (train or heldout): its size and its shard files, in stream order."""

    n_documents: int
    n_tokens: int
    """Token ids in the stream, one ``<|eos|>`` per document included."""
    n_bytes: int
    """UTF-8 bytes of the documents' text (separators excluded): the denominator of bits per byte."""
    shards: list[ShardInfo]


@dataclass
class CorpusManifest:
    """Everything a reader needs to know about a built corpus; stored as ``manifest.json``."""

    vocab_size: int
    dtype: str
    eos_id: int
    tokenizer_file: str
    splits: dict[str, SplitInfo]
    stats: FilterStats
    config: dict[str, Any]
    fingerprint: str
    """Hash of the config, vocab size, source files and tool versions: equal means reusable."""
    build_seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage (read, clean, tokenizer, encode), to see where a build goes."""
    format_version: int = FORMAT_VERSION

    def save(self, out_dir: str | Path) -> Path:
        """Write ``manifest.json`` atomically (temp file + rename): readers never see half of it."""
        path = Path(out_dir) / MANIFEST_NAME
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> CorpusManifest:
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir}; build it with build_corpus")
        raw = json.loads(path.read_text(encoding="utf-8"))
        splits = {
            name: SplitInfo(**{**s, "shards": [ShardInfo(**x) for x in s["shards"]]})
            for name, s in raw.pop("splits").items()
        }
        return cls(splits=splits, stats=FilterStats(**raw.pop("stats")), **raw)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------
# Reading shards


class TokenShards:
    """One split of a built corpus as a single random-access array of token ids, memory-mapped.

    Shards are opened lazily and only the pages a read touches are loaded. Pickles without its
    memory maps (workers reopen the files), so it can be handed to Ray workers on a shared disk.
    """

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root, self.split = Path(root), split
        manifest = CorpusManifest.load(self.root)
        if split not in manifest.splits:
            raise ValueError(f"unknown split {split!r}; this corpus has {sorted(manifest.splits)}")
        info = manifest.splits[split]
        self.vocab_size, self.eos_id = manifest.vocab_size, manifest.eos_id
        self.n_documents, self._n_bytes = info.n_documents, info.n_bytes
        self._dtype = np.dtype(manifest.dtype).newbyteorder("<")
        self._files = [self.root / s.file for s in info.shards]
        counts = np.array([s.n_tokens for s in info.shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # (n_shards + 1,)
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def bytes_of_text(self) -> int:
        """UTF-8 bytes of the split's text: bits per byte = total nats / (ln 2 · bytes_of_text)."""
        return self._n_bytes

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def read(self, start: int, n: int) -> np.ndarray:
        """Ids ``[start, start + n)`` as a new array of the stored dtype, across shard boundaries."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(
                f"read({start}, {n}) is outside the {self.split} split of {len(self)} tokens"
            )
        out = np.empty(n, dtype=self._dtype)
        pos, end = start, start + n
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        while pos < end:
            local, take_n = pos - self._starts[shard], min(end, self._starts[shard + 1]) - pos
            out[pos - start : pos - start + take_n] = self._map(shard)[local : local + take_n]
            pos, shard = pos + take_n, shard + 1
        return out

    def _map(self, i: int) -> np.memmap:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(self._files[i], dtype=self._dtype, mode="r")
        return self._maps[i]

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the memory maps: a pickle (to a Ray worker) stays a few hundred bytes
        whatever the split's size, and the copy reopens the files on its first read."""
        return {**self.__dict__, "_maps": [None] * len(self._files)}


SAMPLE_CHUNK_TOKENS = 1024
"""``sample_split`` reads in chunks of this many tokens: long enough that the cuts between
chunks cost a model little context, short enough to reach many documents."""


def spread_slices(n: int, budget: int, chunk: int = SAMPLE_CHUNK_TOKENS) -> list[tuple[int, int]]:
    """(start, end) slices of ``range(n)`` that total min(n, budget) tokens: all of it when it
    fits, else ceil(budget / chunk) equal chunks starting at evenly spaced offsets (they never
    overlap, since each is at most n / chunks long)."""
    if n <= budget:
        return [(0, n)]
    k = -(-budget // chunk)
    sizes = [budget // k + (i < budget % k) for i in range(k)]
    return [(i * n // k, i * n // k + size) for i, size in enumerate(sizes)]


def sample_split(shards: TokenShards, budget: int, chunk: int = SAMPLE_CHUNK_TOKENS) -> np.ndarray:
    """At most ``budget`` ids of a split for evaluation, spread over all of it (``spread_slices``):
    the first ``budget`` ids alone would be its first one or two documents."""
    parts = [shards.read(a, b - a) for a, b in spread_slices(len(shards), budget, chunk)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=shards.dtype)


# --------------------------------------------------------------------------------------------
# Batches


def steps_per_epoch(n_tokens: int, batch_size: int, seq_len: int, world_size: int = 1) -> int:
    """Global steps before ``get_batch`` starts a new shuffled pass over the windows."""
    return ((n_tokens - 1) // seq_len) // (batch_size * world_size)


@lru_cache(maxsize=4)
def _window_order(n_windows: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation of the windows, fixed by (seed, epoch); cached because every step reuses it."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def get_batch(
    shards: TokenShards,
    batch_size: int,
    seq_len: int,
    step: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (batch_size, seq_len) int64, for one (step, rank).

    The stream is cut into windows ``[k·seq_len, k·seq_len + seq_len + 1)`` (windows may span
    documents; ``<|eos|>`` marks the seams). Each epoch visits the windows in a permutation fixed
    by (seed, epoch); global step s takes the next ``world_size · batch_size`` of them and rank r
    gets its own contiguous ``batch_size`` slice. Hence: the same (step, rank, seed) always gives
    the same batch, whatever ran before (resume = just pass the step); ranks of one step never
    share a window; an epoch never repeats a window. Windows left over after the last full global
    batch of an epoch are skipped that epoch (a different set each time).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if batch_size < 1 or seq_len < 1 or step < 0:
        raise ValueError(
            f"need batch_size >= 1, seq_len >= 1, step >= 0; got {batch_size}, {seq_len}, {step}"
        )
    per_epoch = steps_per_epoch(len(shards), batch_size, seq_len, world_size)
    if per_epoch == 0:
        raise ValueError(
            f"the {shards.split} split has {len(shards)} tokens, fewer than one global batch of "
            f"{world_size}x{batch_size} windows of {seq_len + 1}; use a smaller batch_size or "
            "seq_len, or a bigger corpus"
        )
    epoch, step_in_epoch = divmod(step, per_epoch)
    order = _window_order((len(shards) - 1) // seq_len, seed, epoch)
    first = (step_in_epoch * world_size + rank) * batch_size
    rows = [shards.read(int(k) * seq_len, seq_len + 1) for k in order[first : first + batch_size]]
    data = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()
