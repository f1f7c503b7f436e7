"""The gRPC gateway: kiln.v1 services on a ``grpc.aio`` server of our own, inside a Serve deployment.

Why not Ray Serve's built-in gRPC proxy (docs/serving.md has the full account): the proxy binds
``[::]:<port>`` in plaintext only (no TLS), its port is global to the Serve instance, it cannot
answer ``grpc.health.v1`` from the gateway's own knowledge (NOT_SERVING while no model is
loaded), and it hides the client's deadline from the code that must stop generation. A
``grpc.aio`` server running on the Gateway replica's event loop gives us all of that and talks
to the LLM server replicas through a streaming ``DeploymentHandle``, one hop instead of two.

The gateway converts, delegates and maps errors — nothing else (STYLE.md 6):

- ``to_request`` turns a protobuf request into the dataclasses of ``kilnlm.actors.protocol``
  (validating sampling parameters through ``SamplingParams``, whose errors name the field);
- ``to_proto`` turns a dataclass back into its protobuf response;
- ``status_of`` maps an exception (ours, the engine's, Ray's) to a gRPC status code.

Whatever sits behind it is a ``Backend``: the Serve handle in production (``HandleBackend``), a
``ServingModel`` in-process in tests, with the same code path for both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from functools import singledispatch
from typing import Any, Protocol

import grpc
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RequestCancelledError,
)

from kilnlm.actors.protocol import (
    AbortedError,
    DeadlineExceededError,
    Finish,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    NoModelError,
    NotARewardModelError,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    VersionMismatchError,
    VersionUnavailableError,
    merge_chunks,
)
from kilnlm.actors.streaming import Failover, StreamShape, coalesce, resumable
from kilnlm.engine import EngineDead, QueueFull
from kilnlm.errors import InvalidArgumentError
from kilnlm.generate import TokenLogprob
from kilnlm.proto import admin_pb2, generation_pb2
from kilnlm.sampling import SamplingParams
from kilnlm.serving_config import ServeConfig

log = logging.getLogger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of RESOURCE_EXHAUSTED: milliseconds to wait before retrying."""
PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The same hint under the name gRPC's own retry policy (gRFC A6) reads."""


class Backend(Protocol):
    """What the gateway delegates to: the LLM server replicas (or one ServingModel in tests)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def score(self, request: ScoreRequest) -> ScoreResult: ...

    async def reward(self, request: RewardRequest) -> RewardResult: ...

    async def info(self) -> ModelInfo: ...


# --------------------------------------------------------------------------------------------
# Wire level: requests protobuf cannot parse (a non-UTF-8 string) still get a named field


@dataclass
class UnparsableRequest:
    """Stands in for a request whose bytes do not parse, so the handler can answer INVALID_ARGUMENT.

    protobuf refuses a proto3 string field holding invalid UTF-8 while deserialising, before any
    handler runs, and gRPC would answer INTERNAL; a lenient deserialiser returns this instead.
    """

    type_name: str
    bad_field: str | None

    def error(self) -> InvalidArgumentError:
        if self.bad_field is not None:
            return InvalidArgumentError(
                f"{self.bad_field} is not valid UTF-8; send text encoded as UTF-8", self.bad_field
            )
        return InvalidArgumentError(f"request is not a valid {self.type_name} message")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise IndexError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path (``messages[1].content``) of the first string field that is not valid UTF-8.

    Walks the wire format (field number, wire type, payload) with the message's descriptor,
    recursing into sub-messages; None when every string is valid or the bytes are malformed.
    """
    seen: dict[int, int] = {}
    pos = 0
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type != 2:  # varint / fixed64 / fixed32 hold no strings
                pos = (
                    _varint(data, pos)[1] if wire_type == 0 else pos + (8 if wire_type == 1 else 4)
                )
                continue
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
            field = descriptor.fields_by_number.get(number)
            if field is None:
                continue
            index = seen.get(number, 0)
            seen[number] = index + 1
            name = prefix + field.name + (f"[{index}]" if _is_repeated(field) else "")
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                bad = invalid_utf8_field(field.message_type, payload, name + ".")
                if bad is not None:
                    return bad
    except IndexError:
        return None
    return None


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf >= 5 has `is_repeated`; `label` is its older spelling.
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


