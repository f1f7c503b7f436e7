"""Generation from a ``Transformer``: sampling or beam search, with or without a KV cache.

``generate(model, prompt_ids, params)`` is the library's reference generator; the serving
engine (paged cache, continuous batching) must agree with it. It works in token ids; text
appears only through the optional ``decode`` callable that stop strings need.

Two paths give the same tokens:

- naive (``use_cache=False``): every step runs ``model(ids)`` on the whole sequence so far,
  one prompt at a time. Slow (quadratic) and simple: the independent reference.
- cached (``use_cache=True``), split as in gpt-fast: ``prefill`` runs the prompts once into a
  preallocated ``KVCache``, then ``decode_n_tokens`` calls ``decode_one_token`` per step with
  each row's absolute position. Prompts of different lengths share one batch: they are
  left-padded, the padding gets positions past the row's prompt (which the causal mask hides)
  and its cache slots are marked empty (-1) right after prefill, so no row ever attends to
  padding and each row's tokens sit at positions 0, 1, 2, ... exactly as in the naive path.

Length rule (as vLLM): prompt + max_tokens must fit in the context (``block_size``); a prompt
that leaves no room, or a max_tokens that does not fit, raises ``ValueError``; max_tokens is
never clipped silently.

Returned ``token_ids`` hold the generated tokens without the EOS / stop token that ended
generation (``finish_reason`` and ``stop_reason`` say which); ``logprobs`` are aligned to them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from kilnlm.model import KVCache, ModelConfig, Transformer, kv_cache_bytes_per_token
from kilnlm.sampling import SamplingParams, make_generator, process_logits, sample, token_logprobs

FinishReason = Literal["stop", "length", "eos"]
Decode = Callable[[list[int]], str]

# --------------------------------------------------------------------------------------------
# Results


@dataclass
class TokenLogprob:
    """Raw model log-probabilities at one generated position (see ``sampling.token_logprobs``)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]
    """The ``params.logprobs`` most likely (token id, logprob), most likely first."""


@dataclass
class GenerationResult:
    token_ids: list[int]
    """Generated ids, without the EOS / stop token that ended generation."""
    finish_reason: FinishReason
    """"eos": the model's EOS; "stop": a stop token id or stop string; "length": max_tokens."""
    num_prompt_tokens: int
    text: str | None = None
    """decode(token_ids) when a decode function was given; cut before a matched stop string."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token in token_ids when params.logprobs is set, else None."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that matched (None for eos / length)."""
    kv_cache_bytes: int = 0
    """Bytes of KV cache this call reserved (the whole batch's cache; 0 on the naive path)."""


