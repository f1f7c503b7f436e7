"""Which weights serve: the engine's one snapshot, read leases, and version rules.

DESIGN.md: "the engine owns which weights serve; everything that names a version reads the
engine's one snapshot". A ``Snapshot`` is (version, model, payload) — the payload is opaque to
the engine (the replica keeps its tokenizer and checkpoint path there) — and it changes only
when the engine flips, on its own thread, at a step boundary. So generation (the version a
request is admitted on), scoring, model info, canary evaluation and version pinning all name
the same thing: the weights that produced the answer.

Readers outside the step loop (scoring, evaluation) hold a *lease* on a snapshot while they
read its weights. In drain mode the flip copies the new weights into the serving model in
place, so it waits for those leases to end as it waits for the old version's requests; and
while it waits no new lease is granted (a new reader waits for the new weights, as new
requests do), so a stream of scores cannot starve the flip. In double mode the new weights
are a separate model, so old leases never block anything.

Every change (a flip, a drain that starts or is called off) is published to listeners, which
may run on any thread; ``flips`` counts flips.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kilnlm.model import Transformer


@dataclass(frozen=True)
class Snapshot:
    """The serving version, its weights, and what the replica keeps beside them."""

    version: int
    model: Transformer
    payload: Any = None


class VersionError(RuntimeError):
    """A request's version rule does not hold for the version that would serve it."""


class VersionUnavailable(VersionError):
    """``min_version`` is newer than what serves: retry after it is promoted."""


class VersionMismatch(VersionError):
    """``pin_version`` is not what serves: retrying will not help until it is promoted again."""


@dataclass(frozen=True)
class VersionRule:
    """A request's constraints on the version that serves it (None: any)."""

    min_version: int | None = None
    pin_version: int | None = None

    def check(self, version: int) -> None:
        """Raise VersionUnavailable / VersionMismatch unless ``version`` may serve it."""
        if self.min_version is not None and version < self.min_version:
            raise VersionUnavailable(
                f"min_version {self.min_version} is newer than the served version {version}; "
                "retry after it is promoted"
            )
        if self.pin_version is not None and version != self.pin_version:
            raise VersionMismatch(
                f"pin_version {self.pin_version} is not served (serving version {version})"
            )


class ServingState:
    """The current snapshot, who is reading which version, and whether a drain flip waits.

    Thread-safe: the engine thread flips, any thread reads. Invariant: while a drain flip is
    pending (``holding``), no lease is granted, and the flip happens only with no lease on the
    old version left (``readers``).
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._current = snapshot
        self._lock = threading.Lock()
        self._readers: Counter[int] = Counter()
        self._holding = False
        self._listeners: list[Callable[[], None]] = []
        self.flips = 0

    @property
    def current(self) -> Snapshot:
        """What serves now (one attribute read: atomic)."""
        return self._current

    @property
    def holding(self) -> bool:
        return self._holding

    def readers(self, version: int) -> int:
        with self._lock:
            return self._readers[version]

    def try_lease(self) -> Snapshot | None:
        """A lease on the current snapshot, or None while a drain flip waits (retry after the
        next change; ``add_listener`` says when)."""
        with self._lock:
            if self._holding:
                return None
            snapshot = self._current
            self._readers[snapshot.version] += 1
            return snapshot

    def release(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._readers[snapshot.version] -= 1
            if self._readers[snapshot.version] <= 0:
                del self._readers[snapshot.version]

    def hold(self) -> None:
        """A drain flip is pending: grant no new lease until it happens or is called off."""
        with self._lock:
            self._holding = True
        self._notify()

    def unhold(self) -> None:
        with self._lock:
            changed, self._holding = self._holding, False
        if changed:
            self._notify()

    def quiet(self) -> bool:
        """No lease on the current version: an in-place flip may copy into its weights."""
        with self._lock:
            return self._readers[self._current.version] == 0

    def publish(self, snapshot: Snapshot) -> None:
        """The flip: from now on everything reads ``snapshot``."""
        with self._lock:
            self._current, self._holding = snapshot, False
            self.flips += 1
        self._notify()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the changing thread) after every change."""
        self._listeners.append(callback)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()


__all__ = [
    "ServingState",
    "Snapshot",
    "VersionError",
    "VersionMismatch",
    "VersionRule",
    "VersionUnavailable",
]
