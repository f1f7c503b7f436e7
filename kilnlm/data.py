"""The corpus pipeline: read text, filter it, deduplicate it, split it, tokenize it, pack it.

``build_corpus`` runs every stage and writes one directory::

    out_dir/
      tokenizer.json            byte-level BPE trained on the train split only
      train_00000.bin ...       token ids, raw little-endian uint16 (uint32 above 65536 ids)
      heldout_00000.bin ...
      manifest.json             written last and atomically: its presence means "complete"

Each split is one stream of token ids in which every document is followed by ``<|eos|>``, cut
into shards of at most ``shard_tokens`` ids so a reader memory-maps only what it touches.
Reading the sources is ``kilnlm.documents``; reading the built directory (``TokenShards``,
``get_batch``) is ``kilnlm.shards``.

The default corpus is the Python standard library's own sources (docstrings included), found
through ``sysconfig``: every machine with Python has it, so the main job needs no download.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tqdm.auto import tqdm

from kilnlm.dedup import dedup_key, near_duplicate_mask
from kilnlm.documents import (
    Document,
    _list_files,
    _stdlib_files,
    default_corpus,
    hash64,
    iter_documents,
    take,
)
from kilnlm.filters import FilterStats, clean_text
from kilnlm.fim import FimConfig, encode_documents
from kilnlm.shards import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CorpusManifest,
    ShardInfo,
    SplitInfo,
    token_dtype,
)
from kilnlm.tokenizer import Tokenizer

TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "heldout")


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class CorpusConfig:
    """What goes into the corpus and how it is cleaned. Every field is part of the reuse key."""

    sources: list[str] = field(default_factory=list)
    """Files or folders of .txt/.md/.py/.jsonl; empty means the default corpus (the stdlib)."""
    include_stdlib_tests: bool = False
    """Default corpus only: also read the stdlib's test suites (off: see documents._STDLIB_TEST_DIRS)."""
    min_chars: int = 200
    """Documents shorter than this are dropped (empty ``__init__.py`` files, stubs)."""
    max_chars: int = 1_000_000
    """Documents longer than this are dropped (generated tables, dumps)."""
    max_non_text_ratio: float = 0.01
    """Drop a document when more than this share of its characters are controls, U+FFFD, private-use
    or unassigned code points (binary files, wrongly decoded text)."""
    max_repeated_line_ratio: float = 0.5
    """Drop a document when more than this share of its non-blank lines repeat an earlier line."""
    drop_generated: bool = True
    """Drop documents whose first lines say a program wrote them ("auto-generated", "do not
    edit", "generated from X with gencodec.py"), as StarCoder's data pipeline does: codec tables
    and enumerations teach a model little, and a count model memorises their long repeats, so
    they would skew a held-out comparison towards it."""
    strip_boilerplate: bool = True
    """Remove licence and copyright paragraphs from the comment block a file starts with
    (``filters.strip_license_header``): repeated verbatim across files, they teach nothing."""
    redact_pii: bool = True
    """Replace e-mail addresses, public IP addresses and keys/secrets with ``<EMAIL>``,
    ``<IP_ADDRESS>``, ``<KEY>`` (``filters.redact_pii``), as StarCoder's pipeline does."""
    safety_threshold: float = 0.01
    """Drop a document when more than this share of its words are on the safety word list
    (``filters.unsafe_ratio``): 0 drops any document with one listed word (C4's rule), 1 keeps
    all. At 0.01 a stray oath in a code comment passes; a page that is 1 % explicit words does not."""
    safety_words_file: str | None = None
    """A word list (one per line) replacing the built-in ``filters.SAFETY_WORDS``."""
    num_perm: int = 128
    """MinHash permutations (signature length) for near-duplicate detection."""
    shingle_size: int = 5
    """Words per shingle for MinHash."""
    near_dup_threshold: float = 0.8
    """Estimated Jaccard similarity of shingle sets at or above which a later document is dropped."""
    minhash_seed: int = 0
    heldout_fraction: float = 0.05
    """Share of documents (chosen by hash of their text) kept out of training for evaluation."""
    max_documents: int | None = None
    """Read at most this many documents (before filtering); None = no cap."""
    max_bytes: int | None = None
    """Read documents while their UTF-8 bytes fit in this budget (before filtering); None = no cap."""
    shard_tokens: int = 1 << 24
    """Token ids per shard file (16M ids = 32 MiB in uint16)."""
    tokenizer_max_bytes: int | None = 100_000_000
    """Train the tokenizer on at most this many bytes of the train split (BPE training is memory-hungry)."""
    fim_rate: float = 0.0
    """Share of train documents rearranged for fill-in-the-middle (``kilnlm.fim``); 0 = off."""
    fim_spm_rate: float = 0.5
    """Share of the rearranged documents in suffix–prefix–middle order (the rest prefix first)."""
    fim_seed: int = 0
    """Seed of the per-document FIM draws (the same corpus on every build)."""

    @property
    def fim(self) -> FimConfig:
        return FimConfig(self.fim_rate, self.fim_spm_rate, self.fim_seed)

    def __post_init__(self) -> None:
        self.sources = [str(s) for s in self.sources]
        _check(self.min_chars >= 0, "min_chars", "must be >= 0", self.min_chars)
        _check(self.max_chars > self.min_chars, "max_chars", "must be > min_chars", self.max_chars)
        for name in ("max_non_text_ratio", "max_repeated_line_ratio", "safety_threshold"):
            _check(
                0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]", getattr(self, name)
            )
        _check(self.num_perm >= 8, "num_perm", "must be >= 8", self.num_perm)
        _check(self.shingle_size >= 1, "shingle_size", "must be >= 1", self.shingle_size)
        t = self.near_dup_threshold
        _check(0.0 < t <= 1.0, "near_dup_threshold", "must be in (0, 1]", t)
        f = self.heldout_fraction
        _check(0.0 <= f < 1.0, "heldout_fraction", "must be in [0, 1)", f)
        for name in ("max_documents", "max_bytes", "tokenizer_max_bytes"):
            value = getattr(self, name)
            _check(value is None or value > 0, name, "must be > 0 or None (no cap)", value)
        _check(self.shard_tokens > 0, "shard_tokens", "must be > 0", self.shard_tokens)
        for name in ("fim_rate", "fim_spm_rate"):
            _check(
                0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]", getattr(self, name)
            )


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"CorpusConfig.{name} {rule}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Reading (the readers themselves live in kilnlm.documents, shared with `kiln corpus`)


