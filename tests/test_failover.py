"""A stream survives its replica: SIGKILL the replica under a greedy stream through gRPC, and the
client's one stream completes with exactly the undisturbed tokens, all named by one version.

Two replicas behind the gateway. Which replica runs the stream is Serve's choice, so the test
finds it from the outside: the replica process that burns CPU while the only stream runs.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from serving_utils import make_checkpoint, replica_pids, wait_until

from kilnlm import checkpoint
from kilnlm.client import Client
from kilnlm.engine import EngineConfig, LLMEngine
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]

APP = "kiln-test-failover"
N_TOKENS = 200
ENGINE = EngineConfig(kv_budget_mib=16, max_num_seqs=16, max_tokens_limit=N_TOKENS)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("failover") / "v1", version=1)


@pytest.fixture(scope="module")
def address(ray_cluster, ckpt):
    from ray import serve

    from kilnlm.actors import serve_app

    config = ServeConfig(
        checkpoint=str(ckpt), port=0, app_name=APP, num_replicas=2, engine=ENGINE,
        health_poll_s=0.1, replica_num_cpus=0.5, http_port=0,
        stream_interval_s=0.0, stream_max_tokens=0,  # one message per step: tokens trickle
    )  # fmt: skip
    yield serve_app.run(config)
    serve.delete(APP)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reference(ckpt) -> list[int]:
    model, tok = checkpoint.load(ckpt), checkpoint.load_tokenizer(ckpt)
    engine = LLMEngine(model, ENGINE, tok.eos_id, version=1, decode=tok.decode)
    engine.add_request(
        "ref", tok.encode("The kiln"), SamplingParams(temperature=0, max_tokens=N_TOKENS)
    )
    out: list[int] = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.token_ids]
    return out


def test_sigkilled_replica_mid_stream_the_client_sees_one_unbroken_stream(address, ckpt):
    expected = reference(ckpt)
    assert wait_until(lambda: len(replica_pids(APP)) == 2, timeout=60)
    pids = replica_pids(APP)
    with Client(address, timeout=120) as client:
        stream = client.generate_stream("The kiln", temperature=0, max_tokens=N_TOKENS)
        deltas = [next(stream)]
        before = {pid: cpu_s(pid) for pid in pids}
        while sum(len(d.token_ids) for d in deltas) < 20:  # it runs: find where
            deltas.append(next(stream))
        time.sleep(0.3)
        burnt = {pid: cpu_s(pid) - before[pid] for pid in pids}
        busy, idle = sorted(pids, key=burnt.get, reverse=True)
        assert burnt[busy] > 3 * burnt[idle], burnt  # the stream's replica is the busy one
        streamed_before_kill = sum(len(d.token_ids) for d in deltas)
        os.kill(busy, signal.SIGKILL)
        deltas += list(stream)  # no error: the gateway resent it to the other replica
    tokens = [t for d in deltas for t in d.token_ids]
    assert streamed_before_kill < N_TOKENS  # the kill hit a stream still running
    assert tokens == expected  # the undisturbed greedy tokens, none twice, none missing
    finish = deltas[-1].finish
    assert finish.finish_reason == "length" and finish.completion_tokens == N_TOKENS
    assert finish.model_version == 1
    assert {d.model_version for d in deltas if d.token_ids} == {1}  # every message names it
