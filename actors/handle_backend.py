"""``HandleBackend``: the gateway's Backend over the LLMServer deployment's DeploymentHandle,
with failover: when the replica under a stream dies, the request is resent to another with
the tokens already streamed, pinned to the version that made them (``streaming.resumable``).
While the client is slower than the replica, the deltas that piled up travel as one message.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from kilnlm.actors.grpc_convert import root_cause
from kilnlm.actors.protocol import (
    AbortedError,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    VersionMismatchError,
    VersionUnavailableError,
    merge_chunks,
)
from kilnlm.actors.streaming import Failover, StreamShape, coalesce, resumable
from kilnlm.engine import EngineDead


def _n_tokens(chunk: GenerationChunk) -> int:
    return len(chunk.token_ids)


def _tokens(chunk: GenerationChunk) -> list[int]:
    return chunk.token_ids


def _version(chunk: GenerationChunk) -> int:
    return chunk.model_version


def _replica_lost(exc: BaseException) -> bool:
    """The replica went away under the stream (resend it elsewhere), as opposed to an error of
    the request itself (which a resend would only repeat)."""
    return isinstance(
        root_cause(exc),
        (RayActorError, DeploymentUnavailableError, AbortedError, EngineDead, _NotServedHere),
    )


class _NotServedHere(VersionUnavailableError):
    """A resent stream reached a replica that no longer serves the version that made its first
    tokens: try another; once the resends are spent, UNAVAILABLE (as DESIGN.md's table)."""


async def _unavailable_if_not_served(
    stream: AsyncIterator[GenerationChunk], version: int | None
) -> AsyncIterator[GenerationChunk]:
    try:
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk
    except Exception as e:
        if isinstance(root_cause(e), VersionMismatchError):
            raise _NotServedHere(
                f"the replica serving this stream died and no other replica serves version "
                f"{version} now; retry the request"
            ) from e
        raise


class HandleBackend:
    """The Backend contract over a DeploymentHandle to the LLMServer deployment."""

    def __init__(self, handle: serve.handle.DeploymentHandle, failover: Failover | None = None):
        self.handle = handle
        self.failover = failover if failover is not None else Failover()
        self._defaults: dict[str, Any] | None = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """One unbroken stream: when the replica under it dies, the request is resent to
        another with the tokens already streamed, pinned to their version (``resumable``)."""

        def start(streamed: list[int], version: int | None) -> AsyncIterator[GenerationChunk]:
            if not streamed:  # the first try, or nothing was streamed (beam search: at the end)
                return self._stream(request)
            resumed = replace(request, resume_token_ids=streamed, pin_version=version)
            return _unavailable_if_not_served(self._stream(resumed), version)

        stream = resumable(start, _tokens, _version, _replica_lost, self.failover)
        async with contextlib.aclosing(stream) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """One replica's stream; while the client is slower than the replica, the deltas that
        piled up are sent as one message (``coalesce`` with no hold: it never delays one)."""
        response = self.handle.options(stream=True).generate.remote(request)
        finished = False
        deltas = coalesce(response, merge_chunks, _n_tokens, StreamShape())
        try:
            async with contextlib.aclosing(deltas) as chunks:
                async for chunk in chunks:
                    finished = chunk.finish is not None
                    yield chunk
        finally:
            if not finished:  # client gone, deadline, or error: the replica aborts the sequence
                response.cancel()

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self.handle.score.remote(request)

    async def reward(self, request: RewardRequest) -> RewardResult:
        return await self.handle.reward.remote(request)

    async def generation_defaults(self) -> dict[str, Any]:
        """The model's generation_config.json defaults (fixed for the deployment: a hot-swap
        refuses another tokenizer, and these travel with it), fetched once."""
        if self._defaults is None:
            tokenizer = await self.handle.tokenizer.remote()
            if tokenizer is None:  # an empty replica: ask again next time
                return {}
            defaults = getattr(tokenizer, "generation_defaults", None)
            self._defaults = defaults.to_dict() if defaults is not None else {}
        return self._defaults

    async def info(self) -> ModelInfo:
        return await self.handle.info.remote()


__all__ = ["HandleBackend"]
