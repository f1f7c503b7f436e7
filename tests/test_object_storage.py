"""Checkpoints in object storage, against a real S3-compatible server on 127.0.0.1.

The fixture starts moto's standalone server (``ThreadedMotoServer``, real HTTP, the S3 REST API)
and points the standard variables at it (``AWS_ENDPOINT_URL`` and credentials), so pyarrow's S3
client talks to it as it would to AWS. Nothing is mocked: exports are uploaded and downloaded
over HTTP, replicas are real ``ServingModel`` engines, the registry is an object in the bucket.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("moto.server")

from serving_utils import TEXT
from test_orchestrator import SERVE, Cluster, config, export, run

from kilnlm import checkpoint
from kilnlm.actors.orchestrator import CheckpointRejected
from kilnlm.actors.registry import Registry
from kilnlm.actors.serving_model import ServingModel
from kilnlm.actors.swap_agent import DirectLink, SwapAgent
from kilnlm.actors.swap_messages import Command
from kilnlm.checkpoint import remote
from kilnlm.errors import SwapEnvironmentError
from kilnlm.tokenizer import Tokenizer

BUCKET = "kiln-test"


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1 with one bucket; yields ``s3://bucket``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT * 8], vocab_size=320, min_frequency=2)


@pytest.fixture(scope="module")
def local(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("s3-local")
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    return {
        "heldout": root / "heldout.txt",
        **{f"v{i}": export(root / f"v{i}", tokenizer, seed=i) for i in range(1, 4)},
    }


def put_object(uri: str, data: bytes) -> None:
    """Overwrite one object behind kilnlm's back (a corrupted upload or a bit flip at rest)."""
    remote.write_bytes(uri, data)


def flipped(data: bytes, offset: int = -100) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0xFF
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Upload and fetch


