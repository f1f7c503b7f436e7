"""Sampling parameters and the samplers that turn a batch of logits into next tokens.

Every row of a batch carries its own ``SamplingParams``: the serving engine batches requests
with different temperatures, top-p values and seeds, so each transform below is vectorised
over rows with per-row parameter tensors and never lets one row's setting touch another row.

The transforms are pure ``(logits, per-row parameters) -> logits`` functions applied in
Hugging Face's order (repetition penalty, temperature, top-k, top-p, min-p) and agree with
``transformers.generation.logits_process`` token for token (tests/test_sampling.py checks it).
``sample`` is the one function that draws, and it draws each row with that row's own
``torch.Generator``, so a seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kilnlm.errors import InvalidArgumentError

MAX_LOGPROBS = 20
"""The most top-logprobs a request may ask for per token (vLLM's default cap)."""

GREEDY_BELOW = 1e-5
"""Temperatures below this are greedy (vLLM's rule): dividing logits by 1e-40 overflows to
inf - inf = NaN, and the argmax of a NaN row is token 0."""

CHAT_TEMPERATURE = 0.7
CHAT_TOP_P = 0.9


# --------------------------------------------------------------------------------------------
# Parameters


def _require(name: str, ok: bool, requirement: str, value: Any) -> None:
    """Raise the InvalidArgumentError the gateway maps to INVALID_ARGUMENT, naming the field."""
    if not ok:
        raise InvalidArgumentError(f"{name} must be {requirement}, got {value!r}", field=name)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """How one request turns logits into tokens and when it stops.

    Invalid values raise ``InvalidArgumentError`` (a ``ValueError``) whose message starts with
    the field's name, so the gateway can answer INVALID_ARGUMENT naming the field.
    """

    temperature: float = 1.0
    """Divide the logits by this; 0 (or anything below ``GREEDY_BELOW``) means greedy (argmax,
    the lowest id on ties)."""
    top_k: int = 0
    """Keep the k most likely tokens (ties with the k-th kept); 0 turns it off."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p; 1 turns it off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0 turns it off."""
    repetition_penalty: float = 1.0
    """CTRL penalty on every token already in prompt or output: positive logits are divided by it,
    negative ones multiplied; 1 turns it off, > 1 discourages repeats."""
    seed: int | None = None
    """Seed of this request's own generator: same seed, same tokens. None draws from torch's global RNG."""
    max_tokens: int = 16
    """The most new tokens to generate."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends before the first one that appears in the generated text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation (besides the model's EOS); they are not returned."""
    num_beams: int = 1
    """> 1 runs beam search (deterministic: temperature, top-k/p, min-p and seed are not used)."""
    length_penalty: float = 1.0
    """Beam search ranks finished beams by sum_logprobs / len**length_penalty (HF convention)."""
    logprobs: int | None = None
    """Return the chosen token's logprob and this many top logprobs per token (0..20); None: none."""
    allowed_token_ids: list[int] | None = None
    """Only these ids may be drawn: every other logit is -inf and the rest renormalise, before
    the filters and for the returned logprobs too (they are then the restricted distribution's,
    the one the token was drawn from: RL's importance weight needs it). None: every id."""

    def __post_init__(self) -> None:
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        if isinstance(self.stop, str):  # a lone string would otherwise be split into characters
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self._check_ranges()
        self._check_lists()

    def _check_ranges(self) -> None:
        t, p, m, r = self.temperature, self.top_p, self.min_p, self.repetition_penalty
        # `not (a <= x)` forms also refuse NaN.
        _require("temperature", _is_real(t) and t >= 0 and math.isfinite(t), "a number >= 0", t)
        _require("top_p", _is_real(p) and 0 < p <= 1, "in (0, 1]", p)
        _require("top_k", _is_int(self.top_k) and self.top_k >= 0, "an int >= 0", self.top_k)
        _require("min_p", _is_real(m) and 0 <= m <= 1, "in [0, 1]", m)
        _require("repetition_penalty", _is_real(r) and 0 < r < math.inf, "a number > 0", r)
        _require(
            "max_tokens",
            _is_int(self.max_tokens) and self.max_tokens >= 1,
            "an int >= 1",
            self.max_tokens,
        )
        _require(
            "num_beams",
            _is_int(self.num_beams) and self.num_beams >= 1,
            "an int >= 1",
            self.num_beams,
        )
        lp = self.length_penalty
        _require("length_penalty", _is_real(lp) and math.isfinite(lp), "a finite number", lp)
        n = self.logprobs
        _require(
            "logprobs",
            n is None or (_is_int(n) and 0 <= n <= MAX_LOGPROBS),
            f"None or an int in [0, {MAX_LOGPROBS}]",
            n,
        )
        s = self.seed
        _require(
            "seed", s is None or (_is_int(s) and 0 <= s < 2**64), "None or an int in [0, 2**64)", s
        )

    def _check_lists(self) -> None:
        for s in self.stop:
            _require(
                "stop", isinstance(s, str) and s != "", "a list of non-empty strings", self.stop
            )
        for t in self.stop_token_ids:
            _require(
                "stop_token_ids", _is_int(t) and t >= 0, "a list of ints >= 0", self.stop_token_ids
            )
        allowed = self.allowed_token_ids
        _require(
            "allowed_token_ids",
            allowed is None or (len(allowed) > 0 and all(_is_int(t) and t >= 0 for t in allowed)),
            "None or a non-empty list of ints >= 0",
            allowed,
        )

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0, or so small that dividing by it is not a number."""
        return self.temperature < GREEDY_BELOW

    def validate_for(self, max_tokens_limit: int) -> SamplingParams:
        """Enforce a server's cap on max_tokens (INVALID_ARGUMENT "max_tokens over the limit"); returns self."""
        if self.max_tokens > max_tokens_limit:
            raise InvalidArgumentError(
                f"max_tokens must be <= {max_tokens_limit} (this server's limit), got {self.max_tokens}; "
                "ask for fewer tokens",
                field="max_tokens",
            )
        return self

    @classmethod
    def chat_defaults(cls, **overrides: Any) -> SamplingParams:
        """The chat defaults of DESIGN.md (temperature 0.7, top_p 0.9), any field overridden."""
        return cls(**{"temperature": CHAT_TEMPERATURE, "top_p": CHAT_TOP_P, **overrides})


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A request's own RNG on the logits' device; None (no seed) means torch's global RNG."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Logits transforms (pure; one parameter per row)


def apply_repetition_penalty(logits: Tensor, penalty: Tensor, seen: Tensor) -> Tensor:
    """CTRL / HF penalty on tokens already seen: logits (B, V), penalty (B,), seen (B, V) bool."""
    pen = penalty[:, None].to(logits.dtype)  # (B, 1)
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    return torch.where(seen, penalised, logits)


def apply_temperature(logits: Tensor, temperature: Tensor) -> Tensor:
    """logits (B, V) / temperature (B,); callers pass 1 for greedy rows, which is exact."""
    return logits / temperature[:, None].to(logits.dtype)


def apply_top_k(logits: Tensor, top_k: Tensor) -> Tensor:
    """Keep each row's k largest logits (ties with the k-th kept, as HF); top_k (B,) with 0 = off."""
    V = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k >= V), V, top_k)  # (B,)
    if bool((k == V).all()):
        return logits
    ranked = logits.sort(dim=-1, descending=True).values  # (B, V)
    kth = ranked.gather(1, (k - 1)[:, None].to(logits.device))  # (B, 1)
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter, HF's exact arithmetic: sort ascending, drop tokens whose cumulative
    probability is <= 1 - top_p, always keep the most likely one; top_p (B,) float64, 1 = off."""
    off = top_p >= 1
    if bool(off.all()):
        return logits
    # 1 - p in float64 then float32, exactly like HF's python-float threshold against fp32 probs.
    threshold = (1 - top_p).to(torch.float32)[:, None].to(logits.device)  # (B, 1)
    ordered, order = logits.sort(dim=-1, descending=False, stable=True)  # (B, V)
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= threshold
    remove[:, -1] = False  # min_tokens_to_keep = 1
    remove &= ~off[:, None].to(logits.device)
    remove = remove.scatter(1, order, remove)  # back to vocabulary order
    return logits.masked_fill(remove, -math.inf)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens with probability < min_p · (the row's top probability); min_p (B,) with 0 = off.
    The most likely token always survives (its probability is >= min_p · itself)."""
    if bool((min_p <= 0).all()):
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    top = probs.amax(dim=-1, keepdim=True)  # (B, 1)
    remove = probs < min_p[:, None].to(probs) * top
    return logits.masked_fill(remove, -math.inf)