def read_corpus(cfg: CorpusConfig) -> Iterator[Document]:
    """The documents ``cfg`` names, caps applied (the default corpus when ``sources`` is empty)."""
    if not cfg.sources:
        return default_corpus(cfg.max_documents, cfg.max_bytes, cfg.include_stdlib_tests)
    return take(iter_documents(cfg.sources), cfg.max_documents, cfg.max_bytes)


# --------------------------------------------------------------------------------------------
# Cleaning (the filters themselves live in kilnlm.filters, shared with `kiln corpus`)


def clean(
    docs: Iterable[Document], cfg: CorpusConfig, progress: bool = False
) -> tuple[list[Document], FilterStats]:
    """Per-document filters and redaction (``filters.clean_text``), then exact dedup (normalised
    text), then MinHash near dedup; the first copy in corpus order is kept."""
    stats = FilterStats()
    survivors: list[Document] = []
    seen: set[bytes] = set()
    for doc in docs:
        result = clean_text(doc.text, cfg)
        stats.add(result)
        if result.reason is not None:
            continue
        key = dedup_key(result.text)
        if key in seen:
            stats.exact_duplicates += 1
            continue
        seen.add(key)
        survivors.append(Document(result.text, doc.source))
    dup = near_duplicate_mask([d.text for d in survivors], cfg, progress)
    kept = [d for d, is_dup in zip(survivors, dup, strict=True) if not is_dup]
    stats.near_duplicates = len(survivors) - len(kept)
    stats.n_kept = len(kept)
    stats.bytes_kept = sum(len(d.text.encode("utf-8")) for d in kept)
    return kept, stats


# --------------------------------------------------------------------------------------------
# Held-out split


def heldout_score(text: str) -> float:
    """A stable number in [0, 1) from the document's text: below the fraction means held-out."""
    return hash64(text) / 2**64


