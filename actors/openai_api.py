"""The OpenAI-compatible HTTP API: a FastAPI app on Ray Serve's HTTP proxy (``serve.ingress``).

Every tool that speaks the OpenAI API (the official clients, LangChain, curl scripts,
benchmark harnesses) reaches the same LLMServer replicas as the gRPC gateway, through the same
``HandleBackend`` (streaming handle, cancellation when the client goes, coalesced deltas), the
same validation (``SamplingParams``, the replica's prompt checks) and the same status table
(``openai_protocol.error_of`` goes through the gateway's ``status_of``):

    POST /v1/completions        prompt (a string or a list), n, stream, logprobs, stop, seed, ...
    POST /v1/chat/completions   messages through the model's chat template; SSE when stream
    GET  /v1/models             the served model's id: what clients pass as ``model``
    GET  /v1/models/{id}
    GET  /health                200 while a model serves, 503 (OpenAI's error shape) before

Streams are Server-Sent Events: one ``data: {json}`` per delta, a last delta per choice with its
``finish_reason``, a usage chunk when ``stream_options.include_usage``, then ``data: [DONE]``.
The first delta is awaited before the response starts, so an error raised before any token
(a bad field, a full queue, no model) still gets its HTTP status; one raised later is sent as
a ``data: {"error": ...}`` event, as vLLM does. Every response names the version that produced
it: ``model_version`` in the body and the ``x-kiln-model-version`` header.

With ``ServeConfig.api_key`` set, every ``/v1`` call must carry ``Authorization: Bearer <key>``
(401 otherwise), as vLLM's ``--api-key``.
"""

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from kilnlm.actors.gateway import HandleBackend
from kilnlm.actors.openai_protocol import (
    VERSION_HEADER,
    OpenAIError,
    Parsed,
    chat_choice,
    chat_delta,
    completion_choice,
    completion_delta,
    envelope,
    error_of,
    new_id,
    now,
    to_requests,
    usage,
)
from kilnlm.actors.protocol import GenerationChunk, merge_chunks
from kilnlm.serving_config import ServeConfig

app = FastAPI(title="kilnlm", description="OpenAI-compatible API over kilnlm's replicas")


@app.exception_handler(OpenAIError)
async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (an unknown path, a wrong method) in OpenAI's shape too."""
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    error = OpenAIError(exc.status_code, f"{request.url.path}: {exc.detail}", kind)
    return JSONResponse(error.body(), status_code=exc.status_code)


