"""``kiln corpus`` on Ray Data: ``kilnlm.data.build_corpus``'s stages spread over a cluster's
CPUs, writing the same directory (byte for byte, on the same input and config).

::

    list files (driver) ─► read (tasks) ─► caps (driver, on sizes only)
      ─► clean_text + dedup key + MinHash signature + held-out score (tasks; materialised)
      ─► exact + near dedup, held-out split (driver, keep-first in corpus order)
      ─► BPE on the first tokenizer_max_bytes of train (driver)
      ─► encode (tasks) ─► pack into shards, in order (driver) ─► manifest

Every per-document rule is the library's (``kilnlm.filters.clean_text``, ``kilnlm.dedup``'s
``dedup_key``, ``MinHasher`` and ``NearDuplicateIndex``, ``heldout_mask``, ``tokenizer_texts``,
``_ShardWriter``), so the two builders cannot drift. Reading, filtering, PII redaction,
signatures and encoding are independent per document and run as Ray Data tasks. Deduplication
keeps the *first* copy in corpus order, a sequential decision: the driver makes it over 16-byte
keys and 512-byte signatures streamed in order (the hashing itself ran in the tasks). Packing
writes one ordered stream cut into fixed-size shards, so the driver writes it, streaming. Ray
Data's ``preserve_order`` keeps every stage in corpus order.

Near-duplicate detection reuses kilnlm's own ``MinHasher`` rather than ``datasketch``: the
byte-identical guarantee needs the very same signatures and LSH decisions as ``build_corpus``,
and ``datasketch`` (not a dependency) hashes differently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
from tqdm.auto import tqdm

from kilnlm.data import (
    SPLITS,
    TOKENIZER_NAME,
    CorpusConfig,
    _remove_outputs,
    _reusable,
    _ShardWriter,
    _StageClock,
    corpus_fingerprint,
    heldout_mask,
    heldout_score,
    save_manifest,
    tokenizer_texts,
)
from kilnlm.dedup import MinHasher, NearDuplicateIndex, dedup_key
from kilnlm.documents import (
    JSONL_SUFFIXES,
    TEXT_SUFFIXES,
    Document,
    _list_files,
    _stdlib_files,
    decode_text,
    parse_jsonl,
    stdlib_root,
    within_caps,
)
from kilnlm.filters import CleanedText, FilterStats, PiiCounts, clean_text
from kilnlm.shards import CorpusManifest, SplitInfo, token_dtype
from kilnlm.tokenizer import Tokenizer

PARQUET_SUFFIXES = (".parquet",)
SOURCE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_REC_BITS = 32  # a document's key is file_index << 32 | record index: sorts in corpus order


# --------------------------------------------------------------------------------------------
# Listing and reading


def list_sources(cfg: CorpusConfig) -> list[tuple[str, str, int, int]]:
    """(path or URI, document name, size, mtime_ns) of every input file, in corpus order: the
    stdlib's files as ``default_corpus`` orders them, else each source's files sorted."""
    if not cfg.sources:
        root = stdlib_root()
        files = _stdlib_files(cfg.include_stdlib_tests)
        return [_local(p, f"stdlib:{p.relative_to(root).as_posix()}") for p in files]
    out = []
    for source in cfg.sources:
        if "://" in source:
            out += _list_uri(source)
        else:
            out += [_local(p, str(p)) for p in _list_files([source], SOURCE_SUFFIXES)]
    return out


def _local(path: Path, name: str) -> tuple[str, str, int, int]:
    st = path.stat()
    return str(path), name, st.st_size, st.st_mtime_ns


def _list_uri(uri: str) -> list[tuple[str, str, int, int]]:
    """Files under an object-store (or any pyarrow filesystem) URI, sorted like local folders."""
    from pyarrow import fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"corpus source {uri} does not exist; fix --source")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        found = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
        infos = [i for i in found if i.type == pafs.FileType.File]
        infos = [i for i in infos if i.path.endswith(SOURCE_SUFFIXES)]
        infos.sort(key=lambda i: i.path.split("/"))
    return [
        (f"{scheme}://{i.path}", f"{scheme}://{i.path}", i.size, i.mtime_ns or 0) for i in infos
    ]


def _read_bytes(path: str) -> bytes:
    if "://" not in path:
        return Path(path).read_bytes()
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as f:
        return f.read()


def documents_of(path: str, name: str) -> Iterator[Document]:
    """The documents of one file, read as ``iter_documents`` reads them (plus Parquet files,
    whose string ``text`` column holds one document a row, named ``name:row``)."""
    raw = _read_bytes(path)
    if path.endswith(PARQUET_SUFFIXES):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(pa.BufferReader(raw), columns=["text"])
        for row, text in enumerate(table.column("text").to_pylist(), start=1):
            if not isinstance(text, str):
                raise ValueError(f'{name}:{row} has no string "text"; fix or drop that row')
            yield Document(text, f"{name}:{row}")
    elif path.endswith(JSONL_SUFFIXES):
        yield from parse_jsonl(decode_text(raw), name)
    else:
        yield Document(decode_text(raw), name)


def _read_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Files → documents: key (corpus order), text, UTF-8 size (for the caps)."""
    keys, texts, sizes = [], [], []
    for index, path, name in zip(batch["file"], batch["path"], batch["name"], strict=True):
        for rec, doc in enumerate(documents_of(str(path), str(name))):
            keys.append((int(index) << _REC_BITS) | rec)
            texts.append(doc.text)
            sizes.append(len(doc.text.encode("utf-8")))
    return {"key": np.array(keys, dtype=np.int64), "text": texts, "n_bytes": sizes}


