"""What ``kilnlm.client`` sends and returns: the result dataclasses (``Completion``, ``Delta``,
``Finish``, ``Score``, ``Reward``) and their conversion from and to kiln.v1 protobuf messages.

Kept apart from the clients so the blocking and the asyncio client build the same requests and
read the same responses, and so the conversion reads (and is tested) without a channel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kilnlm.proto import generation_pb2 as pb

_ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}
_FINISH = {
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


# --------------------------------------------------------------------------------------------
# Results


@dataclass
class Finish:
    finish_reason: str
    """"eos", "stop" (a stop string or token) or "length" (max_tokens or the context's end)."""
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    seed: int
    model_version: int
    request_id: str


@dataclass
class Delta:
    """One message of a stream: new text (whole characters), its token ids, maybe the end."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish: Finish | None = None
    model_version: int = 0
    """The version whose weights produced these tokens (every message of a stream names it)."""


@dataclass
class Completion:
    """A whole generation. ``finish`` says why it ended and which model version produced it."""

    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]]
    finish: Finish


@dataclass
class Reward:
    reward: float
    """r(prompt, completion) under the served reward model; higher is preferred."""
    num_tokens: int
    model_version: int


@dataclass
class Score:
    token_ids: list[int]
    logprobs: list[float]
    perplexity: float
    bits_per_byte: float
    num_bytes: int
    model_version: int


# --------------------------------------------------------------------------------------------
# Conversion (the client's one place that touches protobuf)


def sampling_proto(**sampling: Any) -> pb.SamplingParams:
    """Keyword arguments as SamplingParams; None values are left unset (server default)."""
    try:
        return pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    except ValueError as e:  # protobuf: "Protocol message SamplingParams has no "x" field."
        raise TypeError(f"unknown sampling parameter: {e}") from None


def chat_messages(messages: Sequence[Mapping[str, str]]) -> list[pb.ChatMessage]:
    out = []
    for i, m in enumerate(messages):
        if m.get("role") not in _ROLES:
            raise ValueError(
                f"messages[{i}].role must be one of {sorted(_ROLES)}, got {m.get('role')!r}"
            )
        out.append(pb.ChatMessage(role=_ROLES[m["role"]], content=m["content"]))
    return out


def from_proto(msg: Any) -> Any:
    """A response message as this module's dataclass (ModelInfo as a plain dict)."""
    if isinstance(msg, pb.Finish):
        return Finish(
            finish_reason=_FINISH.get(msg.finish_reason, "unspecified"),
            prompt_tokens=msg.usage.prompt_tokens,
            completion_tokens=msg.usage.completion_tokens,
            cached_prompt_tokens=msg.usage.cached_prompt_tokens,
            seed=msg.seed,
            model_version=msg.model_version,
            request_id=msg.request_id,
        )
    if isinstance(msg, (pb.GenerateStreamResponse, pb.GenerateResponse)):
        finish = from_proto(msg.finish) if msg.HasField("finish") else None
        logprobs = [_logprob(lp) for lp in msg.logprobs]
        if isinstance(msg, pb.GenerateResponse):
            return Completion(msg.text, list(msg.token_ids), logprobs, finish)
        return Delta(msg.text, list(msg.token_ids), logprobs, finish, msg.model_version)
    if isinstance(msg, pb.ScoreResponse):
        return Score(
            token_ids=list(msg.token_ids),
            logprobs=list(msg.logprobs),
            perplexity=msg.perplexity,
            bits_per_byte=msg.bits_per_byte,
            num_bytes=msg.num_bytes,
            model_version=msg.model_version,
        )
    if isinstance(msg, pb.RewardResponse):
        return Reward(msg.reward, msg.num_tokens, msg.model_version)
    if isinstance(msg, pb.ModelInfo):
        return _model_info(msg)
    raise TypeError(f"no conversion for {type(msg).__name__}")


def _logprob(lp: pb.TokenLogprob) -> dict[str, Any]:
    top = [(t.token_id, t.logprob) for t in lp.top]
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": top}


def _model_info(msg: pb.ModelInfo) -> dict[str, Any]:
    kv = msg.kv_cache
    return {
        "version": msg.version,
        "checkpoint": msg.checkpoint,
        "config": json.loads(msg.config_json) if msg.config_json else {},
        "context_length": msg.context_length,
        "vocab_size": msg.vocab_size,
        "num_params": msg.num_params,
        "kv_cache": {
            "budget_bytes": kv.budget_bytes,
            "bytes_per_token": kv.bytes_per_token,
            "block_size": kv.block_size,
            "blocks_total": kv.blocks_total,
            "blocks_used": kv.blocks_used,
        },
        "running": msg.running,
        "waiting": msg.waiting,
        "device": msg.device,
        "dtype": msg.dtype,
        "max_tokens_limit": msg.max_tokens_limit,
        "generated_tokens": msg.generated_tokens,
    }


def generate_request(
    prompt: str, request_id: str, versions: dict[str, Any], sampling: dict[str, Any]
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=prompt, sampling=sampling_proto(**sampling), request_id=request_id, **_set(versions)
    )


def chat_request(
    messages: Sequence[Mapping[str, str]],
    request_id: str,
    versions: dict[str, Any],
    sampling: dict[str, Any],
) -> pb.ChatRequest:
    return pb.ChatRequest(
        messages=chat_messages(messages),
        sampling=sampling_proto(**sampling),
        request_id=request_id,
        **_set(versions),
    )


def infill_request(
    prefix: str,
    suffix: str,
    request_id: str,
    versions: dict[str, Any],
    sampling: dict[str, Any],
) -> pb.InfillRequest:
    return pb.InfillRequest(
        prefix=prefix,
        suffix=suffix,
        sampling=sampling_proto(**sampling),
        request_id=request_id,
        **_set(versions),
    )


def reward_request(
    completion: str,
    prompt: str | None,
    messages: Sequence[Mapping[str, str]] | None,
    versions: dict[str, Any],
) -> pb.RewardRequest:
    return pb.RewardRequest(
        completion=completion,
        prompt=prompt or "",
        messages=chat_messages(messages or []),
        **_set(versions),
    )


def _set(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def collect_deltas(deltas: list[Delta]) -> Completion:
    finish = next((d.finish for d in reversed(deltas) if d.finish is not None), None)
    if finish is None:
        raise RuntimeError(
            "the stream ended without a finish message; the server broke the protocol"
        )
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        logprobs=[lp for d in deltas for lp in d.logprobs],
        finish=finish,
    )
