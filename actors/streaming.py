"""Stream shaping between the engine and the client: fewer, fuller messages at the same TTFT.

Why: every message on the replica → gateway → client path costs about a millisecond of CPU in
Ray's streaming and again in the gateway, about what a small model spends computing a token. One
message per token per request therefore caps the whole path near 1k tokens/s, whatever the
engine does. Serving systems send fewer messages: vLLM and SGLang have a stream interval, Ray
Serve LLM batches a stream's items every ~50 ms and flushes the first at once. ``coalesce`` does
the same for one request's deltas:

- the first item goes out at once (time to first token does not grow);
- after it, items are held until ``max_tokens`` tokens are pending or ``interval_s`` has passed
  since the last flush, whichever comes first;
- the last item (and an error) flushes whatever is pending, in order.

With ``interval_s == 0`` it degrades to "whatever arrived while the consumer was busy", which is
also what a lagging client gets at the gateway: its pending deltas merged into one message.

No Ray here: the replica (``server.py``) and the gateway (``gateway.py``) both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class StreamShape:
    """When a stream's pending deltas are flushed (``ServeConfig.stream_*``)."""

    interval_s: float = 0.0
    """Hold deltas at most this long after the previous flush; 0 flushes whenever the consumer asks."""
    max_tokens: int = 0
    """Flush as soon as this many tokens are pending; 0: no token bound (time only)."""

    def __post_init__(self) -> None:
        if not self.interval_s >= 0:
            raise ValueError(f"stream interval must be >= 0 seconds, got {self.interval_s}")
        if self.max_tokens < 0:
            raise ValueError(f"stream max_tokens must be >= 0, got {self.max_tokens}")


END = object()


class _Inbox:
    """What the reader task has produced and the consumer not yet taken (no item is ever lost to
    a timeout: waiting is on an event, the items sit in a list).

    While ``eager`` is off (a stream is holding its deltas for the interval), an arriving delta
    does not wake the consumer unless it brings the pending tokens to ``max_tokens``; the end
    and errors always do. A held stream's consumer thus wakes once per flush, not once per
    engine step (32 streams woke 32 consumer tasks per step before).
    """

    def __init__(self, size: Callable[[Any], int], max_tokens: int) -> None:
        self.items: list[Any] = []
        self.changed = asyncio.Event()
        self.size, self.max_tokens = size, max_tokens
        self.pending_tokens = 0
        self.eager = True

    def put(self, item: Any) -> None:
        self.items.append(item)
        urgent = not is_data(item)
        if not urgent:
            self.pending_tokens += self.size(item)
            urgent = bool(self.max_tokens) and self.pending_tokens >= self.max_tokens
        if urgent or self.eager:
            self.changed.set()

    def _ready(self) -> bool:
        if not self.items:
            return False
        if self.eager or not is_data(self.items[-1]):
            return True
        return bool(self.max_tokens) and self.pending_tokens >= self.max_tokens

    async def wait(self, timeout: float | None = None) -> None:
        """Until something worth waking for is pending (or ``timeout`` seconds pass)."""
        if self._ready():
            return
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.changed.wait()

    def take(self) -> list[Any]:
        items, self.items, self.pending_tokens = self.items, [], 0
        return items


def is_data(item: Any) -> bool:
    """An item of the stream, not the ``END`` marker or the exception that ended it."""
    return item is not END and not isinstance(item, Exception)


@contextlib.asynccontextmanager
async def reading(stream: AsyncIterator[T], put: Callable[[Any], None]) -> AsyncIterator[None]:
    """Within the block, a task puts every item of ``stream``, then ``END`` or the exception
    that ended it (so the consumer meets it after the items before it). Leaving the block
    cancels the task, which closes ``stream``: an engine request behind it is aborted within
    one step. The consumers (``coalesce`` here, ``engine_protocol.arrived_together``) differ
    only in how they hold and hand on what was put."""

    async def read() -> None:
        try:
            async for item in stream:
                put(item)
            put(END)
        except Exception as e:  # delivered to the consumer, in order
            put(e)

    reader = asyncio.create_task(read())
    try:
        yield
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def coalesce(
    stream: AsyncIterator[T],
    merge: Callable[[list[T]], T],
    size: Callable[[T], int],
    shape: StreamShape,
) -> AsyncIterator[T]:
    """``stream``'s items, merged into fewer items as ``shape`` says (see the module docstring).

    Closing this iterator cancels the reader task, which closes ``stream`` (so an engine request
    behind it is aborted within one step). An exception from ``stream`` is raised after the
    items that came before it have been yielded.
    """
    inbox = _Inbox(size, shape.max_tokens)
    async with reading(stream, inbox.put):
        first = True
        last_flush = time.monotonic()
        while True:
            await _flush_due(inbox, first, shape, last_flush)
            items = inbox.take()
            batch = [x for x in items if is_data(x)]
            if batch:
                yield batch[0] if len(batch) == 1 else merge(batch)
                first = False
                last_flush = time.monotonic()
            if isinstance(items[-1], Exception):
                raise items[-1]
            if items[-1] is END:
                return


async def _flush_due(inbox: _Inbox, first: bool, shape: StreamShape, last_flush: float) -> None:
    """Wait until the pending items are to be sent: the first delta at once; after it, at the
    token bound, the interval, the end or an error; an item arriving after the interval has
    passed with nothing pending goes at once. Returns with at least one item pending."""
    inbox.eager = first or shape.interval_s == 0
    if not inbox.eager:
        left = last_flush + shape.interval_s - time.monotonic()
        if left > 0:
            await inbox.wait(left)
        inbox.eager = True  # the interval is over: whatever is or comes next is due
    await inbox.wait()


@dataclass(frozen=True)
class Failover:
    """How often a stream whose replica died is resent elsewhere (``ServeConfig.failover_*``)."""

    max_resends: int = 5
    """Resends per request before the client gets the error (UNAVAILABLE); 0 turns failover off."""
    backoff_s: float = 0.2
    """Wait before the first resend, doubled for each next one (Serve is replacing the replica)."""

    def __post_init__(self) -> None:
        if self.max_resends < 0:
            raise ValueError(f"failover max_resends must be >= 0, got {self.max_resends}")
        if not self.backoff_s >= 0:
            raise ValueError(f"failover backoff_s must be >= 0, got {self.backoff_s}")


async def resumable(
    start: Callable[[list[int], int | None], AsyncIterator[T]],
    tokens: Callable[[T], list[int]],
    version: Callable[[T], int],
    lost: Callable[[BaseException], bool],
    failover: Failover,
) -> AsyncIterator[T]:
    """One unbroken stream over replicas that may die under it (NVIDIA Dynamo's rule).

    ``start(streamed, version)`` opens a stream: ``([], None)`` the request as the client sent
    it; after a loss, the same request continued from the tokens already streamed and pinned to
    the version that produced them, so every token of the stream is that version's. ``lost(e)``
    says whether ``e`` means the replica went away (resend) or is the request's own error
    (raise). After ``failover.max_resends`` resends the last loss is raised.
    """
    streamed: list[int] = []
    served_by: int | None = None
    resends = 0
    while True:
        stream = start(list(streamed), served_by)
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    streamed.extend(tokens(item))
                    served_by = served_by or version(item) or None
                    yield item
            return
        except Exception as e:
            if not lost(e) or resends >= failover.max_resends:
                raise
        await asyncio.sleep(failover.backoff_s * 2**resends)
        resends += 1


__all__ = ["Failover", "StreamShape", "coalesce", "resumable"]
