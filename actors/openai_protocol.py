"""OpenAI request bodies ↔ kilnlm's ``GenerationRequest``, and errors as OpenAI's error shape.

The HTTP ingress (``openai_api.py``) is a shell like the gRPC gateway (STYLE.md 6): one function
turns a JSON body into the same dataclasses the replicas take (``to_requests``), a few turn the
replicas' chunks back into OpenAI's objects (``completion_choice``, ``chat_choice``, the stream
``*_delta`` forms, ``usage``), and ``error_of`` maps an exception to an HTTP status through
the gateway's own ``status_of``, so HTTP and gRPC can never disagree on what an error is:

| gRPC status | HTTP | OpenAI ``type`` |
|---|---|---|
| INVALID_ARGUMENT, FAILED_PRECONDITION | 400 | invalid_request_error |
| UNAUTHENTICATED | 401 | authentication_error |
| NOT_FOUND (an unknown ``model``) | 404 | not_found_error |
| RESOURCE_EXHAUSTED | 429 (with ``Retry-After``) | rate_limit_error |
| UNAVAILABLE | 503 | service_unavailable_error |
| DEADLINE_EXCEEDED | 504 | timeout_error |

Sampling follows vLLM: OpenAI's fields (``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens``, ``stop``, ``seed``, ``n``, ``logprobs``/``top_logprobs``) plus
kilnlm's extras at the top level of the body (``top_k``, ``min_p``, ``repetition_penalty``,
``num_beams``, ``length_penalty``, ``stop_token_ids``, ``min_version``, ``pin_version``), the
``extra_body`` of the official client. A field the client leaves out takes the model's
``generation_config.json`` default, then the server's (chat: temperature 0.7, top_p 0.9).
Fields kilnlm cannot honour (penalties, ``logit_bias``, ``echo``, tools) are refused by name,
never ignored.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from kilnlm.actors.gateway import root_cause, status_of
from kilnlm.actors.protocol import Finish, GenerationChunk, GenerationRequest
from kilnlm.errors import InvalidArgumentError
from kilnlm.sampling import SamplingParams

MAX_N = 16
"""Most choices per request (each is a sequence in the engine's batch)."""
MAX_TOP_LOGPROBS = 20
VERSION_HEADER = "x-kiln-model-version"
"""Every response names the model version that produced it, here and as ``model_version``."""
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")
_EXTRAS = ("num_beams", "length_penalty")
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


# --------------------------------------------------------------------------------------------
# Errors


class OpenAIError(Exception):
    """An error as OpenAI's API writes it: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def error_of(exc: BaseException, retry_after_ms: int = 250) -> OpenAIError:
    """The HTTP form of any exception, through the gateway's gRPC status table."""
    if isinstance(exc, OpenAIError):
        return exc
    cause = root_cause(exc)
    status = status_of(cause, retry_after_ms)
    http, kind = _HTTP.get(status.code, (500, "internal_error"))
    headers = {}
    if http == 429:
        headers["retry-after"] = str(max(1, round(retry_after_ms / 1000)))
        headers["retry-after-ms"] = str(retry_after_ms)
    param = getattr(cause, "field", None) if http == 400 else None
    return OpenAIError(http, status.details, kind, param, status.code.name.lower(), headers)


def _invalid(param: str, requirement: str, value: Any) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} must be {requirement}, got {value!r}", param)


# --------------------------------------------------------------------------------------------
# Request bodies -> GenerationRequest


@dataclass(frozen=True)
class Parsed:
    """One HTTP request as the replicas' requests: ``n`` per prompt, in choice-index order."""

    requests: list[GenerationRequest]
    stream: bool
    include_usage: bool
    n: int


def check_model(body: Mapping[str, Any], model_id: str) -> None:
    """404 for a ``model`` this server does not serve (what OpenAI answers)."""
    model = body.get("model")
    if model is not None and model != model_id:
        raise OpenAIError(
            404,
            f"The model `{model}` does not exist: this server serves `{model_id}` "
            "(GET /v1/models lists it)",
            "not_found_error",
            "model",
            "model_not_found",
        )


