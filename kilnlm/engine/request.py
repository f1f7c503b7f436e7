"""One request's state inside the engine, and what the engine hands back (``RequestOutput``).

A request owns one ``Sequence`` (or one per live beam), its own ``torch.Generator``, the
tokens generated so far, and how much of them it has already streamed. Its rules for ending
mirror ``kilnlm.generate`` exactly, so engine and reference agree token for token: EOS
("eos"), a stop token id or stop string ("stop"), max_tokens ("length"); the ending token is
not returned; a stop string cuts the text before it and the ids to the tokens wholly before it.

Streaming with stop strings holds back the tokens whose text could still be the start of a
stop string, so a client never receives tokens that a later step takes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from kilnlm.engine.block_manager import Sequence
from kilnlm.generate import BeamSearch, Decode, TokenLogprob, cut_at_stop_string
from kilnlm.sampling import SamplingParams

FinishReason = Literal["eos", "stop", "length", "abort", "deadline"]


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
    """eos, stop (stop token or string), length (max_tokens), abort, deadline; None while running."""
    stop_reason: int | str | None
    """The stop token id or stop string that ended the request."""
    version: int
    """The weight version that produced every token of this request."""
    num_prompt_tokens: int
    num_completion_tokens: int
    """Tokens returned so far, in all outputs of this request together."""
    seed: int
    """The seed of the request's generator (drawn at random when the request gave none)."""


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    generator: torch.Generator
    deadline: float | None
    version: int | None = None
    """Fixed when first scheduled; a preempted request keeps it (and its weights)."""
    seqs: list[Sequence] = field(default_factory=list)
    beam: BeamSearch | None = None
    output: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_emitted: int = 0
    text_emitted: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    final_text: str | None = None
    num_preemptions: int = 0

    @property
    def is_beam(self) -> bool:
        return self.params.num_beams > 1

    @property
    def seq_slots(self) -> int:
        """Sequences this request may run at once (its share of max_num_seqs)."""
        return self.params.num_beams

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    # ---- sampling requests: one token at a time -------------------------------------------

    def append(
        self, token: int, entry: TokenLogprob | None, eos_id: int | None, decode: Decode | None
    ) -> None:
        """Take one sampled token; ends the request if the token or the text says so."""
        if token == eos_id:
            self.finish_reason = "eos"
            return
        if token in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
            return
        self.output.append(token)
        self.seqs[0].tokens.append(token)
        if entry is not None:
            self.logprobs.append(entry)
        if self.params.stop and decode is not None and self._cut_at_stop_string(decode):
            return
        if len(self.output) >= self.params.max_tokens:
            self.finish_reason = "length"

    def _cut_at_stop_string(self, decode: Decode) -> bool:
        """As ``kilnlm.generate``: cut text before the earliest stop string, ids to the tokens
        wholly before it."""
        cut = cut_at_stop_string(self.output, self.params.stop, decode)
        if cut is None:
            return False
        keep, stop, text = cut
        self.output, self.logprobs = self.output[:keep], self.logprobs[:keep]
        self.finish_reason, self.stop_reason, self.final_text = "stop", stop, text
        return True

    def _safe_to_emit(self, decode: Decode | None) -> int:
        """How many output tokens can be streamed now: all of them, unless the text ends with
        the beginning of a stop string (those tokens wait for the next step)."""
        n = len(self.output)
        if self.finished or not self.params.stop or decode is None:
            return n
        text = decode(self.output)
        longest = max(len(s) for s in self.params.stop) - 1
        hold = next(
            (
                k
                for k in range(min(longest, len(text)), 0, -1)
                if any(s.startswith(text[-k:]) for s in self.params.stop)
            ),
            0,
        )
        while hold and n > self.num_emitted and len(decode(self.output[:n])) > len(text) - hold:
            n -= 1
        return n

    # ---- output --------------------------------------------------------------------------

    def take_output(self, decode: Decode | None, serving_version: int) -> RequestOutput | None:
        """The delta since the last output, or None if there is nothing new to say."""
        n = self._safe_to_emit(decode)
        if n <= self.num_emitted and not self.finished:
            return None
        ids = self.output[self.num_emitted : n]
        lps = self.logprobs[self.num_emitted : n] if self.params.logprobs is not None else None
        text = None
        if decode is not None:
            visible = self._visible_text(decode, n)
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
            stop_reason=self.stop_reason,
            version=self.version if self.version is not None else serving_version,
            num_prompt_tokens=len(self.prompt),
            num_completion_tokens=n,
            seed=self.seed,
        )

    def _visible_text(self, decode: Decode, n: int) -> str:
        if self.final_text is not None:
            return self.final_text
        text = decode(self.output[:n])
        if not self.finished:  # an incomplete UTF-8 sequence renders as U+FFFD: wait for the rest
            text = text.rstrip("\ufffd")
        return text

    # ---- beam search ----------------------------------------------------------------------

    def finish_beams(self, decode: Decode | None) -> None:
        """Adopt the best finished beam as the request's output."""
        assert self.beam is not None
        best = self.beam.best()
        self.output = list(best.tokens)
        self.logprobs = list(best.logprobs)
        self.finish_reason, self.stop_reason = best.finish, best.stop_reason
        if decode is not None:
            self.final_text = decode(self.output)


__all__ = ["FinishReason", "Request", "RequestOutput"]
