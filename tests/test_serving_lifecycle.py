"""A Serve application that starts with no model: health, UNAVAILABLE, loading, hot-swap, queue full.

One application for the module, deployed empty (as replicas are before the orchestrator's
first promotion) with a one-sequence engine and a one-request queue, so a full queue is easy
to reach, and its orchestrator: weights change only through it (the replicas' swap agents are
the one control path). The tests run in file order: empty -> loaded -> swapped.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving_utils import TEXT, make_checkpoint, wait_until

from kilnlm.client import Client
from kilnlm.engine import EngineConfig
from kilnlm.proto import admin_pb2, admin_pb2_grpc
from kilnlm.serving_config import ServeConfig

pytestmark = pytest.mark.ray

APP = "kiln-test-lifecycle"
TOKEN = "t0ken"
ENGINE = EngineConfig(kv_budget_mib=4, max_num_seqs=1, max_queue=1, max_tokens_limit=240)
CONFIG = ServeConfig(
    port=0,
    http_port=0,
    app_name=APP,
    health_poll_s=0.1,
    admin_token=TOKEN,
    retry_after_ms=400,
    engine=ENGINE,
)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    return make_checkpoint(root / "v1", version=1), make_checkpoint(root / "v2", version=2, seed=2)


@pytest.fixture(scope="module")
def orchestrator(ray_cluster, ckpts):
    import ray

    from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator

    root = ckpts[0].parent
    actor = start_orchestrator(
        OrchestratorConfig(
            storage_path=str(root / "registry"),
            heldout=str(root / "heldout.txt"),
            app_name=APP,
            max_ppl_increase=float("inf"),  # random models: the margin means nothing here
            poll_timeout_s=1.0,
            stage_timeout_s=60.0,
        )
    )
    yield actor
    ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def address(orchestrator):
    from ray import serve

    from kilnlm.actors import serve_app

    yield serve_app.run(CONFIG)
    serve.delete(APP)


def promote(address: str, orchestrator, path) -> admin_pb2.PromoteResponse:
    """Register a checkpoint and promote it through the Admin API, as ``kiln promote`` does."""
    import ray

    version = ray.get(orchestrator.register.remote(str(path)))
    with grpc.insecure_channel(address) as channel:
        return admin_pb2_grpc.AdminStub(channel).Promote(
            admin_pb2.PromoteRequest(version=version),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=120,
        )


@pytest.fixture(scope="module")
def client(address):
    with Client(address, timeout=30) as c:
        yield c


def test_empty_replica_is_not_serving_and_unavailable(client, address):
    assert client.health() == "NOT_SERVING"
    assert client.health("kiln.v1.Generation") == "NOT_SERVING"
    for call in (
        lambda: client.generate("hi"),
        lambda: list(client.chat_stream([{"role": "user", "content": "hi"}])),
        lambda: client.score("hi"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
    assert client.model_info()["version"] == 0


def test_admin_without_a_valid_token_is_unauthenticated(address):
    with grpc.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as e:
                admin.Promote(admin_pb2.PromoteRequest(version=1), metadata=metadata, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_loading_a_model_turns_health_serving(address, orchestrator, client, ckpts):
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert promote(address, orchestrator, ckpts[0]).version == 1
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    assert client.generate("The kiln", max_tokens=3).finish.model_version == 1


def test_queue_full_is_resource_exhausted_with_a_retry_hint(client):
    running = client.generate_stream("The kiln", temperature=0, max_tokens=240)
    next(running)  # the engine's one sequence slot is taken
    waiting = threading.Thread(target=lambda: client.generate("The kiln", max_tokens=2))
    waiting.start()
    assert wait_until(lambda: client.model_info()["waiting"] == 1)
    with pytest.raises(grpc.RpcError) as e:
        client.generate("The kiln", max_tokens=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(e.value.trailing_metadata())["retry-after-ms"] == "400"
    running.close()
    waiting.join(30)
    assert client.generate("The kiln", max_tokens=2).finish.completion_tokens == 2


def test_two_phase_swap_keeps_in_flight_requests_on_their_version(
    address, orchestrator, client, ckpts
):
    """A promotion (stage + commit through the orchestrator and the swap agent): the running
    stream finishes on version 1, the next request is served by version 2."""
    stream = client.generate_stream("The kiln", temperature=0, max_tokens=120)
    next(stream)
    assert promote(address, orchestrator, ckpts[1]).version == 2
    assert list(stream)[-1].finish.model_version == 1
    assert client.generate("The kiln", max_tokens=2).finish.model_version == 2
    assert client.model_info()["version"] == 2