@app.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    error = error_of(exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def merged(streams: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, chunk) from several streams as they arrive; an exception is yielded as the
    item. Closing this iterator cancels the readers, which closes each stream (replica aborts)."""
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def read(i: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async with contextlib.aclosing(stream) as chunks:  # type: ignore[type-var]
                async for chunk in chunks:
                    queue.put_nowait((i, chunk))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, done))

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(readers)
        while open_streams:
            i, item = await queue.get()
            if item is done:
                open_streams -= 1
            else:
                yield i, item
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


class OpenAIService:
    """The endpoints' logic over a Backend (the Serve handle's; no FastAPI types inside)."""

    def __init__(self, backend: Any, llm: Any, config: ServeConfig) -> None:
        self.backend, self.llm, self.config = backend, llm, config
        self.model_id = config.model_id
        self._tokenizer: Any = None

    async def tokenizer(self) -> Any:
        """The served tokenizer (logprobs name tokens; generation_config gives defaults); fixed
        for the deployment's life: a hot-swap refuses a different one."""
        if self._tokenizer is None:
            self._tokenizer = await self.llm.tokenizer.remote()
        return self._tokenizer

    async def defaults(self) -> dict[str, Any]:
        tok = await self.tokenizer()
        defaults = getattr(tok, "generation_defaults", None)
        return defaults.to_dict() if defaults is not None else {}

    def check_key(self, authorization: str | None) -> None:
        key = self.config.api_key
        if key and not hmac.compare_digest(
            (authorization or "").encode(), f"Bearer {key}".encode()
        ):
            raise OpenAIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                "server was started with ($KILN_API_KEY)",
                "authentication_error",
                None,
                "invalid_api_key",
            )

    async def parse(self, body: Any, chat: bool) -> Parsed:
        try:
            return to_requests(body, chat, self.model_id, await self.defaults())
        except Exception as e:
            raise error_of(e, self.config.retry_after_ms) from e

    async def complete(self, body: Any, chat: bool) -> Response:
        parsed = await self.parse(body, chat)
        streams = [self.backend.generate(r) for r in parsed.requests]
        events = merged(streams)
        try:
            first = await anext(events)
        except StopAsyncIteration:
            raise OpenAIError(
                500, "the replica ended the stream without output", "internal_error"
            ) from None
        if isinstance(first[1], BaseException):
            await events.aclose()
            raise error_of(first[1], self.config.retry_after_ms)
        version = first[1].model_version
        headers = {VERSION_HEADER: str(version)}
        if parsed.stream:
            body_iter = self._stream(events, first, parsed, chat, version)
            return StreamingResponse(body_iter, media_type="text/event-stream", headers=headers)
        return JSONResponse(
            await self._whole(events, first, parsed, chat, version), headers=headers
        )

    async def _whole(
        self, events: AsyncIterator[tuple[int, Any]], first: tuple[int, Any], parsed: Parsed,
        chat: bool, version: int,
    ) -> dict[str, Any]:  # fmt: skip
        per_choice: list[list[GenerationChunk]] = [[] for _ in parsed.requests]
        async with contextlib.aclosing(events):
            item: tuple[int, Any] | None = first
            while item is not None:
                i, chunk = item
                if isinstance(chunk, BaseException):
                    raise error_of(chunk, self.config.retry_after_ms)
                per_choice[i].append(chunk)
                item = await anext(events, None)
        whole = [merge_chunks(chunks) for chunks in per_choice]
        tok = await self.tokenizer()
        choose = chat_choice if chat else completion_choice
        out = envelope(
            "chat.completion" if chat else "text_completion", new_id(chat), self.model_id, now(),
            version,
        )  # fmt: skip
        out["choices"] = [choose(i, c, tok) for i, c in enumerate(whole)]
        out["usage"] = usage([c.finish for c in whole if c.finish is not None], parsed.n)
        return out

    async def _stream(
        self, events: AsyncIterator[tuple[int, Any]], first: tuple[int, Any], parsed: Parsed,
        chat: bool, version: int,
    ) -> AsyncIterator[str]:  # fmt: skip
        tok = await self.tokenizer()
        head = envelope(
            "chat.completion.chunk" if chat else "text_completion", new_id(chat), self.model_id,
            now(), version,
        )  # fmt: skip
        started, offsets, finishes = set(), [0] * len(parsed.requests), {}
        async with contextlib.aclosing(events):
            item: tuple[int, Any] | None = first
            while item is not None:
                i, chunk = item
                if isinstance(chunk, BaseException):
                    yield _sse(error_of(chunk, self.config.retry_after_ms).body())
                    break
                if chat:
                    choice = chat_delta(i, chunk, tok, i not in started)
                else:
                    choice = completion_delta(i, chunk, tok, offsets[i])
                started.add(i)
                offsets[i] += len(chunk.text)
                if chunk.finish is not None:
                    finishes[i] = chunk.finish
                extra = {"usage": None} if parsed.include_usage else {}
                yield _sse({**head, "choices": [choice], **extra})
                item = await anext(events, None)
            else:
                if parsed.include_usage:
                    ordered = [finishes[i] for i in sorted(finishes)]
                    yield _sse({**head, "choices": [], "usage": usage(ordered, parsed.n)})
        yield "data: [DONE]\n\n"

    async def models(self) -> JSONResponse:
        info = await self.backend.info()
        body = {"object": "list", "data": [self._model_card(info)]}
        return JSONResponse(body, headers={VERSION_HEADER: str(info.version)})

    def _model_card(self, info: Any) -> dict[str, Any]:
        return {
            "id": self.model_id,
            "object": "model",
            "created": now(),
            "owned_by": "kilnlm",
            "root": info.checkpoint or None,
            "max_model_len": info.context_length or None,
            "model_version": info.version,
        }

    async def model(self, model_id: str) -> JSONResponse:
        if model_id != self.model_id:
            raise OpenAIError(
                404, f"The model `{model_id}` does not exist", "not_found_error", "model",
                "model_not_found",
            )  # fmt: skip
        info = await self.backend.info()
        return JSONResponse(self._model_card(info), headers={VERSION_HEADER: str(info.version)})

    async def health(self) -> JSONResponse:
        try:
            info = await self.backend.info()
        except Exception as e:
            raise error_of(e) from e
        if not info.loaded:
            raise OpenAIError(
                503, "no model is loaded yet: promote a checkpoint (kiln promote), then retry",
                "service_unavailable_error", None, "unavailable",
            )  # fmt: skip
        headers = {VERSION_HEADER: str(info.version)}
        return JSONResponse({"status": "ok", "model_version": info.version}, headers=headers)


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:
        raise OpenAIError(400, f"the body is not valid JSON ({e})", param=None) from e


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class OpenAIServer:
    """The HTTP ingress deployment: converts, delegates to the LLMServer handle, maps errors.

    It is the application's root when HTTP is on, so it also answers ``address()`` for the
    gateway it holds (``serve_app.run`` returns the gRPC address either way).
    """

    def __init__(
        self, llm: serve.handle.DeploymentHandle, gateway: Any, config: ServeConfig
    ) -> None:
        self.service = OpenAIService(HandleBackend(llm), llm, config)
        self.gateway = gateway

    async def address(self) -> str:
        return await self.gateway.address.remote()

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        self.service.check_key(request.headers.get("authorization"))
        return await self.service.complete(await _json(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        self.service.check_key(request.headers.get("authorization"))
        return await self.service.complete(await _json(request), chat=True)

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        self.service.check_key(request.headers.get("authorization"))
        return await self.service.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        self.service.check_key(request.headers.get("authorization"))
        return await self.service.model(model_id)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        return await self.service.health()


__all__ = ["OpenAIServer", "OpenAIService", "app", "merged"]
