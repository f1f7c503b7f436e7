"""The replicas the orchestrator knows: who is attached, their mailboxes, who is still alive.

Every LLM server replica's ``SwapAgent`` attaches and then long-polls (swap_agent.py); this
class holds one ``ReplicaState`` per attached replica — its command outbox, the results it
reported, its last heartbeat — and decides liveness: a replica whose Ray actor name is gone is
dead (in-process tests: one silent for ``replica_timeout_s``). It knows nothing of versions or
swaps; the swap coordinator learns of joins and deaths through ``on_death`` and ``attach``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kilnlm.actors.swap_messages import Command, CommandKind, Heartbeat, Hello, Result, Target

log = logging.getLogger(__name__)

MAX_RESULTS = 64
"""Unclaimed command results kept per replica (a swap that timed out never reads its own)."""


@dataclass
class ReplicaState:
    """One attached replica: identity, what it last said it serves, and its command mailbox."""

    replica_id: str
    actor_name: str | None
    namespace: str | None
    version: int
    checkpoint: str
    staged_version: int | None
    swap_mode: str
    attached_unix: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat | None = None
    outbox: list[Command] = field(default_factory=list)
    results: dict[int, Result] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    alive: bool = True
    probed: float = 0.0
    reported: int = 0
    """Highest command seq the replica has reported a result for."""


@dataclass
class ReplicaView:
    """A replica in ``status()``: picklable, no mailbox."""

    replica_id: str
    version: int
    staged_version: int | None
    swap_mode: str
    last_seen_s: float
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    energy_joules: float = 0.0
    energy_source: str = ""
    generated_tokens: int = 0


def _actor_exists(name: str, namespace: str | None) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


class ReplicaSet:
    """Attached replicas, their mailboxes and liveness; wakes waiters on every change."""

    def __init__(
        self, poll_timeout_s: float, replica_timeout_s: float, on_death: Callable[[str], None]
    ) -> None:
        self.poll_timeout_s, self.replica_timeout_s = poll_timeout_s, replica_timeout_s
        self.on_death = on_death
        self.replicas: dict[str, ReplicaState] = {}
        # Command numbers grow across restarts (microseconds since the epoch to start from), so
        # a result of a command sent by a previous life never matches one sent by this one.
        self._seq = time.time_ns() // 1000
        self._changed = asyncio.Event()

    def get(self, rid: str) -> ReplicaState | None:
        return self.replicas.get(rid)

    def attach(self, hello: Hello) -> ReplicaState:
        r = ReplicaState(
            replica_id=hello.replica_id,
            actor_name=hello.actor_name,
            namespace=hello.namespace,
            version=hello.version,
            checkpoint=hello.checkpoint,
            staged_version=None,  # the agent drops staged weights when it attaches
            swap_mode=hello.swap_mode,
        )
        self.replicas[hello.replica_id] = r
        self.notify()
        return r

    async def poll(self, rid: str, acked: int, heartbeat: Heartbeat) -> list[Command] | None:
        """Long poll: commands newer than ``acked``, or [] after poll_timeout_s; None: attach."""
        r = self.replicas.get(rid)
        if r is None:
            return None
        r.last_seen, r.heartbeat, r.alive = time.monotonic(), heartbeat, True
        if heartbeat.executed >= r.reported:  # else a report already said something newer
            r.version, r.staged_version = heartbeat.version, heartbeat.staged_version
        r.outbox = [c for c in r.outbox if c.seq > acked]
        if not r.outbox:
            r.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(r.wakeup.wait(), self.poll_timeout_s)
        if self.replicas.get(rid) is not r:
            return None
        return list(r.outbox)  # last_seen stays the call's start: a dead caller ages out

    def report(self, rid: str, result: Result) -> None:
        r = self.replicas.get(rid)
        if r is None:
            return
        r.results[result.seq] = result
        for stale in sorted(r.results)[:-MAX_RESULTS]:  # answers nobody waited for (timeouts)
            del r.results[stale]
        r.reported = max(r.reported, result.seq)
        r.last_seen = time.monotonic()
        if result.ok and result.kind == "stage":
            r.staged_version = result.version
        elif result.ok and result.kind in ("commit", "load"):
            r.version, r.staged_version = result.version, None
        self.notify()

    def send(
        self,
        r: ReplicaState,
        kind: CommandKind,
        target: Target | None = None,
        swap_id: int = 0,
        token_ids: list[int] | None = None,
    ) -> int:
        """Queue one command for ``r``; returns its seq (the key of its result)."""
        self._seq += 1
        version, path = (0, "") if target is None else (target.version, target.path)
        command = Command(self._seq, kind, version, path, swap_id, token_ids or [])
        r.outbox.append(command)
        r.wakeup.set()
        return self._seq

    def result(self, rid: str, r: ReplicaState, seq: int) -> Result | None:
        """The result of command ``seq`` if ``r`` (still attached as ``rid``) reported it."""
        return r.results.pop(seq, None) if self.replicas.get(rid) is r else None

    # ---- change notification ----------------------------------------------------------------

    def notify(self) -> None:
        """Wake every coroutine waiting in ``wait_change`` (a report, an attach, a death)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_change(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ---- liveness -------------------------------------------------------------------------------

    async def live(self) -> dict[str, ReplicaState]:
        """Probe liveness (a Ray actor name that is gone means dead), drop the dead."""
        now = time.monotonic()
        for rid, r in list(self.replicas.items()):
            if r.actor_name is not None:
                if now - r.last_seen > self.poll_timeout_s + 0.5 and now - r.probed > 0.5:
                    r.probed = now
                    r.alive = await asyncio.to_thread(_actor_exists, r.actor_name, r.namespace)
            else:
                r.alive = now - r.last_seen < self.replica_timeout_s
            if not r.alive and self.replicas.get(rid) is r:
                log.info("replica %s is gone", rid)
                del self.replicas[rid]
                self.on_death(rid)
                self.notify()
        return dict(self.replicas)

    async def reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.live()

    def view(self, r: ReplicaState) -> ReplicaView:
        hb = r.heartbeat
        return ReplicaView(
            replica_id=r.replica_id,
            version=r.version,
            staged_version=r.staged_version,
            swap_mode=r.swap_mode,
            last_seen_s=time.monotonic() - r.last_seen,
            running=hb.running if hb else 0,
            waiting=hb.waiting if hb else 0,
            kv_blocks_used=hb.blocks_used if hb else 0,
            kv_blocks_total=hb.blocks_total if hb else 0,
            energy_joules=hb.energy_joules if hb else 0.0,
            energy_source=hb.energy_source if hb else "",
            generated_tokens=hb.generated_tokens if hb else 0,
        )

    def views(self) -> list[ReplicaView]:
        return [self.view(r) for _, r in sorted(self.replicas.items())]


def serve_running_count(app_name: str, deployment_name: str) -> int | None:
    """RUNNING replicas of the deployment as Serve counts them (None: unknown / no Serve)."""
    import ray

    if not ray.is_initialized():
        return None
    from ray import serve

    try:
        app = serve.status().applications.get(app_name)
    except Exception:  # Serve not running or its controller restarting: no cross-check
        return None
    deployment: Any = None if app is None else app.deployments.get(deployment_name)
    if deployment is None:
        return None
    return int(deployment.replica_states.get("RUNNING", 0))


__all__ = ["MAX_RESULTS", "ReplicaSet", "ReplicaState", "ReplicaView", "serve_running_count"]