def kv_cache_bytes(
    cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes a contiguous cache of batch_size rows × max_len positions reserves."""
    return batch_size * max_len * kv_cache_bytes_per_token(cfg, dtype)


# --------------------------------------------------------------------------------------------
# Per-row state shared by the naive and the cached path


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    out: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
    stop_reason: int | str | None = None
    text: str | None = None

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.out

    @property
    def last(self) -> tuple[int, int]:
        """The newest token and its absolute position (what the next decode step feeds)."""
        return (self.out[-1] if self.out else self.prompt[-1]), len(self.prompt) + len(self.out) - 1


class _Rows:
    """What each row has generated so far and whether it is done; ``advance`` takes one step."""

    def __init__(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        eos_id: int | None,
        decode: Decode | None,
        device: torch.device,
    ):
        self.rows = [
            _Row(p, sp, make_generator(sp.seed, device))
            for p, sp in zip(prompts, params, strict=True)
        ]
        self.eos_id, self.decode = eos_id, decode

    def active(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.finish is None]

    def advance(self, logits: Tensor, active: list[int]) -> None:
        """Choose the next token of every active row from its logits (len(active), V)."""
        rows = [self.rows[i] for i in active]
        params = [r.params for r in rows]
        penalised = any(p.repetition_penalty != 1 for p in params)
        prev = [r.sequence for r in rows] if penalised else None
        tokens = sample(process_logits(logits, params, prev), params, [r.generator for r in rows])
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        lp = token_logprobs(logits, tokens, n_top) if n_top is not None else None
        for j, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            entry = _logprob_entry(lp, j, token, row.params.logprobs) if lp is not None else None
            self._append(row, token, entry)

    def _append(self, row: _Row, token: int, entry: TokenLogprob | None) -> None:
        if token == self.eos_id:
            row.finish = "eos"
            return
        if token in row.params.stop_token_ids:
            row.finish, row.stop_reason = "stop", token
            return
        row.out.append(token)
        if entry is not None:
            row.logprobs.append(entry)
        if row.params.stop and self.decode is not None and _cut_at_stop_string(row, self.decode):
            return
        if len(row.out) >= row.params.max_tokens:
            row.finish = "length"

    def results(self, cache_bytes: int) -> list[GenerationResult]:
        return [_result(r, self.decode, cache_bytes) for r in self.rows]


def _logprob_entry(lp: Any, j: int, token: int, n: int | None) -> TokenLogprob | None:
    if n is None:
        return None
    top = list(zip(lp.top_ids[j, :n].tolist(), lp.top_logprobs[j, :n].tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(lp.chosen[j]), top=top)


def cut_at_stop_string(
    ids: list[int], stops: Sequence[str], decode: Decode
) -> tuple[int, str, str] | None:
    """Where generation stops if a stop string appeared: (ids to keep, the stop, the text).

    The text is cut before the earliest stop string and the ids to the tokens wholly before it.
    A token that straddles the stop string's start is dropped from the ids while the text keeps
    its leading part, so the text may run a little past decode(ids[:keep]) (vLLM does the same).
    The engine and this module both call it, so streamed and reference output cut alike.
    """
    text = decode(ids)
    hits = [(text.find(s), k, s) for k, s in enumerate(stops) if s in text]
    if not hits:
        return None
    start, _, stop = min(hits)
    text = text[:start]
    keep = len(ids)
    while keep > 0 and not text.startswith(decode(ids[:keep])):
        keep -= 1
    return keep, stop, text


def _cut_at_stop_string(row: _Row, decode: Decode) -> bool:
    """Apply ``cut_at_stop_string`` to a row (checked after every token, so the earliest
    occurrence is found on the step that completes it)."""
    cut = cut_at_stop_string(row.out, row.params.stop, decode)
    if cut is None:
        return False
    keep, stop, text = cut
    row.out, row.logprobs = row.out[:keep], row.logprobs[:keep]
    row.finish, row.stop_reason, row.text = "stop", stop, text
    return True


def _result(row: _Row, decode: Decode | None, cache_bytes: int) -> GenerationResult:
    assert row.finish is not None
    text = row.text if row.text is not None else (decode(row.out) if decode else None)
    return GenerationResult(
        token_ids=row.out,
        finish_reason=row.finish,
        num_prompt_tokens=len(row.prompt),
        text=text,
        logprobs=row.logprobs if row.params.logprobs is not None else None,
        stop_reason=row.stop_reason,
        kv_cache_bytes=cache_bytes,
    )


# --------------------------------------------------------------------------------------------
# Naive path: recompute everything every step


def _generate_naive(model: Transformer, rows: _Rows) -> None:
    """One prompt at a time, full forward over the sequence so far: the reference path."""
    device = model.device
    while active := rows.active():
        last = [
            model(torch.tensor([rows.rows[i].sequence], device=device))[0, -1] for i in active
        ]  # each (V,)
        rows.advance(torch.stack(last), active)


# --------------------------------------------------------------------------------------------
# Cached path (gpt-fast split)


def prefill(model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor) -> Tensor:
    """Run prompts (B, T) at absolute positions (B, T) into the cache; logits (B, V) of the last column."""
    return model(tokens, positions=positions, cache=cache, last_only=True)[:, -1]


def decode_one_token(
    model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor
) -> Tensor:
    """One new token per row: tokens (B, 1) at positions (B, 1); logits (B, V)."""
    return model(tokens, positions=positions, cache=cache)[:, -1]


def decode_n_tokens(model: Transformer, cache: KVCache, rows: _Rows, n: int) -> None:
    """Up to n decode steps, stopping early once every row has finished.

    Every row feeds its last token at its own next position. A finished row keeps re-feeding
    its last token at that token's own position: it rewrites the same cache slot with the same
    values, so the batch keeps its shape without touching anything a live row reads.
    """
    device = model.device
    for _ in range(n):
        active = rows.active()
        if not active:
            return
        last = torch.tensor([r.last for r in rows.rows], device=device)  # (B, 2)
        tokens, positions = last[:, :1], last[:, 1:]  # (B, 1) each
        logits = decode_one_token(model, cache, tokens, positions)  # (B, V)
        rows.advance(logits[active], active)


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """Tokens and positions (B, T) with prompts right-aligned so the last column is every row's
    last prompt token. Row i's padding takes positions len_i .. T-1: past its prompt, so the
    causal mask hides it from the row's real tokens during prefill."""
    T = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), T, dtype=torch.long)
    positions = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = T - len(p)
        tokens[i, pad:] = torch.tensor(p)
        positions[i] = torch.cat((torch.arange(len(p), T), torch.arange(len(p))))
    return tokens.to(device), positions.to(device)


