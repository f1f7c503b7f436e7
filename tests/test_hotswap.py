"""Hot-swap for real: Ray Serve replicas, the orchestrator actor, gRPC clients on loopback.

One Serve application (2 replicas of a tiny model behind the gateway) and one orchestrator
actor for the module; the tests run in order and each leaves version 2 promoted. Streams are
greedy, so every stream's tokens must equal the reference output of the version its finish
message names: one version produced all of its tokens.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from serving_utils import TEXT, make_checkpoint, wait_until

from kilnlm import checkpoint
from kilnlm.checkpoint import save_pretrained
from kilnlm.client import Client
from kilnlm.engine import EngineConfig, LLMEngine
from kilnlm.model import ModelConfig, Transformer
from kilnlm.proto import admin_pb2, admin_pb2_grpc
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig
from kilnlm.tokenizer import Tokenizer

pytestmark = pytest.mark.ray

APP = "kiln-test-hotswap"
TOKEN = "hotswap-test-token"
PROMPT = "The kiln fires clay"
MAX_TOKENS = 96
LONG_TOKENS = 200
ENGINE = EngineConfig(kv_budget_mib=16, max_num_seqs=64, max_tokens_limit=240)


# --------------------------------------------------------------------------------------------
# Fixtures: checkpoints, the orchestrator actor, the Serve application


@dataclass
class Setup:
    address: str
    orchestrator: object
    ckpts: dict[str, Path]
    root: Path


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory):
    import ray
    from ray import serve

    from kilnlm.actors import serve_app
    from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator

    root = tmp_path_factory.mktemp("hotswap")
    ckpts = {f"v{i}": make_checkpoint(root / f"v{i}", version=i, seed=i) for i in (1, 2, 3, 4)}
    ckpts["wide"] = _wide(root / "wide", ckpts["v1"])
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    orchestrator = start_orchestrator(
        OrchestratorConfig(
            storage_path=str(root / "registry"),
            heldout=str(root / "heldout.txt"),
            app_name=APP,
            max_ppl_increase=float("inf"),  # random models; the margin is tested in-process
            canary_max_ppl_increase=float("inf"),
            poll_timeout_s=1.0,
            replica_timeout_s=5.0,
            stage_timeout_s=60.0,
            validate_in="task",  # the gate as a Ray task (the thread path runs in-process)
            validation_num_cpus=0.5,
        )
    )
    config = ServeConfig(
        checkpoint=str(ckpts["v1"]), port=0, http_port=0, app_name=APP, num_replicas=2, admin_token=TOKEN,
        health_poll_s=0.2, engine=ENGINE, replica_num_cpus=0.5,
    )  # fmt: skip
    address = serve_app.run(config)
    yield Setup(address, orchestrator, ckpts, root)
    serve.delete(APP)
    ray.kill(orchestrator, no_restart=True)


def _wide(path: Path, like: Path) -> Path:
    """Another architecture (n_embd 64) with the same tokenizer: valid, but not hot-swappable."""
    tokenizer = Tokenizer.load(like)
    torch.manual_seed(7)
    cfg = ModelConfig.from_preset(
        "test-1m", vocab_size=tokenizer.vocab_size, block_size=256, n_embd=64
    )
    return save_pretrained(Transformer(cfg), path, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def references(setup) -> dict[int, list[int]]:
    """Greedy tokens of PROMPT under each version, from an in-process engine (a greedy stream
    of n tokens is the first n of these)."""
    out = {}
    for version in (1, 2):
        path = setup.ckpts[f"v{version}"]
        tok = checkpoint.load_tokenizer(path)
        engine = LLMEngine(checkpoint.load(path), ENGINE, tok.eos_id, version, decode=tok.decode)
        engine.add_request("ref", tok.encode(PROMPT), SamplingParams(temperature=0, max_tokens=LONG_TOKENS))  # fmt: skip
        tokens: list[int] = []
        while engine.has_unfinished():
            tokens += [t for o in engine.step() for t in o.token_ids]
        out[version] = tokens
    assert out[1] != out[2]
    return out


# --------------------------------------------------------------------------------------------
# Helpers: admin calls, continuous streaming load


def admin(setup: Setup, method: str, request, timeout: float = 120.0):
    with grpc.insecure_channel(setup.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return getattr(stub, method)(
            request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=timeout
        )


def status(setup: Setup) -> admin_pb2.StatusResponse:
    return admin(setup, "Status", admin_pb2.StatusRequest(), timeout=10)


def replica_versions(setup: Setup) -> list[int]:
    return sorted(r.version for r in status(setup).replicas)


def register(setup: Setup, name: str) -> int:
    import ray

    return ray.get(setup.orchestrator.register.remote(str(setup.ckpts[name])))


@dataclass
class Stream:
    sent: float
    max_tokens: int
    first: float | None = None
    end: float = 0.0
    version: int | None = None
    tokens: list[int] = field(default_factory=list)
    error: grpc.StatusCode | None = None
    details: str = ""


class Load:
    """``n`` clients, each streaming greedy generations back to back until stopped."""

    def __init__(self, address: str, n: int, max_tokens: int = MAX_TOKENS) -> None:
        self.address, self.max_tokens = address, max_tokens
        self.streams: list[Stream] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _client(self) -> None:
        with Client(self.address, timeout=60) as client:
            while not self._stop.is_set():
                self.one(client)

    def one(self, client: Client) -> Stream:
        s = Stream(sent=time.monotonic(), max_tokens=self.max_tokens)
        self.streams.append(s)  # visible while in flight; ``end`` is set when it finishes
        try:
            for delta in client.generate_stream(PROMPT, temperature=0, max_tokens=self.max_tokens):
                if s.first is None:
                    s.first = time.monotonic()
                s.tokens += delta.token_ids
                if delta.finish is not None:
                    s.version = delta.finish.model_version
        except grpc.RpcError as e:
            s.error, s.details = e.code(), e.details()
        s.end = time.monotonic()
        return s

    def done(self) -> list[Stream]:
        return [s for s in self.streams if s.end]

    def generating(self) -> list[Stream]:
        return [s for s in self.streams if s.first is not None and not s.end]


def _check_streams(streams: list[Stream], references: dict[int, list[int]]) -> None:
    """No failure, and each stream is exactly the reference output of the version it names."""
    failed = [(s.error, s.details) for s in streams if s.error is not None]
    assert not failed, failed
    for s in streams:
        assert s.version in references, s.version
        expected = references[s.version][: s.max_tokens]
        assert s.tokens == expected, f"stream mixes versions (named {s.version})"


# --------------------------------------------------------------------------------------------
# Tests


def test_replicas_attach_and_the_served_checkpoint_keeps_its_number(setup):
    assert wait_until(lambda: len(status(setup).replicas) == 2, timeout=15)
    assert register(setup, "v1") == 1  # the files the replicas were started with
    swap = admin(setup, "Promote", admin_pb2.PromoteRequest(version=1)).swap
    assert all(r.skipped for r in swap.replicas) and len(swap.replicas) == 2
    assert status(setup).promoted_version == 1 and replica_versions(setup) == [1, 1]


def test_promote_under_streaming_load_fails_no_request(setup, references):
    from kilnlm.actors.swap_messages import ORCHESTRATOR_NAMESPACE, orchestrator_name
    from kilnlm.cluster.hooks import ActorHook

    ActorHook(orchestrator_name(APP), ORCHESTRATOR_NAMESPACE)(str(setup.ckpts["v2"]))  # trainer
    with Load(setup.address, n=6, max_tokens=LONG_TOKENS) as load:
        assert wait_until(lambda: len(load.generating()) >= 4, 60)  # mid-stream, on version 1
        before = time.monotonic()
        response = admin(setup, "Promote", admin_pb2.PromoteRequest(version=2))
        after = time.monotonic()
        assert wait_until(lambda: sum(s.sent > after for s in load.done()) >= 3, 120)
    streams = load.done()
    _check_streams(streams, references)
    straddling = [s for s in streams if s.first is not None and s.first < before and s.end > after]
    assert straddling and all(s.version == 1 for s in straddling), "in-flight streams keep v1"
    started_after = [s for s in streams if s.sent > after]
    assert started_after and all(s.version == 2 for s in started_after)
    assert response.version == 2 and response.previous_version == 1
    assert response.swap_mode == "double" and response.swap.outcome == "ok"
    assert replica_versions(setup) == [2, 2]
    print(
        f"\nswap under load of 6 streams: {response.swap_seconds * 1000:.0f} ms (stage + commit), "
        f"registered → all replicas serving {response.swap.registered_to_serving_seconds:.2f} s, "
        f"stage per replica {[round(r.stage_seconds * 1000) for r in response.swap.replicas]} ms; "
        f"{len(streams)} streams, {len(straddling)} straddled the swap, 0 failed"
    )


def _flipped_copy(setup: Setup, name: str, source: str) -> Path:
    path = setup.root / name
    shutil.copytree(setup.ckpts[source], path)
    _flip(path / "model.safetensors")
    return path


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_nothing_flipped(setup: Setup) -> None:
    assert wait_until(
        lambda: all(r.version == 2 and r.staged_version == 0 for r in status(setup).replicas), 10
    ), status(setup).replicas
    with Client(setup.address, timeout=30) as c:
        assert {c.generate(PROMPT, max_tokens=2).finish.model_version for _ in range(6)} == {2}


def test_corrupted_checkpoint_is_rejected_naming_the_file(setup):
    import ray

    bad = _flipped_copy(setup, "corrupt", "v3")
    version = ray.get(setup.orchestrator.register.remote(str(bad)))
    with pytest.raises(grpc.RpcError) as e:
        admin(setup, "Promote", admin_pb2.PromoteRequest(version=version))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "checksum" in e.value.details() and "model.safetensors" in e.value.details()
    record = next(c for c in status(setup).checkpoints if c.version == version)
    assert record.state == admin_pb2.CHECKPOINT_STATE_REJECTED
    assert "model.safetensors" in record.reason
    _assert_nothing_flipped(setup)


def test_corruption_after_validation_aborts_the_stage_on_every_replica(setup):
    """The files change between the gate and the swap: each replica's own checksum check
    refuses them, the swap aborts everywhere, the checkpoint is rejected."""
    import ray

    path = setup.root / "late-corrupt"
    shutil.copytree(setup.ckpts["v3"], path)
    version = ray.get(setup.orchestrator.register.remote(str(path)))
    assert ray.get(setup.orchestrator.validate.remote(version)).status == "validated"
    _flip(path / "model.safetensors")
    with pytest.raises(grpc.RpcError) as e:
        admin(setup, "Promote", admin_pb2.PromoteRequest(version=version))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "failed to stage" in e.value.details() and "model.safetensors" in e.value.details()
    swap = status(setup).swaps[-1]
    assert swap.version == version and swap.outcome == "aborted"
    _assert_nothing_flipped(setup)


def test_another_architecture_is_rejected_and_no_replica_flips(setup):
    version = register(setup, "wide")
    with pytest.raises(grpc.RpcError) as e:
        admin(setup, "Promote", admin_pb2.PromoteRequest(version=version))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "n_embd" in e.value.details()
    record = next(c for c in status(setup).checkpoints if c.version == version)
    assert record.state == admin_pb2.CHECKPOINT_STATE_REJECTED and "n_embd" in record.reason
    _assert_nothing_flipped(setup)


def test_version_pinning_end_to_end(setup):
    with Client(setup.address, timeout=30) as c:
        assert c.generate(PROMPT, max_tokens=2, pin_version=2).finish.model_version == 2
        assert c.generate(PROMPT, max_tokens=2, min_version=2).finish.model_version == 2
        for kwargs, code in (
            ({"pin_version": 1}, grpc.StatusCode.FAILED_PRECONDITION),
            ({"min_version": 3}, grpc.StatusCode.UNAVAILABLE),
        ):
            with pytest.raises(grpc.RpcError) as e:
                c.generate(PROMPT, max_tokens=2, **kwargs)
            assert e.value.code() == code


def test_cli_canary_promote_status_and_rollback(setup, capsys, monkeypatch):
    from kilnlm.cli import main

    version = register(setup, "v4")
    flags = ["--address", setup.address]
    monkeypatch.setenv("KILN_ADMIN_TOKEN", "wrong")
    assert main(["status", *flags]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    monkeypatch.setenv("KILN_ADMIN_TOKEN", TOKEN)
    assert main(["promote", str(version), "--canary", *flags]) == 0
    out = capsys.readouterr().out
    assert f"version {version} serves on every replica (was 2)" in out and "canary:" in out
    assert replica_versions(setup) == [version, version]
    assert main(["rollback", *flags]) == 0
    assert "version 2 serves on every replica" in capsys.readouterr().out
    assert replica_versions(setup) == [2, 2]
    assert main(["status", *flags]) == 0
    out = capsys.readouterr().out
    assert "promoted version: 2" in out and "rollback target: 1" in out
    assert "canary" in out and "rollback" in out and "rejected" in out
    assert main(["promote", "999", *flags]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_orchestrator_killed_and_restarted_keeps_registry_and_replicas(setup, references):
    import ray

    before = admin(setup, "ListCheckpoints", admin_pb2.ListCheckpointsRequest())
    replicas = sorted(r.replica_id for r in status(setup).replicas)
    swaps = len(status(setup).swaps)
    first_life = ray.get(setup.orchestrator.ping.remote())
    with Load(setup.address, n=4) as load:
        assert wait_until(lambda: len(load.done()) >= 4, 60)
        ray.kill(setup.orchestrator, no_restart=False)  # Ray restarts it: same name, new process
        assert wait_until(lambda: _pid(setup) not in (None, first_life["pid"]), 30, 0.2)
        after = admin(setup, "ListCheckpoints", admin_pb2.ListCheckpointsRequest())
        assert after == before, "the registry came back exactly"
        assert wait_until(lambda: len(status(setup).replicas) == 2, timeout=15)
        time.sleep(0.5)
    st = status(setup)
    assert sorted(r.replica_id for r in st.replicas) == replicas, "same replicas re-attached"
    assert [r.version for r in st.replicas] == [2, 2] and len(st.swaps) == swaps
    _check_streams(load.done(), references)  # serving never noticed
    assert all(s.version == 2 for s in load.done())


def _pid(setup: Setup) -> int | None:
    """The orchestrator's process id; None while Ray reports it restarting."""
    import ray
    from ray.exceptions import RayActorError

    try:
        return ray.get(setup.orchestrator.ping.remote(), timeout=10)["pid"]
    except RayActorError:
        return None