# --------------------------------------------------------------------------------------------
# Per-document work (tasks)


def _clean_batch(
    batch: dict[str, np.ndarray], cfg: CorpusConfig, selected: np.ndarray | None
) -> dict[str, Any]:
    """clean_text, then what the driver's sequential decisions need, computed here in parallel."""
    keep = np.ones(len(batch["key"]), bool) if selected is None else np.isin(batch["key"], selected)
    hasher = MinHasher(cfg.num_perm, cfg.shingle_size, cfg.minhash_seed)
    cols: dict[str, list] = {name: [] for name in _CLEAN_COLUMNS}
    for key, text in zip(batch["key"][keep], batch["text"][keep], strict=True):
        doc = clean_text(str(text), cfg)
        sig = hasher.signature(doc.text) if doc.reason is None else None
        row = {
            "key": int(key),
            "text": doc.text,
            "reason": doc.reason or "",
            "n_bytes_in": doc.n_bytes_in,
            "n_bytes_out": len(doc.text.encode("utf-8")),
            "boilerplate_bytes": doc.boilerplate_bytes,
            "pii_emails": doc.pii.emails,
            "pii_ip_addresses": doc.pii.ip_addresses,
            "pii_keys": doc.pii.keys,
            "dedup": dedup_key(doc.text) if doc.reason is None else b"",
            "signature": b"" if sig is None else sig.tobytes(),
            "score": heldout_score(doc.text),
        }
        for name, value in row.items():
            cols[name].append(value)
    return cols


_CLEAN_COLUMNS = (
    "key",
    "text",
    "reason",
    "n_bytes_in",
    "n_bytes_out",
    "boilerplate_bytes",
    "pii_emails",
    "pii_ip_addresses",
    "pii_keys",
    "dedup",
    "signature",
    "score",
)


def _encode_batch(
    batch: dict[str, np.ndarray],
    tok: Tokenizer,
    heldout: np.ndarray,
    kept: np.ndarray,
    dtype: str,
) -> dict[str, Any]:
    """Token ids of each kept document followed by ``<|eos|>``, as little-endian bytes."""
    mask = np.isin(batch["key"], kept)
    keys, texts = batch["key"][mask], [str(t) for t in batch["text"][mask]]
    little = np.dtype(dtype).newbyteorder("<")
    ids = [np.asarray([*x, tok.eos_id]).astype(little).tobytes() for x in tok.encode_batch(texts)]
    return {
        "heldout": np.isin(keys, heldout),
        "ids": ids,
        "n_bytes": batch["n_bytes_out"][mask],
    }


# --------------------------------------------------------------------------------------------
# Sequential decisions (driver)


def _decide(
    cleaned: ray.data.Dataset, cfg: CorpusConfig, progress: bool
) -> tuple[np.ndarray, np.ndarray, FilterStats]:
    """(kept keys, held-out keys, stats): exact then near dedup, keep-first in corpus order."""
    stats, seen = FilterStats(), set()
    index = NearDuplicateIndex(cfg.num_perm, cfg.near_dup_threshold)
    kept, scores, kept_bytes = [], [], 0
    columns = [c for c in _CLEAN_COLUMNS if c != "text"]
    bar = tqdm(desc="dedup", unit="doc", disable=not progress)
    for batch in cleaned.iter_batches(batch_format="numpy"):  # materialised: no projection task
        for row in zip(*(batch[c] for c in columns), strict=True):
            key, reason, n_in, n_out, boiler, *pii, dedup, signature, score = row
            pii_counts = PiiCounts(*(int(n) for n in pii))
            stats.add(CleanedText("", reason or None, int(n_in), int(boiler), pii_counts))
            bar.update()
            if reason:
                continue
            if dedup in seen:
                stats.exact_duplicates += 1
                continue
            seen.add(dedup)
            sig = np.frombuffer(signature, dtype=np.uint32) if signature else None
            if index.is_duplicate(sig):
                stats.near_duplicates += 1
                continue
            kept.append(int(key))
            scores.append(float(score))
            kept_bytes += int(n_out)
    bar.close()
    stats.n_kept, stats.bytes_kept = len(kept), kept_bytes
    held = heldout_mask(scores, cfg.heldout_fraction)
    kept_arr = np.array(kept, dtype=np.int64)
    return kept_arr, kept_arr[np.array(held, dtype=bool)], stats


