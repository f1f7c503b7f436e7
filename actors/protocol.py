"""The plain dataclasses and errors that travel between the gateway and the LLM server replicas.

Why a module of its own: the gateway speaks protobuf to clients and these dataclasses to the
replicas (through Ray), and the replicas speak token ids to the engine. Keeping the middle
language free of protobuf, Ray and torch tensors means a replica can be driven in-process by the
gateway's tests, pickles cheaply across Ray, and only the gateway imports generated stubs.

Errors are classes the gateway maps to gRPC status codes (``kilnlm.actors.gateway.status_of``);
``ValueError`` (a bad field, message starting with its name) stays the library's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kilnlm.decoding import FinishReason, TokenLogprob
from kilnlm.sampling import SamplingParams

# --------------------------------------------------------------------------------------------
# Requests


@dataclass
class GenerationRequest:
    """One completion, chat reply or infill to generate. Exactly one of ``prompt`` /
    ``messages`` / ``infill`` is set."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    """Plain text to continue (encoded without special tokens)."""
    messages: list[dict[str, str]] | None = None
    """A conversation ({"role", "content"} dicts) rendered by ``kilnlm.chat.encode_chat``."""
    infill: tuple[str, str] | None = None
    """(prefix, suffix) whose middle to write: the replica builds the fill-in-the-middle prompt
    (``kilnlm.fim.infill_ids``) and the model ends the middle with ``<|eos|>``."""
    deadline: float | None = None
    """Wall-clock time (``time.time()``) after which the client no longer waits: the replica
    stops generating and frees the sequence's blocks. Wall clock, not monotonic, because the
    gateway and the replica may sit on different hosts."""
    min_version: int | None = None
    pin_version: int | None = None
    resume_token_ids: list[int] = field(default_factory=list)
    """Tokens a replica that died had already streamed for this request: the gateway resends
    it with them (and pinned to their version) so the client's stream goes on unbroken."""


@dataclass
class ScoreRequest:
    text: str
    min_version: int | None = None
    pin_version: int | None = None


@dataclass
class RewardRequest:
    """A reply to judge with a served reward model; ``messages`` is the prompt conversation."""

    messages: list[dict[str, str]]
    completion: str
    min_version: int | None = None
    pin_version: int | None = None


# --------------------------------------------------------------------------------------------
# Responses


@dataclass
class Finish:
    """How a generation ended; sent once, with the last chunk."""

    finish_reason: FinishReason
    """eos, stop or length: a request the engine ended otherwise arrives as an error."""
    prompt_tokens: int
    completion_tokens: int
    seed: int
    model_version: int
    request_id: str
    cached_prompt_tokens: int = 0


@dataclass
class GenerationChunk:
    """One step of a generation: new whole-character text, the ids behind it, and maybe the end."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """One per token id when the request asked for logprobs."""
    finish: Finish | None = None
    model_version: int = 0
    """The version whose weights produced these tokens (one per request: DESIGN.md, "Versions"),
    so a stream can name it before its end (the HTTP ingress's header); 0: not known."""


def merge_chunks(chunks: list[GenerationChunk]) -> GenerationChunk:
    """Consecutive chunks as one: a whole generation (unary ``Generate``), or deltas that arrived
    together."""
    return GenerationChunk(
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        logprobs=[lp for c in chunks for lp in c.logprobs],
        finish=next((c.finish for c in reversed(chunks) if c.finish is not None), None),
        model_version=next((c.model_version for c in chunks if c.model_version), 0),
    )


@dataclass
class ScoreResult:
    token_ids: list[int]
    logprobs: list[float]
    perplexity: float
    bits_per_byte: float
    num_bytes: int
    model_version: int


@dataclass
class RewardResult:
    reward: float
    num_tokens: int
    model_version: int


@dataclass
class ModelInfo:
    """What a replica serves; version 0 with empty fields while it has no model."""

    version: int = 0
    checkpoint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    context_length: int = 0
    vocab_size: int = 0
    num_params: int = 0
    kv_budget_bytes: int = 0
    kv_bytes_per_token: int = 0
    block_size: int = 0
    blocks_total: int = 0
    blocks_used: int = 0
    running: int = 0
    waiting: int = 0
    device: str = ""
    dtype: str = ""
    max_tokens_limit: int = 0
    generated_tokens: int = 0
    staged_version: int | None = None

    @property
    def loaded(self) -> bool:
        return self.version > 0


# --------------------------------------------------------------------------------------------
# Errors (each maps to one gRPC status; see gateway.status_of)


class NoModelError(RuntimeError):
    """The replica has no model yet (nothing promoted): UNAVAILABLE, retry after a promotion."""


class AbortedError(RuntimeError):
    """The engine aborted the request (the replica is shutting down): UNAVAILABLE, retry."""


class VersionUnavailableError(RuntimeError):
    """``min_version`` is newer than the served version: UNAVAILABLE until it is promoted."""


class VersionMismatchError(RuntimeError):
    """``pin_version`` is not the served version: FAILED_PRECONDITION (retrying will not help)."""


class NotARewardModelError(RuntimeError):
    """The served model has no reward head: FAILED_PRECONDITION (serve a reward-model export)."""


class DeadlineExceededError(TimeoutError):
    """The request's deadline passed before it finished: DEADLINE_EXCEEDED."""