def heldout_mask(scores: Sequence[float], fraction: float) -> list[bool]:
    """Which documents (by ``heldout_score``, in corpus order) ``split_heldout`` holds out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    held = [s < fraction for s in scores]
    if fraction > 0 and len(scores) >= 2 and not any(held):
        held[int(np.argmin(scores))] = True
    return held


def split_heldout(
    docs: Sequence[Document], fraction: float
) -> tuple[list[Document], list[Document]]:
    """(train, heldout): a document is held out when ``heldout_score(text) < fraction``.

    Decided per document, so the split does not depend on order or on which other documents are
    present. When ``fraction > 0`` and no document scores under it (tiny corpora), the one with
    the lowest score is held out so evaluation always has data.
    """
    held = heldout_mask([heldout_score(d.text) for d in docs], fraction)
    train = [d for d, h in zip(docs, held, strict=True) if not h]
    heldout = [d for d, h in zip(docs, held, strict=True) if h]
    return train, heldout


# --------------------------------------------------------------------------------------------
# Reuse of a previous build


def corpus_fingerprint(
    cfg: CorpusConfig, vocab_size: int, listing: list[tuple[str, int, int]] | None = None
) -> str:
    """Hash of what determines the built corpus: config, vocab size, every source file's
    (path, size, mtime) and the versions of the tools that shape the output. ``listing`` gives
    the files where they are not local paths (``kiln corpus`` on object storage)."""
    if listing is None:
        if cfg.sources:
            files = list(_list_files(cfg.sources))
        else:
            files = _stdlib_files(cfg.include_stdlib_tests)
        listing = [(str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in files]
    config = asdict(cfg)
    if cfg.fim_rate == 0.0:  # FIM off builds what it built before FIM existed: keep its key
        for name in ("fim_rate", "fim_spm_rate", "fim_seed"):
            config.pop(name)
    key = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "vocab_size": vocab_size,
        "files": listing,
        "python": sys.version,
        "tokenizers": tokenizers.__version__,
    }
    return hashlib.blake2b(json.dumps(key).encode("utf-8"), digest_size=16).hexdigest()


def _reusable(out_dir: Path, fingerprint: str) -> CorpusManifest | None:
    """The manifest in ``out_dir`` if it is for this fingerprint and all its files are intact."""
    try:
        manifest = CorpusManifest.load(out_dir)
    except (FileNotFoundError, ValueError, TypeError, KeyError):
        return None
    if manifest.fingerprint != fingerprint or not (out_dir / manifest.tokenizer_file).is_file():
        return None
    itemsize = np.dtype(manifest.dtype).itemsize
    for split in manifest.splits.values():
        for shard in split.shards:
            path = out_dir / shard.file
            if not path.is_file() or path.stat().st_size != shard.n_tokens * itemsize:
                return None
    return manifest


# --------------------------------------------------------------------------------------------
# Packing


class _ShardWriter:
    """Appends token ids to ``<split>_NNNNN.bin`` files of at most ``shard_tokens`` ids each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = (
            out_dir,
            split,
            dtype,
            shard_tokens,
        )
        self.shards: list[ShardInfo] = []
        self._file: Any = None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._file is None or self.shards[-1].n_tokens == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1].n_tokens
            chunk, ids = ids[:room], ids[room:]
            chunk.astype(self.dtype.newbyteorder("<")).tofile(self._file)
            self.shards[-1].n_tokens += chunk.size

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = (self.out_dir / name).open("wb")
        self.shards.append(ShardInfo(name, 0))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def pack_split(
    docs: Sequence[Document],
    tok: Tokenizer,
    out_dir: Path,
    split: str,
    shard_tokens: int,
    progress: bool = False,
    batch_docs: int = 256,
    fim: FimConfig | None = None,
) -> SplitInfo:
    """Encode ``docs`` and write them as one stream ``doc0 <eos> doc1 <eos> ...`` in shards.

    ``fim`` rearranges a share of the documents for fill-in-the-middle before they are packed
    (``kilnlm.fim``); the ``<eos>`` after each one is what ends an infill."""
    writer = _ShardWriter(out_dir, split, token_dtype(tok.vocab_size), shard_tokens)
    eos = np.array([tok.eos_id], dtype=np.int64)
    bar = tqdm(total=len(docs), desc=f"encode {split}", unit="doc", disable=not progress)
    try:
        for i in range(0, len(docs), batch_docs):
            batch = docs[i : i + batch_docs]
            encoded = encode_documents([d.text for d in batch], tok, fim or FimConfig())
            writer.write(np.concatenate([x for ids in encoded for x in (np.asarray(ids), eos)]))
            bar.update(len(batch))
    finally:
        writer.close()
        bar.close()
    return SplitInfo(
        n_documents=len(docs),
        n_tokens=sum(s.n_tokens for s in writer.shards),
        n_bytes=sum(len(d.text.encode("utf-8")) for d in docs),
        shards=writer.shards,
    )


