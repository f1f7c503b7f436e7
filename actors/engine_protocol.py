"""The engine's side of a replica's requests in the replica protocol's terms (``protocol.py``).

``ServingModel`` hands a request to the engine and gets back token-level ``RequestOutput``s, the
engine's version errors and a monotonic clock; the replica protocol speaks ``GenerationChunk``s,
its own errors and wall-clock deadlines. The conversions live here, one function each:
``to_chunk`` (an output, or the error an early end means), ``version_errors`` (the engine's
errors as the protocol's), ``engine_deadline`` (wall clock to the engine's clock), and
``arrived_together`` (the outputs that piled up while the consumer was busy, as one batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

from kilnlm.actors.protocol import (
    AbortedError,
    DeadlineExceededError,
    Finish,
    GenerationChunk,
    VersionMismatchError,
    VersionUnavailableError,
)
from kilnlm.actors.streaming import END, is_data, reading
from kilnlm.engine import RequestOutput, VersionError, VersionMismatch

T = TypeVar("T")


def engine_deadline(wall_deadline: float | None) -> float | None:
    """The request's wall-clock deadline on this process's monotonic clock (the engine's)."""
    if wall_deadline is None:
        return None
    return time.monotonic() + (wall_deadline - time.time())


@contextlib.contextmanager
def version_errors() -> Iterator[None]:
    """The engine's version errors as the replica protocol's (the gateway maps those)."""
    try:
        yield
    except VersionMismatch as e:
        raise VersionMismatchError(str(e)) from e
    except VersionError as e:
        raise VersionUnavailableError(str(e)) from e


async def arrived_together(stream: AsyncIterator[T]) -> AsyncIterator[list[T]]:
    """Each time the consumer asks, everything ``stream`` produced since, as one list.

    Why: a replica under load yields slower than the engine steps (every yield is a Ray object
    and then a gRPC message), so per-step deltas pile up; sending them as one chunk cuts the
    per-message cost exactly when it matters and adds no delay when the consumer keeps up.
    Closing this iterator cancels the reader, which closes ``stream`` (the engine aborts).
    """
    arrived: asyncio.Queue[Any] = asyncio.Queue()
    async with reading(stream, arrived.put_nowait):
        while True:
            items = [await arrived.get()]
            while not arrived.empty():
                items.append(arrived.get_nowait())
            batch = [x for x in items if is_data(x)]
            if batch:
                yield batch
            if isinstance(items[-1], Exception):
                raise items[-1]
            if items[-1] is END:
                return


def to_chunk(out: RequestOutput, request_id: str) -> GenerationChunk:
    """An engine delta as a chunk; a request the engine ended early raises the matching error."""
    if out.finish_reason == "deadline":
        raise DeadlineExceededError(f"request {request_id} passed its deadline; generation stopped")
    if out.finish_reason == "abort":
        raise AbortedError(f"request {request_id} was aborted: the replica is shutting down; retry")
    finish = None
    if out.finished:
        assert out.finish_reason in ("eos", "stop", "length")
        finish = Finish(
            finish_reason=out.finish_reason,
            prompt_tokens=out.num_prompt_tokens,
            completion_tokens=out.num_completion_tokens,
            seed=out.seed,
            model_version=out.version,
            request_id=request_id,
        )
    return GenerationChunk(
        text=out.text or "",
        token_ids=list(out.token_ids),
        logprobs=list(out.logprobs or []),
        finish=finish,
        model_version=out.version,
    )