def seen_mask(
    prev_tokens: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> Tensor:
    """(B, V) bool, True for every token id that row has seen (prompt + output)."""
    mask = torch.zeros(len(prev_tokens), vocab_size, dtype=torch.bool, device=device)
    for row, ids in enumerate(prev_tokens):
        if len(ids):
            mask[row, torch.as_tensor(list(ids), dtype=torch.long, device=device)] = True
    return mask


def _row_tensor(params: Sequence[SamplingParams], name: str, dtype: torch.dtype) -> Tensor:
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype)


def apply_allowed_token_ids(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Rows whose params name ``allowed_token_ids``: every other id at -inf (others unchanged).

    Ids at or past the vocabulary are ignored (a row left with no id raises, naming the field)."""
    if all(p.allowed_token_ids is None for p in params):
        return logits
    V = logits.shape[-1]
    keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)  # (B, V)
    for i, p in enumerate(params):
        if p.allowed_token_ids is not None:
            ids = [t for t in p.allowed_token_ids if t < V]
            if not ids:
                raise InvalidArgumentError(
                    f"allowed_token_ids has no id below the vocabulary size {V}; "
                    "give ids of this model's tokenizer",
                    field="allowed_token_ids",
                )
            keep[i] = False
            keep[i, ids] = True
    return logits.masked_fill(~keep, float("-inf"))


def process_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prev_tokens: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """The logits (B, V) that ``sample`` draws from, in float32, filtered tokens at -inf.

    Order: the ``allowed_token_ids`` restriction, then as HF's ``generate``: repetition penalty (on ``prev_tokens``, prompt + output, when
    given), temperature, top-k, top-p, min-p. Greedy rows (``SamplingParams.greedy``) get only the
    repetition penalty: the filters never remove the argmax, so there is nothing else to do.
    Filtering runs in float32 even for bf16 models: top-p's cumulative sum is too coarse in bf16.
    """
    if logits.dim() != 2 or logits.shape[0] != len(params):
        raise ValueError(
            f"logits must be (batch, vocab) with one SamplingParams per row; got logits of shape "
            f"{tuple(logits.shape)} and {len(params)} params"
        )
    x = apply_allowed_token_ids(logits.float(), params)
    greedy = torch.tensor([p.greedy for p in params])  # (B,)
    if prev_tokens is not None and any(p.repetition_penalty != 1 for p in params):
        seen = seen_mask(prev_tokens, x.shape[-1], x.device)
        x = apply_repetition_penalty(
            x, _row_tensor(params, "repetition_penalty", torch.float32).to(x.device), seen
        )
    if bool(greedy.all()):
        return x
    temperature = torch.where(greedy, 1.0, _row_tensor(params, "temperature", torch.float32))
    if bool((temperature != 1).any()):
        x = apply_temperature(x, temperature.to(x.device))
    x = apply_top_k(x, torch.where(greedy, 0, _row_tensor(params, "top_k", torch.long)))
    x = apply_top_p(x, torch.where(greedy, 1.0, _row_tensor(params, "top_p", torch.float64)))
    return apply_min_p(x, torch.where(greedy, 0.0, _row_tensor(params, "min_p", torch.float32)))


# --------------------------------------------------------------------------------------------
# Drawing


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> Tensor:
    """Next token ids (B,) from ``process_logits`` output (B, V): argmax for greedy rows (lowest id
    on ties), otherwise one draw from softmax(logits) with that row's generator.

    The draw is the exponential race (Gumbel-max): argmax(logits - log E) with E ~ Exp(1) per
    token is distributed as softmax(logits). Each row's noise comes from its own generator, so a
    seeded row's token does not depend on which other rows share the batch.
    """
    if not (logits.shape[0] == len(params) == len(generators)):
        raise ValueError("sample needs one SamplingParams and one generator (or None) per row")
    choice = logits.argmax(dim=-1)  # (B,) torch returns the first maximum: lowest id on ties
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return choice
    V = logits.shape[-1]
    noise = torch.stack(
        [torch.empty(V, device=logits.device).exponential_(generator=generators[i]) for i in rows]
    )  # (R, V)
    drawn = (logits[rows].float() - noise.log()).argmax(dim=-1)  # (R,)
    choice[rows] = drawn
    return choice


@dataclass
class Logprobs:
    """Log-probabilities for one step of a batch: the chosen tokens' and the top-n."""

    chosen: Tensor
    """(B,) logprob of each row's chosen token."""
    top_ids: Tensor
    """(B, n) the n most likely token ids, most likely first."""
    top_logprobs: Tensor
    """(B, n) their logprobs."""


def token_logprobs(logits: Tensor, tokens: Tensor, n: int) -> Logprobs:
    """Log-probabilities of ``tokens`` (B,) and the top-n under the model's own distribution.

    We return the raw model logprobs, log_softmax of the logits before repetition penalty,
    temperature and filters, as vLLM does by default: they describe the model, not the sampler,
    so scoring and perplexity agree whatever sampling the request used (a filtered token would
    otherwise have no finite logprob).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = logp.gather(1, tokens[:, None].to(logp.device))[:, 0]  # (B,)
    top_logprobs, top_ids = logp.topk(n, dim=-1) if n else (logp[:, :0], logp[:, :0].long())
    return Logprobs(chosen=chosen, top_ids=top_ids, top_logprobs=top_logprobs)


__all__ = [
    "CHAT_TEMPERATURE",
    "CHAT_TOP_P",
    "GREEDY_BELOW",
    "MAX_LOGPROBS",
    "Logprobs",
    "SamplingParams",
    "apply_allowed_token_ids",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "make_generator",
    "process_logits",
    "sample",
    "seen_mask",
    "token_logprobs",
]
