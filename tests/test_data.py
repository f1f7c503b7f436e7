"""The corpus pipeline on a hand-made corpus whose every document's fate is known, plus the
default (stdlib) corpus end to end with a small cap."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kilnlm.data import (
    CorpusConfig,
    CorpusManifest,
    Document,
    FilterStats,
    MinHasher,
    ShardInfo,
    SplitInfo,
    TokenShards,
    _ShardWriter,
    build_corpus,
    clean,
    default_corpus,
    get_batch,
    iter_documents,
    lsh_bands,
    read_corpus,
    split_heldout,
    stdlib_root,
    steps_per_epoch,
    token_dtype,
)
from kilnlm.tokenizer import Tokenizer

WORDS = [f"w{i}" for i in range(300)] + ["naïve", "café", "日本", "🙂"]


def prose(seed: int, n_words: int = 120) -> str:
    """Random words in lines of 8: distinct seeds share no 5-word shingles in practice."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 8]) for i in range(0, n_words, 8)) + "\n"


def replace_word(text: str, index: int, new: str) -> str:
    """``text`` with its ``index``-th word replaced, whitespace kept as it was."""
    parts = re.split(r"(\s+)", text)  # word, separator, word, ...
    parts[2 * index] = new
    return "".join(parts)


def hand_made_corpus() -> list[Document]:
    """Eight good documents and one of each kind every stage must drop, in a known order."""
    good = [Document(prose(seed), f"good{seed}") for seed in range(8)]
    return [
        *good[:4],
        Document("too short", "short"),
        Document("x" * 5000 + " " + prose(100), "long"),
        Document(prose(101) + "\x00\x01\x02\ufffd" * 10, "binary"),
        Document(prose(102, 24) + "the same line\n" * 20, "repeated"),
        Document("  " + good[0].text.upper().replace("\n", " \n\t"), "exact_dup"),
        Document(replace_word(good[1].text, 50, "CHANGED"), "near_dup"),
        *good[4:],
    ]


CFG = CorpusConfig(min_chars=100, max_chars=4000, heldout_fraction=0.1, shard_tokens=97)


def write_corpus(root: Path, docs: list[Document]) -> Path:
    """The hand-made corpus on disk: the first half as .txt/.md/.py files, the rest as JSONL."""
    root.mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for i, doc in enumerate(docs[:half]):
        (root / f"{i:02d}_doc{('.txt', '.md', '.py')[i % 3]}").write_text(
            doc.text, encoding="utf-8"
        )
    with (root / "99_rest.jsonl").open("w", encoding="utf-8") as f:
        for doc in docs[half:]:
            f.write(json.dumps({"text": doc.text}) + "\n")
    return root


# ---- config and reading ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("min_chars", {"min_chars": -1}),
        ("max_chars", {"max_chars": 10, "min_chars": 10}),
        ("max_non_text_ratio", {"max_non_text_ratio": 1.5}),
        ("max_repeated_line_ratio", {"max_repeated_line_ratio": -0.1}),
        ("num_perm", {"num_perm": 4}),
        ("shingle_size", {"shingle_size": 0}),
        ("near_dup_threshold", {"near_dup_threshold": 0.0}),
        ("heldout_fraction", {"heldout_fraction": 1.0}),
        ("max_documents", {"max_documents": 0}),
        ("max_bytes", {"max_bytes": -5}),
        ("shard_tokens", {"shard_tokens": 0}),
    ],
)
def test_config_errors_name_the_field(name: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=f"CorpusConfig.{name} "):
        CorpusConfig(**kwargs)