def test_upload_then_fetch_gives_the_same_files_verified(s3, local, tmp_path):
    uri = f"{s3}/exports/a"
    assert remote.upload_export(local["v1"], uri) is True
    fetched = remote.fetch(uri, tmp_path / "cache")
    manifest = checkpoint.read_manifest(local["v1"])
    assert fetched.downloaded and fetched.path.name == manifest.content_sha256()
    for name in [*manifest.files, checkpoint.MANIFEST]:
        assert (fetched.path / name).read_bytes() == (local["v1"] / name).read_bytes()
    a = checkpoint.load(local["v1"]).state_dict()
    b = checkpoint.load(fetched.path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = remote.fetch(uri, tmp_path / "cache")  # the node's cache is reused
    assert again.path == fetched.path and not again.downloaded
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [
        manifest.content_sha256()
    ]


def test_an_export_folder_is_never_overwritten(s3, local, tmp_path):
    uri = f"{s3}/exports/immutable"
    assert remote.upload_export(local["v1"], uri) is True
    assert remote.upload_export(local["v2"], uri) is False  # other content, same name: refused
    fetched = remote.fetch(uri, tmp_path / "cache")
    assert fetched.path.name == checkpoint.read_manifest(local["v1"]).content_sha256()


def test_a_folder_without_manifest_is_not_there(s3, local, tmp_path):
    """An upload that died before its manifest (uploaded last) is never read."""
    uri = f"{s3}/exports/unfinished"
    weights = (local["v1"] / checkpoint.WEIGHTS).read_bytes()
    put_object(f"{uri}/{checkpoint.WEIGHTS}", weights)
    with pytest.raises(checkpoint.IncompleteCheckpointError, match="manifest"):
        remote.fetch(uri, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_corrupted_object_is_a_checkpoint_error_and_never_cached(s3, local, tmp_path):
    uri = f"{s3}/exports/corrupted"
    remote.upload_export(local["v1"], uri)
    weights = (local["v1"] / checkpoint.WEIGHTS).read_bytes()
    put_object(f"{uri}/{checkpoint.WEIGHTS}", flipped(weights))
    with pytest.raises(checkpoint.ChecksumError, match=checkpoint.WEIGHTS) as e:
        remote.fetch(uri, tmp_path / "cache")
    assert e.value.file == checkpoint.WEIGHTS
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_bucket_is_a_retryable_environment_error(s3, local, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(SwapEnvironmentError, match="cannot reach") as e:
        remote.fetch(f"{s3}/exports/a", tmp_path / "cache")
    assert not isinstance(e.value, checkpoint.CheckpointError)


def _fetch_in_process(uri: str, cache: str, queue: multiprocessing.Queue) -> None:
    fetched = remote.fetch(uri, cache)
    queue.put((str(fetched.path), fetched.downloaded))


def test_two_processes_on_one_node_download_a_checkpoint_once(s3, local, tmp_path):
    """Two replicas of one node fetch the same version at the same time: the file lock makes
    one download and the other wait and reuse it."""
    uri = f"{s3}/exports/shared"
    remote.upload_export(local["v2"], uri)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_fetch_in_process, args=(uri, str(tmp_path / "cache"), queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({path for path, _ in results}) == 1
    assert sorted(downloaded for _, downloaded in results) == [False, True]


def test_storage_env_forwards_only_storage_settings():
    env = {"AWS_ENDPOINT_URL": "http://x", "GOOGLE_CLOUD_PROJECT": "p", "HOME": "/root"}
    assert remote.storage_env(env) == {"AWS_ENDPOINT_URL": "http://x", "GOOGLE_CLOUD_PROJECT": "p"}
    keys = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
    assert remote.storage_env(keys) == keys  # a Ray this process starts itself
    assert remote.storage_env(keys, secrets=False) == {"AWS_ACCESS_KEY_ID": "id"}  # a shared one
    assert remote.local_dir("file:///tmp/x") == "/tmp/x"


def test_kiln_eval_scores_an_export_in_the_bucket_as_on_disk(
    s3, local, tmp_path, monkeypatch, capsys
):
    import json

    from kilnlm.cli import main

    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    uri = f"{s3}/exports/eval"
    remote.upload_export(local["v1"], uri)
    results = []
    for where in (uri, str(local["v1"])):
        assert main(["eval", "--checkpoint", where, "--text", str(local["heldout"]), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and results[0]["tokens"] > 1


# --------------------------------------------------------------------------------------------
# The registry and the orchestrator on s3://


def test_registry_persists_in_the_bucket_and_recovers(s3):
    reg = Registry.open(f"{s3}/registry-a")
    reg.add("s3://b/x", "s3://b/x", "a" * 64, {"model.safetensors": "b" * 64}, {"step": 4})
    reg.set_status(1, "validating")
    again = Registry.open(f"{s3}/registry-a")
    assert again.to_dict() == reg.to_dict()
    assert again.recover() == [1] and again.get(1).status == "registered"
    assert Registry.open(f"{s3}/registry-b").checkpoints == {}


def test_orchestrator_registers_gates_and_hot_swaps_from_s3(s3, local, tmp_path, monkeypatch):
    """register(s3://) -> the gate fetches and validates -> every replica fetches, stages and
    flips; a corrupted upload is rejected by the gate and the replicas keep the old version;
    an object corrupted after validation is refused by each replica's own check."""
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    uris = {}
    for name in ("v1", "v2", "v3"):
        uris[name] = f"{s3}/orch/{name}"
        remote.upload_export(local[name], uris[name])
    weights = (local["v3"] / checkpoint.WEIGHTS).read_bytes()
    put_object(f"{uris['v3']}/{checkpoint.WEIGHTS}", flipped(weights))
    cfg = config(tmp_path, local, storage_path=f"{s3}/orch/registry")

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        for _ in range(2):
            await c.add_replica()
        v1 = await o.register(uris["v1"])
        await o.promote(v1)
        v2 = await o.register(uris["v2"])
        assert await o.register(uris["v2"]) == v2  # idempotent on content
        swap = await o.promote(v2)
        assert swap.outcome == "ok" and c.versions() == [2, 2]
        assert all(m.current.checkpoint.startswith(str(tmp_path / "cache")) for m in c.models)
        v3 = await o.register(uris["v3"])
        with pytest.raises(CheckpointRejected, match="checksum"):
            await o.promote(v3)
        assert c.versions() == [2, 2]
        # A replica handed a corrupted object (here without the gate) refuses it as the
        # checkpoint's fault and keeps serving version 2.
        result = await c.agents[0].execute(Command(999, "stage", version=7, path=uris["v3"]))
        assert not result.ok and result.fault == "checkpoint" and "ChecksumError" in result.error
        assert c.versions() == [2, 2] and c.models[0].staged is None
        st = await o.status()
        assert st.promoted_version == 2
        assert [r.status for r in await o.list_checkpoints()] == ["retired", "promoted", "rejected"]

    run(cfg, body)
    reloaded = Registry.open(f"{s3}/orch/registry")
    assert reloaded.promoted == 2 and reloaded.get(2).path == uris["v2"]
    assert reloaded.get(3).status == "rejected"
    # The gate's and both replicas' fetches of one version downloaded it once for the node.
    keys = {checkpoint.read_manifest(local[n]).content_sha256() for n in ("v1", "v2")}
    cached = {p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")}
    assert cached == keys


def test_a_replica_started_on_a_bucket_uri_keeps_its_version_number(
    s3, local, tmp_path, monkeypatch
):
    """``kiln serve --checkpoint s3://…``: the replica loads its cached copy before its agent
    exists; the agent reports the URI, so registering that URI keeps the number it serves
    under and promoting it loads nothing again."""
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    uri = f"{s3}/serve/a"
    remote.upload_export(local["v1"], uri)
    cfg = config(tmp_path, local, storage_path=f"{s3}/serve/registry")

    async def body(c: Cluster) -> None:
        model = ServingModel(SERVE)
        path = remote.local_dir(uri)
        await model.load(path, 3)
        agent = SwapAgent(model, DirectLink(c.orchestrator), "r0", sources={path: uri})
        await agent.start(sync_timeout_s=30)
        c.models.append(model)
        c.agents.append(agent)
        assert await c.orchestrator.register(uri) == 3
        swap = await c.orchestrator.promote(3)
        assert swap.outcome == "ok" and all(r.skipped for r in swap.replicas.values())
        assert c.versions() == [3]

    run(cfg, body)


def test_an_unreachable_bucket_leaves_the_version_registered_not_rejected(
    s3, local, tmp_path, monkeypatch
):
    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    uri = f"{s3}/orch2/v1"
    remote.upload_export(local["v1"], uri)
    cfg = config(tmp_path, local)

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        v1 = await o.register(uri)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
        with pytest.raises(SwapEnvironmentError):
            await o.validate(v1)
        record = (await o.list_checkpoints())[0]
        assert record.status == "registered"

    run(cfg, body)


# --------------------------------------------------------------------------------------------
# End to end on real Ray: train -> export -> register -> gate -> hot-swap, all through s3://


def _list(uri: str) -> list[str]:
    import pyarrow.fs

    fs, root = remote.filesystem(uri)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return [i.path.removeprefix(root).lstrip("/") for i in infos]


@pytest.mark.ray
@pytest.mark.slow
def test_train_export_register_gate_and_hot_swap_through_s3(
    s3, ray_cluster, tiny_corpus, tmp_path, monkeypatch
):
    """Ray Train writes its sharded checkpoints and rank 0 its exports to the bucket; the
    orchestrator's registry lives there; the gate and the replicas fetch the exports from it.
    The training runs in a Ray task whose runtime env carries the bucket's settings (the
    session's Ray started before the server existed), as ``ensure_ray`` gives them to a run."""
    import ray

    from kilnlm.cluster.config import ClusterConfig, JobConfig
    from kilnlm.cluster.launcher import launch
    from kilnlm.train import TrainConfig

    train = TrainConfig(
        lr=3e-3,
        warmup_steps=2,
        max_steps=8,
        batch_size=4,
        seq_len=64,
        eval_every=4,
        eval_batches=1,
        log_every=4,
        checkpoint_every=4,
    )
    cluster = ClusterConfig(
        workers=2,
        storage_path=f"{s3}/runs",
        name="s3-e2e",
        progress=False,
        max_failures=0,
        checkpoint_upload="sync",
    )
    job = JobConfig(
        preset="test-1m",
        model={"block_size": 128},
        train=train,
        cluster=cluster,
        data_dir=str(tiny_corpus),
    )

    @ray.remote(num_cpus=0.1, runtime_env={"env_vars": remote.storage_env()})
    def train_in_ray(job: JobConfig, cwd: str) -> list[str]:
        # A run in a bucket keeps its local metrics in ./<name>-metrics: not in the checkout.
        previous = os.getcwd()
        os.chdir(cwd)
        try:
            return launch(job).exports
        finally:
            os.chdir(previous)

    exports = ray.get(train_in_ray.remote(job, str(tmp_path)), timeout=1200)
    assert len(exports) == 2 and all(u.startswith(f"{s3}/runs/s3-e2e/") for u in exports)
    stored = _list(f"{s3}/runs/s3-e2e")
    assert any("checkpoint_" in p for p in stored)  # Ray Train's sharded checkpoints
    for uri in exports:
        assert remote.exists(f"{uri}/{checkpoint.MANIFEST}")

    monkeypatch.setenv(remote.CACHE_ENV, str(tmp_path / "cache"))
    cfg = config(
        tmp_path,
        {"heldout": tiny_corpus},
        storage_path=f"{s3}/runs/s3-e2e/orchestrator",
        max_ppl_increase=1.0,
    )

    async def body(c: Cluster) -> None:
        o = c.orchestrator
        for _ in range(2):
            await c.add_replica()
        first = await o.register(exports[0])
        await o.promote(first)
        second = await o.register(exports[1])
        swap = await o.promote(second)
        assert swap.outcome == "ok" and c.versions() == [second, second]
        records = await o.list_checkpoints()
        assert [r.status for r in records] == ["retired", "promoted"]
        assert all(r.validation is not None and r.validation.perplexity > 1 for r in records)
        # What serves is the export's weights, byte for byte.
        served = c.models[0].current.checkpoint
        assert Path(served).name == remote.read_remote_manifest(exports[1]).content_sha256()

    run(cfg, body)
    assert "registry.json" in _list(f"{s3}/runs/s3-e2e/orchestrator")
