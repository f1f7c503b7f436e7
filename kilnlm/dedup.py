"""Deduplication shared by both corpus builders: exact duplicates by a hash of normalised text
(``dedup_key``), near duplicates by MinHash signatures of word shingles bucketed with LSH
(``MinHasher``, ``NearDuplicateIndex``). The first copy in corpus order is kept.

Unlike the per-document filters (``kilnlm.filters``), these decide a document's fate by the
documents before it; both builders offer the same signatures in the same order, so they keep the
same representative of every cluster.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

if TYPE_CHECKING:  # kilnlm.data imports this module; the config is only read here
    from kilnlm.data import CorpusConfig


# --------------------------------------------------------------------------------------------
# Exact duplicates


def normalize_for_dedup(text: str) -> str:
    """Compatibility-normalised, case-folded, whitespace-collapsed text: the exact-dedup key."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup_key(text: str) -> bytes:
    """16-byte hash of ``normalize_for_dedup(text)``: equal keys are exact duplicates."""
    return hashlib.blake2b(normalize_for_dedup(text).encode("utf-8"), digest_size=16).digest()


# --------------------------------------------------------------------------------------------
# Near-duplicate detection: MinHash signatures + LSH banding


class MinHasher:
    """MinHash signatures of word-shingle sets.

    Words are hashed with CRC-32 (stable across processes, unlike ``hash``); a shingle of k words
    is a random linear combination of their hashes; each of ``num_perm`` hash functions is
    multiply-add-shift ``(a·x + b) >> 32`` over 64-bit words, a universal family for 32-bit keys.
    """

    _CHUNK = 4096  # shingles per block: bounds memory at CHUNK x num_perm x 8 bytes

    def __init__(self, num_perm: int, shingle_size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        high = np.iinfo(np.uint64).max
        self.shingle_size = shingle_size
        self._mix = rng.integers(1, high, size=shingle_size, dtype=np.uint64, endpoint=True) | 1
        self._a = rng.integers(1, high, size=num_perm, dtype=np.uint64, endpoint=True) | 1
        self._b = rng.integers(0, high, size=num_perm, dtype=np.uint64, endpoint=True)

    def shingles(self, text: str) -> np.ndarray:
        """Unique 32-bit hashes of the text's k-word shingles (the whole text if shorter), (S,)."""
        words = re.findall(r"\w+", text.casefold())
        if not words:
            return np.zeros(0, dtype=np.uint64)
        table = {w: zlib.crc32(w.encode("utf-8")) for w in set(words)}
        ids = np.fromiter((table[w] for w in words), dtype=np.uint64, count=len(words))
        k = min(self.shingle_size, len(ids))
        n = len(ids) - k + 1
        acc = np.zeros(n, dtype=np.uint64)
        for j in range(k):  # (S,): sum_j mix_j * word_{i+j}, wrapping mod 2^64
            acc += ids[j : j + n] * self._mix[j]
        return np.unique(acc >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray | None:
        """(num_perm,) uint32 minimum of each hash function over the shingles; None if no words."""
        sh = self.shingles(text)
        if sh.size == 0:
            return None
        sig = np.full(self._a.shape, np.iinfo(np.uint64).max, dtype=np.uint64)
        for i in range(0, sh.size, self._CHUNK):
            block = sh[i : i + self._CHUNK, None] * self._a + self._b  # (C, P) wrapping
            np.minimum(sig, (block >> np.uint64(32)).min(axis=0), out=sig)
        return sig.astype(np.uint32)


def lsh_bands(num_perm: int, threshold: float, min_recall: float = 0.95) -> tuple[int, int]:
    """(bands, rows): the most rows per band such that a pair at ``threshold`` still collides in
    some band with probability >= ``min_recall``.

    More rows means fewer false candidates to verify; the recall floor keeps pairs just above the
    threshold from slipping through. Candidates are then verified on the full signature.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= min_recall:
            best = (bands, rows)
    return best


class NearDuplicateIndex:
    """Greedy keep-first near-duplicate detection over signatures offered in corpus order.

    Each signature is compared only with kept ones that share an LSH band bucket, so the cost
    grows with the number of candidates, not with n². Both builders feed it the same signatures
    in the same order, so they keep the same representative of every cluster.
    """

    def __init__(self, num_perm: int, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows = lsh_bands(num_perm, threshold)
        self._buckets: list[dict[bytes, list[int]]] = [{} for _ in range(self.bands)]
        self._kept: list[np.ndarray] = []

    def is_duplicate(self, sig: np.ndarray | None) -> bool:
        """True when ``sig`` is near a kept signature; else keep it (None: no words, kept)."""
        if sig is None:
            return False
        rows = self.rows
        keys = [sig[b * rows : (b + 1) * rows].tobytes() for b in range(self.bands)]
        candidates = {j for b, key in enumerate(keys) for j in self._buckets[b].get(key, ())}
        if candidates:
            cand = np.stack([self._kept[j] for j in sorted(candidates)])  # (C, P)
            if (cand == sig).mean(axis=1).max() >= self.threshold:
                return True
        for b, key in enumerate(keys):
            self._buckets[b].setdefault(key, []).append(len(self._kept))
        self._kept.append(sig)
        return False


def near_duplicate_mask(
    texts: Sequence[str], cfg: CorpusConfig, progress: bool = False
) -> list[bool]:
    """True for each text whose estimated Jaccard with an EARLIER kept text is >= the threshold."""
    hasher = MinHasher(cfg.num_perm, cfg.shingle_size, cfg.minhash_seed)
    index = NearDuplicateIndex(cfg.num_perm, cfg.near_dup_threshold)
    texts = tqdm(texts, desc="near-dedup", unit="doc", disable=not progress)
    return [index.is_duplicate(hasher.signature(text)) for text in texts]