def lenient_deserializer(cls: type[pb_message.Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except pb_message.DecodeError:
            return UnparsableRequest(
                cls.DESCRIPTOR.full_name, invalid_utf8_field(cls.DESCRIPTOR, data)
            )

    return parse


# --------------------------------------------------------------------------------------------
# proto -> dataclass


_SAMPLING_SCALARS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "max_tokens",
    "num_beams",
    "length_penalty",
    "logprobs",
)
_ROLES = {
    generation_pb2.ROLE_SYSTEM: "system",
    generation_pb2.ROLE_USER: "user",
    generation_pb2.ROLE_ASSISTANT: "assistant",
}


def sampling_from_proto(
    pb: generation_pb2.SamplingParams, chat: bool, model_defaults: Mapping[str, Any] | None = None
) -> SamplingParams:
    """Only the fields the client set (proto3 ``optional``): unset means the model's default
    (a Hugging Face model's generation_config.json), else the server's, which for chat is
    temperature 0.7 / top_p 0.9. SamplingParams names any bad field."""
    defaults = {k: v for k, v in (model_defaults or {}).items() if k != "stop_token_ids"}
    kwargs: dict[str, Any] = defaults | {
        name: getattr(pb, name) for name in _SAMPLING_SCALARS if pb.HasField(name)
    }
    kwargs["stop"] = list(pb.stop)
    kwargs["stop_token_ids"] = list(pb.stop_token_ids)
    return SamplingParams.chat_defaults(**kwargs) if chat else SamplingParams(**kwargs)


def _versions(msg: Any) -> dict[str, int | None]:
    return {
        name: getattr(msg, name) if msg.HasField(name) else None
        for name in ("min_version", "pin_version")
    }


def _messages_from_proto(messages: Any) -> list[dict[str, str]]:
    if not messages:
        raise InvalidArgumentError(
            "messages must not be empty: send at least one user message", "messages"
        )
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise InvalidArgumentError(
                f"messages[{i}].role must be ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT",
                f"messages[{i}].role",
            )
        out.append({"role": _ROLES[m.role], "content": m.content})
    return out


def _infill_request(
    msg: Any, deadline: float | None, model_defaults: Mapping[str, Any] | None
) -> GenerationRequest:
    if not msg.prefix and not msg.suffix:
        raise InvalidArgumentError("prefix and suffix must not both be empty", "prefix")
    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        params=sampling_from_proto(msg.sampling, False, model_defaults),
        infill=(msg.prefix, msg.suffix),
        deadline=deadline,
        **_versions(msg),
    )


def _reward_request(msg: Any) -> RewardRequest:
    if bool(msg.messages) == bool(msg.prompt):
        raise InvalidArgumentError("set exactly one of messages and prompt", "prompt")
    messages = (
        _messages_from_proto(msg.messages)
        if msg.messages
        else [{"role": "user", "content": msg.prompt}]
    )
    return RewardRequest(messages=messages, completion=msg.completion, **_versions(msg))


def to_request(
    msg: Any, deadline: float | None = None, model_defaults: Mapping[str, Any] | None = None
) -> GenerationRequest | ScoreRequest | RewardRequest:
    """A protobuf request as the dataclass the replicas take; InvalidArgumentError names a bad
    field.

    ``deadline`` is the client's gRPC deadline as wall-clock time (None: the client waits forever).
    """
    if isinstance(msg, UnparsableRequest):
        raise msg.error()
    if isinstance(msg, generation_pb2.ScoreRequest):
        if not msg.text:
            raise InvalidArgumentError("text must not be empty", "text")
        return ScoreRequest(text=msg.text, **_versions(msg))
    if isinstance(msg, generation_pb2.InfillRequest):
        return _infill_request(msg, deadline, model_defaults)
    if isinstance(msg, generation_pb2.RewardRequest):
        return _reward_request(msg)
    chat = isinstance(msg, generation_pb2.ChatRequest)
    if not chat and not msg.prompt:
        raise InvalidArgumentError("prompt must not be empty", "prompt")
    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        params=sampling_from_proto(msg.sampling, chat, model_defaults),
        prompt=None if chat else msg.prompt,
        messages=_messages_from_proto(msg.messages) if chat else None,
        deadline=deadline,
        **_versions(msg),
    )


