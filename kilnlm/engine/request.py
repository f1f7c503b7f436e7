"""One request's state inside the engine, and what the engine hands back (``RequestOutput``).

A request owns one ``Sequence`` (or one per live beam), its own ``torch.Generator``, the
tokens generated so far (a ``kilnlm.decoding.Continuation``: the same end rule as
``kilnlm.generate``, so engine and reference agree token for token), and how much of them it
has already streamed.

Streaming with stop strings holds back the tokens whose text could still be the start of a
stop string, so a client never receives tokens that a later step takes back. Text is built
incrementally (``decoding.IncrementalText``): a step costs the same at token 10 and token 4000.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kilnlm.decoding import BeamSearch, Continuation, Decode, FinishReason, TokenLogprob
from kilnlm.engine.block_manager import Sequence
from kilnlm.engine.serving import VersionError, VersionRule
from kilnlm.sampling import SamplingParams


@dataclass
class RequestOutput:
    """What a request produced since its last output (a streaming delta), or its end."""

    request_id: str
    token_ids: list[int]
    """New token ids since the last output (beam search: the best beam, all at the end)."""
    logprobs: list[TokenLogprob] | None
    """One entry per id in token_ids when params.logprobs is set."""
    text: str | None
    """New text since the last output when the engine has a ``decode``; else None."""
    finished: bool
    finish_reason: FinishReason | None
    """eos, stop (stop token or string), length (max_tokens), abort, deadline, rejected (see
    ``error``); None while running."""
    stop_reason: int | str | None
    """The stop token id or stop string that ended the request."""
    version: int
    """The weight version that produced every token of this request."""
    num_prompt_tokens: int
    num_completion_tokens: int
    """Tokens returned so far, in all outputs of this request together."""
    seed: int
    """The seed of the request's generator (drawn at random when the request gave none)."""
    error: VersionError | None = None
    """Why the engine rejected the request when admitting it (finish_reason "rejected")."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    generator: torch.Generator
    deadline: float | None
    out: Continuation
    versions: VersionRule = field(default_factory=VersionRule)
    """pin_version / min_version, checked against the version the engine admits it on."""
    version: int | None = None
    """Fixed when first scheduled; a preempted request keeps it (and its weights)."""
    seqs: list[Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    num_emitted: int = 0
    text_emitted: int = 0
    error: VersionError | None = None
    num_preemptions: int = 0

    @property
    def output(self) -> list[int]:
        return self.out.tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.out.finish_reason

    @property
    def is_beam(self) -> bool:
        return self.params.num_beams > 1

    @property
    def seq_slots(self) -> int:
        """Sequences this request may run at once (its share of max_num_seqs)."""
        return self.params.num_beams

    @property
    def finished(self) -> bool:
        return self.out.finished

    def end(self, reason: FinishReason, error: VersionError | None = None) -> None:
        """End it from outside the stop rule (abort, deadline, rejected)."""
        self.out.finish_reason, self.error = reason, error

    def append(self, token: int, entry: TokenLogprob | None) -> None:
        """Take one sampled token (sampling requests); the stop rule may end the request."""
        if self.out.append(token, entry):
            self.seqs[0].tokens.append(token)

    # ---- output --------------------------------------------------------------------------

    def take_output(self, has_text: bool, serving_version: int) -> RequestOutput | None:
        """The delta since the last output, or None if there is nothing new to say."""
        n = self.out.safe_to_emit(self.num_emitted)
        if n <= self.num_emitted and not self.finished:
            return None
        ids = self.output[self.num_emitted : n]
        lps = self.out.logprobs[self.num_emitted : n] if self.params.logprobs is not None else None
        text = None
        if has_text:
            visible = self.out.visible_text(n)
            text, self.text_emitted = (
                visible[self.text_emitted :],
                max(self.text_emitted, len(visible)),
            )
        self.num_emitted = n
        return RequestOutput(
            request_id=self.request_id,
            token_ids=ids,
            logprobs=lps,
            text=text,
            finished=self.finished,
            finish_reason=self.finish_reason,
            stop_reason=self.out.stop_reason,
            version=self.version if self.version is not None else serving_version,
            num_prompt_tokens=len(self.prompt),
            num_completion_tokens=n,
            seed=self.seed,
            error=self.error,
        )

    # ---- beam search ----------------------------------------------------------------------

    def finish_beams(self) -> None:
        """Adopt the best finished beam as the request's output."""
        assert self.beam is not None
        best = self.beam.best()
        self.out.adopt(best.tokens, best.logprobs, best.finish, best.stop_reason)


__all__ = ["Decode", "FinishReason", "Request", "RequestOutput"]