def test_iter_documents_reads_text_files_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("# beta")
    (tmp_path / "c.py").write_bytes(b"x = 1  # \xff not utf-8\n")
    (tmp_path / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two \\u00e9", "id": 7}\n')
    (tmp_path / "e.bin").write_bytes(b"\x00\x01")
    docs = list(iter_documents([tmp_path]))
    assert [(d.text, Path(d.source).name) for d in docs] == [
        ("alpha", "a.txt"),
        ("x = 1  # \ufffd not utf-8\n", "c.py"),
        ("one", "d.jsonl:1"),
        ("two é", "d.jsonl:3"),
        ("# beta", "b.md"),
    ]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"bad.jsonl:2 is not valid JSON"),
        ('{"txt": "x"}', r'bad.jsonl:2 must be .* "text"'),
    ],
)
def test_bad_jsonl_line_is_named(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    with pytest.raises(FileNotFoundError, match=r"fix CorpusConfig\.sources"):
        list(iter_documents([tmp_path / "nope"]))


def test_default_corpus_is_the_stdlib_without_tests_or_packages() -> None:
    docs = list(default_corpus(max_documents=400))
    assert len(docs) == 400
    sources = [d.source.removeprefix("stdlib:") for d in docs]
    assert all(d.source.startswith("stdlib:") for d in docs)
    assert all((stdlib_root() / s).is_file() for s in sources)
    parts = {p for s in sources for p in Path(s).parts[:-1]}
    assert not parts & {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    capped = list(default_corpus(max_bytes=100_000))
    assert 99_000 <= sum(len(d.text.encode()) for d in capped) <= 100_000


# ---- cleaning --------------------------------------------------------------------------------


def test_clean_drops_each_bad_document_at_the_right_stage() -> None:
    docs = hand_made_corpus()
    kept, stats = clean(docs, CFG)
    assert [d.source for d in kept] == [f"good{i}" for i in range(8)]
    assert stats == FilterStats(
        n_input=14,
        bytes_input=sum(len(d.text.encode()) for d in docs),
        too_short=1,
        too_long=1,
        non_text=1,
        repeated_lines=1,
        exact_duplicates=1,
        near_duplicates=1,
        n_kept=8,
        bytes_kept=sum(len(d.text.encode()) for d in kept),
    )


def test_dedup_keeps_the_first_copy_whatever_the_order() -> None:
    docs = hand_made_corpus()[::-1]
    kept, stats = clean(docs, CFG)
    assert {d.source for d in kept} == {f"good{i}" for i in range(8) if i > 1} | {
        "exact_dup",
        "near_dup",
    }
    assert (stats.exact_duplicates, stats.near_duplicates) == (1, 1)


def test_minhash_estimates_jaccard() -> None:
    """Signature agreement vs the exact Jaccard of the shingle sets (independent reference)."""
    hasher = MinHasher(num_perm=256, shingle_size=5, seed=1)
    a = prose(7, 400)
    for n_changed, lo, hi in [(0, 1.0, 1.0), (4, 0.8, 0.95), (40, 0.1, 0.6)]:
        b = a
        for k in range(n_changed):
            b = replace_word(b, 10 * k + 3, f"X{k}")
        sa, sb = set(hasher.shingles(a).tolist()), set(hasher.shingles(b).tolist())
        exact = len(sa & sb) / len(sa | sb)
        estimate = float((hasher.signature(a) == hasher.signature(b)).mean())
        assert lo <= exact <= hi
        assert abs(estimate - exact) < 0.1


def test_lsh_bands_worked_example() -> None:
    bands, rows = lsh_bands(128, 0.8)
    assert (bands, rows) == (18, 7)
    assert 1 - (1 - 0.8**7) ** 18 >= 0.95 > 1 - (1 - 0.8**8) ** 16


# ---- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_and_stable_under_reordering() -> None:
    docs = [Document(prose(s, 20), f"d{s}") for s in range(1000)]
    train, heldout = split_heldout(docs, 0.1)
    assert len(train) + len(heldout) == 1000
    assert 60 <= len(heldout) <= 140  # Binomial(1000, 0.1): mean 100, sd 9.5
    shuffled = random.Random(0).sample(docs, len(docs))
    train2, heldout2 = split_heldout(shuffled, 0.1)
    assert {d.source for d in heldout2} == {d.source for d in heldout}
    assert {d.source for d in train2} == {d.source for d in train}
    # Deciding per document: a subset keeps each document's side.
    _, heldout3 = split_heldout(docs[:300], 0.1)
    assert {d.source for d in heldout3} == {d.source for d in heldout if int(d.source[1:]) < 300}
    assert split_heldout(docs, 0.0) == (docs, [])


def test_tiny_corpus_still_gets_a_heldout_document() -> None:
    docs = [Document(prose(s, 20), f"d{s}") for s in range(3)]
    train, heldout = split_heldout(docs, 0.01)
    assert (len(train), len(heldout)) == (2, 1)


# ---- build, shards, batches ------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CorpusConfig]:
    root = tmp_path_factory.mktemp("corpus")
    cfg = CorpusConfig(
        **{**CFG.__dict__, "sources": [str(write_corpus(root / "src", hand_made_corpus()))]}
    )
    build_corpus(cfg, root / "out", vocab_size=300, progress=False)
    return root / "out", cfg


def test_shards_round_trip_to_the_encoded_stream(built: tuple[Path, CorpusConfig]) -> None:
    out, cfg = built
    manifest = CorpusManifest.load(out)
    tok = Tokenizer.load(out)
    train, heldout = split_heldout(clean(read_corpus(cfg), cfg)[0], cfg.heldout_fraction)
    # 8 kept documents; by heldout_score only good2 (0.072) and good6 (0.088) are under 0.1.
    assert [d.text for d in heldout] == [prose(2), prose(6)] and len(train) == 6
    for name, docs in (("train", train), ("heldout", heldout)):
        expected = [i for d in docs for i in [*tok.encode(d.text), tok.eos_id]]
        shards = TokenShards(out, name)
        assert shards.read(0, len(shards)).tolist() == expected
        info = manifest.splits[name]
        assert (info.n_tokens, info.n_documents) == (len(expected), len(docs))
        # Bytes, not characters: the corpus has é, 日本 and 🙂 in it.
        assert shards.bytes_of_text == info.n_bytes == sum(len(d.text.encode()) for d in docs)
        assert info.n_bytes > sum(len(d.text) for d in docs)
        assert tok.count_bytes(shards.read(0, len(shards))) == info.n_bytes
        assert [s.n_tokens for s in info.shards[:-1]] == [97] * (len(info.shards) - 1)
        for s in info.shards:
            assert (out / s.file).stat().st_size == 2 * s.n_tokens


def test_read_any_slice_across_shard_boundaries(built: tuple[Path, CorpusConfig]) -> None:
    shards = TokenShards(built[0], "train")
    assert shards.dtype == np.uint16 and len(shards) > 3 * 97
    full = shards.read(0, len(shards))
    rng = random.Random(0)
    for start, n in [(96, 2), (0, 97), (97, 0), (50, 250), (len(full) - 1, 1)] + [
        (s := rng.randrange(len(full)), rng.randrange(len(full) - s + 1)) for _ in range(20)
    ]:
        assert np.array_equal(shards.read(start, n), full[start : start + n])
    with pytest.raises(IndexError, match="outside the train split"):
        shards.read(len(full) - 1, 2)
    clone = pickle.loads(pickle.dumps(shards))  # memory maps are reopened, not copied
    assert np.array_equal(clone.read(90, 20), full[90:110])


def test_manifest_records_what_readers_need(built: tuple[Path, CorpusConfig]) -> None:
    out, cfg = built
    raw = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.load(out)
    assert raw["vocab_size"] == tok.vocab_size <= 300
    assert (raw["dtype"], raw["eos_id"], raw["tokenizer_file"]) == ("uint16", 1, "tokenizer.json")
    assert raw["stats"]["n_kept"] == 8 and raw["stats"]["near_duplicates"] == 1
    assert raw["config"] == json.loads(json.dumps(cfg.__dict__))


def test_build_is_reused_and_rebuilt_when_stale(built: tuple[Path, CorpusConfig]) -> None:
    out, cfg = built
    first = CorpusManifest.load(out)
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert build_corpus(cfg, out, vocab_size=300, progress=False) == first
    assert (out / "manifest.json").stat().st_mtime_ns == mtime
    # A truncated shard means the build is not complete: rebuild, identical result.
    shard = out / first.splits["train"].shards[0].file
    shard.write_bytes(shard.read_bytes()[:-2])
    rebuilt = build_corpus(cfg, out, vocab_size=300, progress=False)
    assert rebuilt.splits == first.splits and rebuilt.fingerprint == first.fingerprint
    assert (out / "manifest.json").stat().st_mtime_ns != mtime


def test_other_config_or_vocab_changes_the_fingerprint(
    built: tuple[Path, CorpusConfig], tmp_path: Path
) -> None:
    out, cfg = built
    first = CorpusManifest.load(out)
    bigger = build_corpus(cfg, tmp_path, vocab_size=290, progress=False)
    assert bigger.fingerprint != first.fingerprint and bigger.vocab_size <= 290
    other = CorpusConfig(**{**cfg.__dict__, "heldout_fraction": 0.5})
    assert build_corpus(other, tmp_path, 290, progress=False).fingerprint != bigger.fingerprint
    # The first build's shards are gone: only files the new manifest lists remain.
    listed = {
        s.file for split in CorpusManifest.load(tmp_path).splits.values() for s in split.shards
    }
    assert {p.name for p in tmp_path.glob("*.bin")} == listed


def test_failed_build_leaves_no_manifest(built: tuple[Path, CorpusConfig], tmp_path: Path) -> None:
    out, cfg = built
    for f in out.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    empty = CorpusConfig(**{**cfg.__dict__, "min_chars": 3999})
    with pytest.raises(ValueError, match="no training documents left"):
        build_corpus(empty, tmp_path, vocab_size=300, progress=False)
    assert not (tmp_path / "manifest.json").exists()


def test_dtype_by_vocab_size(tmp_path: Path) -> None:
    assert (token_dtype(300), token_dtype(65536), token_dtype(65537)) == (
        np.uint16,
        np.uint16,
        np.uint32,
    )
    # A uint32 corpus holds ids above 65535 exactly.
    ids = np.array([0, 65535, 65536, 100_000, 4_000_000_000], dtype=np.int64)
    writer = _ShardWriter(tmp_path, "train", token_dtype(100_001), shard_tokens=3)
    writer.write(ids)
    writer.close()
    manifest = CorpusManifest(
        vocab_size=4_000_000_001,
        dtype="uint32",
        eos_id=1,
        tokenizer_file="tokenizer.json",
        splits={"train": SplitInfo(1, 5, 10, writer.shards)},
        stats=FilterStats(),
        config={},
        fingerprint="x",
        build_seconds=0.0,
    )
    manifest.save(tmp_path)
    assert writer.shards == [ShardInfo("train_00000.bin", 3), ShardInfo("train_00001.bin", 2)]
    assert TokenShards(tmp_path, "train").read(0, 5).tolist() == ids.tolist()
    assert os.path.getsize(tmp_path / "train_00000.bin") == 12


def test_get_batch_is_reproducible_disjoint_and_shifted(built: tuple[Path, CorpusConfig]) -> None:
    shards = TokenShards(built[0], "train")
    stream = torch.from_numpy(shards.read(0, len(shards)).astype(np.int64))
    B, T, W = 2, 8, 3
    per_epoch = steps_per_epoch(len(shards), B, T, W)
    assert per_epoch >= 2
    window_start = {tuple(stream[s : s + T].tolist()): s for s in range(0, len(stream) - T, T)}
    assert len(window_start) == (len(stream) - 1) // T  # every window is distinct text
    seen: list[int] = []
    for step in range(per_epoch):
        for rank in range(W):
            x, y = get_batch(shards, B, T, step, rank, W, seed=5)
            assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
            assert torch.equal(x[:, 1:], y[:, :-1])
            for row_x, row_y in zip(x, y, strict=True):
                start = window_start[tuple(row_x.tolist())]  # a window of the stream...
                assert torch.equal(stream[start + 1 : start + T + 1], row_y)  # ...and its targets
                seen.append(start)
            again = get_batch(shards, B, T, step, rank, W, seed=5)
            assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert len(seen) == len(set(seen)) == per_epoch * W * B  # no window twice in an epoch
    other_seed = get_batch(shards, B, T, 0, 0, W, seed=6)[0]
    next_epoch = get_batch(shards, B, T, per_epoch, 0, W, seed=5)[0]
    assert not torch.equal(other_seed, get_batch(shards, B, T, 0, 0, W, seed=5)[0])
    assert next_epoch.shape == (B, T)
    with pytest.raises(ValueError, match="smaller batch_size"):
        get_batch(shards, 1000, T, 0)
    with pytest.raises(ValueError, match="rank must be"):
        get_batch(shards, B, T, 0, rank=3, world_size=3)


def test_default_corpus_end_to_end(tmp_path: Path) -> None:
    cfg = CorpusConfig(max_bytes=300_000, heldout_fraction=0.1)
    start = time.perf_counter()
    manifest = build_corpus(cfg, tmp_path, vocab_size=512, progress=False)
    assert time.perf_counter() - start < 20
    assert manifest.vocab_size == 512 and manifest.stats.n_kept > 5
    assert 0 < manifest.stats.bytes_input <= 300_000
    train, heldout = TokenShards(tmp_path, "train"), TokenShards(tmp_path, "heldout")
    assert len(train) > 0 and len(heldout) > 0
    # The first document of the stream decodes back to the first kept training document.
    docs, _ = clean(read_corpus(cfg), cfg)
    first = split_heldout(docs, cfg.heldout_fraction)[0][0]
    stream = train.read(0, min(len(train), 4 * len(first.text) + 1)).tolist()
    tok = Tokenizer.load(tmp_path)
    assert tok.decode(stream[: stream.index(tok.eos_id)]) == first.text
    assert train.bytes_of_text + heldout.bytes_of_text == manifest.stats.bytes_kept