# --------------------------------------------------------------------------------------------
# dataclass -> proto


_FINISH_REASONS = {
    "eos": generation_pb2.FINISH_REASON_EOS,
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}


@singledispatch
def to_proto(obj: Any, cls: type | None = None) -> pb_message.Message:
    """A replica's dataclass as its protobuf response (``cls`` picks the unary or stream type)."""
    raise TypeError(f"no protobuf form for {type(obj).__name__}")


@to_proto.register
def _(obj: TokenLogprob, cls: type | None = None) -> generation_pb2.TokenLogprob:
    top = [generation_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in obj.top]
    return generation_pb2.TokenLogprob(token_id=obj.token_id, logprob=obj.logprob, top=top)


@to_proto.register
def _(obj: Finish, cls: type | None = None) -> generation_pb2.Finish:
    usage = generation_pb2.Usage(
        prompt_tokens=obj.prompt_tokens,
        completion_tokens=obj.completion_tokens,
        cached_prompt_tokens=obj.cached_prompt_tokens,
    )
    return generation_pb2.Finish(
        finish_reason=_FINISH_REASONS.get(
            obj.finish_reason, generation_pb2.FINISH_REASON_UNSPECIFIED
        ),
        usage=usage,
        seed=obj.seed,
        model_version=obj.model_version,
        request_id=obj.request_id,
    )


@to_proto.register
def _(obj: GenerationChunk, cls: type | None = None) -> pb_message.Message:
    out = (cls or generation_pb2.GenerateStreamResponse)(
        text=obj.text,
        token_ids=obj.token_ids,
        logprobs=[to_proto(lp) for lp in obj.logprobs],
    )
    if isinstance(out, generation_pb2.GenerateStreamResponse):
        out.model_version = obj.model_version
    if obj.finish is not None:
        out.finish.CopyFrom(to_proto(obj.finish))
    return out


@to_proto.register
def _(obj: ScoreResult, cls: type | None = None) -> generation_pb2.ScoreResponse:
    return generation_pb2.ScoreResponse(
        token_ids=obj.token_ids,
        logprobs=obj.logprobs,
        perplexity=obj.perplexity,
        bits_per_byte=obj.bits_per_byte,
        num_bytes=obj.num_bytes,
        model_version=obj.model_version,
    )


@to_proto.register
def _(obj: RewardResult, cls: type | None = None) -> generation_pb2.RewardResponse:
    return generation_pb2.RewardResponse(
        reward=obj.reward, num_tokens=obj.num_tokens, model_version=obj.model_version
    )


@to_proto.register
def _(obj: ModelInfo, cls: type | None = None) -> generation_pb2.ModelInfo:
    kv = generation_pb2.KVCacheInfo(
        budget_bytes=obj.kv_budget_bytes,
        bytes_per_token=obj.kv_bytes_per_token,
        block_size=obj.block_size,
        blocks_total=obj.blocks_total,
        blocks_used=obj.blocks_used,
    )
    return generation_pb2.ModelInfo(
        version=obj.version,
        checkpoint=obj.checkpoint,
        config_json=json.dumps(obj.config, sort_keys=True),
        context_length=obj.context_length,
        vocab_size=obj.vocab_size,
        num_params=obj.num_params,
        kv_cache=kv,
        running=obj.running,
        waiting=obj.waiting,
        device=obj.device,
        dtype=obj.dtype,
        max_tokens_limit=obj.max_tokens_limit,
        generated_tokens=obj.generated_tokens,
    )


# --------------------------------------------------------------------------------------------
# exception -> status


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    details: str
    trailers: tuple[tuple[str, str], ...] = ()


