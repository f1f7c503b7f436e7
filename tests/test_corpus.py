"""`kiln corpus` on Ray Data against `kilnlm.data.build_corpus`: the same bytes on the same input
(shards, tokenizer, held-out split, counts), its readers, and its output as `kiln train --data`."""

from __future__ import annotations

import contextlib
import filecmp
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.documents import Document, iter_documents
from kilnlm.shards import CorpusManifest, TokenShards
from tests.test_data import CFG, hand_made_corpus, prose, write_corpus
from tests.test_filters import MIT_HEADER

cluster_corpus = pytest.importorskip("kilnlm.cluster.corpus")


def assert_same_build(one: Path, other: Path) -> None:
    """Every file but the manifest byte for byte; the manifest up to its timings."""
    a, b = CorpusManifest.load(one), CorpusManifest.load(other)
    files = ["tokenizer.json"] + [s.file for split in a.splits.values() for s in split.shards]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in other.iterdir())
    for name in files:
        assert filecmp.cmp(one / name, other / name, shallow=False), name
    assert (a.splits, a.stats, a.config, a.fingerprint) == (
        b.splits,
        b.stats,
        b.config,
        b.fingerprint,
    )


# ---- reading (no Ray) ------------------------------------------------------------------------


def test_parquet_jsonl_and_uris_are_read_like_local_files(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = write_corpus(tmp_path / "src", hand_made_corpus()[:6])
    pq.write_table(pa.table({"text": ["first row", "second row"]}), src / "zz.parquet")
    cfg = CorpusConfig(sources=[str(src)])
    listed = cluster_corpus.list_sources(cfg)
    docs = [d for path, name, _, _ in listed for d in cluster_corpus.documents_of(path, name)]
    local = list(iter_documents([src]))  # what build_corpus reads: no Parquet
    assert docs[: len(local)] == local
    assert docs[len(local) :] == [
        Document("first row", f"{src}/zz.parquet:1"),
        Document("second row", f"{src}/zz.parquet:2"),
    ]
    by_uri = cluster_corpus.list_sources(CorpusConfig(sources=[f"file://{src}"]))
    assert [p for p, _, _, _ in by_uri] == [f"file://{p}" for p, _, _, _ in listed]
    uri_docs = [d for p, n, _, _ in by_uri for d in cluster_corpus.documents_of(p, n)]
    assert [d.text for d in uri_docs] == [d.text for d in docs]


# ---- the two builders ------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.slow
def test_default_corpus_is_byte_identical_to_build_corpus(ray_cluster, tmp_path: Path) -> None:
    """The embedded default (the stdlib), capped: caps, filters, split, BPE sample and packing."""
    cfg = CorpusConfig(max_bytes=150_000, heldout_fraction=0.1, shard_tokens=20_000)
    one = build_corpus(cfg, tmp_path / "one", vocab_size=512, progress=False)
    ray_built = cluster_corpus.build_corpus_ray(
        cfg, tmp_path / "ray", vocab_size=512, workers=2, progress=False
    )
    assert_same_build(tmp_path / "one", tmp_path / "ray")
    assert len(one.splits["train"].shards) >= 2 and one.splits["heldout"].n_documents >= 1
    assert ray_built.stats.pii_emails > 0 and ray_built.stats.boilerplate_headers > 0
    again = cluster_corpus.build_corpus_ray(cfg, tmp_path / "one", 512, workers=1, progress=False)
    assert again.stage_seconds == one.stage_seconds  # build_corpus's output is reused as is


@pytest.mark.ray
def test_duplicates_keep_the_same_representative_as_build_corpus(
    ray_cluster, tmp_path: Path
) -> None:
    """Exact and near duplicates spread over files (so over blocks and tasks), PII, licences."""
    extra = [
        Document(MIT_HEADER + prose(40), "licensed"),
        Document(prose(40), "duplicate of licensed once its header is gone"),
        Document("# by ann@corp.io\n" + prose(41), "pii"),
        Document(prose(42) + " porn" * 20, "unsafe"),
    ]
    docs = hand_made_corpus() + extra + hand_made_corpus()[::-1]  # second copies: all duplicates
    cfg = replace(CFG, sources=[str(write_corpus(tmp_path / "src", docs))], heldout_fraction=0.2)
    one = build_corpus(cfg, tmp_path / "one", vocab_size=300, progress=False)
    cluster_corpus.build_corpus_ray(cfg, tmp_path / "ray", 300, workers=2, progress=False)
    assert_same_build(tmp_path / "one", tmp_path / "ray")
    s = one.stats
    # First copy: 1 exact, 1 near; then the header-less twin; then 8 good + exact_dup + near_dup.
    assert (s.exact_duplicates, s.near_duplicates) == (1 + 1 + 10, 1)
    assert (s.unsafe, s.boilerplate_headers, s.pii_emails) == (1, 1, 1)


# ---- the command, and its output as kiln train --data ----------------------------------------


def run_kiln(*argv: str) -> dict:
    """`kiln ARGV --json` in this process (on the session's Ray), its summary parsed."""
    from kilnlm.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return json.loads(out.getvalue())


@pytest.mark.ray
@pytest.mark.slow
def test_kiln_corpus_output_trains_with_kiln_train(ray_cluster, tmp_path: Path) -> None:
    from kilnlm.cli import build_parser
    from kilnlm.cli.training import job_from_args
    from kilnlm.cluster.launcher import launch, prepare_data

    data = str(tmp_path / "data")
    common = ("corpus", "--out", data, "--max-bytes", "150000", "--vocab-size", "512", "--json")
    built = run_kiln(*common, "--workers", "2")
    assert not built["reused"] and built["tokens"]["train"] > 10_000
    assert built["documents_per_s"] > 0 and built["stats"]["n_kept"] == sum(built["kept"].values())
    assert run_kiln(*common)["reused"]  # same inputs: nothing rebuilt
    args = build_parser().parse_args([
        "train", "--data", data, "--preset", "test-1m", "--block-size", "64", "--seq-len", "32",
        "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--eval-every", "0",
        "--checkpoint-every", "0", "--workers", "1", "--no-export", "--no-progress",
        "--storage-path", str(tmp_path / "runs"), "--name", "from-kiln-corpus",
    ])  # fmt: skip
    job = job_from_args(args)  # what `kiln train` launches
    assert job.data_dir == data and prepare_data(job)[1] == built["vocab_size"]
    result = launch(job, raise_on_error=False)
    assert result.error is None, result.error
    trained = {"last": result.history[-1]}
    assert trained["last"]["step"] == 2 and np.isfinite(trained["last"]["loss"])
    assert len(TokenShards(data, "train")) == built["tokens"]["train"]
