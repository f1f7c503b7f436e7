"""The registry says what serves: each defect of issue 11 against the real orchestrator actor.

The orchestrator runs as the real detached Ray actor; replicas are real ``ServingModel``s with
real ``SwapAgent``s that reach it over Ray (``ActorLink``), running in the test's event loop.
One test adds a replica that speaks the same protocol but whose engine fails every commit
(what a replica whose step loop died reports), since no healthy engine fails a commit on cue.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from serving_utils import TEXT, make_checkpoint

from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator
from kilnlm.actors.serving_model import ServingModel
from kilnlm.actors.swap_agent import ActorLink, SwapAgent
from kilnlm.actors.swap_messages import Heartbeat, Hello, Result, orchestrator_name
from kilnlm.engine import EngineConfig
from kilnlm.serving_config import ServeConfig

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # 4 tests, ~25 s each on 2 cores

SERVE = ServeConfig(engine=EngineConfig(kv_budget_mib=4, max_tokens_limit=64))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("truth")
    (root / "heldout.txt").write_text(TEXT * 2, encoding="utf-8")
    return {
        "root": root,
        "heldout": root / "heldout.txt",
        **{f"v{i}": make_checkpoint(root / f"v{i}", version=i, seed=i) for i in (1, 2, 3)},
    }


@pytest.fixture
def orchestrator(ray_cluster, ckpts, tmp_path, request):
    """A fresh orchestrator actor per test (its own app name and registry)."""
    import ray

    app = f"truth-{request.node.name[:40]}"
    config = OrchestratorConfig(
        storage_path=str(tmp_path / "registry"),
        heldout=str(ckpts["heldout"]),
        app_name=app,
        max_ppl_increase=float("inf"),  # random models: the margin is tested in-process
        poll_timeout_s=0.5,
        replica_timeout_s=4.0,
        stage_timeout_s=30.0,
        commit_timeout_s=10.0,
        check_serve=False,
        keep_last=0,
    )
    handle = start_orchestrator(config)
    yield handle, orchestrator_name(app)
    ray.kill(handle, no_restart=True)


async def _replica(name: str, rid: str) -> tuple[ServingModel, SwapAgent]:
    model = ServingModel(SERVE)
    agent = SwapAgent(model, ActorLink(name), rid, retry_s=0.5)
    await agent.start(sync_timeout_s=60)
    return model, agent


async def _commit_fails(name: str, rid: str) -> None:
    """A replica that stages, loads and aborts like any other, but whose commits fail."""
    link = ActorLink(name)
    hello = Hello(rid, None, None, 0, "", None, "double")
    attachment = await link.call("attach", hello)
    serving = attachment.target.version if attachment.target else 0
    staged, acked = None, 0
    while True:
        beat = Heartbeat(serving, staged, acked, 0, 0, 0, 0)
        for c in await link.call("poll", rid, acked, beat) or []:
            acked = max(acked, c.seq)
            ok, error = True, ""
            if c.kind == "stage":
                staged = c.version
            elif c.kind == "commit":
                ok, error = False, "EngineDead: the engine's step loop died"
            elif c.kind == "load":
                serving, staged = c.version, None
            elif c.kind == "abort":
                staged = None
            await link.call("report", rid, Result(c.seq, c.kind, ok, c.version, error=error))


async def _eventually(predicate: Any, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return False


def _version(model: ServingModel) -> int | None:
    return None if model.current is None else model.current.version


async def _close(*replicas: tuple[ServingModel, SwapAgent]) -> None:
    for model, agent in replicas:
        await agent.stop()
        model.shutdown()


def test_a_failed_commit_rolls_every_replica_back_and_the_registry_keeps_the_old_version(
    orchestrator, ckpts
):
    handle, name = orchestrator

    async def body() -> None:
        r0 = await _replica(name, "r0")
        flaky = asyncio.ensure_future(_commit_fails(name, "flaky"))
        try:
            v1 = await handle.register.remote(str(ckpts["v1"]))
            assert await _eventually(lambda: len(ray_status(handle).replicas) == 2)
            await handle.validate.remote(v1)
            # the first promotion: flaky fails its commit as well, so nothing is promoted
            with pytest.raises(Exception, match="flaky"):
                await handle.promote.remote(v1)
            st = await handle.status.remote()
            assert st.promoted_version is None, "a version no replica set committed is promoted"
            swap = st.swaps[-1]
            assert swap.outcome == "failed" and "flaky" in swap.reason
            assert getattr(swap, "failed_replica", None) == "flaky"
            assert "EngineDead" in swap.replicas["flaky"].error
            records = {r.version: r.status for r in await handle.list_checkpoints.remote()}
            assert records[v1] == "validated", "an environment failure leaves it promotable"
        finally:
            flaky.cancel()
            await _close(r0)

    asyncio.run(body())


def test_a_commit_failure_after_a_promotion_rolls_back_to_it(orchestrator, ckpts):
    handle, name = orchestrator

    async def body() -> None:
        r0, r1 = await _replica(name, "r0"), await _replica(name, "r1")
        flaky = None
        try:
            v1 = await handle.register.remote(str(ckpts["v1"]))
            await handle.promote.remote(v1)
            assert [_version(r0[0]), _version(r1[0])] == [v1, v1]
            flaky = asyncio.ensure_future(_commit_fails(name, "flaky"))
            assert await _eventually(lambda: len(ray_status(handle).replicas) == 3)
            v2 = await handle.register.remote(str(ckpts["v2"]))
            with pytest.raises(Exception, match="flaky"):
                await handle.promote.remote(v2)
            st = await handle.status.remote()
            assert st.promoted_version == v1, "the registry must not name a version that failed"
            assert [_version(r0[0]), _version(r1[0])] == [v1, v1], "every replica rolled back"
            swap = st.swaps[-1]
            assert swap.outcome == "failed" and swap.version == v2
            assert getattr(swap, "failed_replica", None) == "flaky"
        finally:
            if flaky is not None:
                flaky.cancel()
            await _close(r0, r1)

    asyncio.run(body())


def test_a_checkpoint_missing_on_the_replicas_stays_promotable(orchestrator, ckpts, tmp_path):
    """A FileNotFoundError while staging is the environment's (a node without the shared
    mount), not the checkpoint's: the swap fails, the checkpoint stays ``validated``."""
    handle, name = orchestrator
    v2_dir = tmp_path / "v2"
    shutil.copytree(ckpts["v2"], v2_dir)

    async def body() -> None:
        r0, r1 = await _replica(name, "r0"), await _replica(name, "r1")
        try:
            await handle.promote.remote(await handle.register.remote(str(ckpts["v1"])))
            v2 = await handle.register.remote(str(v2_dir))
            await handle.validate.remote(v2)
            v2_dir.rename(tmp_path / "unmounted")  # the replicas no longer see it
            with pytest.raises(Exception, match="FileNotFoundError"):
                await handle.promote.remote(v2)
            records = {r.version: r for r in await handle.list_checkpoints.remote()}
            assert records[v2].status == "validated", records[v2].reason
            swap = (await handle.status.remote()).swaps[-1]
            assert getattr(swap, "failure_kind", None) == "environment"
            assert swap.outcome == "aborted" and any(p.error for p in swap.replicas.values())
            (tmp_path / "unmounted").rename(v2_dir)  # mounted again: the same version promotes
            await handle.promote.remote(v2)
            assert [_version(r0[0]), _version(r1[0])] == [v2, v2]
        finally:
            await _close(r0, r1)

    asyncio.run(body())