def root_cause(exc: BaseException) -> BaseException:
    """The exception a replica raised, unwrapped from Ray's RayTaskError."""
    while isinstance(exc, RayTaskError) and exc.cause is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def status_of(
    exc: BaseException, retry_after_ms: int = 250, request_id: str | None = None
) -> Status:
    """The gRPC status for an exception: DESIGN.md's table, plus UNAVAILABLE for a dead replica.

    Classes are mapped explicitly: INVALID_ARGUMENT only for ``InvalidArgumentError`` (the
    client's fault); anything unexpected is INTERNAL, logged with its traceback under a request
    id (the client's, else a fresh one) that the details repeat, so a report finds the trace.
    """
    exc = root_cause(exc)
    code = grpc.StatusCode.INTERNAL
    details = str(exc) or type(exc).__name__
    trailers: tuple[tuple[str, str], ...] = ()
    if isinstance(exc, InvalidArgumentError):  # only this class: a stray ValueError is a bug
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, (QueueFull, BackPressureError)):
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
        details = f"server queue is full: {details}; retry after {retry_after_ms} ms"
        trailers = ((RETRY_AFTER_KEY, str(retry_after_ms)), (PUSHBACK_KEY, str(retry_after_ms)))
    elif isinstance(exc, (NoModelError, VersionUnavailableError, AbortedError, EngineDead)):
        code = grpc.StatusCode.UNAVAILABLE
    elif isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        code = grpc.StatusCode.UNAVAILABLE
        details = f"the serving replica is unavailable ({type(exc).__name__}); retry the request"
    elif isinstance(exc, (VersionMismatchError, NotARewardModelError)):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, (DeadlineExceededError, TimeoutError)):
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif isinstance(exc, (RequestCancelledError, asyncio.CancelledError)):
        code = grpc.StatusCode.CANCELLED
    else:  # a bug, never the client's fault
        request_id = request_id or uuid.uuid4().hex
        details = f"internal error ({type(exc).__name__}: {details}); request id {request_id}"
        log.error("unexpected error in a kiln.v1 call, request id %s", request_id, exc_info=exc)
    return Status(code, details, trailers)


# --------------------------------------------------------------------------------------------
# Servicers


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.time() + remaining