def test_replica_killed_mid_stream(setup, references):
    """No stream is cut: the gateway resends the victim's streams to the other replica with the
    tokens already streamed, pinned to their version, and each client's one stream ends with
    that version's greedy tokens; Serve's replacement loads the promoted version (not the
    --checkpoint it was deployed with) before taking traffic."""
    import ray

    with Load(setup.address, n=6, max_tokens=LONG_TOKENS) as load:
        # Picking the victim needs both replicas busy by a recent heartbeat; on a loaded
        # 2-core machine heartbeats lag, so allow up to a minute to see that.
        assert wait_until(lambda: _busiest(setup) is not None, 60, 0.1), "streams on both"
        victim = _busiest(setup)
        actor = ray.get_actor(f"SERVE_REPLICA::{APP}#{victim}", namespace="serve")
        killed = time.monotonic()
        ray.kill(actor, no_restart=True)
        assert wait_until(lambda: _replaced(setup, victim), timeout=90, period=0.5)
        time.sleep(1.0)
    streams = load.done()
    assert all(s.error is None for s in streams), {s.details for s in streams if s.error}
    assert sum(s.sent < killed < s.end for s in streams) >= 2, "streams ran across the kill"
    _check_streams(streams, references)  # resent streams too: the version's greedy tokens
    assert all(s.version == 2 for s in streams), "the replacement never served version 1"
    assert replica_versions(setup) == [2, 2]


def _busiest(setup: Setup) -> str | None:
    """The replica with the most running streams by a fresh heartbeat, once both have some."""
    replicas = status(setup).replicas
    if len(replicas) != 2 or not all(r.running > 0 and r.last_seen_seconds < 1.0 for r in replicas):
        return None
    return max(replicas, key=lambda r: r.running).replica_id


def _replaced(setup: Setup, victim: str) -> bool:
    replicas = status(setup).replicas
    return len(replicas) == 2 and victim not in {r.replica_id for r in replicas}