def tokenizer_texts(texts: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """The BPE training sample: texts of the train split, in order, until ``max_bytes`` is spent
    (the text that crosses the budget is included). Both builders train on exactly this."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for text in texts:
        if budget <= 0:
            return
        budget -= len(text.encode("utf-8"))
        yield text


def _remove_outputs(out_dir: Path) -> None:
    """Remove a previous build's files, manifest first so a half-rebuilt dir never looks complete."""
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{split}_*.bin"):
            old.unlink()


class _StageClock:
    """Seconds spent in each named stage, measured back to back."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now


def build_corpus(
    cfg: CorpusConfig, out_dir: str | Path, vocab_size: int, progress: bool = True
) -> CorpusManifest:
    """Read → clean → split → train the tokenizer on train → encode → pack; write ``out_dir``.

    Returns at once with the existing manifest when ``out_dir`` already holds a complete build for
    the same config, vocab size and source files. Build once (on the driver), then let workers
    open ``TokenShards``: two processes building into the same directory would overwrite each other.
    """
    out_dir = Path(out_dir)
    fingerprint = corpus_fingerprint(cfg, vocab_size)
    if (existing := _reusable(out_dir, fingerprint)) is not None:
        return existing
    clock = _StageClock()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    docs = list(tqdm(read_corpus(cfg), desc="read", unit="doc", disable=not progress))
    clock.lap("read")
    kept, stats = clean(docs, cfg, progress)
    train, heldout = split_heldout(kept, cfg.heldout_fraction)
    clock.lap("clean")
    if not train:
        raise ValueError(
            f"no training documents left ({stats.summary()}); add text to CorpusConfig.sources "
            "or loosen the filters (min_chars, max_non_text_ratio, max_repeated_line_ratio)"
        )
    texts = tokenizer_texts((d.text for d in train), cfg.tokenizer_max_bytes)
    tok = Tokenizer.train(texts, vocab_size, show_progress=progress)
    tok.save(out_dir / TOKENIZER_NAME)
    clock.lap("tokenizer")
    # FIM on the train split only: held-out perplexity stays the left-to-right figure.
    fims = (cfg.fim, FimConfig())
    splits = {
        name: pack_split(split_docs, tok, out_dir, name, cfg.shard_tokens, progress, fim=fim)
        for name, split_docs, fim in zip(SPLITS, (train, heldout), fims, strict=True)
    }
    clock.lap("encode")
    return save_manifest(out_dir, tok, splits, stats, cfg, fingerprint, clock.laps)


def save_manifest(
    out_dir: Path,
    tok: Tokenizer,
    splits: dict[str, SplitInfo],
    stats: FilterStats,
    cfg: CorpusConfig,
    fingerprint: str,
    laps: dict[str, float],
) -> CorpusManifest:
    """Write the manifest that marks a build complete (both builders end here)."""
    manifest = CorpusManifest(
        vocab_size=tok.vocab_size,
        dtype=token_dtype(tok.vocab_size).name,
        eos_id=tok.eos_id,
        tokenizer_file=TOKENIZER_NAME,
        splits=splits,
        stats=stats,
        config=asdict(cfg),
        fingerprint=fingerprint,
        build_seconds=round(sum(laps.values()), 3),
        stage_seconds=laps,
    )
    manifest.save(out_dir)
    return manifest