def _refuse_unsupported(body: Mapping[str, Any], chat: bool) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise _invalid(name, "0 (use repetition_penalty)", body[name])
    if body.get("logit_bias"):
        raise _invalid("logit_bias", "empty (not supported)", body["logit_bias"])
    if not chat and body.get("echo"):
        raise _invalid("echo", "false (not supported)", body["echo"])
    if not chat and body.get("suffix"):
        raise _invalid("suffix", "empty (use kiln infill over gRPC)", body["suffix"])
    if chat and (body.get("tools") or body.get("functions")):
        raise _invalid("tools", "absent (tool calls are not supported)", "…")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise _invalid("best_of", "equal to n (not supported otherwise)", best_of)


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise _invalid("stop", "a string or a list of strings", stop)


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """SamplingParams.logprobs: chat asks ``logprobs: true`` + ``top_logprobs: k``, completions
    ``logprobs: k``."""
    if not chat:
        value = body.get("logprobs")
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
            raise _invalid("logprobs", f"an int in [0, {MAX_TOP_LOGPROBS}]", value)
        return value
    wants, top = body.get("logprobs"), body.get("top_logprobs")
    if wants not in (None, True, False):
        raise _invalid("logprobs", "a boolean", wants)
    if top is not None and (
        isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
    ):
        raise _invalid("top_logprobs", f"an int in [0, {MAX_TOP_LOGPROBS}]", top)
    if top is not None and not wants:
        raise _invalid("top_logprobs", "used with logprobs: true", top)
    return (top or 0) if wants else None


def sampling_params(
    body: Mapping[str, Any], chat: bool, model_defaults: Mapping[str, Any]
) -> SamplingParams:
    """The request's SamplingParams: its fields over the model's defaults over the server's."""
    _refuse_unsupported(body, chat)
    given: dict[str, Any] = {k: body[k] for k in (*_SAMPLING, *_EXTRAS) if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens")
    if max_tokens is not None:
        given["max_tokens"] = max_tokens
    given["stop"] = _stop(body)
    given["logprobs"] = _logprobs(body, chat)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list):
        raise _invalid("stop_token_ids", "a list of ints", stop_ids)
    defaults = dict(model_defaults)
    given["stop_token_ids"] = list(dict.fromkeys([*defaults.pop("stop_token_ids", []), *stop_ids]))
    fields = {**defaults, **given}
    try:
        return SamplingParams.chat_defaults(**fields) if chat else SamplingParams(**fields)
    except InvalidArgumentError:
        raise
    except ValueError as e:  # SamplingParams names the field first
        raise InvalidArgumentError(str(e), str(e).split(" ", 1)[0]) from e