def _pack(
    encoded: ray.data.Dataset, out_dir: Path, dtype: np.dtype, cfg: CorpusConfig, progress: bool
) -> dict[str, SplitInfo]:
    """Write the train and held-out streams in corpus order, as ``pack_split`` does."""
    writers = {name: _ShardWriter(out_dir, name, dtype, cfg.shard_tokens) for name in SPLITS}
    n_docs, n_bytes = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    bar = tqdm(desc="encode", unit="doc", disable=not progress)
    try:
        for batch in encoded.iter_batches(batch_format="numpy"):
            for held, ids, size in zip(
                batch["heldout"], batch["ids"], batch["n_bytes"], strict=True
            ):
                name = SPLITS[int(held)]
                writers[name].write(np.frombuffer(ids, dtype=dtype.newbyteorder("<")))
                n_docs[name] += 1
                n_bytes[name] += int(size)
            bar.update(len(batch["ids"]))
    finally:
        for writer in writers.values():
            writer.close()
        bar.close()
    return {
        name: SplitInfo(n_docs[name], sum(s.n_tokens for s in w.shards), n_bytes[name], w.shards)
        for name, w in writers.items()
    }


# --------------------------------------------------------------------------------------------
# The build


@contextmanager
def _ordered(progress: bool) -> Iterator[None]:
    """Ray Data keeps every stage's output in input order (the corpus order) while we build."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
    ctx.execution_options.preserve_order, ctx.enable_progress_bars = True, progress
    try:
        yield
    finally:
        ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved


def build_corpus_ray(
    cfg: CorpusConfig,
    out_dir: str | Path,
    vocab_size: int,
    workers: int = 2,
    progress: bool = True,
) -> CorpusManifest:
    """``build_corpus`` on Ray Data with ``workers`` concurrent tasks per stage (Ray must be up).

    Same output directory, same reuse rule: a complete build for the same inputs is returned as is.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    files = list_sources(cfg)
    listing = [(path, size, mtime) for path, _, size, mtime in files]
    fingerprint = corpus_fingerprint(cfg, vocab_size, listing)
    if (existing := _reusable(out_dir, fingerprint)) is not None:
        return existing
    if not files:
        raise ValueError(f"no {'/'.join(SOURCE_SUFFIXES)} files in {cfg.sources}; fix --source")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_outputs(out_dir)
    clock = _StageClock()
    with _ordered(progress):
        stage = {"compute": ray.data.TaskPoolStrategy(size=workers)}
        items = [{"file": i, "path": p, "name": n} for i, (p, n, _, _) in enumerate(files)]
        blocks = min(len(items), 8 * workers)
        docs = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _read_batch, batch_size=8, **stage
        )
        selected = _apply_caps(docs, cfg)
        clock.lap("read")
        cleaned = docs.map_batches(
            _clean_batch, batch_size=32, fn_kwargs={"cfg": cfg, "selected": selected}, **stage
        ).materialize()
        kept, heldout, stats = _decide(cleaned, cfg, progress)
        clock.lap("clean")
        train = np.setdiff1d(kept, heldout)
        if train.size == 0:
            raise ValueError(
                f"no training documents left ({stats.summary()}); add text to --source "
                "or loosen the filters (min_chars, max_non_text_ratio, max_repeated_line_ratio)"
            )
        tok = _train_tokenizer(cleaned, train, cfg, vocab_size, progress)
        tok.save(out_dir / TOKENIZER_NAME)
        clock.lap("tokenizer")
        dtype = token_dtype(tok.vocab_size)
        encode_kwargs = {"tok": tok, "heldout": heldout, "kept": kept, "dtype": dtype.name}
        encoded = cleaned.map_batches(
            _encode_batch, batch_size=None, fn_kwargs=encode_kwargs, **stage
        )
        splits = _pack(encoded, out_dir, dtype, cfg, progress)
        clock.lap("encode")
    return save_manifest(out_dir, tok, splits, stats, cfg, fingerprint, clock.laps)


def _apply_caps(docs: ray.data.Dataset, cfg: CorpusConfig) -> np.ndarray | None:
    """Keys of the documents ``take`` keeps under max_documents/max_bytes (None: no caps).
    Only keys and sizes reach the driver; it stops reading once the caps are reached."""
    if cfg.max_documents is None and cfg.max_bytes is None:
        return None
    rows = docs.select_columns(["key", "n_bytes"]).iter_rows()
    sized = ((int(r["key"]), int(r["n_bytes"])) for r in rows)
    keys = [key for key, _ in within_caps(sized, cfg.max_documents, cfg.max_bytes)]
    return np.array(keys, dtype=np.int64)


def _train_tokenizer(
    cleaned: ray.data.Dataset,
    train: np.ndarray,
    cfg: CorpusConfig,
    vocab_size: int,
    progress: bool,
) -> Tokenizer:
    """BPE on the same sample as ``build_corpus``: train texts in corpus order up to the budget."""

    def train_texts() -> Iterator[str]:
        for batch in cleaned.iter_batches(batch_format="numpy"):
            yield from (str(t) for t in batch["text"][np.isin(batch["key"], train)])

    sample = tokenizer_texts(train_texts(), cfg.tokenizer_max_bytes)
    return Tokenizer.train(sample, vocab_size, show_progress=progress)


def default_workers() -> int:
    """Concurrent tasks per stage when not told: the cluster's CPUs (this machine's before Ray)."""
    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1
