"""`kiln up`, the main job, for real: Ray Train workers, the orchestrator, Serve replicas, gRPC.

One end-to-end run of ``kilnlm.actors.up_app.run_up`` with tiny settings (test-1m, 24 steps, a
checkpoint every 8) inside the session's Ray: the trainer's hook registers each export, the
orchestrator validates and auto-promotes it into 2 empty replicas, the watcher asks each new
version for a greedy generation through gRPC, and background streams run throughout; one
replica is SIGKILLed after the first promotion. The
assertions are the main job's promises: at least two promotions, perplexity falling across
them, zero failed requests, a complete summary, and nothing left deployed afterwards.

The other tests check the `kiln up --cluster` side without a cluster: the flags the job's
`kiln up` on the head receives parse back to the same settings.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from serving_utils import replica_pids

from kilnlm.cli import build_parser
from kilnlm.cluster.config import ClusterConfig, JobConfig
from kilnlm.train import TrainConfig

APP = "kiln-test-up"
STEPS, EVERY = 24, 8


@pytest.fixture(scope="module")
def summary(ray_cluster, tiny_corpus, tmp_path_factory):
    from kilnlm.actors.up_app import LoadConfig, UpConfig, default_serve, run_up

    train = TrainConfig(
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        max_steps=STEPS,
        batch_size=4,
        seq_len=64,
        eval_every=EVERY,
        eval_batches=2,
        log_every=4,
        checkpoint_every=EVERY,
    )
    cluster = ClusterConfig(
        workers=2,
        storage_path=str(tmp_path_factory.mktemp("up")),
        name="up",
        progress=False,
        max_failures=0,
    )
    job = JobConfig(
        preset="test-1m",
        model={"block_size": 128},
        train=train,
        cluster=cluster,
        data_dir=str(tiny_corpus),
    )
    config = UpConfig(
        job=job,
        serve=replace(default_serve(), port=0, http_port=0, app_name=APP),
        load=LoadConfig(clients=2, max_tokens=16),
        prompt_tokens=16,
        exit_after=0,
    )
    lines: list[str] = []
    # A replica is SIGKILLed after the first promotion, while the background clients stream:
    # the run must still end with 0 failed requests (the gateway resends the streams it
    # carried; Serve replaces it on the promoted version).
    promoted = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("── version"):
            promoted.set()

    killer = threading.Thread(target=kill_a_replica_after, args=(promoted,), daemon=True)
    killer.start()
    return run_up(config, say=say), lines


KILLED: list[int] = []


def kill_a_replica_after(promoted: threading.Event) -> None:
    if promoted.wait(timeout=600):
        time.sleep(0.5)  # let the clients' next streams start on both replicas
        pids = replica_pids(APP)
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            KILLED.append(pids[0])


@pytest.mark.ray
@pytest.mark.slow
def test_up_promotes_every_improving_checkpoint_and_fails_no_request(summary) -> None:
    result, _ = summary
    assert result.training_error is None
    assert result.settled
    assert [r.step for r in result.versions] == list(range(EVERY, STEPS + 1, EVERY))
    assert len(result.promoted) >= 2
    assert result.perplexity_falling
    assert KILLED, "no replica was killed mid-run: the failover drill did not happen"
    assert result.requests_failed == 0, result.failures
    assert result.requests_served > 0
    assert set(result.requests_by_version) <= set(result.promoted)
    assert result.ok


@pytest.mark.ray
@pytest.mark.slow
def test_summary_has_a_perplexity_and_a_swap_time_per_promoted_version(summary) -> None:
    result, lines = summary
    for row in result.versions:
        if row.version in result.promoted:
            assert row.perplexity is not None and row.perplexity > 1
            assert 0 < row.swap_s <= row.registered_to_serving_s
    text = result.format()
    assert f"{result.requests_served} served, 0 failed" in text
    assert text in lines  # printed, not only returned
    saved = json.loads((Path(result.run_dir) / "up-summary.json").read_text())
    assert saved["promoted"] == result.promoted
    assert saved["perplexity_falling"] is True


@pytest.mark.ray
@pytest.mark.slow
def test_summary_sets_the_n_gram_baseline_beside_the_versions(summary, tiny_corpus) -> None:
    """The baseline is scored on the gate's own held-out tokens, at its best order."""
    from kilnlm.actors.orchestrator import heldout_ids
    from kilnlm.ngram import NGramModel
    from kilnlm.shards import TokenShards
    from kilnlm.tokenizer import Tokenizer

    result, lines = summary
    train = TokenShards(tiny_corpus, "train")
    ids, n_bytes = heldout_ids(str(tiny_corpus), Tokenizer.load(tiny_corpus), 16384)
    ppl = {
        k: NGramModel(k, train.vocab_size)
        .fit(train.read(0, len(train)).astype("int64"))
        .evaluate(ids, n_bytes)
        .perplexity
        for k in (2, 3, 4, 5)
    }
    best = min(ppl, key=ppl.__getitem__)
    assert result.ngram["order"] == best
    assert result.ngram["perplexity"] == pytest.approx(ppl[best])
    assert result.ngram["tokens"] == len(ids) - 1
    final = next(r for r in result.versions if r.version == result.promoted[-1])
    assert result.beats_ngram == (final.perplexity < ppl[best])
    text = result.format()
    assert f"{best}-gram KN" in text and "n-gram baseline" in text
    assert any(line.startswith("[kiln up] baseline to beat") for line in lines)
    saved = json.loads((Path(result.run_dir) / "up-summary.json").read_text())
    assert saved["beats_ngram"] == result.beats_ngram


