"""The replica side of the hot-swap protocol: a ``SwapAgent`` in every LLM server replica.

Why an agent that *pulls*: the orchestrator must reach every live replica, and a Serve
``DeploymentHandle`` routes a call to one replica of its choice. ``DeploymentHandle.broadcast``
(Ray 2.60, alpha) reaches the replicas its router knows of, and says neither which replicas
those were nor anything about a replica that is starting (docs/orchestrator.md has the full
comparison). So each replica dials the orchestrator instead, as Serve's own long-poll does:

1. ``attach``: at start, the agent tells the orchestrator who it is (its actor name, what it
   serves) and learns the promoted version; it loads that version before the replica's
   constructor returns, so Serve never routes a request to an old or empty replica
   (``check()`` fails the replica's health check until it has).
2. ``poll``: a long poll (a few seconds, also the heartbeat) that returns the orchestrator's
   commands — stage, commit, abort, load, evaluate — which the agent runs one at a time, in
   order, on the replica's ``ServingModel``, and answers with ``report``.

If the orchestrator restarts, a poll answers "unknown replica" (or fails while the actor is
down) and the agent attaches again; the replica keeps serving what it serves meanwhile. With
no orchestrator at all (``kiln serve`` alone) the agent keeps looking for one, every few
seconds, and the replica serves its ``--checkpoint``.

The messages both sides exchange are ``swap_messages.py``'s. The link to the orchestrator is
injected (``ActorLink`` over Ray, ``DirectLink`` to an object in this process), so the protocol
runs in-process in tests with real replicas and no Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from kilnlm.actors.serving_model import ServingModel
from kilnlm.actors.swap_messages import (
    ORCHESTRATOR_NAMESPACE,
    Attachment,
    Command,
    Heartbeat,
    Hello,
    Result,
    Target,
    UnknownReplica,
    local_path,
    orchestrator_name,
)
from kilnlm.checkpoint import CheckpointError, remote
from kilnlm.energy import EnergyMeter
from kilnlm.hotswap import FailureKind

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Links to the orchestrator


class Link(Protocol):
    async def call(self, method: str, *args: Any) -> Any: ...

    async def exists(self) -> bool: ...


class DirectLink:
    """An orchestrator object in this process (tests; no Ray in between)."""

    def __init__(self, orchestrator: Any) -> None:
        self.orchestrator = orchestrator

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self.orchestrator, method)(*args)

    async def exists(self) -> bool:
        return True


class ActorLink:
    """The named orchestrator actor, looked up again after it restarts or appears."""

    def __init__(self, name: str, namespace: str = ORCHESTRATOR_NAMESPACE) -> None:
        self.name, self.namespace = name, namespace
        self._handle: Any = None

    async def exists(self) -> bool:
        import ray

        try:
            self._handle = await asyncio.to_thread(ray.get_actor, self.name, self.namespace)
        except ValueError:
            self._handle = None
        return self._handle is not None

    async def call(self, method: str, *args: Any) -> Any:
        if self._handle is None and not await self.exists():
            raise ConnectionError(f"no orchestrator named {self.name!r} is running")
        return await getattr(self._handle, method).remote(*args)


# --------------------------------------------------------------------------------------------
# The agent


def failure_kind(e: BaseException) -> FailureKind:
    """Only a ``CheckpointError`` says the checkpoint itself is bad; anything else (a
    ``SwapEnvironmentError``, a file missing on this node, a timeout, or a bug) may pass on a
    retry, so it never rejects a checkpoint for good."""
    return "checkpoint" if isinstance(e, CheckpointError) else "environment"


class SwapAgent:
    """Runs the orchestrator's commands on one replica's ``ServingModel``."""

    def __init__(
        self,
        model: ServingModel,
        link: Link,
        replica_id: str,
        actor_name: str | None = None,
        namespace: str | None = None,
        retry_s: float = 2.0,
        sources: dict[str, str] | None = None,
    ) -> None:
        self.model, self.link, self.replica_id = model, link, replica_id
        self.energy = EnergyMeter("process")  # the replica's process: its own tokens' energy
        self.actor_name, self.namespace = actor_name, namespace
        self.retry_s = retry_s
        self.poll_timeout_s = 2.0
        self.ready = False
        """True once the replica serves what the orchestrator said (or there is none)."""
        self.error = ""
        """Why the replica is not ready (``check`` raises with it)."""
        self.orchestrated = False
        self._acked = 0
        self._executed = 0
        self._commands: asyncio.Queue[Command] = asyncio.Queue()
        self._model_lock = asyncio.Lock()  # stage/commit/abort/load run one at a time
        self._sources: dict[str, str] = dict(sources or {})
        """Local cache folder -> the object-store URI it was fetched from (``sources``: those
        the replica loaded before its agent existed, ``kiln serve --checkpoint s3://…``)."""
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def start_in_replica(
        cls,
        model: ServingModel,
        sync_timeout_s: float = 60.0,
        sources: dict[str, str] | None = None,
    ) -> SwapAgent:
        """The agent of the Serve replica this runs in, synced before the constructor returns."""
        import ray
        from ray import serve

        context = serve.get_replica_context()
        runtime = ray.get_runtime_context()
        agent = cls(
            model,
            ActorLink(orchestrator_name(context.app_name)),
            replica_id=f"{context.deployment}#{context.replica_tag}",
            actor_name=runtime.get_actor_name(),
            namespace=runtime.namespace,
            sources=sources,
        )
        await agent.start(sync_timeout_s)
        return agent

    async def start(self, sync_timeout_s: float = 60.0) -> None:
        """Attach and load the promoted version (if an orchestrator exists), then run the loops.

        With no orchestrator the replica is ready at once; with one that does not answer
        within ``sync_timeout_s`` it is not (``check`` fails, so Serve does not route to it).
        """
        if await self.link.exists():
            try:
                await asyncio.wait_for(self._attach(), sync_timeout_s)
            except Exception as e:  # the poll loop attaches again; check() says why meanwhile
                self.error = f"could not sync with the orchestrator: {e!r}"
                log.warning("replica %s: %s", self.replica_id, self.error)
        else:
            self.ready = True
        self._tasks = [
            asyncio.create_task(self._poll_loop(), name="swap-agent-poll"),
            asyncio.create_task(self._exec_loop(), name="swap-agent-exec"),
        ]

    def check(self) -> None:
        """Raise unless the replica serves what the orchestrator promoted (its health check)."""
        if not self.ready:
            raise RuntimeError(
                f"replica {self.replica_id} is not serving the promoted version yet: "
                f"{self.error or 'syncing'}"
            )
        for task in self._tasks:
            if task.done() and not task.cancelled():
                raise RuntimeError(f"swap agent loop died: {task.exception()!r}")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ---- attach / poll ---------------------------------------------------------------------

    async def _hello(self) -> Hello:
        current, staged = self.model.current, self.model.staged
        return Hello(
            replica_id=self.replica_id,
            actor_name=self.actor_name,
            namespace=self.namespace,
            version=0 if current is None else current.version,
            checkpoint="" if current is None else self._source(current.checkpoint),
            staged_version=None if staged is None else staged.version,
            swap_mode=self.model.config.engine.swap_mode,
        )

    async def _attach(self) -> None:
        """Introduce this replica and serve the promoted version before anything else."""
        attachment: Attachment = await self.link.call("attach", await self._hello())
        self.poll_timeout_s, self._acked, self.orchestrated = attachment.poll_timeout_s, 0, True
        while not self._commands.empty():  # commands of the orchestrator's previous life
            self._commands.get_nowait()
        async with self._model_lock:
            if self.model.staged is not None:  # left by a swap the orchestrator no longer runs
                await self.model.abort_stage()
            if attachment.target is not None:
                await self._serve(attachment.target)
        self.ready, self.error = True, ""

    def _serves(self, target: Target) -> bool:
        """True if the replica serves ``target`` already; raises if it serves other files under
        that version number (the engine cannot hold two weight sets of one version)."""
        current = self.model.current
        if current is None or current.version != target.version:
            return False
        if self._source(current.checkpoint) != target.path:
            raise RuntimeError(
                f"this replica serves {current.checkpoint} as version {target.version}, the "
                f"orchestrator promoted {target.path} under that number; restart the "
                "deployment without --checkpoint"
            )
        return True

    def _source(self, checkpoint: str) -> str:
        """The URI the orchestrator knows a loaded checkpoint by (a cached copy's bucket URI)."""
        return self._sources.get(checkpoint) or local_path(checkpoint)

    async def _local(self, path: str) -> str:
        """A local directory to load ``path`` from: an object-store URI is fetched into this
        node's cache first (verified; CheckpointError if corrupted, SwapEnvironmentError if the
        bucket cannot be reached), shared with the other replicas of the node."""
        if not remote.is_remote(path):
            return path
        local = await asyncio.to_thread(remote.local_dir, path)
        self._sources[local] = path
        return local

    async def _serve(self, target: Target) -> None:
        if self._serves(target):
            return
        await self._wait_retired(target.version)
        await self.model.load(await self._local(target.path), target.version)

    async def _poll_loop(self) -> None:
        while True:
            try:
                if not self.orchestrated:
                    if not await self.link.exists():
                        await asyncio.sleep(self.retry_s)
                        continue
                    await self._attach()
                commands = await self.link.call(
                    "poll", self.replica_id, self._acked, await self._heartbeat()
                )
                if commands is None:
                    raise UnknownReplica(self.replica_id)
                for command in commands:
                    if command.seq > self._acked:  # a poll may repeat what is not yet acked
                        self._acked = command.seq
                        self._commands.put_nowait(command)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # orchestrator restarting or gone: attach again
                log.info(
                    "replica %s: orchestrator link lost (%r); re-attaching", self.replica_id, e
                )
                self.orchestrated = False
                await asyncio.sleep(min(self.retry_s, 0.5))

    async def _heartbeat(self) -> Heartbeat:
        executed = self._executed  # before sampling: a later report always wins
        info = await self.model.info()
        return Heartbeat(
            version=info.version,
            staged_version=info.staged_version,
            executed=executed,
            running=info.running,
            waiting=info.waiting,
            blocks_used=info.blocks_used,
            blocks_total=info.blocks_total,
            energy_joules=self.energy.read(),
            energy_source=self.energy.source,
            generated_tokens=info.generated_tokens,
        )

    # ---- commands --------------------------------------------------------------------------

    async def _exec_loop(self) -> None:
        while True:
            command = await self._commands.get()
            result = await self.execute(command)
            self._executed = command.seq
            try:
                await self.link.call("report", self.replica_id, result)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the orchestrator is gone: it re-syncs us on attach
                log.info("replica %s: report of %s failed: %r", self.replica_id, command.kind, e)

    async def execute(self, command: Command) -> Result:
        """Run one command; failures become a Result (the orchestrator decides what they mean)."""
        start = time.perf_counter()
        result = Result(command.seq, command.kind, ok=True, version=command.version)
        result.swap_mode = self.model.config.engine.swap_mode
        try:
            await self._run(command, result)
        except Exception as e:
            result.ok, result.error = False, f"{type(e).__name__}: {e}"
            result.fault = failure_kind(e)
            if command.kind in ("commit", "load"):  # out of step with the rest: stop routing
                self.ready = False
                self.error = f"{command.kind} of version {command.version} failed: {e}"
        result.seconds = time.perf_counter() - start
        return result

    async def _run(self, command: Command, result: Result) -> None:
        if command.kind == "evaluate":  # reads the served weights; changes nothing
            result.version, result.logprobs = await self._evaluate(command.token_ids)
            return
        async with self._model_lock:
            await self._change(command, result)

    async def _change(self, command: Command, result: Result) -> None:
        """Stage, commit, abort or load; stage and commit are idempotent (a repeated command
        after a lost answer, or a version the replica already serves, is a no-op)."""
        target = Target(command.version, command.path)
        if command.kind == "stage":
            if self.model.staged is not None:
                await self.model.abort_stage()
            if self._serves(target):
                result.skipped = True
                return
            await self._wait_retired(command.version)
            await self.model.stage(await self._local(command.path), command.version)
        elif command.kind == "commit":
            current = self.model.current
            flipped = current is not None and current.version == command.version
            if self.model.staged is None and flipped:
                result.skipped = True
                return
            await self.model.commit(command.version)
        elif command.kind == "abort":
            await self.model.abort_stage()
        elif command.kind == "load":
            await self._serve(target)
            self.ready, self.error = True, ""
        else:
            raise ValueError(f"unknown command {command.kind!r}")

    async def _evaluate(self, token_ids: list[int]) -> tuple[int, list[float]]:
        """Log-probabilities of held-out ids under the weights this replica serves (canary),
        with the version of those weights: both from one engine snapshot."""
        if self.model.current is None:
            raise RuntimeError("this replica serves no model to evaluate")
        return await self.model.evaluate(token_ids)

    async def _wait_retired(self, version: int, timeout_s: float = 300.0) -> None:
        """Wait until old requests stop using ``version``'s weights (a rollback to a version
        still finishing its last streams); the engine refuses to stage a loaded version."""
        engine, current = self.model.engine, self.model.current
        if engine is None or current is None:
            return
        deadline = time.monotonic() + timeout_s
        # Re-read what serves every time: a commit queued before this flips meanwhile.
        while not _settled(engine.stats(), self.model.current.version, version):  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"version {version} is still finishing old requests after {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.05)


def _settled(stats: dict[str, Any], serving: int, version: int) -> bool:
    """The engine's stats (as of its last step) show ``serving`` flipped in, and no old request
    holds ``version``'s weights any more (stats lag a commit by one step: wait for it)."""
    if stats.get("committing_version") is not None or stats.get("serving_version") != serving:
        return False
    return version == serving or version not in stats.get("loaded_versions", ())


__all__ = ["ActorLink", "DirectLink", "Link", "SwapAgent", "failure_kind"]
