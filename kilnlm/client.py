"""Python client of a kiln server: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

    from kilnlm.client import Client
    with Client("127.0.0.1:50051") as c:
        print(c.generate("Once upon a time", max_tokens=32, temperature=0).text)
        for delta in c.generate_stream("Once upon a time", max_tokens=32):
            print(delta.text, end="", flush=True)

Both speak the kiln.v1 gRPC API (``protos/``) and nothing else, so anything shown here can be
done from any language with stubs generated from the protos (the result dataclasses and their
conversion live in ``kilnlm.client_messages``). ``register(path)`` is an admin call
(``Admin.Register``): it needs the client's ``token``. Sampling parameters are keyword
arguments named as in ``SamplingParams`` (``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repetition_penalty``, ``seed``, ``max_tokens``, ``stop``, ``stop_token_ids``, ``num_beams``,
``length_penalty``, ``logprobs``); one left out takes the server's default. Errors arrive as
``grpc.RpcError`` with the status codes of DESIGN.md (``e.code()``, ``e.details()``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kilnlm.client_messages import (
    Completion,
    Delta,
    Finish,
    Reward,
    Score,
    chat_request,
    collect_deltas,
    from_proto,
    generate_request,
    infill_request,
    reward_request,
)
from kilnlm.proto import admin_pb2, admin_pb2_grpc
from kilnlm.proto import generation_pb2 as pb
from kilnlm.proto import generation_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""Where `kiln serve` listens by default (loopback only)."""


# --------------------------------------------------------------------------------------------
# Channel


def _credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    if tls_ca is None:
        return None
    with open(tls_ca, "rb") as f:
        return grpc.ssl_channel_credentials(root_certificates=f.read())


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def checkpoint_uri(path: str | os.PathLike[str]) -> str:
    """What ``Admin.Register`` needs: a URI as it is, a local path made absolute (the orchestrator
    resolves paths in its own process, whose working folder is not the caller's)."""
    path = os.fspath(path)
    return path if "://" in path else os.path.abspath(path)


# --------------------------------------------------------------------------------------------
# Clients


