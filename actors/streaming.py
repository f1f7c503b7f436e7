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


_END = object()


class _Inbox:
    """What the reader task has produced and the consumer not yet taken (no item is ever lost to
    a timeout: waiting is on an event, the items sit in a list)."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.changed = asyncio.Event()

    def put(self, item: Any) -> None:
        self.items.append(item)
        self.changed.set()

    async def wait(self, timeout: float | None = None) -> None:
        """Until something is pending (or ``timeout`` seconds pass)."""
        if self.items:
            return
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout)

    def take(self) -> list[Any]:
        items, self.items = self.items, []
        return items


def _is_data(item: Any) -> bool:
    return item is not _END and not isinstance(item, Exception)


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
    inbox = _Inbox()

    async def read() -> None:
        try:
            async for item in stream:
                inbox.put(item)
            inbox.put(_END)
        except Exception as e:  # delivered to the consumer, in order
            inbox.put(e)

    reader = asyncio.create_task(read())
    try:
        first = True
        last_flush = time.monotonic()
        while True:
            await inbox.wait()
            items = inbox.take()
            if not first:
                items = await _gather(inbox, items, size, shape, last_flush)
            batch = [x for x in items if _is_data(x)]
            if batch:
                yield batch[0] if len(batch) == 1 else merge(batch)
                first = False
                last_flush = time.monotonic()
            if isinstance(items[-1], Exception):
                raise items[-1]
            if items[-1] is _END:
                return
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _gather(
    inbox: _Inbox,
    items: list[Any],
    size: Callable[[Any], int],
    shape: StreamShape,
    last_flush: float,
) -> list[Any]:
    """Keep taking items until the token bound, the interval, the end or an error."""
    while _is_data(items[-1]):
        if shape.max_tokens and sum(size(x) for x in items) >= shape.max_tokens:
            break
        left = last_flush + shape.interval_s - time.monotonic()
        if left <= 0:
            break
        await inbox.wait(left)
        items.extend(inbox.take())
    return items


__all__ = ["StreamShape", "coalesce"]