def _generate_cached(model: Transformer, rows: _Rows) -> int:
    """Prefill + decode over one contiguous cache; returns the bytes the cache reserved."""
    cfg, device = model.config, model.device
    prompts = [r.prompt for r in rows.rows]
    max_len = max(len(r.prompt) + r.params.max_tokens for r in rows.rows)
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, len(prompts), max_len, dtype=dtype, device=device)
    tokens, positions = left_pad(prompts, device)
    logits = prefill(model, cache, tokens, positions)  # (B, V)
    for i, p in enumerate(prompts):
        cache.pos[i, len(p) : tokens.shape[1]] = -1  # padding slots are empty, not keys
    rows.advance(logits, rows.active())
    decode_n_tokens(model, cache, rows, max(r.params.max_tokens for r in rows.rows))
    return kv_cache_bytes(cfg, len(prompts), max_len, dtype)


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


class _BeamSearch:
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


BeamSearch = _BeamSearch
"""Public name of the beam-search state machine (the serving engine drives it step by step)."""


def _beam_logits_naive(model: Transformer, search: _BeamSearch) -> Tensor:
    seqs = torch.tensor([search.prompt + b.tokens for b in search.live], device=model.device)
    return model(seqs)[:, -1]  # (n_live, V): all live beams have the same length


@torch.inference_mode()
def beam_search(
    model: Transformer,
    prompt: list[int],
    params: SamplingParams,
    use_cache: bool = True,
    eos_id: int | None = None,
    decode: Decode | None = None,
) -> GenerationResult:
    """The best beam for one prompt (``params.num_beams`` beams, ``params.length_penalty``)."""
    search = _BeamSearch(prompt, params, eos_id)
    K, device, cache_bytes = params.num_beams, model.device, 0
    if use_cache:
        max_len = len(prompt) + params.max_tokens
        dtype = next(model.parameters()).dtype
        cache = KVCache(model.config, K, max_len, dtype=dtype, device=device)
        tokens = torch.tensor([prompt], device=device).expand(K, -1)
        logits = prefill(
            model, cache, tokens, torch.arange(len(prompt), device=device).expand(K, -1)
        )
        logits = logits[:1]
        cache_bytes = kv_cache_bytes(model.config, K, max_len, dtype)
    else:
        logits = _beam_logits_naive(model, search)
    while True:
        parents = search.step(logits)
        if search.done():
            break
        if not use_cache:
            logits = _beam_logits_naive(model, search)
            continue
        cache.reorder(parents + [0] * (K - len(parents)))  # rows past the live beams: unused
        n = len(search.live)
        last = [b.tokens[-1] for b in search.live] + [0] * (K - n)
        position = len(prompt) + len(search.live[0].tokens) - 1
        tokens = torch.tensor(last, device=device)[:, None]  # (K, 1)
        positions = torch.full((K, 1), position, device=device)
        logits = decode_one_token(model, cache, tokens, positions)[:n]
    best = search.best()
    return GenerationResult(
        token_ids=best.tokens,
        finish_reason=best.finish,
        num_prompt_tokens=len(prompt),
        text=decode(best.tokens) if decode else None,
        logprobs=best.logprobs if params.logprobs is not None else None,
        stop_reason=best.stop_reason,
        kv_cache_bytes=cache_bytes,
    )


# --------------------------------------------------------------------------------------------
# Input checks and the public entry point


def _token_ids(prompt: Any, name: str, vocab_size: int) -> list[int]:
    try:
        ids = [operator.index(t) for t in prompt]
    except TypeError:
        raise ValueError(f"{name} must be a list of int token ids, got {prompt!r:.80}") from None
    if not ids:
        raise ValueError(f"{name} is empty; give at least one token (e.g. the BOS token)")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(
            f"{name} has token id {bad[0]} outside the vocabulary [0, {vocab_size}); "
            "encode it with this model's tokenizer"
        )
    return ids