@pytest.mark.ray
@pytest.mark.slow
def test_each_promotion_is_shown_with_a_generation_from_that_version(summary) -> None:
    result, lines = summary
    for g in result.generations:
        # pinned to its version: either that version answered, or it was already superseded
        assert g["served_by"] == g["version"] or g["error"].startswith("superseded"), g
    assert any(g["served_by"] == result.promoted[-1] for g in result.generations)
    assert sum("promoted: held-out ppl" in line for line in lines) == len(result.promoted)


@pytest.mark.ray
@pytest.mark.slow
def test_up_removes_what_it_deployed_and_leaves_ray_running(summary, ray_cluster) -> None:
    from ray import serve

    from kilnlm.actors.orchestrator import get_orchestrator

    assert ray_cluster.is_initialized()
    assert APP not in serve.status().applications
    with pytest.raises(ValueError):
        get_orchestrator(APP)


# --------------------------------------------------------------------------------------------
# kiln up --cluster: what the job on the head receives


def test_cluster_flags_reach_the_job_unchanged() -> None:
    from kilnlm.cli.up import forwarded_flags, job_from_args

    parser = build_parser()
    flags = "--max-steps 100 --no-progress --source a --source b --exit-after 30 --storage-path /k"
    here = parser.parse_args(["up", "--cluster", "http://127.0.0.1:8265", *flags.split()])
    sent = forwarded_flags(here)
    assert "--cluster" not in sent and "--config" not in sent
    head = parser.parse_args(["up", "--ray-address", "auto", *sent])
    for name in ("max_steps", "progress", "source", "exit_after", "storage_path"):
        assert getattr(head, name) == getattr(here, name), name
    job = job_from_args(head)
    assert (job.train.max_steps, job.cluster.progress) == (100, False)
    assert job.cluster.storage_path == "/k"


def test_object_store_storage_needs_a_prebuilt_corpus_and_keeps_the_registry_there() -> None:
    from kilnlm.actors.up_app import UpConfig, default_job

    job = default_job()
    job = replace(job, cluster=replace(job.cluster, storage_path="s3://bucket/kiln"))
    with pytest.raises(ValueError, match="--data"):
        UpConfig(job=job)
    config = UpConfig(job=replace(job, data_dir="/data/corpus"))
    assert config.registry_uri == f"s3://bucket/kiln/{job.cluster.name}/orchestrator"
    assert not str(config.run_dir).startswith("s3:")


@pytest.mark.ray
@pytest.mark.slow
def test_summary_reports_training_and_serving_energy(summary) -> None:
    """kWh and CO2 of the training run, and of serving per 1,000 generated tokens, labelled with
    their source (an estimate on a machine without RAPL or NVML)."""
    result, _ = summary
    train, serving = result.energy["train"], result.energy["serving"]
    assert train["kwh"] > 0 and train["co2_g"] == pytest.approx(train["kwh"] * 475.0)
    assert train["estimated"] == ("estimate" in train["source"])
    if serving["tokens"]:
        assert serving["kwh_per_1k_tokens"] == pytest.approx(
            serving["kwh"] * 1000 / serving["tokens"]
        )
    text = result.format()
    assert "energy    train" in text and "g CO2" in text
    saved = json.loads((Path(result.run_dir) / "up-summary.json").read_text())
    assert saved["energy"]["train"]["kwh"] == train["kwh"]
