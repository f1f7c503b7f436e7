"""The Admin API adapter: kiln.v1.Admin over the orchestrator actor, beside the gateway.

The gateway's ``AdminServicer`` authenticates and delegates here; this converts protobuf to
one actor call and back, and maps the orchestrator's errors to gRPC status codes (STYLE.md 6).
The gateway side is the only place that imports generated ``*_pb2`` modules: the orchestrator
itself (orchestrator.py and its parts) never does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kilnlm.actors.orchestrator_config import (
    NotFoundError,
    OrchestratorStatus,
    PreconditionError,
    SwapAborted,
)
from kilnlm.actors.registry import RegistryError
from kilnlm.actors.registry_records import CheckpointRecord, SwapRecord
from kilnlm.actors.swap_messages import orchestrator_name
from kilnlm.checkpoint import CheckpointError

log = logging.getLogger(__name__)


READ_RETRY_S = 10.0
"""How long an Admin read waits for a restarting orchestrator (within the client's deadline)."""


class OrchestratorAdmin:
    """kiln.v1.Admin over the orchestrator actor: protobuf in, one actor call, protobuf out.

    The gateway authenticates first (AdminServicer); this converts, delegates and maps the
    orchestrator's errors to gRPC status codes (STYLE.md 6).
    """

    def __init__(self, app_name: str) -> None:
        from kilnlm.actors.swap_agent import ActorLink

        self.link = ActorLink(orchestrator_name(app_name))

    async def _call(self, context: Any, method: str, *args: Any, read: bool = False) -> Any:
        """One actor call. A read (Status, ListCheckpoints) that meets the actor restarting is
        retried while the client's deadline allows; a promotion never is (it may have run)."""
        import grpc
        from ray.exceptions import RayActorError

        give_up = time.monotonic() + min(READ_RETRY_S, context.time_remaining() or READ_RETRY_S)
        while True:
            try:
                return await self.link.call(method, *args)
            except ConnectionError as e:  # no actor by that name: nothing to wait for
                code, details = grpc.StatusCode.UNAVAILABLE, f"{e}; start it (kiln up) and retry"
            except RayActorError as e:
                self.link._handle = None  # look it up again next time (restarted or replaced)
                if read and time.monotonic() + 0.5 < give_up:
                    await asyncio.sleep(0.5)
                    continue
                code, details = grpc.StatusCode.UNAVAILABLE, f"the orchestrator is restarting: {e}"
            except Exception as e:
                code, details = admin_status(e)
            await context.abort(code, details)

    async def Register(self, request: Any, context: Any) -> Any:
        from kilnlm.proto import admin_pb2

        version = await self._call(context, "register", request.uri)
        records = await self._call(context, "list_checkpoints", read=True)
        record = next(r for r in records if r.version == version)
        return admin_pb2.RegisterResponse(version=version, checkpoint=checkpoint_pb(record))

    async def ListCheckpoints(self, request: Any, context: Any) -> Any:
        from kilnlm.proto import admin_pb2

        records = await self._call(context, "list_checkpoints", read=True)
        return admin_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_pb(r) for r in records])

    async def Promote(self, request: Any, context: Any) -> Any:
        canary = request.canary if request.HasField("canary") else None
        swap = await self._call(context, "promote", int(request.version), canary)
        return promote_response_pb(swap)

    async def Rollback(self, request: Any, context: Any) -> Any:
        version = int(request.version) if request.HasField("version") else None
        swap = await self._call(context, "rollback", version)
        return promote_response_pb(swap)

    async def Status(self, request: Any, context: Any) -> Any:
        return status_pb(await self._call(context, "status", read=True))