def _check_lengths(name: str, n_prompt: int, params: SamplingParams, block_size: int) -> None:
    if n_prompt >= block_size:
        raise ValueError(
            f"{name} has {n_prompt} tokens but the context holds {block_size}, leaving no room to "
            f"generate; shorten it to at most {block_size - 1} tokens"
        )
    if n_prompt + params.max_tokens > block_size:
        raise ValueError(
            f"max_tokens ({params.max_tokens}) plus the prompt ({n_prompt} tokens) exceeds the "
            f"context ({block_size}); ask for at most {block_size - n_prompt} new tokens"
        )


def _normalise(
    model: Transformer, prompt_ids: Any, params: Any, eos_id: int | None, decode: Decode | None
) -> tuple[bool, list[list[int]], list[SamplingParams]]:
    """(single?, prompts, one SamplingParams per prompt), or ValueError saying what to fix."""
    cfg = model.config
    if not cfg.causal:
        raise ValueError(
            "model is bidirectional (config.causal=False); generation needs a causal LM"
        )
    if hasattr(prompt_ids, "tolist"):  # a torch tensor or numpy array, 1-D or 2-D
        prompt_ids = prompt_ids.tolist()
    prompt_ids = list(prompt_ids)
    single = not prompt_ids or not isinstance(prompt_ids[0], (Sequence, Tensor))
    raw = [prompt_ids] if single else prompt_ids
    names = ["prompt_ids"] if single else [f"prompt_ids[{i}]" for i in range(len(raw))]
    prompts = [_token_ids(p, n, cfg.vocab_size) for p, n in zip(raw, names, strict=True)]
    plist = _params_list(params, len(prompts))
    for name, p, sp in zip(names, prompts, plist, strict=True):
        _check_lengths(name, len(p), sp, cfg.block_size)
        if sp.stop and decode is None:
            raise ValueError("stop strings need text: pass decode=tokenizer.decode to generate")
        if sp.stop and sp.num_beams > 1:
            raise ValueError(
                "stop strings are not supported with num_beams > 1; use stop_token_ids"
            )
    if eos_id is not None and not 0 <= eos_id < cfg.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
    return single, prompts, plist


def _params_list(params: Any, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    plist = list(params)
    if len(plist) != n or not all(isinstance(p, SamplingParams) for p in plist):
        raise ValueError(f"params must be one SamplingParams or a list of {n} (one per prompt)")
    return plist


@torch.inference_mode()
def generate(
    model: Transformer,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    decode: Decode | None = None,
) -> GenerationResult | list[GenerationResult]:
    """Generate from one prompt (a list of ids: returns one result) or a batch (a list of lists,
    lengths may differ: returns a list). ``params`` is one SamplingParams for all prompts or one
    per prompt; None means ``SamplingParams()``. ``eos_id`` ends a sequence (finish "eos");
    ``decode`` turns ids into text, needed for stop strings and filling ``result.text``.

    Raises ValueError, naming the argument, for an empty prompt, ids outside the vocabulary, a
    prompt that fills the context, or prompt + max_tokens longer than the context.
    """
    single, prompts, plist = _normalise(model, prompt_ids, params, eos_id, decode)
    results: list[GenerationResult | None] = [None] * len(prompts)
    sampled = [i for i, p in enumerate(plist) if p.num_beams == 1]
    for i, p in enumerate(plist):
        if p.num_beams > 1:
            results[i] = beam_search(model, prompts[i], p, use_cache, eos_id, decode)
    if sampled:
        rows = _Rows(
            [prompts[i] for i in sampled], [plist[i] for i in sampled], eos_id, decode, model.device
        )
        cache_bytes = _generate_cached(model, rows) if use_cache else 0
        if not use_cache:
            _generate_naive(model, rows)
        for i, r in zip(sampled, rows.results(cache_bytes), strict=True):
            results[i] = r
    done = [r for r in results if r is not None]
    return done[0] if single else done


__all__ = [
    "BeamSearch",
    "GenerationResult",
    "TokenLogprob",
    "beam_search",
    "decode_n_tokens",
    "decode_one_token",
    "generate",
    "kv_cache_bytes",
    "left_pad",
    "prefill",
]
