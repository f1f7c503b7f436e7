"""The gateway's conversions, in one place: protobuf requests → ``kilnlm.actors.protocol``
dataclasses (``to_request``; lenient parsing so a non-UTF-8 string still names its field),
dataclasses → protobuf responses (``to_proto``), and exceptions (ours, the engine's, Ray's) →
gRPC status codes (``status_of``). No server and no Ray handle here: the gateway
(gateway.py) and the OpenAI ingress (openai_protocol.py) share them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import singledispatch
from typing import Any

import grpc
from google.protobuf import message as pb_message
from google.protobuf.descriptor import Descriptor, FieldDescriptor
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
)
from kilnlm.engine import EngineDead, QueueFull
from kilnlm.errors import InvalidArgumentError
from kilnlm.generate import TokenLogprob
from kilnlm.proto import generation_pb2
from kilnlm.sampling import SamplingParams

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"
"""Trailing metadata of RESOURCE_EXHAUSTED: milliseconds to wait before retrying."""
PUSHBACK_KEY = "grpc-retry-pushback-ms"
"""The same hint under the name gRPC's own retry policy (gRFC A6) reads."""


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
