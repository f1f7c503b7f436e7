"""A client that keeps streaming through the gateway while ``kiln rl`` trains and hot-swaps.

The architecture's promise during RL is that clients keep being served: every swap is two-phase,
in-flight requests finish on the weights they started with, and every response names the one
version that produced it. ``BackgroundClient`` checks that from outside, as a user would: one
thread, one gRPC channel (``kilnlm.client.Client``), one streamed generation after another
(``GenerateStream``, sampled, a short pause between them) for the whole run. A request counts as
failed when the call raises (any gRPC status), when its stream ends without a finish, or when its
messages name more than one version (or none). ``TrafficCounts`` is what goes into the run's
JSON summary; the caller compares the versions seen with the ones the orchestrator promoted.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_ERRORS_KEPT = 5


@dataclass
class TrafficCounts:
    """What the background client saw."""

    requests: int = 0
    """Requests finished, served or failed."""
    failed: int = 0
    versions: Counter = field(default_factory=Counter)
    """Responses per version named (served requests only)."""
    errors: list[str] = field(default_factory=list)
    """The first few failures, as one line each."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "failed": self.failed,
            "versions": {int(v): n for v, n in sorted(self.versions.items())},
            "errors": list(self.errors),
        }


class BackgroundClient:
    """Streams ``prompts`` in turn through the gateway at ``address`` until ``stop``."""

    def __init__(
        self,
        address: str,
        prompts: Sequence[str],
        max_tokens: int = 12,
        pause_s: float = 0.05,
        timeout_s: float = 120.0,
    ) -> None:
        if not prompts:
            raise ValueError("BackgroundClient needs at least one prompt")
        self.address, self.prompts = address, list(prompts)
        self.max_tokens, self.pause_s, self.timeout_s = max_tokens, pause_s, timeout_s
        self.counts = TrafficCounts()
        self._stop = threading.Event()
        self._seen = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kiln-rl-client", daemon=True)

    def start(self) -> BackgroundClient:
        self._thread.start()
        return self

    def wait_for_version(self, version: int, timeout_s: float) -> bool:
        """Block until a response named ``version`` (True) or ``timeout_s`` passed (False)."""
        with self._seen:
            return self._seen.wait_for(lambda: version in self.counts.versions, timeout_s)

    def stop(self) -> TrafficCounts:
        """Let the request in flight finish, stop, and return the counts."""
        self._stop.set()
        self._thread.join()
        return self.counts

    def _run(self) -> None:
        from kilnlm.client import Client

        with Client(self.address, timeout=self.timeout_s) as client:
            i = 0
            while not self._stop.is_set():
                prompt = self.prompts[i % len(self.prompts)]
                self._record(*self._one(client, prompt, seed=i))
                i += 1
                self._stop.wait(self.pause_s)

    def _one(self, client: Any, prompt: str, seed: int) -> tuple[int | None, str | None]:
        """(the one version the response named, None) or (None, why it failed)."""
        import grpc

        versions: set[int] = set()
        finished = False
        try:
            for delta in client.generate_stream(
                prompt, max_tokens=self.max_tokens, temperature=0.7, top_p=0.9, seed=seed
            ):
                versions.add(delta.model_version)
                if delta.finish is not None:
                    finished = True
                    versions.add(delta.finish.model_version)
        except grpc.RpcError as e:
            return None, f"{e.code().name}: {e.details()}"
        if not finished:
            return None, "the stream ended without a finish"
        if len(versions) != 1 or 0 in versions:
            return None, f"one response named versions {sorted(versions)}"
        return versions.pop(), None

    def _record(self, version: int | None, error: str | None) -> None:
        with self._seen:
            self.counts.requests += 1
            if version is None:
                self.counts.failed += 1
                if len(self.counts.errors) < MAX_ERRORS_KEPT:
                    self.counts.errors.append(str(error))
            else:
                self.counts.versions[version] += 1
            self._seen.notify_all()


__all__ = ["BackgroundClient", "TrafficCounts"]