def _n(body: Mapping[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise _invalid("n", f"an int in [1, {MAX_N}]", n)
    return n


def _text_content(content: Any, i: int) -> str:
    """A message's content: a string, or OpenAI's list of ``{"type": "text", "text"}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _invalid(f"messages[{i}].content", "a string or a list of text parts", content)


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "a non-empty list of {role, content}", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise _invalid(f"messages[{i}]", "an object with a role and content", m)
        if m["role"] not in ("system", "user", "assistant"):
            raise _invalid(f"messages[{i}].role", "system, user or assistant", m["role"])
        out.append({"role": m["role"], "content": _text_content(m.get("content"), i)})
    return out


def _prompts(body: Mapping[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise _invalid("prompt", "a non-empty string or list of strings", body.get("prompt"))
    if any(p == "" for p in prompt):
        raise InvalidArgumentError("prompt must not be empty", "prompt")
    return prompt


def _version(body: Mapping[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise _invalid(name, "an int >= 1", v)
    return v


def to_requests(body: Any, chat: bool, model_id: str, model_defaults: Mapping[str, Any]) -> Parsed:
    """A ``/v1/completions`` or ``/v1/chat/completions`` body as the replicas' requests.

    ``n`` choices of one prompt differ by seed when the client gave one (``seed + i``), so a
    seeded request is reproducible choice by choice.
    """
    if not isinstance(body, Mapping):
        raise InvalidArgumentError("the request body must be a JSON object", None)
    check_model(body, model_id)
    n = _n(body)
    params = sampling_params(body, chat, model_defaults)
    stream = bool(body.get("stream", False))
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise _invalid("stream_options", "an object", options)
    versions = {k: _version(body, k) for k in ("min_version", "pin_version")}
    inputs: list[dict[str, Any]] = (
        [{"messages": _messages(body)}] if chat else [{"prompt": p} for p in _prompts(body)]
    )
    requests = []
    for item in inputs:
        for i in range(n):
            seeded = (
                params if params.seed is None or i == 0 else _with_seed(params, params.seed + i)
            )
            requests.append(
                GenerationRequest(request_id=uuid.uuid4().hex, params=seeded, **item, **versions)
            )
    return Parsed(requests, stream, bool(options.get("include_usage")) and stream, n)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed % 2**64)


# --------------------------------------------------------------------------------------------
# Chunks -> OpenAI objects


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def envelope(object_: str, id_: str, model_id: str, created: int, version: int) -> dict[str, Any]:
    """The fields every completion object carries, the serving version among them."""
    return {
        "id": id_,
        "object": object_,
        "created": created,
        "model": model_id,
        "system_fingerprint": f"kiln-v{version}",
        "model_version": version,
    }


def now() -> int:
    return int(time.time())


def finish_reason(finish: Finish | None) -> str | None:
    return None if finish is None else _FINISH[finish.finish_reason]


def usage(finishes: Sequence[Finish], n: int) -> dict[str, int]:
    """Token counts; a prompt's tokens count once however many choices it had (as OpenAI)."""
    prompt = sum(f.prompt_tokens for f in finishes[::n])
    completion = sum(f.completion_tokens for f in finishes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def token_text(tokenizer: Any, token_id: int) -> str:
    if hasattr(tokenizer, "token_text"):
        return tokenizer.token_text(token_id)
    return tokenizer.decode([token_id])


def _token_bytes(tokenizer: Any, token_id: int) -> list[int]:
    if hasattr(tokenizer, "token_bytes"):
        return list(tokenizer.token_bytes(token_id))
    return list(token_text(tokenizer, token_id).encode("utf-8"))


def chat_logprobs(chunk: GenerationChunk, tokenizer: Any) -> dict[str, Any] | None:
    """Chat's ``logprobs.content``: each token with its bytes and its top alternatives."""
    if not chunk.logprobs:
        return None

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": token_text(tokenizer, token_id),
            "logprob": logprob,
            "bytes": _token_bytes(tokenizer, token_id),
        }

    content = [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in chunk.logprobs
    ]
    return {"content": content}


def completion_logprobs(
    chunk: GenerationChunk, tokenizer: Any, offset: int = 0
) -> dict[str, Any] | None:
    """Completions' legacy form: tokens, token_logprobs, top_logprobs, text_offset."""
    if not chunk.logprobs:
        return None
    tokens = [token_text(tokenizer, lp.token_id) for lp in chunk.logprobs]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in chunk.logprobs],
        "top_logprobs": [{token_text(tokenizer, t): v for t, v in lp.top} for lp in chunk.logprobs],
        "text_offset": offsets,
    }


def completion_choice(index: int, chunk: GenerationChunk, tokenizer: Any) -> dict[str, Any]:
    return {
        "index": index,
        "text": chunk.text,
        "logprobs": completion_logprobs(chunk, tokenizer),
        "finish_reason": finish_reason(chunk.finish),
    }


def chat_choice(index: int, chunk: GenerationChunk, tokenizer: Any) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": chunk.text},
        "logprobs": chat_logprobs(chunk, tokenizer),
        "finish_reason": finish_reason(chunk.finish),
    }


def chat_delta(index: int, chunk: GenerationChunk, tokenizer: Any, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": chunk.text}
    if first:
        delta = {"role": "assistant", **delta}
    return {
        "index": index,
        "delta": delta,
        "logprobs": chat_logprobs(chunk, tokenizer),
        "finish_reason": finish_reason(chunk.finish),
    }


def completion_delta(
    index: int, chunk: GenerationChunk, tokenizer: Any, offset: int
) -> dict[str, Any]:
    return {
        "index": index,
        "text": chunk.text,
        "logprobs": completion_logprobs(chunk, tokenizer, offset),
        "finish_reason": finish_reason(chunk.finish),
    }


__all__ = [
    "MAX_N",
    "VERSION_HEADER",
    "OpenAIError",
    "Parsed",
    "chat_choice",
    "chat_delta",
    "check_model",
    "completion_choice",
    "completion_delta",
    "envelope",
    "error_of",
    "new_id",
    "now",
    "sampling_params",
    "to_requests",
    "usage",
]