def _cause(e: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    while isinstance(e, RayTaskError) and e.cause is not None and e.cause is not e:
        e = e.cause
    return e


def admin_status(e: BaseException) -> tuple[Any, str]:
    """The gRPC status of an orchestrator error (raised here or inside the actor)."""
    import grpc

    e = _cause(e)
    codes: list[tuple[type[BaseException], Any]] = [
        (NotFoundError, grpc.StatusCode.NOT_FOUND),
        (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
        (SwapAborted, grpc.StatusCode.ABORTED),
        (RegistryError, grpc.StatusCode.FAILED_PRECONDITION),
        (CheckpointError, grpc.StatusCode.INVALID_ARGUMENT),  # Register: no usable export there
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for cls, code in codes:
        if isinstance(e, cls):
            return code, str(e)
    log.exception("unexpected orchestrator error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


_STATE_PB = {
    "registered": 1,
    "validated": 2,
    "promoted": 3,
    "rejected": 4,
    "validating": 5,
    "retired": 6,
}


def checkpoint_pb(r: CheckpointRecord) -> Any:
    from kilnlm.proto import admin_pb2

    v = r.validation
    return admin_pb2.Checkpoint(
        version=r.version,
        uri=r.uri,
        step=r.step or 0,
        tokens_seen=r.tokens_seen or 0,
        heldout_loss=r.heldout_loss or 0.0,
        state=_STATE_PB[r.status],
        reason=r.reason,
        registered_unix=r.registered_unix,
        updated_unix=r.updated_unix,
        heldout_perplexity=v.perplexity if v else 0.0,
        heldout_bits_per_byte=v.bits_per_byte if v else 0.0,
        manifest_sha256=r.manifest_sha256,
        deleted=r.deleted,
        smoke_text=v.smoke_text if v else "",
    )


def swap_pb(s: SwapRecord) -> Any:
    from kilnlm.proto import admin_pb2

    return admin_pb2.SwapRecord(
        swap_id=s.swap_id,
        kind=s.kind,
        version=s.version,
        previous_version=s.previous_version or 0,
        outcome=s.outcome,
        reason=s.reason,
        started_unix=s.started_unix,
        seconds=s.seconds or 0.0,
        registered_to_serving_seconds=s.registered_to_serving_s or 0.0,
        swap_mode=s.swap_mode,
        replicas=[
            admin_pb2.ReplicaSwap(
                replica_id=p.replica_id,
                stage_seconds=p.stage_s or 0.0,
                commit_seconds=p.commit_s or 0.0,
                swap_mode=p.swap_mode,
                error=p.error,
                skipped=p.skipped,
            )
            for p in s.replicas.values()
        ],
        canary=s.canary or {},
    )


def promote_response_pb(s: SwapRecord) -> Any:
    from kilnlm.proto import admin_pb2

    return admin_pb2.PromoteResponse(
        version=s.version,
        previous_version=s.previous_version or 0,
        swap_mode=s.swap_mode,
        swap_seconds=s.seconds or 0.0,
        swap=swap_pb(s),
    )


def status_pb(st: OrchestratorStatus) -> Any:
    from kilnlm.proto import admin_pb2

    t = st.training
    return admin_pb2.StatusResponse(
        promoted_version=st.promoted_version or 0,
        replicas=[
            admin_pb2.ReplicaStatus(
                replica_id=r.replica_id,
                version=r.version,
                running=r.running,
                waiting=r.waiting,
                kv_blocks_used=r.kv_blocks_used,
                kv_blocks_total=r.kv_blocks_total,
                staged_version=r.staged_version or 0,
                last_seen_seconds=r.last_seen_s,
                swap_mode=r.swap_mode,
                energy_joules=r.energy_joules,
                energy_source=r.energy_source,
                generated_tokens=r.generated_tokens,
            )
            for r in st.replicas
        ],
        checkpoints=[checkpoint_pb(r) for r in st.checkpoints],
        rollback_version=st.rollback_version or 0,
        training=admin_pb2.TrainingProgress(
            step=t.step or 0,
            tokens_seen=t.tokens_seen or 0,
            loss=t.loss or 0.0,
            heldout_loss=t.heldout_loss or 0.0,
            updated_unix=t.updated_unix,
        ),
        swaps=[swap_pb(s) for s in st.swaps],
        policy=st.policy,
        swapping_version=st.swapping_version or 0,
    )


__all__ = [
    "OrchestratorAdmin",
    "admin_status",
    "checkpoint_pb",
    "promote_response_pb",
    "status_pb",
    "swap_pb",
]
