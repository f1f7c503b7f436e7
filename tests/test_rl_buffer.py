"""Sample staleness: a worked example, then random interleavings of producing samples (by
replicas that may lag), promoting versions and training, checked against an independent ledger."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kilnlm.rl.buffer import Sample, StalenessBuffer


def sample(version: int, uid: int) -> Sample:
    """The uid rides in the reward: the ledger maps it back to the version that produced it."""
    return Sample((1,), (2, 3), (-0.5, -0.1), version, float(uid), group=uid)


def test_worked_example_drops_only_what_falls_behind_the_bound():
    buf = StalenessBuffer(max_staleness=1)
    buf.put([sample(0, 0), sample(0, 1)])
    buf.advance(1)  # lag 1: still usable
    assert len(buf) == 2 and buf.dropped == 0
    buf.put([sample(1, 2)])
    assert [s.reward for s in buf.take(1)] == [0.0]  # oldest first
    assert buf.advance(2) == 1  # sample 1 (version 0) is now 2 behind: dropped
    buf.put([sample(0, 3)])  # arrives already too old: dropped at once
    assert [(s.version, s.reward) for s in buf.take()] == [(1, 2.0)]
    assert (buf.added, buf.used, buf.dropped, len(buf)) == (4, 2, 2, 0)
    buf.check()


def test_refuses_samples_from_a_version_not_yet_reached_and_versions_going_back():
    buf = StalenessBuffer(max_staleness=0, version=3)
    with pytest.raises(ValueError, match="advance the buffer"):
        buf.put([sample(4, 0)])
    with pytest.raises(ValueError, match="versions only grow"):
        buf.advance(2)
    with pytest.raises(ValueError, match="max_staleness"):
        StalenessBuffer(max_staleness=-1)
    with pytest.raises(ValueError, match="logprobs has 1 entries"):
        Sample((1,), (2, 3), (-0.5,), 0, 0.0, 0)


class StalenessMachine(RuleBasedStateMachine):
    """Replicas produce samples from any version they may still serve (up to 3 behind, so some
    arrive stale); the trainer takes batches and promotes. The ledger records, at production,
    which version made each sample; every taken sample must match it and be within the bound,
    and every sample that fell behind the bound must have been dropped, never taken."""

    def __init__(self) -> None:
        super().__init__()
        self.buf: StalenessBuffer | None = None
        self.version = 0
        self.ledger: dict[int, int] = {}  # uid -> version that produced it
        self.taken: set[int] = set()
        self.next_uid = 0

    @rule(max_staleness=st.integers(0, 3))
    @precondition(lambda self: self.buf is None)
    def start(self, max_staleness):
        self.buf = StalenessBuffer(max_staleness)

    @rule(lag=st.integers(0, 4), n=st.integers(1, 4))
    @precondition(lambda self: self.buf is not None)
    def produce(self, lag, n):
        version = max(0, self.version - lag)
        batch = []
        for _ in range(n):
            self.ledger[self.next_uid] = version
            batch.append(sample(version, self.next_uid))
            self.next_uid += 1
        self.buf.put(batch)

    @rule(steps=st.integers(1, 2))
    @precondition(lambda self: self.buf is not None)
    def promote(self, steps):
        self.version += steps
        self.buf.advance(self.version)

    @rule(n=st.none() | st.integers(0, 5))
    @precondition(lambda self: self.buf is not None)
    def train(self, n):
        for s in self.buf.take(n):
            uid = int(s.reward)
            assert s.version == self.ledger[uid], "sample attributed to another version"
            assert self.version - s.version <= self.buf.max_staleness, "stale sample used"
            assert uid not in self.taken, "sample used twice"
            self.taken.add(uid)

    @invariant()
    def consistent(self):
        if self.buf is None:
            return
        self.buf.check()
        stale = {u for u, v in self.ledger.items() if self.version - v > self.buf.max_staleness}
        held = {int(s.reward) for s in self.buf._held}
        assert not (held & stale), "a stale sample is still held"
        dropped = set(self.ledger) - self.taken - held
        assert len(dropped) == self.buf.dropped
        assert dropped <= stale, "a sample was dropped while still within the bound"


TestStalenessMachine = StalenessMachine.TestCase
TestStalenessMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
