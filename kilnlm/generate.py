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
that leaves no room, or a max_tokens that does not fit, raises ``InvalidArgumentError`` (a
``ValueError``); max_tokens is never clipped silently. That rule, the stop rule and beam search
live in ``kilnlm.decoding``, shared with the serving engine.

Returned ``token_ids`` hold the generated tokens without the EOS / stop token that ended
generation (``finish_reason`` and ``stop_reason`` say which); ``logprobs`` are aligned to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kilnlm.decoding import (
    BeamSearch,
    Continuation,
    Decode,
    FinishReason,
    TokenLogprob,
    check_request,
    prompt_token_ids,
)
from kilnlm.errors import InvalidArgumentError
from kilnlm.model import KVCache, ModelConfig, Transformer, kv_cache_bytes_per_token
from kilnlm.sampling import (
    SamplingParams,
    apply_allowed_token_ids,
    make_generator,
    process_logits,
    sample,
    token_logprobs,
)

# --------------------------------------------------------------------------------------------
# Results


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
    out: Continuation

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.out.tokens

    @property
    def last(self) -> tuple[int, int]:
        """The newest token and its absolute position (what the next decode step feeds)."""
        tokens = self.out.tokens
        return (tokens[-1] if tokens else self.prompt[-1]), len(self.prompt) + len(tokens) - 1


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
            _Row(p, sp, make_generator(sp.seed, device), Continuation(sp, eos_id, decode))
            for p, sp in zip(prompts, params, strict=True)
        ]

    def active(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not r.out.finished]

    def advance(self, logits: Tensor, active: list[int]) -> None:
        """Choose the next token of every active row from its logits (len(active), V)."""
        rows = [self.rows[i] for i in active]
        params = [r.params for r in rows]
        penalised = any(p.repetition_penalty != 1 for p in params)
        prev = [r.sequence for r in rows] if penalised else None
        tokens = sample(process_logits(logits, params, prev), params, [r.generator for r in rows])
        n_top = max((p.logprobs for p in params if p.logprobs is not None), default=None)
        lp = (
            token_logprobs(apply_allowed_token_ids(logits, params), tokens, n_top)
            if n_top is not None
            else None
        )
        for j, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            entry = _logprob_entry(lp, j, token, row.params.logprobs) if lp is not None else None
            row.out.append(token, entry)

    def results(self, cache_bytes: int) -> list[GenerationResult]:
        return [_result(r, cache_bytes) for r in self.rows]


def _logprob_entry(lp: Any, j: int, token: int, n: int | None) -> TokenLogprob | None:
    if n is None:
        return None
    top = list(zip(lp.top_ids[j, :n].tolist(), lp.top_logprobs[j, :n].tolist(), strict=True))
    return TokenLogprob(token_id=token, logprob=float(lp.chosen[j]), top=top)


def _result(row: _Row, cache_bytes: int) -> GenerationResult:
    out = row.out
    assert out.finish_reason is not None
    return GenerationResult(
        token_ids=out.tokens,
        finish_reason=out.finish_reason,
        num_prompt_tokens=len(row.prompt),
        text=out.result_text(),
        logprobs=out.logprobs if row.params.logprobs is not None else None,
        stop_reason=out.stop_reason,
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
# Beam search (the state machine is ``decoding.BeamSearch``, shared with the engine)


def _beam_logits_naive(model: Transformer, search: BeamSearch) -> Tensor:
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
    search = BeamSearch(prompt, params, eos_id)
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
    prompts = [prompt_token_ids(p, n, cfg.vocab_size) for p, n in zip(raw, names, strict=True)]
    plist = _params_list(params, len(prompts))
    for name, p, sp in zip(names, prompts, plist, strict=True):
        check_request(name, len(p), sp, cfg.block_size, decode is not None)
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
        raise InvalidArgumentError(
            f"params must be one SamplingParams or a list of {n} (one per prompt)", "params"
        )
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
    "Decode",
    "FinishReason",
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