class GenerationServicer:
    """kiln.v1.Generation: each method converts, delegates to the backend, maps errors."""

    def __init__(self, backend: Backend, retry_after_ms: int = 250) -> None:
        self.backend = backend
        self.retry_after_ms = retry_after_ms

    async def _abort(
        self, context: grpc.aio.ServicerContext, exc: Exception, request: Any = None
    ) -> None:
        request_id = getattr(request, "request_id", None) or None
        status = status_of(exc, self.retry_after_ms, request_id)
        await context.abort(status.code, status.details, status.trailers)

    async def _defaults(self) -> dict[str, Any]:
        """The served model's sampling defaults, where the backend knows them."""
        getter = getattr(self.backend, "generation_defaults", None)
        return await getter() if getter is not None else {}

    async def _stream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # aclosing: when the client cancels or its deadline passes, gRPC cancels this task and
        # closing the backend's stream aborts the sequence in the engine (blocks freed).
        try:
            req = to_request(request, _deadline(context), await self._defaults())
            async with contextlib.aclosing(self.backend.generate(req)) as chunks:
                async for chunk in chunks:
                    yield to_proto(chunk)
        except Exception as e:
            await self._abort(context, e, request)

    async def GenerateStream(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # An async generator function itself: grpc.aio tells streaming handlers by that.
        async for response in self._stream(request, context):
            yield response

    async def Chat(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._stream(request, context):
            yield response

    async def Infill(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in self._stream(request, context):
            yield response

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            req = to_request(request, _deadline(context), await self._defaults())
            async with contextlib.aclosing(self.backend.generate(req)) as chunks:
                merged = merge_chunks([chunk async for chunk in chunks])
            return to_proto(merged, generation_pb2.GenerateResponse)
        except Exception as e:
            await self._abort(context, e, request)

    async def Score(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.score(to_request(request)))
        except Exception as e:
            await self._abort(context, e)

    async def Reward(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.reward(to_request(request)))
        except Exception as e:
            await self._abort(context, e)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return to_proto(await self.backend.info())
        except Exception as e:
            await self._abort(context, e)


class AdminServicer:
    """kiln.v1.Admin: every call must carry ``authorization: Bearer <token>``.

    The calls themselves belong to the orchestrator (``orchestrator``: an object with the
    same async methods, protobuf in and out); until one is wired in they answer UNIMPLEMENTED
    — after authentication, so an unauthenticated caller learns nothing.
    """

    def __init__(self, token: str | None, orchestrator: Any = None) -> None:
        self.token = token
        self.orchestrator = orchestrator

    def authenticated(self, context: grpc.aio.ServicerContext) -> bool:
        if not self.token:
            return False
        given = dict(context.invocation_metadata() or ()).get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not self.authenticated(context):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need the metadata 'authorization: Bearer <token>' with the "
                "server's admin token (kiln serve reads it from $KILN_ADMIN_TOKEN)",
            )
        if isinstance(request, UnparsableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        handler = getattr(self.orchestrator, method, None)
        if handler is None:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED, f"Admin.{method} needs the orchestrator"
            )
        return await handler(request, context)

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Register", request, context)

    async def ListCheckpoints(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("ListCheckpoints", request, context)

    async def Promote(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Promote", request, context)

    async def Rollback(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Rollback", request, context)

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._call("Status", request, context)


# --------------------------------------------------------------------------------------------
# The server


def _handlers(service: Any, servicer: Any, pb_module: Any) -> grpc.GenericRpcHandler:
    """Method handlers for every RPC of ``service`` with lenient request parsing."""
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb_module, method.input_type.name)
        response_cls = getattr(pb_module, method.output_type.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=lenient_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class GatewayServer:
    """A grpc.aio server: kiln.v1.Generation, kiln.v1.Admin, health and reflection.

    grpc.aio binds a server to the event loop it is created on: build it inside the loop that
    will run it (``await start_gateway(...)``).
    """

    def __init__(self, backend: Backend, config: ServeConfig, orchestrator: Any = None) -> None:
        self.backend = backend
        self.config = config
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                _handlers(
                    GENERATION_SERVICE,
                    GenerationServicer(backend, config.retry_after_ms),
                    generation_pb2,
                ),
                _handlers(
                    ADMIN_SERVICE, AdminServicer(config.admin_token, orchestrator), admin_pb2
                ),
            )
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (GENERATION_SERVICE.full_name, ADMIN_SERVICE.full_name, health.SERVICE_NAME)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), self.server)
        self.port = self._bind(config)
        self._health_task: asyncio.Task[None] | None = None

    def _bind(self, config: ServeConfig) -> int:
        address = config.address
        if config.tls_cert is not None and config.tls_key is not None:
            with open(config.tls_key, "rb") as key, open(config.tls_cert, "rb") as cert:
                credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
            port = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"could not bind the gateway to {address}; is another server using it?")
        return port

    @property
    def address(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> GatewayServer:
        for name in ("", GENERATION_SERVICE.full_name):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        self._health_task = asyncio.create_task(self._report_health())
        return self

    async def _report_health(self) -> None:
        """SERVING exactly while a replica reports a loaded model; polled, so Watch sees changes."""
        while True:
            try:
                info = await asyncio.wait_for(
                    self.backend.info(), timeout=10 * self.config.health_poll_s + 5
                )
                serving = info.loaded
            except Exception:  # a replica restarting or gone: not serving, try again
                serving = False
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            for name in ("", GENERATION_SERVICE.full_name):
                await self.health.set(name, status)
            await asyncio.sleep(self.config.health_poll_s)

    @property
    def running(self) -> bool:
        return self._health_task is not None and not self._health_task.done()

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_gateway(
    backend: Backend, config: ServeConfig, orchestrator: Any = None
) -> GatewayServer:
    """Build and start a gateway on the running event loop; ``.address`` says where it listens."""
    return await GatewayServer(backend, config, orchestrator).start()


# --------------------------------------------------------------------------------------------
# Ray Serve


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


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.25})
class Gateway:
    """Serve deployment that runs the gRPC server; it takes no Serve (HTTP) traffic itself."""

    async def __init__(self, llm: serve.handle.DeploymentHandle, config: ServeConfig) -> None:
        # [orchestrator] Admin calls go to the application's orchestrator actor (found by name
        # per call, so one started or restarted later is picked up).
        from kilnlm.actors.admin import OrchestratorAdmin

        admin = OrchestratorAdmin(config.app_name)
        failover = Failover(config.failover_max_resends, config.failover_backoff_s)
        self._server = await start_gateway(HandleBackend(llm, failover), config, admin)

    async def address(self) -> str:
        """host:port the gRPC server listens on (the real port when the config asked for 0)."""
        return self._server.address

    async def check_health(self) -> None:
        if not self._server.running:
            raise RuntimeError("the gateway's gRPC server stopped; Serve will restart the replica")

    async def __del__(self) -> None:
        await self._server.stop()
