"""The swap coordinator: drives ``kilnlm.hotswap.SwapMachine`` over the replicas' mailboxes.

The machine decides (who must stage, when to commit, who to roll back, what a failure means);
this class only moves messages: it sends the commands the machine asks for through the
``ReplicaSet``, feeds every result back as an event, waits, and writes the outcome to the
registry exactly once. The registry's promoted version changes only when the machine says
every replica committed (docs/orchestrator.md has the state table).
"""

from __future__ import annotations

import asyncio
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from kilnlm import checkpoint
from kilnlm.actors.orchestrator_config import (
    CheckpointRejected,
    OrchestratorConfig,
    PreconditionError,
    SwapAborted,
)
from kilnlm.actors.registry import Registry
from kilnlm.actors.registry_records import CheckpointRecord, ReplicaSwap, SwapKind, SwapRecord
from kilnlm.actors.replica_set import ReplicaSet, ReplicaState, serve_running_count
from kilnlm.actors.swap_messages import CommandKind, Heartbeat, Hello, Result, Target
from kilnlm.checkpoint import remote
from kilnlm.errors import SwapEnvironmentError
from kilnlm.gate import heldout_ids
from kilnlm.hotswap import ProtocolError, Swap, SwapMachine

log = logging.getLogger(__name__)

Sent = dict[str, tuple[ReplicaState, int]]
"""Replica id → (the attachment a command went to, its seq; 0: nothing was sent)."""


