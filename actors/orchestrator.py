"""The orchestrator actor: checkpoint registry, validation gate, promote / rollback, status.

One named, detached Ray actor per Serve application (``start_orchestrator``): it outlives the
job that started it and Ray restarts it when it dies; a restarted one reads its registry back
from the storage path (registry.py) and the replicas re-attach on their own. The trainer's
checkpoint hook (``cluster.hooks.ActorHook``) calls ``register(uri)``; the gateway's Admin
service (admin.py) calls ``register``, ``list_checkpoints``, ``promote``, ``rollback``, ``status``.

This file is the thin shell; the work lives in its parts:

- ``kilnlm/gate.py``: the validation gate (held-out perplexity, smoke generation), pure library
  code run in a thread or as a Ray task, so Status answers while a model is being checked;
- ``replica_set.py``: the attached replicas, their mailboxes and liveness;
- ``swap_coordinator.py``: the two-phase swap, rollback and canary, driving the pure state
  machine of ``kilnlm/hotswap.py`` (docs/orchestrator.md has its table);
- ``orchestrator_config.py``: the config, the errors, the status it returns.

No test doubles anywhere: in tests the same class runs in-process (``DirectLink``) with real
``ServingModel`` replicas, and as the real actor behind real Serve replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import torch

from kilnlm import checkpoint
from kilnlm.actors.orchestrator_config import (
    CheckpointRejected,
    NotFoundError,
    OrchestratorConfig,
    OrchestratorError,
    OrchestratorStatus,
    Policy,
    PreconditionError,
    SwapAborted,
)
from kilnlm.actors.registry import Registry
from kilnlm.actors.registry_records import CheckpointRecord, SwapRecord
from kilnlm.actors.replica_set import ReplicaState, ReplicaView
from kilnlm.actors.swap_coordinator import SwapCoordinator
from kilnlm.actors.swap_messages import (
    ORCHESTRATOR_NAMESPACE,
    Attachment,
    Command,
    Heartbeat,
    Hello,
    Result,
    Target,
    local_path,
    orchestrator_name,
)
from kilnlm.checkpoint import remote
from kilnlm.gate import GateResult, heldout_ids, regression, run_gate

log = logging.getLogger(__name__)


class Orchestrator:
    """Registry, gate and swaps. Async methods; runs as a Ray actor or in-process."""

    def __init__(self, config: OrchestratorConfig) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.registry = Registry.open(config.storage_path)
        self._requeue = self.registry.recover()
        self.swaps = SwapCoordinator(config, self.registry)
        self._gate_lock = asyncio.Lock()
        self._validations: dict[int, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._started_unix = time.time()

    @property
    def replicas(self) -> dict[str, ReplicaState]:
        return self.swaps.replicas.replicas

    def _start(self) -> None:
        """Background work needs the running loop: start it on the first call."""
        if self._started:
            return
        self._started = True
        self._spawn(self.swaps.replicas.reap_forever())
        if self.config.policy == "auto":
            for version in self._requeue:
                self._spawn(self._auto_promote(version))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ping(self) -> dict[str, Any]:
        """Which life of the actor answers (a restart is a new pid) and since when."""
        self._start()
        return {"pid": os.getpid(), "started_unix": self._started_unix}

    # ---- registration ----------------------------------------------------------------------

    async def register(self, uri: str) -> int:
        """Record an export (the trainer's hook, ``kiln register``); returns its version.

        Registering the same files again returns the same version; a registered path whose
        files changed is refused (a registered checkpoint never changes). Under the "auto"
        policy the gate runs next and the checkpoint is promoted if it passes.
        """
        self._start()
        path = local_path(uri)  # an object-store URI stays one: the gate and replicas fetch it
        manifest, sha = await asyncio.to_thread(_read_manifest, path)
        files = {n: e.sha256 for n, e in manifest.files.items()}
        record = self.registry.add(
            uri, path, sha, files, manifest.fields, version=self._served_unregistered(path)
        )
        log.info("registered %s as version %d", uri, record.version)
        if self.config.policy == "auto" and record.status == "registered":
            self._spawn(self._auto_promote(record.version))
        return record.version

    def _served_unregistered(self, path: str) -> int | None:
        """The version number replicas serve ``path`` under, if the registry does not know it
        (they were started with ``--checkpoint``): registering those files keeps that number."""
        for r in self.replicas.values():
            if r.checkpoint == path and r.version and r.version not in self.registry.checkpoints:
                return r.version
        return None

    async def report_progress(
        self,
        step: int,
        loss: float | None = None,
        tokens_seen: int | None = None,
        heldout_loss: float | None = None,
        **metrics: float,
    ) -> None:
        """Training progress for Status (the trainer may call this between checkpoints)."""
        self.registry.report_training(step, loss, tokens_seen, heldout_loss, metrics)

    # ---- queries ---------------------------------------------------------------------------

    async def list_checkpoints(self) -> list[CheckpointRecord]:
        self._start()
        return list(self.registry)

    async def status(self) -> OrchestratorStatus:
        self._start()
        return OrchestratorStatus(
            promoted_version=self.registry.promoted,
            rollback_version=self.registry.rollback_target,
            policy=self.config.policy,
            swapping_version=self.swaps.swapping,
            replicas=self.swaps.replicas.views(),
            checkpoints=list(self.registry),
            swaps=list(self.registry.swaps),
            training=self.registry.training,
        )

    async def promoted(self) -> Target | None:
        return self._target(self.registry.promoted)

    def _target(self, version: int | None) -> Target | None:
        return None if version is None else Target(version, self.registry.get(version).path)

    # ---- validation ------------------------------------------------------------------------

    async def validate(self, version: int) -> CheckpointRecord:
        """Run the gate on ``version`` (once; later calls return the verdict)."""
        self._start()
        await self._ensure_validated(self._record(version))
        return self._record(version)

    def _record(self, version: int) -> CheckpointRecord:
        try:
            return self.registry.get(version)
        except KeyError as e:
            raise NotFoundError(e.args[0]) from None

    async def _ensure_validated(self, record: CheckpointRecord) -> None:
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")
        if record.validation is not None:
            return
        task = self._validations.get(record.version)
        if task is None:
            task = asyncio.ensure_future(self._validate(record.version))
            self._validations[record.version] = task
            task.add_done_callback(lambda _: self._validations.pop(record.version, None))
        await asyncio.shield(task)  # a caller that gives up does not stop the gate
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")

    async def _validate(self, version: int) -> None:
        async with self._gate_lock:  # one model at a time: the gate is CPU/GPU bound
            record = self.registry.get(version)
            if record.status != "registered":
                return
            self.registry.set_status(version, "validating")
            try:
                gate = await self._run_gate(record.path)
            except Exception as e:  # the gate itself broke (a Ray task lost): not the model's fault
                self.registry.set_status(version, "registered", f"validation failed to run: {e!r}")
                raise
            reason = gate.reason if not gate.ok else self._regression(record.version, gate)
            if reason:
                self.registry.set_status(version, "rejected", reason)
                self.swaps.machine.rejected.add(version)
                return
            assert gate.validation is not None
            self.registry.set_validation(version, gate.validation)

    async def _run_gate(self, path: str) -> GateResult:
        if self.config.validate_in == "thread":
            return await asyncio.to_thread(run_gate, path, self.config)
        import ray

        task = ray.remote(run_gate).options(
            num_cpus=self.config.validation_num_cpus, num_gpus=self.config.validation_num_gpus
        )
        return await task.remote(path, self.config)

    def _regression(self, version: int, gate: GateResult) -> str:
        """Why ``version`` measured worse than the promoted one beyond the margin ("" if not)."""
        assert gate.validation is not None
        current = self.registry.promoted
        if current is None or current == version:
            return ""
        reference = self.registry.get(current).validation
        return regression(gate.validation, reference, current, self.config.max_ppl_increase)

    # ---- promote / rollback ----------------------------------------------------------------

    async def promote(self, version: int, canary: bool | None = None) -> SwapRecord:
        """Validate (if not yet) and hot-swap ``version`` into every replica, all or nothing."""
        self._start()
        record = self._record(version)
        self._check_loadable(record)
        await self._ensure_validated(record)
        async with self.swaps.lock:
            if record.status != "promoted":
                reason = self._regression(version, GateResult(True, validation=record.validation))
                if reason:
                    self.registry.set_status(version, "rejected", reason)
                    self.swaps.machine.rejected.add(version)
                    raise CheckpointRejected(f"version {version} was rejected: {reason}")
            use_canary = self.config.canary if canary is None else canary
            if use_canary and record.status != "promoted":
                return await self.swaps.canary_then_promote(record)
            return await self.swaps.run("promote", record)

    async def rollback(self, version: int | None = None) -> SwapRecord:
        """Promote an earlier version the same way (default: the one before the current one)."""
        self._start()
        async with self.swaps.lock:
            current = self.registry.promoted
            target = self.registry.rollback_target if version is None else version
            if target is None:
                raise PreconditionError(
                    "there is no earlier promoted version to roll back to"
                    + ("" if current is None else f" (only version {current} was promoted)")
                )
            record = self._record(target)
            self._check_loadable(record)
            if record.validation is None:
                raise PreconditionError(
                    f"version {target} never passed validation; promote it instead of rolling back"
                )
            if target == current:
                raise PreconditionError(f"version {target} is already the promoted version")
            return await self.swaps.run("rollback", record)

    def _check_loadable(self, record: CheckpointRecord) -> None:
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")
        if record.deleted:
            raise PreconditionError(
                f"version {record.version}'s files were deleted by retention (keep_last)"
            )

    async def _auto_promote(self, version: int) -> None:
        """The "auto" policy: promote ``version`` once it passes, unless a newer one serves."""
        try:
            await self._ensure_validated(self.registry.get(version))
            async with self.swaps.lock:
                newest = max(
                    (
                        r.version
                        for r in self.registry
                        if r.validation is not None and r.status != "rejected"
                    ),
                    default=version,
                )
                if version < newest or self.registry.get(version).status != "validated":
                    return  # a newer checkpoint passed too: promote that one instead
            await self.promote(version)
        except OrchestratorError as e:
            log.warning("auto-promotion of version %d stopped: %s", version, e)
        except Exception:
            log.exception("auto-promotion of version %d failed", version)

    # ---- the agents' side of the protocol --------------------------------------------------

    async def attach(self, hello: Hello) -> Attachment:
        """A replica introduces itself; it must serve the returned target before it is ready."""
        self._start()
        if hello.version and not self._is_registered(hello.version, hello.checkpoint):
            self.registry.reserve_versions_above(hello.version)  # never hand its number out
        target = self._target(self.swaps.joined(hello))
        log.info("replica %s attached (serving version %d)", hello.replica_id, hello.version)
        return Attachment(target, self.config.poll_timeout_s)

    def _is_registered(self, version: int, path: str) -> bool:
        record = self.registry.checkpoints.get(version)
        return record is not None and record.path == path

    async def poll(self, replica_id: str, acked: int, heartbeat: Heartbeat) -> list[Command] | None:
        """Long poll: commands newer than ``acked``, or [] after poll_timeout_s; None: attach."""
        self.swaps.heard(replica_id, heartbeat)
        return await self.swaps.replicas.poll(replica_id, acked, heartbeat)

    async def report(self, replica_id: str, result: Result) -> None:
        self.swaps.replicas.report(replica_id, result)


def _read_manifest(path: str) -> tuple[checkpoint.Manifest, str]:
    """The manifest and its content identity (not its bytes: they carry the export's time); a
    plain Hugging Face directory gets its manifest computed here (checked from then on)."""
    if remote.is_remote(path):  # a bucket holds exports only: no manifest is written there
        manifest = remote.read_remote_manifest(path)
    else:
        manifest = checkpoint.ensure_manifest(path, verify=False)
    return manifest, manifest.content_sha256()


# --------------------------------------------------------------------------------------------
# As a Ray actor


def start_orchestrator(config: OrchestratorConfig) -> Any:
    """Start (or find) the application's orchestrator actor and wait until it answers.

    Detached (it outlives the driver), restarted by Ray whenever it dies (``max_restarts=-1``;
    the registry is read back from ``storage_path``), in the ``kiln`` namespace, under
    ``orchestrator_name(app_name)`` — the name the replicas' agents and the gateway look up.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Preferably on the driver's node (the head under `kiln up --cluster`), as Ray Train and
    # Serve place their controllers: not on a worker node that an autoscaler or a spot
    # reclaim may take away. Soft: a restart after that node is lost goes anywhere.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor = ray.remote(Orchestrator).options(
        name=orchestrator_name(config.app_name),
        scheduling_strategy=here,
        namespace=ORCHESTRATOR_NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=config.num_cpus,
        get_if_exists=True,
    )
    handle = actor.remote(config)
    ray.get(handle.ping.remote())
    return handle


def get_orchestrator(app_name: str = "kiln") -> Any:
    """The running orchestrator of ``app_name``; ValueError if there is none."""
    import ray

    return ray.get_actor(orchestrator_name(app_name), namespace=ORCHESTRATOR_NAMESPACE)


__all__ = [
    "CheckpointRejected",
    "GateResult",
    "NotFoundError",
    "Orchestrator",
    "OrchestratorConfig",
    "OrchestratorError",
    "OrchestratorStatus",
    "Policy",
    "PreconditionError",
    "ReplicaState",
    "ReplicaView",
    "SwapAborted",
    "get_orchestrator",
    "heldout_ids",
    "run_gate",
    "start_orchestrator",
]
