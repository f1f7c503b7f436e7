"""The hot-swap protocol as a pure state machine: which version each replica may serve, and when.

No Ray, no I/O, no clocks: the orchestrator's swap coordinator (``actors/swap_coordinator.py``)
feeds it what the replicas reported and does what it decides, and a hypothesis stateful test
(tests/test_swap_protocol.py) drives it through arbitrary sequences of the same events.

The registry's word is ``promoted``: the version every routable replica serves. A swap changes
it all or nothing:

- ``staging``: every member (every live replica, or the canary's one) loads the new weights
  beside the serving ones. A stage failure ends the swap ``aborted`` and nothing flips; it
  rejects the version only when the failure is the checkpoint's (kind ``"checkpoint"``: a
  ``kilnlm.checkpoint.CheckpointError``); an ``"environment"`` failure (file missing on one
  node, a timeout, a replica died) leaves it promotable.
- ``committing``: once every member staged, each flips. ``promoted`` changes only when every
  live member has committed.
- ``rolling_back``: a commit failed (or a member died or timed out): every member is loaded
  back onto ``previous``; one that cannot be is not routable (its agent fails Serve's health
  check and Serve replaces it with a replica that joins on ``previous``). The swap ends
  ``failed`` and ``promoted`` never changed.

Invariants (``check``):

1. Outside a commit or rollback, every routable replica serves ``promoted`` (the canary replica:
   the canary version); with nothing promoted yet the registry claims nothing.
2. During a commit or rollback, a routable member serves the swap's version or its previous one.
3. A version's registered path never changes, and no two versions share a path.
4. A rejected version is never promoted, never a canary, never staged by a running swap.
5. Every response names the version whose weights produced it (``respond`` reads the one
   snapshot a replica has).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Phase = Literal["staging", "committing", "rolling_back"]
FailureKind = Literal["checkpoint", "environment"]
SwapKind = Literal["promote", "rollback", "canary", "canary-rollback"]
Outcome = Literal["ok", "aborted", "failed", "interrupted"]


class ProtocolError(RuntimeError):
    """An event that is not legal in this state: a bug in the caller, not in a replica."""


@dataclass
class Replica:
    """What one replica serves, as its reports said."""

    serving: int | None = None
    """The version new requests get (None: empty)."""
    staged: int | None = None
    routable: bool = False
    """It may take requests: it serves what the registry says it should."""


@dataclass
class Swap:
    """One swap in flight: what it changes, who takes part, how far it got."""

    kind: SwapKind
    version: int
    previous: int | None
    members: frozenset[str] | None
    """None: every live replica (joiners included); else these replicas only (a canary)."""
    phase: Phase = "staging"
    staged: set[str] = field(default_factory=set)
    committed: set[str] = field(default_factory=set)
    flipping: set[str] = field(default_factory=set)
    """Members sent a commit that has not answered yet."""
    given_up: set[str] = field(default_factory=set)
    """Members a rollback could not bring back (left to Serve's health check)."""
    outcome: Outcome | None = None
    failed_replica: str = ""
    failure_kind: FailureKind | None = None
    reason: str = ""

    def has(self, rid: str) -> bool:
        return self.members is None or rid in self.members


class SwapMachine:
    """Registry-side truth (promoted, canary, rejected, paths) and every replica's state."""

    def __init__(self, promoted: int | None = None, paths: dict[int, str] | None = None) -> None:
        self.promoted = promoted
        self.canary: tuple[str, int] | None = None
        """(replica, version) while a canary replica serves a version not yet promoted."""
        self.rejected: set[int] = set()
        self.paths: dict[int, str] = dict(paths or {})
        self.replicas: dict[str, Replica] = {}
        self.swap: Swap | None = None
        self.responses: list[tuple[str, int, int]] = []
        """(replica, version named, version of the weights that produced it)."""

    # ---- registry-side events ----------------------------------------------------------------

    def register(self, version: int, path: str) -> None:
        """A version's path is fixed once registered; a path belongs to one version."""
        if self.paths.get(version, path) != path:
            raise ProtocolError(f"version {version} is registered at {self.paths[version]}")
        owner = next((v for v, p in self.paths.items() if p == path and v != version), None)
        if owner is not None:
            raise ProtocolError(f"{path} is registered as version {owner} already")
        self.paths[version] = path

    def reject(self, version: int) -> None:
        """The canary verdict or the gate says ``version`` is bad (a canary is dropped)."""
        if version == self.promoted or (self.swap is not None and self.swap.version == version):
            raise ProtocolError(f"version {version} is promoted or swapping; it cannot be rejected")
        self.rejected.add(version)
        if self.canary is not None and self.canary[1] == version:
            self.replicas[self.canary[0]].routable = False  # until it loads promoted
            self.canary = None

    def to_repair(self) -> list[str]:
        """Replicas outside any swap that must load their target before they may route."""
        if self.swap is not None:
            return []
        return [
            rid
            for rid, r in sorted(self.replicas.items())
            if not r.routable and self.join_target(rid) not in (None, r.serving)
        ]

    def restart(self) -> None:
        """The orchestrator died: what it ran is interrupted, replicas attach again."""
        if self.swap is not None:
            self._finish("interrupted", "", None, "the orchestrator restarted mid-swap")
        self.canary, self.replicas = None, {}

    # ---- replicas joining, loading, dying -----------------------------------------------------

    def join_target(self, rid: str) -> int | None:
        """The version ``rid`` must serve before it is routable (None: the registry names none)."""
        s = self.swap
        if s is not None and s.has(rid):
            if s.phase == "committing":
                return s.version
            if s.phase == "rolling_back":
                return s.previous
        if self.canary is not None and self.canary[0] == rid:
            return self.canary[1]
        return self.promoted

    def join(self, rid: str, serving: int | None) -> int | None:
        """A replica attaches (started, restarted, or re-attached); returns what it must load
        (None: nothing, it may route now)."""
        self.replicas[rid] = Replica(serving=serving)
        if self.swap is not None:  # commands of its previous attachment are void
            self.swap.flipping.discard(rid)
            self.swap.staged.discard(rid)
        if self.canary is not None and self.canary[0] == rid:
            self.canary = None  # a re-attached canary lost its place: it loads the promoted one
        target = self.join_target(rid)
        if target is None or target == serving:
            self.loaded(rid, serving)
            return None
        return target

    def loaded(self, rid: str, version: int | None) -> None:
        """``rid`` serves ``version`` now (a load: stage and commit at once)."""
        r = self._replica(rid)
        r.serving, r.staged = version, None
        target = self.join_target(rid)
        r.routable = version is not None and (target is None or version == target)
        s = self.swap
        if s is not None and s.has(rid) and version == s.version and s.phase == "committing":
            self.committed(rid)
        self._maybe_settle()

    def load_failed(self, rid: str, reason: str) -> None:
        r = self._replica(rid)
        r.routable = False
        s = self.swap
        if s is not None and s.has(rid) and s.phase == "committing":
            self.commit_failed(rid, reason)

    def died(self, rid: str) -> None:
        self.replicas.pop(rid, None)
        if self.canary is not None and self.canary[0] == rid:
            self.canary = None
        s = self.swap
        if s is None or not s.has(rid):
            return
        s.staged.discard(rid)
        if s.phase == "staging" and s.members is not None:
            self.stage_failed(rid, "environment", f"replica {rid} died")
        elif s.phase == "committing" and rid not in s.committed:
            self.commit_failed(rid, f"replica {rid} died before committing")
        self._maybe_settle()

    # ---- the swap -----------------------------------------------------------------------------

    def begin(
        self, kind: SwapKind, version: int, path: str, members: frozenset[str] | None = None
    ) -> Swap:
        if self.swap is not None:
            raise ProtocolError(f"a swap to version {self.swap.version} is running")
        if version in self.rejected:
            raise ProtocolError(f"version {version} was rejected")
        self.register(version, path)
        previous = self.promoted
        if kind == "canary":
            if members is None or len(members) != 1 or self.promoted is None:
                raise ProtocolError("a canary swap needs one member and a promoted version")
        elif kind == "canary-rollback":
            if self.canary is None or members != frozenset({self.canary[0]}):
                raise ProtocolError("a canary rollback needs the canary replica as its member")
            if version != self.promoted:
                raise ProtocolError("a canary rolls back to the promoted version")
            previous = self.canary[1]
        elif members is not None:
            raise ProtocolError(f"a {kind} swap goes to every replica")
        elif self.canary is not None and self.canary[1] != version:
            raise ProtocolError(
                f"version {self.canary[1]} is on a canary replica; promote or roll it back first"
            )
        self.swap = Swap(kind, version, previous, members)
        return self.swap

    def live_members(self) -> list[str]:
        s = self._swap()
        return sorted(rid for rid in self.replicas if s.has(rid))

    def needs_stage(self, rid: str) -> bool:
        """A stage command must go to ``rid`` (it is a member and does not hold the version)."""
        s = self._swap()
        r = self.replicas.get(rid)
        if s.phase != "staging" or r is None or not s.has(rid) or rid in s.staged:
            return False
        if r.serving == s.version and r.staged is None:
            s.staged.add(rid)  # already serves it: nothing to load
            return False
        return True

    def staged(self, rid: str, version: int) -> None:
        s = self._swap()
        if s.phase != "staging" or version != s.version:
            raise ProtocolError(f"stage of {version} reported in phase {s.phase}")
        self._replica(rid).staged = version
        s.staged.add(rid)

    def stage_failed(self, rid: str, kind: FailureKind, reason: str) -> None:
        s = self._swap()
        if s.phase != "staging":
            raise ProtocolError(f"stage failure reported in phase {s.phase}")
        if kind == "checkpoint" and s.kind != "canary-rollback":
            self.rejected.add(s.version)
            if self.canary is not None and self.canary[1] == s.version:
                self.canary = None  # its replica is not routable until it loads promoted
        self._finish("aborted", rid, kind, reason)

    def abort(self, reason: str) -> None:
        """The coordinator gives up (timeout, cancelled): staging aborts, a commit rolls back."""
        s = self._swap()
        if s.phase == "staging":
            self._finish("aborted", "", "environment", reason)
            return
        if s.phase == "committing":
            self.commit_failed("", reason)
        if self.swap is s:  # rolling back: whoever has not come back is given up
            for rid in set(s.flipping) | set(self.to_roll_back()):
                self.give_up(rid)

    def ready_to_commit(self) -> bool:
        s = self._swap()
        live = self.live_members()
        # No replica at all is fine for a promotion (replicas that join later load it), not
        # for a canary, whose one member is the point.
        some = bool(live) or s.members is None
        return s.phase == "staging" and some and all(rid in s.staged for rid in live)

    def commit(self) -> list[str]:
        """Phase 2 starts; returns the members that must flip (the rest serve it already)."""
        s = self._swap()
        if not self.ready_to_commit():
            raise ProtocolError("commit before every member staged")
        s.phase = "committing"
        flip = [rid for rid in self.live_members() if self.replicas[rid].staged == s.version]
        s.flipping = set(flip)
        for rid in self.live_members():
            if rid not in flip:
                s.committed.add(rid)
        self._maybe_settle()
        return flip

    def committed(self, rid: str) -> None:
        s = self._swap()
        if s.phase == "staging":
            raise ProtocolError("commit reported before phase 2")
        r = self._replica(rid)
        r.serving, r.staged = s.version, None
        s.committed.add(rid)
        s.flipping.discard(rid)
        self._maybe_settle()

    def commit_failed(self, rid: str, reason: str, kind: FailureKind = "environment") -> None:
        """A member could not flip: roll every member back to ``previous``."""
        s = self._swap()
        if s.phase == "staging":
            raise ProtocolError("commit failure reported before phase 2")
        if rid in self.replicas:
            self.replicas[rid].routable = False  # its agent fails its health check
        s.flipping.discard(rid)
        if s.phase == "committing":
            s.phase, s.failed_replica, s.failure_kind, s.reason = "rolling_back", rid, kind, reason
        self._maybe_settle()

    def to_roll_back(self) -> list[str]:
        """Members that must load ``previous`` again (routable ones serve it already)."""
        s = self._swap()
        if s.phase != "rolling_back" or s.previous is None:
            return []
        return [
            rid
            for rid in self.live_members()
            if rid not in s.flipping | s.given_up
            and (self.replicas[rid].serving != s.previous or not self.replicas[rid].routable)
        ]

    def give_up(self, rid: str) -> None:
        """``rid`` did not answer or could not be brought back: it is not routable (its agent
        fails Serve's health check) until Serve replaces it."""
        s = self._swap()
        self._replica(rid).routable = False
        s.given_up.add(rid)
        s.flipping.discard(rid)
        self._maybe_settle()

    # ---- requests -----------------------------------------------------------------------------

    def respond(self, rid: str) -> int:
        """A response from ``rid``: it names the version of the one snapshot it serves."""
        r = self._replica(rid)
        if not r.routable or r.serving is None:
            raise ProtocolError(f"replica {rid} is not routable")
        self.responses.append((rid, r.serving, r.serving))
        return r.serving

    # ---- invariants ---------------------------------------------------------------------------

    def allowed(self, rid: str) -> set[int] | None:
        """Versions a routable ``rid`` may serve now (None: any, nothing is promoted)."""
        s = self.swap
        if s is not None and s.has(rid) and s.phase != "staging":
            return None if s.previous is None else {s.version, s.previous}
        if self.canary is not None and self.canary[0] == rid:
            return {self.canary[1]}
        return None if self.promoted is None else {self.promoted}

    def in_use(self) -> set[int]:
        """Versions whose files must stay: promoted, canary, swapping, or held by a replica."""
        used = {v for r in self.replicas.values() for v in (r.serving, r.staged) if v}
        if self.promoted is not None:
            used.add(self.promoted)
        if self.canary is not None:
            used.add(self.canary[1])
        if self.swap is not None:
            used |= {v for v in (self.swap.version, self.swap.previous) if v is not None}
        return used

    def check(self) -> None:
        """Assert every invariant of the module docstring."""
        for rid, r in self.replicas.items():
            allowed = self.allowed(rid)
            assert not r.routable or allowed is None or r.serving in allowed, (rid, r, allowed)
        assert len(set(self.paths.values())) == len(self.paths), "two versions share a path"
        assert self.promoted not in self.rejected, "a rejected version is promoted"
        assert self.canary is None or self.canary[1] not in self.rejected
        if self.swap is not None and self.swap.kind != "canary-rollback":
            assert self.swap.version not in self.rejected, "a running swap stages a rejected one"
        for _, named, produced in self.responses:
            assert named == produced, "a response names another version than its weights"

    # ---- internals ----------------------------------------------------------------------------

    def _maybe_settle(self) -> None:
        s = self.swap
        if s is None or s.phase == "staging":
            return
        live = self.live_members()
        some = bool(live) or s.members is None
        if s.phase == "committing" and some and all(rid in s.committed for rid in live):
            self._succeed()
        elif s.phase == "committing" and not live:
            self.commit_failed("", "every member died before committing")
        elif s.phase == "rolling_back" and not s.flipping & set(live) and not self.to_roll_back():
            self._finish("failed", s.failed_replica, s.failure_kind, s.reason)

    def _succeed(self) -> None:
        s = self._swap()
        for rid in self.live_members():
            self.replicas[rid].routable = True
        if s.kind in ("promote", "rollback"):
            self.promoted, self.canary = s.version, None
        elif s.kind == "canary":
            assert s.members is not None
            self.canary = (next(iter(s.members)), s.version)
        else:
            self.canary = None
        self._finish("ok", "", None, "")

    def _finish(self, outcome: Outcome, rid: str, kind: FailureKind | None, reason: str) -> None:
        s = self._swap()
        s.outcome, s.failed_replica, s.failure_kind, s.reason = outcome, rid, kind, reason
        for r in self.replicas.values():
            r.staged = None  # aborted everywhere (or flipped)
        self.swap = None
        for rid_, r in self.replicas.items():  # settle routability against the new truth
            allowed = self.allowed(rid_)
            r.routable = r.routable and (allowed is None or r.serving in allowed)

    def _swap(self) -> Swap:
        if self.swap is None:
            raise ProtocolError("no swap is running")
        return self.swap

    def _replica(self, rid: str) -> Replica:
        r = self.replicas.get(rid)
        if r is None:
            raise ProtocolError(f"replica {rid} is not attached")
        return r


__all__ = [
    "FailureKind",
    "Outcome",
    "ProtocolError",
    "Replica",
    "Swap",
    "SwapKind",
    "SwapMachine",
]
