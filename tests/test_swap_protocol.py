"""The hot-swap state machine (kilnlm.hotswap): worked examples, then hypothesis sequences.

The machine is what the orchestrator's swap coordinator drives, so these sequences are the
protocol itself: whatever replicas report, die or join, every routable replica serves what the
registry promoted (or is mid-commit), a failed swap never changes the promoted version, a
registered path never changes, and a rejected version never serves.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kilnlm.hotswap import ProtocolError, SwapMachine

REPLICAS = ("r0", "r1", "r2")
VERSIONS = (1, 2, 3, 4)
RARE = st.integers(0, 5)
"""Deaths, restarts and timeouts fire on a 0 only, so that sequences reach commits too."""


def path(v: int) -> str:
    return f"/ck/v{v}"


def two_on(version: int) -> SwapMachine:
    m = SwapMachine(promoted=version, paths={version: path(version)})
    for rid in ("r0", "r1"):
        assert m.join(rid, version) is None
    return m


def test_a_swap_promotes_only_when_every_replica_committed():
    m = two_on(1)
    m.begin("promote", 2, path(2))
    assert [rid for rid in REPLICAS[:2] if m.needs_stage(rid)] == ["r0", "r1"]
    m.staged("r0", 2)
    assert not m.ready_to_commit()
    m.staged("r1", 2)
    assert m.commit() == ["r0", "r1"]
    m.committed("r0")
    assert m.promoted == 1 and m.swap is not None, "one commit is not a promotion"
    m.check()
    m.committed("r1")
    assert m.promoted == 2 and m.swap is None
    m.check()


def test_a_commit_failure_rolls_every_replica_back_and_says_who_failed():
    m = two_on(1)
    swap = m.begin("promote", 2, path(2))
    m.staged("r0", 2)
    m.staged("r1", 2)
    m.commit()
    m.committed("r0")
    m.commit_failed("r1", "ValueError: version 2 is not staged")
    assert m.to_roll_back() == ["r0", "r1"] and m.promoted == 1
    m.loaded("r0", 1)
    m.loaded("r1", 1)
    assert m.swap is None and m.promoted == 1
    assert (swap.outcome, swap.failed_replica) == ("failed", "r1")
    assert "not staged" in swap.reason and 2 not in m.rejected, "retryable"
    assert all(r.routable and r.serving == 1 for r in m.replicas.values())
    m.check()


@pytest.mark.parametrize(("kind", "rejected"), [("checkpoint", True), ("environment", False)])
def test_only_a_checkpoint_fault_rejects(kind, rejected):
    m = two_on(1)
    swap = m.begin("promote", 2, path(2))
    m.staged("r0", 2)
    m.stage_failed("r1", kind, "reason")
    assert swap.outcome == "aborted" and swap.failure_kind == kind
    assert (2 in m.rejected) is rejected and m.promoted == 1
    with pytest.raises(ProtocolError) if rejected else _no_error():
        m.begin("promote", 2, path(2))


def test_a_replica_that_dies_mid_commit_aborts_and_its_replacement_joins_on_previous():
    m = two_on(1)
    m.begin("promote", 2, path(2))
    m.staged("r0", 2)
    m.staged("r1", 2)
    m.commit()
    m.committed("r0")
    m.died("r1")
    assert m.to_roll_back() == ["r0"]
    assert m.join("r2", None) == 1, "the replacement comes up on the previous version"
    m.loaded("r0", 1)
    m.loaded("r2", 1)
    assert m.swap is None and m.promoted == 1
    m.check()


def test_a_registered_path_never_changes():
    m = two_on(1)
    with pytest.raises(ProtocolError, match="registered as version 1"):
        m.register(2, path(1))
    with pytest.raises(ProtocolError, match="registered at"):
        m.register(1, path(2))


class _no_error:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


class SwapProtocol(RuleBasedStateMachine):
    """Arbitrary interleavings of swaps, reports, deaths, joins and restarts."""

    def __init__(self) -> None:
        super().__init__()
        self.m = SwapMachine()
        self.outcomes: list[tuple[str, int | None, int | None]] = []

    def _swap_step(self, action) -> None:
        """Run ``action``; if it ended a swap, a failed one must not have moved promoted."""
        swap, before = self.m.swap, self.m.promoted
        action()
        if swap is not None and self.m.swap is None:
            if swap.outcome != "ok" or swap.kind in ("canary", "canary-rollback"):
                assert self.m.promoted == before, (swap, before)
            else:
                assert self.m.promoted == swap.version
                assert all(
                    r.serving == swap.version for r in self.m.replicas.values() if r.routable
                )

    @initialize()
    def first_promotion(self):
        for rid in REPLICAS:
            self.m.join(rid, None)
        self.m.begin("promote", 1, path(1))
        for rid in REPLICAS:
            assert self.m.needs_stage(rid)
            self.m.staged(rid, 1)
        for rid in self.m.commit():
            self.m.committed(rid)
        assert self.m.promoted == 1

    @rule(rid=st.sampled_from(REPLICAS), serving=st.sampled_from((None, *VERSIONS)), dice=RARE)
    def join(self, rid, serving, dice):
        if rid in self.m.replicas and dice != 0:  # mostly new replicas; rarely a re-attach
            return
        if serving is not None:
            self.m.paths.setdefault(serving, path(serving))
        self._swap_step(lambda: self.m.join(rid, serving))

    @rule(rid=st.sampled_from(REPLICAS), ok=st.booleans())
    def load_target(self, rid, ok):
        r = self.m.replicas.get(rid)
        target = self.m.join_target(rid)
        if r is None or target is None or (r.routable and r.serving == target):
            return
        if ok:
            self._swap_step(lambda: self.m.loaded(rid, target))
        else:
            self._swap_step(lambda: self.m.load_failed(rid, "OSError: disk"))

    @rule(rid=st.sampled_from(REPLICAS), dice=RARE)
    def die(self, rid, dice):
        if dice == 0:
            self._swap_step(lambda: self.m.died(rid))

    @rule(dice=RARE)
    def restart(self, dice):
        if dice == 0:
            self._swap_step(self.m.restart)

    @precondition(lambda self: self.m.swap is None)
    @rule(version=st.sampled_from(VERSIONS), kind=st.sampled_from(("promote", "rollback")))
    def begin(self, version, kind):
        if version in self.m.rejected or version == self.m.promoted:
            return
        if self.m.canary is not None and self.m.canary[1] != version:
            with pytest.raises(ProtocolError, match="canary"):
                self.m.begin(kind, version, path(version))
            return
        self.m.begin(kind, version, path(version))

    @precondition(lambda self: self.m.swap is None and self.m.promoted is not None)
    @rule(version=st.sampled_from(VERSIONS), rid=st.sampled_from(REPLICAS))
    def begin_canary(self, version, rid):
        if version in self.m.rejected or version == self.m.promoted or self.m.canary:
            return
        self.m.begin("canary", version, path(version), frozenset({rid}))

    @precondition(lambda self: self.m.swap is None and self.m.canary is not None)
    @rule(reject=st.booleans())
    def end_canary(self, reject):
        rid, version = self.m.canary
        if reject:
            assert self.m.promoted is not None
            self.m.begin(
                "canary-rollback", self.m.promoted, path(self.m.promoted), frozenset({rid})
            )
        else:
            self.m.begin("promote", version, path(version))

    @precondition(lambda self: self.m.swap is None and self.m.canary is not None)
    @rule(dice=RARE)
    def reject_canary(self, dice):
        if dice == 0:  # the verdict rejects before the rollback ran (its replica stops routing)
            self.m.reject(self.m.canary[1])

    @precondition(lambda self: self.m.swap is not None and self.m.swap.phase == "staging")
    @rule(data=st.data(), outcome=st.sampled_from(("ok",) * 6 + ("checkpoint", "environment")))
    def stage_report(self, data, outcome):
        todo = [rid for rid in self.m.live_members() if self.m.needs_stage(rid)]
        if not todo:
            return
        rid = data.draw(st.sampled_from(todo))
        if outcome == "ok":
            self.m.staged(rid, self.m.swap.version)
        else:
            self._swap_step(lambda: self.m.stage_failed(rid, outcome, "bad"))

    @precondition(lambda self: self.m.swap is not None and self.m.swap.phase == "staging")
    @rule()
    def commit(self):
        if self.m.ready_to_commit():
            self._swap_step(self.m.commit)

    @precondition(lambda self: self.m.swap is not None and self.m.swap.flipping)
    @rule(data=st.data(), ok=st.sampled_from((True,) * 4 + (False,)))
    def commit_report(self, data, ok):
        rid = data.draw(st.sampled_from(sorted(self.m.swap.flipping)))
        if ok:
            self._swap_step(lambda: self.m.committed(rid))
        else:
            self._swap_step(lambda: self.m.commit_failed(rid, "commit failed"))

    @precondition(lambda self: self.m.swap is not None and self.m.swap.phase == "rolling_back")
    @rule(data=st.data(), ok=st.booleans())
    def roll_back_one(self, data, ok):
        todo = self.m.to_roll_back()
        if not todo:
            return
        rid = data.draw(st.sampled_from(todo))
        if ok:
            self._swap_step(lambda: self.m.loaded(rid, self.m.swap.previous))
        else:
            self._swap_step(lambda: self.m.give_up(rid))

    @precondition(lambda self: self.m.swap is not None)
    @rule(dice=RARE)
    def abort(self, dice):
        if dice == 0:
            self._swap_step(lambda: self.m.abort("timeout"))

    @rule(rid=st.sampled_from(REPLICAS))
    def respond(self, rid):
        r = self.m.replicas.get(rid)
        if r is not None and r.routable and r.serving is not None:
            assert self.m.respond(rid) == r.serving

    @invariant()
    def invariants_hold(self):
        self.m.check()
        if self.m.swap is None and self.m.promoted is not None:
            for rid, r in self.m.replicas.items():
                if r.routable and (self.m.canary is None or self.m.canary[0] != rid):
                    assert r.serving == self.m.promoted, (rid, r)

    @invariant()
    def paths_never_change(self):
        assert all(p == path(v) for v, p in self.m.paths.items())


TestSwapProtocol = SwapProtocol.TestCase
TestSwapProtocol.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
