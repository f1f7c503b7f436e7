"""End to end through Ray Serve: gRPC client -> Gateway deployment -> LLMServer replica -> engine.

One Serve application for the module (starting Serve is slow), on a free port so a running
``kiln serve`` is never in the way. ``test_gateway.py`` covers each status row in detail
in-process; here each path that crosses Ray is checked for real: errors raised inside a
replica, streaming through a DeploymentHandle, cancellation and deadlines reaching the
replica's engine, 100 concurrent streams, and a replica dying mid-stream.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_utils import make_checkpoint, wait_until

from kilnlm import checkpoint
from kilnlm.client import AsyncClient, Client
from kilnlm.engine import EngineConfig, LLMEngine
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

pytestmark = pytest.mark.ray

APP = "kiln-test-serving"
MAX_TOKENS_LIMIT = 240
ENGINE = EngineConfig(
    kv_budget_mib=16, max_num_seqs=128, max_num_batched_tokens=512, max_queue=512,
    max_tokens_limit=MAX_TOKENS_LIMIT,
)  # fmt: skip
# Coalescing by token count only (the interval is far longer than any test's stream), so the
# message sizes are exact: 1 token at once, then STREAM_MAX_TOKENS per message, then the rest.
STREAM_INTERVAL_S, STREAM_MAX_TOKENS = 30.0, 8


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serving") / "v1", version=1)


@pytest.fixture(scope="module")
def address(ray_cluster, ckpt):
    from ray import serve

    from kilnlm.actors import serve_app

    config = ServeConfig(
        checkpoint=str(ckpt), port=0, http_port=0, app_name=APP, health_poll_s=0.1, engine=ENGINE,
        max_ongoing_requests=256, replica_num_cpus=0.5,
        stream_interval_s=STREAM_INTERVAL_S, stream_max_tokens=STREAM_MAX_TOKENS,
        failover_max_resends=0,  # one replica: its death reaches the client (test_failover: 2)
    )  # fmt: skip
    yield serve_app.run(config)
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(address):
    with Client(address, timeout=60) as c:
        yield c


def _idle(client: Client) -> bool:
    info = client.model_info()
    return info["running"] == 0 and info["waiting"] == 0 and info["kv_cache"]["blocks_used"] == 0


def test_health_is_serving_for_a_stock_health_client(address):
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "kiln.v1.Generation"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_stream_equals_the_in_process_engine_greedy_output(client, ckpt):
    model, tok = checkpoint.load(ckpt), checkpoint.load_tokenizer(ckpt)
    prompt = "The kiln fires clay"
    engine = LLMEngine(model, ENGINE, tok.eos_id, version=1, decode=tok.decode)
    engine.add_request("ref", tok.encode(prompt), SamplingParams(temperature=0, max_tokens=32))
    expected: list[int] = []
    while engine.has_unfinished():
        expected += [t for out in engine.step() for t in out.token_ids]
    deltas = list(client.generate_stream(prompt, temperature=0, max_tokens=32))
    assert [t for d in deltas for t in d.token_ids] == expected  # coalesced = one per step
    sizes = [len(d.token_ids) for d in deltas]  # the first at once, then >= 8 tokens a message
    assert len(sizes) <= 1 + -(-31 // STREAM_MAX_TOKENS), sizes
    assert all(n >= STREAM_MAX_TOKENS for n in sizes[1:-1]), sizes
    assert "".join(d.text for d in deltas) == tok.decode(expected)
    assert deltas[-1].finish.model_version == 1 and deltas[-1].finish.finish_reason == "length"


def test_errors_raised_in_a_replica_keep_their_status_and_the_server_keeps_serving(client, address):
    cases = [
        (lambda: client.generate("kiln " * 400, max_tokens=1), "prompt"),  # replica: too long
        (lambda: client.generate("The kiln", max_tokens=MAX_TOKENS_LIMIT + 1), "max_tokens"),
        (lambda: client.generate("The kiln", temperature=-1), "temperature"),  # gateway
        (lambda: list(client.generate_stream("")), "prompt"),
        (lambda: client.chat([{"role": "user", "content": "kiln " * 400}]), "messages"),
    ]
    for call, field in cases:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert e.value.details().startswith(field), e.value.details()
    raw = b"\n\x02\xff\xfe"  # GenerateRequest.prompt (field 1) holding invalid UTF-8
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as e:
        channel.unary_unary("/kiln.v1.Generation/Generate")(raw, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.value.details()
    assert client.generate("The kiln", max_tokens=3).finish.completion_tokens == 3
    assert client.score("The kiln fires clay.").perplexity > 1


def test_100_concurrent_streams_complete_without_error(address):
    """The bounded load test: 100 streams at once, greedy and seeded, every one finishes."""

    async def one(c: AsyncClient, i: int) -> tuple[int, list[int]]:
        sampling = {"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": 7}
        deltas = [d async for d in c.generate_stream("The kiln", max_tokens=12, **sampling)]
        assert deltas[-1].finish is not None and deltas[-1].finish.completion_tokens == 12
        return i, [t for d in deltas for t in d.token_ids]

    async def run() -> list[tuple[int, list[int]]]:
        async with AsyncClient(address, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(100)))

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    greedy = {tuple(ids) for i, ids in results if i % 2}
    seeded = {tuple(ids) for i, ids in results if not i % 2}
    assert len(results) == 100 and len(greedy) == 1 and len(seeded) == 1
    print(f"100 streams x 12 tokens through Serve: {elapsed:.2f} s, {1200 / elapsed:.0f} tokens/s")


def test_client_cancel_reaches_the_replica_and_frees_blocks(client):
    stream = client.generate_stream("The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT)
    next(stream), next(stream)
    assert client.model_info()["running"] == 1
    stream.close()
    assert wait_until(lambda: _idle(client), timeout=3), client.model_info()


def test_deadline_is_deadline_exceeded_and_frees_blocks(client):
    with pytest.raises(grpc.RpcError) as e:
        list(
            client.generate_stream(
                "The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT, timeout=0.4
            )
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: _idle(client), timeout=3), client.model_info()


def test_replica_death_mid_stream_is_unavailable_quickly(client, address):
    """Kill the replica under a running stream: the client gets UNAVAILABLE, never a hang."""
    import ray

    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLMServer")
    ]  # fmt: skip
    assert len(names) == 1
    replica = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    stream = client.generate_stream(
        "The kiln", temperature=0, max_tokens=MAX_TOKENS_LIMIT, timeout=60
    )
    next(stream)
    ray.kill(replica, no_restart=True)
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert time.monotonic() - start < 10
    # Serve replaces the replica, which loads the model again; then requests succeed again.
    assert wait_until(lambda: _generates(client), timeout=60, period=0.5)


def _generates(client: Client) -> bool:
    try:
        return client.generate("The kiln", max_tokens=2, timeout=5).finish.completion_tokens == 2
    except grpc.RpcError:
        return False
