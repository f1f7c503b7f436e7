"""Shared fixtures. Ray is started at most once per test session, and only by tests that ask for it."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep every process's torch to one thread so the tests' processes don't oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster for the whole session.

    Ray's CPUs are logical: 8 lets training workers, Serve replicas, the gateway and the
    orchestrator be placed at once on a 2-core machine (each asks for a fraction), while torch
    in every worker is held to one thread (OMP_NUM_THREADS) so the cores aren't oversubscribed.
    """
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # Serve may never have started
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """One small stdlib corpus (300 KB, vocab 512) built once and shared by every test that reads shards."""
    from kilnlm.data import CorpusConfig, build_corpus

    root = tmp_path_factory.mktemp("corpus")
    build_corpus(CorpusConfig(max_bytes=300_000, heldout_fraction=0.1), root, 512, progress=False)
    return root
