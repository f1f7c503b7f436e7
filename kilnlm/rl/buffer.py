"""Sample staleness: which samples may still train the policy, as a small pure state machine.

Each sample carries the version of the weights that produced it (the engine's one snapshot,
reported with the sample). The trainer's policy is at ``version``; a sample made ``lag =
version − sample.version`` versions ago is usable while ``lag <= max_staleness`` and is then
importance-weighted by the ratio of trainer to sampler log-probs (``kilnlm.rl.objective``);
beyond the bound it is dropped and counted, never trained on.

Invariants (asserted by ``check``):

- every held sample satisfies ``0 <= version − sample.version <= max_staleness``;
- nothing is lost: ``added == used + dropped + held``;
- the buffer never changes a sample: samples are frozen, and the version a caller reads from a
  taken sample is the one it put in (a sample from a version not yet reached is refused, since
  no weights could have produced it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One completion as the sampler returned it, with its reward."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    """Sampled ids, the final eos included when one was sampled (its log-prob counts)."""
    logprobs: tuple[float, ...]
    """Sampler log-prob of each completion id, under the distribution it was drawn from."""
    version: int
    """The weights that produced every id (the engine's snapshot), never rewritten."""
    reward: float
    group: int
    """Samples of one prompt in one round share a group (the leave-one-out baseline's unit)."""

    def __post_init__(self) -> None:
        if not self.completion_ids:
            raise ValueError("completion_ids must hold at least one id")
        if len(self.logprobs) != len(self.completion_ids):
            raise ValueError(
                f"logprobs has {len(self.logprobs)} entries for {len(self.completion_ids)} ids; "
                "ask the sampler for the chosen token's logprob at every step"
            )


class StalenessBuffer:
    """Samples waiting to train, dropped once they are more than ``max_staleness`` versions old."""

    def __init__(self, max_staleness: int, version: int = 0) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = max_staleness
        self.version = version
        """The trainer's current policy version."""
        self._held: deque[Sample] = deque()
        self.added = 0
        self.used = 0
        self.dropped = 0
        """Samples never trained on because they were too old (the metric the loop reports)."""

    def __len__(self) -> int:
        return len(self._held)

    def is_fresh(self, sample: Sample) -> bool:
        return self.version - sample.version <= self.max_staleness

    def put(self, samples: Iterable[Sample]) -> None:
        """Add samples; ones already too old are dropped (and counted) at once."""
        for s in samples:
            if s.version > self.version:
                raise ValueError(
                    f"sample from version {s.version} but the policy is at {self.version}: "
                    "advance the buffer when a version is promoted, before its samples arrive"
                )
            self.added += 1
            if self.is_fresh(s):
                self._held.append(s)
            else:
                self.dropped += 1

    def advance(self, version: int) -> int:
        """The policy moved to ``version``; drop what is now stale and return how many."""
        if version < self.version:
            raise ValueError(f"versions only grow: at {self.version}, asked for {version}")
        self.version = version
        before = len(self._held)
        self._held = deque(s for s in self._held if self.is_fresh(s))
        self.dropped += before - len(self._held)
        return before - len(self._held)

    def take(self, n: int | None = None) -> list[Sample]:
        """Remove and return up to ``n`` samples (all when None), oldest first; all fresh."""
        n = len(self._held) if n is None else min(n, len(self._held))
        out = [self._held.popleft() for _ in range(n)]
        self.used += len(out)
        return out

    def check(self) -> None:
        """Assert the invariants (tests call this after every operation)."""
        for s in self._held:
            assert 0 <= self.version - s.version <= self.max_staleness, (s.version, self.version)
        assert self.added == self.used + self.dropped + len(self._held)


__all__ = ["Sample", "StalenessBuffer"]