def test_retention_never_deletes_the_files_a_kept_version_points_at(orchestrator, ckpts, tmp_path):
    """keep_last=0. An export rewritten in place must not become a second version on the same
    path: retention of the first would delete the files the second (the rollback target) needs."""
    handle, _ = orchestrator
    path = tmp_path / "step-100"
    shutil.copytree(ckpts["v1"], path)

    async def body() -> None:
        v1 = await handle.register.remote(str(path))
        await handle.promote.remote(v1)
        for f in ckpts["v2"].iterdir():  # a re-export over the registered folder
            shutil.copy(f, path / f.name)
        refused = False
        try:
            await handle.promote.remote(await handle.register.remote(str(path)))
        except Exception as e:
            refused = "rewritten" in str(e)
        await handle.promote.remote(await handle.register.remote(str(ckpts["v3"])))
        st = await handle.status.remote()
        target = next(r for r in st.checkpoints if r.version == st.rollback_version)
        assert (Path(target.path) / "manifest.json").is_file(), (
            f"retention deleted {target.path}, which the rollback target version "
            f"{target.version} points at"
        )
        assert refused, "a registered path whose files changed must be refused"

    asyncio.run(body())


def ray_status(handle: Any) -> Any:
    import ray

    return ray.get(handle.status.remote())