class SwapCoordinator:
    """Stage, commit, roll back and canary, one swap at a time, as the machine says."""

    def __init__(self, config: OrchestratorConfig, registry: Registry) -> None:
        self.config, self.registry = config, registry
        self.machine = SwapMachine(promoted=registry.promoted)
        self.machine.rejected = {r.version for r in registry if r.status == "rejected"}
        self.replicas = ReplicaSet(config.poll_timeout_s, config.replica_timeout_s, self.died)
        self.lock = asyncio.Lock()
        self.swapping: int | None = None
        self._serve_count: tuple[float, int | None] = (0.0, None)

    # ---- replicas joining, dying, reporting ---------------------------------------------------

    def joined(self, hello: Hello) -> int | None:
        """A replica attached; returns the version it must serve before it is ready."""
        self.replicas.attach(hello)
        self.machine.join(hello.replica_id, hello.version or None)
        return self.machine.join_target(hello.replica_id)

    def died(self, rid: str) -> None:
        self.machine.died(rid)

    def heard(self, rid: str, heartbeat: Heartbeat) -> None:
        """A heartbeat: a replica that was loading its target (on attach) serves it now."""
        r = self.machine.replicas.get(rid)
        if r is None or r.routable or heartbeat.staged_version is not None:
            return
        if heartbeat.version and heartbeat.version == self.machine.join_target(rid):
            self.machine.loaded(rid, heartbeat.version)

    # ---- one swap -------------------------------------------------------------------------------

    async def run(
        self,
        kind: SwapKind,
        record: CheckpointRecord,
        members: frozenset[str] | None = None,
        finish: bool = True,
    ) -> SwapRecord:
        """One swap of ``record`` into ``members`` (None: every replica); all or nothing.

        Returns the swap's record; raises CheckpointRejected or SwapAborted when it did not
        happen. ``finish=False`` leaves a successful record open (the canary adds its verdict).
        """
        try:
            swap = self.machine.begin(kind, record.version, record.path, members)
        except ProtocolError as e:
            raise PreconditionError(str(e)) from None
        rec = self.registry.start_swap(kind, record.version, swap.previous)
        self.swapping = record.version
        try:
            sent = await self._stage(swap, rec, Target(record.version, record.path))
            if swap.outcome is None:
                await self._commit(swap, rec, Target(record.version, record.path))
            else:
                await self._abort(sent)
        except asyncio.CancelledError:
            while swap.outcome is None:  # staging aborts; a commit rolls back, then gives up
                self.machine.abort("the swap was cancelled")
            raise
        finally:
            self.swapping = None
            self._settle(swap, rec, finish)
        return self._outcome(swap, rec)

    def _settle(self, swap: Swap, rec: SwapRecord, finish: bool) -> None:
        """Write what the machine decided to the registry, once."""
        modes = sorted({p.swap_mode for p in rec.replicas.values() if p.swap_mode})
        rec.swap_mode = ",".join(modes)
        rec.failed_replica, rec.failure_kind = swap.failed_replica, swap.failure_kind or ""
        record = self.registry.get(swap.version)
        if swap.outcome == "ok" and swap.kind == "promote":
            self.registry.promote(swap.version, "hot-swapped into every replica")
        elif swap.outcome == "ok" and swap.kind == "rollback":
            self.registry.rollback(swap.version)
        elif swap.version in self.machine.rejected and record.status in ("validated", "retired"):
            self.registry.set_status(swap.version, "rejected", swap.reason)
        if finish or swap.outcome != "ok":
            self.registry.finish_swap(rec, swap.outcome or "interrupted", swap.reason)
        if swap.outcome == "ok":
            self.apply_retention()
        self.repair()

    def _outcome(self, swap: Swap, rec: SwapRecord) -> SwapRecord:
        if swap.outcome == "ok":
            return rec
        status = self.registry.get(swap.version).status
        if status == "rejected":
            raise CheckpointRejected(f"version {swap.version} was rejected: {swap.reason}")
        verb = "failed and was rolled back" if swap.outcome == "failed" else "aborted"
        raise SwapAborted(
            f"swap to version {swap.version} {verb}: {swap.reason}; version {swap.version} "
            f"stays {status}, promote it again once that is fixed"
        )

    async def _stage(self, swap: Swap, rec: SwapRecord, target: Target) -> Sent:
        """Phase 1 over the machine's members (joiners included) until ready, failed or late."""
        sent: Sent = {}
        deadline = time.monotonic() + self.config.stage_timeout_s
        while swap.outcome is None:
            await self.replicas.live()
            serve_count = await self._serve_running() if swap.members is None else None
            if swap.outcome is not None:  # a member died
                break
            self._send_stage(swap, rec, target, sent)
            self._collect_stage(swap, rec, sent)
            live = self.machine.live_members() if swap.outcome is None else []
            enough = serve_count is None or len(live) >= serve_count
            if swap.outcome is None and enough and self.machine.ready_to_commit():
                break
            if swap.outcome is None and time.monotonic() > deadline:
                self.machine.abort(self._stage_timeout_reason(swap, live, serve_count))
            await self.replicas.wait_change(0.25)
        return sent

    def _send_stage(self, swap: Swap, rec: SwapRecord, target: Target, sent: Sent) -> None:
        for rid in self.machine.live_members():
            r = self.replicas.get(rid)
            if r is None or (rid in sent and sent[rid][0] is r):
                continue
            if self.machine.needs_stage(rid):
                sent[rid] = (r, self.replicas.send(r, "stage", target, rec.swap_id))
            elif rid in swap.staged:  # serves the version already
                rec.replicas[rid] = ReplicaSwap(rid, swap_mode=r.swap_mode, skipped=True)
                sent[rid] = (r, 0)

    def _collect_stage(self, swap: Swap, rec: SwapRecord, sent: Sent) -> None:
        for rid, (r, seq) in sent.items():
            result = self.replicas.result(rid, r, seq) if seq and rid not in swap.staged else None
            if result is None or swap.outcome is not None:
                continue
            part = self._part(rec, rid, result)
            part.stage_s = result.seconds
            if result.ok:
                self.machine.staged(rid, swap.version)
            else:
                reason = f"replica {rid} failed to stage ({result.fault}): {result.error}"
                self.machine.stage_failed(rid, result.fault or "environment", reason)

    def _stage_timeout_reason(self, swap: Swap, live: list[str], serve_count: int | None) -> str:
        waiting = [rid for rid in live if rid not in swap.staged]
        if waiting:
            return (
                f"replica(s) {', '.join(waiting)} did not stage within "
                f"{self.config.stage_timeout_s:.0f} s; every replica kept the old version"
            )
        if serve_count is not None and len(live) < serve_count:
            return (
                f"Serve runs {serve_count} replicas but only {len(live)} attached to the "
                "orchestrator; the swap would miss some, so it was aborted"
            )
        return "no live replica to stage on"

    async def _commit(self, swap: Swap, rec: SwapRecord, target: Target) -> None:
        """Phase 2; on a failure, every member loads ``previous`` again (the machine's list)."""
        flips: Sent = {}
        for rid in self.machine.commit():
            r = self.replicas.get(rid)
            if r is not None:
                flips[rid] = (r, self.replicas.send(r, "commit", target, rec.swap_id))
        loads: Sent = {}
        deadline = time.monotonic() + self.config.commit_timeout_s
        rolling = False
        while swap.outcome is None:
            await self.replicas.live()
            self._collect_commits(swap, rec, flips)
            if swap.phase == "rolling_back" and swap.outcome is None:
                if not rolling:  # a rollback loads weights: give it a stage's time
                    rolling, deadline = True, time.monotonic() + self.config.stage_timeout_s
                self._roll_back(swap, rec, loads)
            if swap.outcome is None and time.monotonic() > deadline:
                late = sorted(swap.flipping) or self.machine.to_roll_back()
                self.machine.abort(f"replica(s) {', '.join(late)} did not answer in time")
            await self.replicas.wait_change(0.1)

    def _collect_commits(self, swap: Swap, rec: SwapRecord, flips: Sent) -> None:
        for rid, (r, seq) in list(flips.items()):
            result = self.replicas.result(rid, r, seq)
            if self.replicas.get(rid) is not r or result is not None:
                del flips[rid]  # answered, or re-attached / died (the machine knows)
            if result is None or swap.outcome is not None:
                continue
            self._part(rec, rid, result).commit_s = result.seconds
            if result.ok:
                self.machine.committed(rid)
            else:
                reason = f"replica {rid} failed to commit ({result.fault}): {result.error}"
                self.machine.commit_failed(rid, reason, result.fault or "environment")

    def _roll_back(self, swap: Swap, rec: SwapRecord, loads: Sent) -> None:
        if swap.previous is None:  # a first promotion: nothing to go back to (none promoted)
            return
        previous = Target(swap.previous, self.registry.get(swap.previous).path)
        for rid in self.machine.to_roll_back():
            r = self.replicas.get(rid)
            if r is not None and not (rid in loads and loads[rid][0] is r):
                loads[rid] = (r, self.replicas.send(r, "load", previous, rec.swap_id))
        for rid, (r, seq) in list(loads.items()):
            result = self.replicas.result(rid, r, seq)
            if result is None or swap.outcome is not None:
                continue
            del loads[rid]
            if result.ok:
                self.machine.loaded(rid, swap.previous)
            else:
                self._part(rec, rid, result).error += f"; rollback: {result.error}"
                self.machine.give_up(rid)

    def _part(self, rec: SwapRecord, rid: str, result: Result) -> ReplicaSwap:
        part = rec.replicas.setdefault(rid, ReplicaSwap(rid))
        part.swap_mode = result.swap_mode or part.swap_mode
        if not result.ok:
            part.error = result.error
        return part

    async def _abort(self, sent: Sent) -> None:
        """Drop staged weights wherever a stage was sent; wait (briefly) until they are gone."""
        aborts = {
            rid: (r, self.replicas.send(r, "abort"))
            for rid, (r, seq) in sent.items()
            if seq and self.replicas.get(rid) is r
        }
        deadline = time.monotonic() + self.config.commit_timeout_s
        while aborts and time.monotonic() < deadline:
            for rid, (r, seq) in list(aborts.items()):
                if self.replicas.get(rid) is not r or r.results.pop(seq, None) is not None:
                    r.staged_version = None
                    del aborts[rid]
            if aborts:
                await self.replicas.wait_change(0.1)
                await self.replicas.live()

    def repair(self) -> None:
        """Replicas left out of step (a canary dropped, a rollback that gave up) load their
        target; the heartbeat that shows it makes them routable again."""
        for rid in self.machine.to_repair():
            r, version = self.replicas.get(rid), self.machine.join_target(rid)
            if r is not None and version is not None:
                self.replicas.send(r, "load", Target(version, self.registry.get(version).path))

    async def _serve_running(self) -> int | None:
        if not self.config.check_serve:
            return None
        at, count = self._serve_count
        if time.monotonic() - at < 0.5:
            return count
        config = self.config
        count = await asyncio.to_thread(serve_running_count, config.app_name, config.deployment)
        self._serve_count = (time.monotonic(), count)
        return count

    # ---- canary -----------------------------------------------------------------------------

    async def canary_then_promote(self, record: CheckpointRecord) -> SwapRecord:
        """One replica first; compare it with one still on the current version; go on or undo."""
        previous = self.registry.promoted
        await self.replicas.live()
        live = sorted(rid for rid, r in self.machine.replicas.items() if r.routable)
        if previous is None or len(live) < 2:
            raise PreconditionError(
                "a canary needs a promoted version to compare with and at least 2 replicas "
                f"(promoted: {previous}, replicas: {len(live)}); promote without canary"
            )
        canary_id, reference_id = live[0], live[1]
        rec = await self.run("canary", record, frozenset({canary_id}), finish=False)
        try:
            metrics = await self._compare(canary_id, reference_id, record, previous)
        except Exception as e:
            metrics, passed, reason = {"error": 1.0}, False, f"canary comparison failed: {e}"
        else:
            passed, reason = self._canary_verdict(metrics, previous)
        rec.canary = metrics
        self.registry.finish_swap(rec, "ok" if passed else "aborted", reason)
        if not passed:
            try:
                members = frozenset({canary_id})
                await self.run("canary-rollback", self.registry.get(previous), members)
            finally:  # a canary left behind by a failed rollback stops routing, then repairs
                self.machine.reject(record.version)
                self.registry.set_status(record.version, "rejected", reason)
                self.repair()
            raise CheckpointRejected(f"version {record.version} was rejected: {reason}")
        full = await self.run("promote", record)
        full.canary = metrics
        self.registry.save()
        return full

    async def _compare(
        self, canary_id: str, reference_id: str, record: CheckpointRecord, previous: int
    ) -> dict[str, float]:
        tokenizer = await asyncio.to_thread(checkpoint.load_tokenizer, record.path, False)
        ids, _ = await asyncio.to_thread(
            heldout_ids, self.config.heldout, tokenizer, self.config.canary_tokens
        )
        canary, reference = await asyncio.gather(
            self.request(canary_id, "evaluate", token_ids=ids),
            self.request(reference_id, "evaluate", token_ids=ids),
        )
        if canary.version != record.version or reference.version != previous:
            raise RuntimeError(
                f"replica versions changed during the canary (canary {canary.version}, "
                f"reference {reference.version})"
            )
        diffs = [abs(a - b) for a, b in zip(canary.logprobs, reference.logprobs, strict=True)]
        return {
            "canary_perplexity": math.exp(-sum(canary.logprobs) / len(canary.logprobs)),
            "reference_perplexity": math.exp(-sum(reference.logprobs) / len(reference.logprobs)),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "tokens": float(len(diffs)),
        }

    def _canary_verdict(self, metrics: dict[str, float], previous: int) -> tuple[bool, str]:
        limit = metrics["reference_perplexity"] * (1 + self.config.canary_max_ppl_increase)
        if metrics["canary_perplexity"] <= limit:
            return True, ""
        return False, (
            f"canary: held-out perplexity {metrics['canary_perplexity']:.3f} on the canary "
            f"replica is worse than version {previous}'s {metrics['reference_perplexity']:.3f} "
            f"by more than {self.config.canary_max_ppl_increase:.0%}"
        )

    async def request(self, rid: str, kind: CommandKind, **fields: Any) -> Result:
        """Send one command to one replica and wait for its result."""
        r = self.replicas.get(rid)
        if r is None:
            raise RuntimeError(f"replica {rid} is gone")
        seq = self.replicas.send(r, kind, **fields)
        deadline = time.monotonic() + self.config.stage_timeout_s
        while time.monotonic() < deadline:
            result = self.replicas.result(rid, r, seq)
            if result is not None:
                if not result.ok:
                    raise RuntimeError(f"replica {rid}: {result.error}")
                return result
            if self.replicas.get(rid) is not r:
                raise RuntimeError(f"replica {rid} went away")
            await self.replicas.wait_change(0.25)
            await self.replicas.live()
        raise TimeoutError(f"replica {rid} did not answer {kind} in time")

    # ---- retention -------------------------------------------------------------------------------

    def apply_retention(self) -> None:
        """Delete old checkpoint files, never one a promoted, canary, swapping or served
        version (or the rollback target) uses: ``Registry.retention_candidates`` decides."""
        if self.config.keep_last is None:
            return
        in_use = self.machine.in_use()
        for record in self.registry.retention_candidates(self.config.keep_last, in_use):
            path = Path(record.path)
            if remote.is_remote(record.path):
                try:  # manifest first: never a torn export
                    remote.delete_export(record.path)
                except SwapEnvironmentError as e:  # kept for now; the next promotion tries again
                    log.warning("retention could not delete %s: %s", record.path, e)
                    continue
            elif (path / checkpoint.MANIFEST).is_file():  # only ever a checkpoint directory
                shutil.rmtree(path, ignore_errors=True)
            self.registry.mark_deleted(record.version)
            log.info("retention deleted version %d (%s)", record.version, record.path)


__all__ = ["SwapCoordinator"]
