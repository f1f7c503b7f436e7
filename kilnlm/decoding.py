"""What every generator shares: request checks, the stop rule, beam search, per-token logprobs.

The reference generator (``kilnlm.generate``) and the serving engine (``kilnlm.engine``) must
agree token for token, so the rules they share live here once (STYLE.md: the same rule is
never written on two paths):

- request validation: prompt ids, the context length rule, stop strings (errors are
  ``InvalidArgumentError`` naming the field);
- ``Continuation``: one prompt's generated tokens and when they end: EOS ("eos"), a stop token
  id or stop string ("stop"), max_tokens ("length"). The ending token is not returned; a stop
  string cuts the text before it and the ids to the tokens wholly before it;
- ``IncrementalText``: the text of a growing list of ids at bounded cost per token, so the
  stop-string check and streaming look only at the new tail instead of re-decoding the whole
  output every token (which was O(L²) on the engine thread);
- ``BeamSearch`` and ``TokenLogprob``; ``FinishReason``, the one list of ways a request ends.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from kilnlm.errors import InvalidArgumentError
from kilnlm.sampling import SamplingParams, process_logits

FinishReason = Literal["eos", "stop", "length", "abort", "deadline", "rejected"]
"""eos: the model's EOS; stop: a stop token id or stop string; length: max_tokens; abort: the
caller or a shutdown stopped it; deadline: its deadline passed; rejected: the engine refused it
when admitting it (its pin_version / min_version did not match the version it would run on)."""

Decode = Callable[[list[int]], str]

REPLACEMENT = "\ufffd"
"""What an incomplete UTF-8 sequence decodes to: text ending in it is not final yet."""


@dataclass
class TokenLogprob:
    """Raw model log-probabilities at one generated position (see ``sampling.token_logprobs``)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The ``params.logprobs`` most likely (token id, logprob), most likely first."""


# --------------------------------------------------------------------------------------------
# Request validation


def prompt_token_ids(prompt: Any, name: str, vocab_size: int) -> list[int]:
    """The prompt as a list of ids, or an InvalidArgumentError naming ``name``."""
    field = name.split("[")[0]
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError:
        raise InvalidArgumentError(
            f"{name} must be a list of int token ids, got {prompt!r:.80}", field
        ) from None
    if not ids:
        raise InvalidArgumentError(
            f"{name} is empty; give at least one token (e.g. the BOS token)", field
        )
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise InvalidArgumentError(
            f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
            "encode it with this model's tokenizer",
            field,
        )
    return ids


def check_request(
    name: str, n_prompt: int, params: SamplingParams, block_size: int, has_decode: bool
) -> None:
    """The rules every generator applies (as vLLM): prompt + max_tokens fit in the context
    (never clipped silently); stop strings need text and a single sequence."""
    if n_prompt >= block_size:
        raise InvalidArgumentError(
            f"{name} has {n_prompt} tokens but the context holds {block_size}, leaving no room "
            f"to generate; shorten it to at most {block_size - 1} tokens",
            name.split("[")[0],
        )
    if n_prompt + params.max_tokens > block_size:
        raise InvalidArgumentError(
            f"max_tokens ({params.max_tokens}) plus the prompt ({n_prompt} tokens) exceeds the "
            f"context ({block_size}); ask for at most {block_size - n_prompt} new tokens",
            "max_tokens",
        )
    if params.stop and not has_decode:
        raise InvalidArgumentError(
            "stop strings need text: give the generator a decode function (tokenizer.decode)",
            "stop",
        )
    if params.stop and params.num_beams > 1:
        raise InvalidArgumentError(
            "stop strings are not supported with num_beams > 1; use stop_token_ids", "stop"
        )


# --------------------------------------------------------------------------------------------
# Text, token by token


class IncrementalText:
    """The text of ids that arrive one at a time, each ``push`` costing a short decode.

    As vLLM's incremental detokenizer: decode only a window of the newest ids (with the
    previous window as context, for tokenizers whose text depends on what precedes), and
    take its text once it no longer ends in an incomplete UTF-8 sequence. ``text`` is the
    whole characters so far; ``ends[i]`` is ``len(text)`` right after id ``i`` when the text
    of ids[: i + 1] is whole (a boundary), else -1. A window only grows while its text stays
    incomplete (at most a few ids for real text).
    """

    def __init__(self, decode: Decode) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.ends: list[int] = []
        self._prefix = self._read = 0  # ids[_prefix:_read]: context, ids[_read:]: pending
        self._prefix_text = ""

    def push(self, token: int) -> str:
        """Add one id; returns the whole characters it completed ("" while incomplete)."""
        self.ids.append(token)
        window = self.decode(self.ids[self._prefix :])
        if window.endswith(REPLACEMENT):
            self.ends.append(-1)
            return ""
        delta = window[len(self._prefix_text) :]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        self._prefix_text = self.decode(self.ids[self._prefix : self._read])
        self.ends.append(len(self.text))
        return delta

    def final(self) -> str:
        """All the text, an incomplete tail included (as U+FFFD): what ``decode(ids)`` gives."""
        if self._read == len(self.ids):
            return self.text
        return self.text + self.decode(self.ids[self._prefix :])[len(self._prefix_text) :]

    def whole_before(self, limit: int, at_least: int = 0) -> int:
        """The most ids (>= at_least) whose text is whole and no longer than ``limit`` chars."""
        n = len(self.ids)
        while n > at_least and not (self.ends[n - 1] != -1 and self.ends[n - 1] <= limit):
            n -= 1
        return n

    def whole_text(self, n: int) -> str:
        """The whole characters of ids[:n] (an incomplete tail left out)."""
        k = n
        while k > 0 and self.ends[k - 1] == -1:
            k -= 1
        return self.text[: self.ends[k - 1]] if k else ""


def find_stop(text: str, since: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string that ends after ``since`` (characters already checked):
    (its start, the stop). Ties go to the first in ``stops``. Only the tail is searched."""
    longest = max(len(s) for s in stops)
    lo = max(0, since - longest + 1)
    hits = [(i, k, s) for k, s in enumerate(stops) if (i := text.find(s, lo)) != -1]
    if not hits:
        return None
    start, _, stop = min(hits)
    return start, stop


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could still be the start of a stop string (not streamed)."""
    longest = max(len(s) for s in stops) - 1
    for k in range(min(longest, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return k
    return 0


class Continuation:
    """One prompt's generated tokens and the rule that ends them (both generators use this).

    ``append`` takes each sampled token: EOS or a stop token id ends it ("eos" / "stop", the
    token not kept); a stop string ends it ("stop"), cutting the text before the string and
    the ids to the tokens wholly before it (a token straddling the string's start is dropped
    while the text keeps its leading part, as vLLM); max_tokens ends it ("length").
    """

    def __init__(self, params: SamplingParams, eos_id: int | None, decode: Decode | None):
        self.params, self.eos_id, self.decode = params, eos_id, decode
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.final_text: str | None = None
        self.text = IncrementalText(decode) if decode is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, entry: TokenLogprob | None) -> bool:
        """Take one sampled token; False if it ended generation without being kept."""
        if token == self.eos_id:
            self.finish_reason = "eos"
            return False
        if token in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
            return False
        self.tokens.append(token)
        if entry is not None:
            self.logprobs.append(entry)
        if self.text is not None:
            checked = len(self.text.text)
            self.text.push(token)
            if self.params.stop and self._cut_at_stop_string(checked):
                return True
        if len(self.tokens) >= self.params.max_tokens:
            self.finish_reason = "length"
        return True

    def resume(self, tokens: Sequence[int]) -> None:
        """Take tokens another replica already generated and streamed (failover, see
        ``actors.streaming.resumable``): none of them ended the stream, so no end rule runs;
        their logprobs went to the client already, so placeholders keep the lists aligned."""
        for token in tokens:
            self.tokens.append(token)
            if self.params.logprobs is not None:
                self.logprobs.append(TokenLogprob(token, float("nan"), []))
            if self.text is not None:
                self.text.push(token)

    def _cut_at_stop_string(self, checked: int) -> bool:
        assert self.text is not None
        if len(self.text.text) == checked:
            return False
        hit = find_stop(self.text.text, checked, self.params.stop)
        if hit is None:
            return False
        start, stop = hit
        keep = self.text.whole_before(start)
        self.tokens, self.logprobs = self.tokens[:keep], self.logprobs[:keep]
        self.finish_reason, self.stop_reason = "stop", stop
        self.final_text = self.text.text[:start]
        return True

    def adopt(
        self,
        tokens: list[int],
        logprobs: list[TokenLogprob],
        finish: FinishReason,
        stop_reason: int | None,
    ) -> None:
        """Take a whole result at once (beam search's best beam)."""
        self.tokens, self.logprobs = list(tokens), list(logprobs)
        self.finish_reason, self.stop_reason = finish, stop_reason
        if self.decode is not None:
            self.final_text = self.decode(self.tokens)

    def safe_to_emit(self, emitted: int) -> int:
        """How many tokens may be streamed now: all, unless the text ends with what could be
        the beginning of a stop string (those wait, so no client sees text taken back)."""
        n = len(self.tokens)
        if self.finished or not self.params.stop or self.text is None:
            return n
        hold = held_back(self.text.text, self.params.stop)
        if not hold:
            return n
        return self.text.whole_before(len(self.text.text) - hold, at_least=emitted)

    def visible_text(self, n: int) -> str:
        """The text of the first n tokens as a client may see it: whole characters only until
        the end, then all of it (cut before a stop string)."""
        if self.final_text is not None:
            return self.final_text
        assert self.text is not None
        if self.finished and n == len(self.tokens):
            return self.text.final()
        return self.text.whole_text(n)

    def result_text(self) -> str | None:
        """The final text (None without a decode)."""
        if self.final_text is not None or self.text is None:
            return self.final_text
        return self.text.final()


# --------------------------------------------------------------------------------------------
# Beam search


@dataclass
class _Beam:
    tokens: list[int]
    score: float  # sum of log-probabilities of tokens
    logprobs: list[TokenLogprob]


@dataclass
class _Finished:
    tokens: list[int]
    score: float  # normalised: sum_logprobs / len**length_penalty
    logprobs: list[TokenLogprob]
    finish: FinishReason
    stop_reason: int | None


class BeamSearch:
    """Beam search for one prompt (HF's algorithm without its early-stopping heuristic).

    Every step expands the live beams, ranks the candidates by summed log-probability and
    keeps the best ``num_beams`` that do not end; a candidate ending in EOS / a stop token
    (only among the top ``num_beams``, as HF) or reaching max_tokens becomes a finished
    hypothesis scored sum_logprobs / len**length_penalty, len counting the end token. We stop
    when no live beam can still beat the best finished one (an exact bound, since log-probs
    are <= 0), so with enough beams the result equals exhaustive search.
    """

    def __init__(self, prompt: list[int], params: SamplingParams, eos_id: int | None):
        self.prompt, self.params = prompt, params
        self.ends = set(params.stop_token_ids) | ({eos_id} if eos_id is not None else set())
        self.eos_id = eos_id
        self.live = [_Beam([], 0.0, [])]
        self.finished: list[_Finished] = []
        # Only the repetition penalty shapes beam scores (HF's do_sample=False).
        self.score_params = replace(params, temperature=0.0, num_beams=1)

    def step(self, logits: Tensor) -> list[int]:
        """Extend the live beams given their logits (n_live, V); returns each new beam's parent."""
        K, length = self.params.num_beams, len(self.live[0].tokens) + 1
        prev = [self.prompt + b.tokens for b in self.live]
        scores = process_logits(logits, [self.score_params] * len(self.live), prev)
        logp = torch.log_softmax(scores, dim=-1)  # (n, V)
        total = torch.tensor([b.score for b in self.live], device=logp.device)[:, None] + logp
        order = total.flatten().sort(descending=True, stable=True).indices[: 2 * K].tolist()
        raw = self._raw_logprobs(logits)
        V = logits.shape[-1]
        live, parents = [], []
        for rank, flat in enumerate(order):
            parent, token = divmod(flat, V)
            beam = self.live[parent]
            score = float(total[parent, token])
            entry = raw(parent, token)
            if token in self.ends:
                if rank < K:
                    self._finish(beam.tokens, beam.logprobs, score, length, token)
                continue
            new = _Beam([*beam.tokens, token], score, beam.logprobs + ([entry] if entry else []))
            if length >= self.params.max_tokens:
                self._finish(new.tokens, new.logprobs, score, length, None)
            elif len(live) < K:
                live.append(new)
                parents.append(parent)
            if len(live) == K and length < self.params.max_tokens:
                break
        self.live = live if length < self.params.max_tokens else []
        return parents

    def _raw_logprobs(self, logits: Tensor) -> Callable[[int, int], TokenLogprob | None]:
        n = self.params.logprobs
        if n is None:
            return lambda parent, token: None
        logp = torch.log_softmax(logits.float(), dim=-1)  # (n_live, V)
        top_lp, top_ids = logp.topk(n, dim=-1)

        def entry(parent: int, token: int) -> TokenLogprob:
            top = list(zip(top_ids[parent].tolist(), top_lp[parent].tolist(), strict=True))
            return TokenLogprob(token, float(logp[parent, token]), top)

        return entry

    def _finish(
        self, tokens: list[int], lps: list[TokenLogprob], score: float, length: int, end: int | None
    ) -> None:
        reason: FinishReason = (
            "length" if end is None else ("eos" if end == self.eos_id else "stop")
        )
        normalised = score / length**self.params.length_penalty
        stop = end if reason == "stop" else None
        self.finished.append(_Finished(tokens, normalised, lps, reason, stop))

    def done(self) -> bool:
        """True when no live beam can beat the best finished hypothesis."""
        if not self.live:
            return True
        if not self.finished:
            return False
        lp, M = self.params.length_penalty, self.params.max_tokens
        length = len(self.live[0].tokens)
        # A live beam's sum only falls; the best it can reach divides by the largest len**lp ahead.
        denominator = max((length + 1) ** lp, M**lp)
        bound = max(b.score for b in self.live) / denominator
        return self.best().score >= bound

    def best(self) -> _Finished:
        return max(self.finished, key=lambda f: f.score)  # first found wins ties


__all__ = [
    "BeamSearch",
    "Continuation",
    "Decode",
    "FinishReason",
    "IncrementalText",
    "TokenLogprob",
    "check_request",
    "find_stop",
    "held_back",
    "prompt_token_ids",
]