class _Connection:
    """What both clients hold, opened the same way: one channel, the stubs on it, the default
    deadline and the admin token's metadata (the arguments are ``Client``'s)."""

    _grpc: Any = grpc
    """The module whose channels are opened: ``grpc``, or ``grpc.aio`` for ``AsyncClient``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        timeout: float | None = None,
        tls_ca: str | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
    ) -> None:
        creds = _credentials(tls_ca)
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        self.channel = (
            self._grpc.secure_channel(address, creds, options)
            if creds
            else self._grpc.insecure_channel(address, options)
        )
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.admin_stub = admin_pb2_grpc.AdminStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout
        self.metadata = _metadata(token)

    def _opts(self, timeout: float | None) -> dict[str, Any]:
        return {
            "timeout": timeout if timeout is not None else self.timeout,
            "metadata": self.metadata,
        }


class Client(_Connection):
    """Blocking client. ``timeout`` (seconds) becomes each call's gRPC deadline unless overridden.

    ``tls_ca``: a PEM file to verify a TLS server with (plaintext when None). ``token``: the admin
    bearer token, sent as ``authorization`` metadata.
    """

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> Completion:
        """Generate a completion of ``prompt`` and return it whole."""
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = generate_request(prompt, request_id, versions, sampling)
        return from_proto(self.stub.Generate(request, **self._opts(timeout)))

    def generate_stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Stream a completion; closing the iterator early cancels the generation on the server."""
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = generate_request(prompt, request_id, versions, sampling)
        call = self.stub.GenerateStream(request, **self._opts(timeout))
        try:
            for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()  # no-op once the stream completed

    def chat_stream(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Stream the assistant's reply to ``messages`` ([{"role": "user", "content": ...}, ...])."""
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = chat_request(messages, request_id, versions, sampling)
        call = self.stub.Chat(request, **self._opts(timeout))
        try:
            for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()

    def chat(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> Completion:
        """The assistant's whole reply (chat defaults: temperature 0.7, top_p 0.9)."""
        return collect_deltas(list(self.chat_stream(messages, **kwargs)))

    def infill_stream(
        self,
        prefix: str,
        suffix: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> Iterator[Delta]:
        """Stream the middle between ``prefix`` and ``suffix`` (a model trained with FIM)."""
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = infill_request(prefix, suffix, request_id, versions, sampling)
        call = self.stub.Infill(request, **self._opts(timeout))
        try:
            for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()

    def infill(self, prefix: str, suffix: str, **kwargs: Any) -> Completion:
        """The whole middle: ``prefix + infill(prefix, suffix).text + suffix`` is the document."""
        return collect_deltas(list(self.infill_stream(prefix, suffix, **kwargs)))

    def score(self, text: str, *, timeout: float | None = None) -> Score:
        """Per-token log-probabilities of ``text``, its perplexity and bits per byte."""
        return from_proto(self.stub.Score(pb.ScoreRequest(text=text), **self._opts(timeout)))

    def reward(
        self,
        completion: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, str]] | None = None,
        timeout: float | None = None,
        min_version: int | None = None,
        pin_version: int | None = None,
    ) -> Reward:
        """The served reward model's r(prompt, completion); the prompt is ``prompt`` (one user
        message) or ``messages`` (a conversation), as in preference JSONL."""
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = reward_request(completion, prompt, messages, versions)
        return from_proto(self.stub.Reward(request, **self._opts(timeout)))

    def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return from_proto(self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._opts(timeout)))

    def register(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        """Register an export (a path every replica can read, or file://) as a version; the same
        content again answers the same version. Needs the admin ``token``."""
        request = admin_pb2.RegisterRequest(uri=checkpoint_uri(path))
        return int(self.admin_stub.Register(request, **self._opts(timeout)).version)

    def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        """grpc.health.v1 status name: "SERVING", "NOT_SERVING" (no model yet), ..."""
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class AsyncClient(_Connection):
    """asyncio twin of ``Client``: the same methods, awaited (streams are async iterators)."""

    _grpc = grpc.aio

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> Completion:
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = generate_request(prompt, request_id, versions, sampling)
        return from_proto(await self.stub.Generate(request, **self._opts(timeout)))

    async def generate_stream(
        self,
        prompt: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> AsyncIterator[Delta]:
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = generate_request(prompt, request_id, versions, sampling)
        call = self.stub.GenerateStream(request, **self._opts(timeout))
        try:
            async for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()

    async def chat_stream(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> AsyncIterator[Delta]:
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = chat_request(messages, request_id, versions, sampling)
        call = self.stub.Chat(request, **self._opts(timeout))
        try:
            async for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()

    async def chat(self, messages: Sequence[Mapping[str, str]], **kwargs: Any) -> Completion:
        return collect_deltas([d async for d in self.chat_stream(messages, **kwargs)])

    async def infill_stream(
        self,
        prefix: str,
        suffix: str,
        *,
        timeout: float | None = None,
        request_id: str = "",
        min_version: int | None = None,
        pin_version: int | None = None,
        **sampling: Any,
    ) -> AsyncIterator[Delta]:
        versions = {"min_version": min_version, "pin_version": pin_version}
        request = infill_request(prefix, suffix, request_id, versions, sampling)
        call = self.stub.Infill(request, **self._opts(timeout))
        try:
            async for msg in call:
                yield from_proto(msg)
        finally:
            call.cancel()

    async def infill(self, prefix: str, suffix: str, **kwargs: Any) -> Completion:
        return collect_deltas([d async for d in self.infill_stream(prefix, suffix, **kwargs)])

    async def score(self, text: str, *, timeout: float | None = None) -> Score:
        return from_proto(await self.stub.Score(pb.ScoreRequest(text=text), **self._opts(timeout)))

    async def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        return from_proto(
            await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._opts(timeout))
        )

    async def register(self, path: str | os.PathLike[str], *, timeout: float | None = None) -> int:
        request = admin_pb2.RegisterRequest(uri=checkpoint_uri(path))
        response = await self.admin_stub.Register(request, **self._opts(timeout))
        return int(response.version)

    async def health(self, service: str = "", *, timeout: float | None = 5.0) -> str:
        response = await self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


__all__ = [
    "AsyncClient",
    "Client",
    "Completion",
    "Delta",
    "Finish",
    "Reward",
    "Score",
    "checkpoint_uri",
]
