"""Held-out cross-entropy, perplexity and bits per byte, and per-token log-probabilities.

Every number here comes from one function, ``token_logprobs``: the log-probability of each token
of a sequence given the tokens before it. A sequence longer than the model's context is cut
into windows; each window starts a fresh context at position 0 and scores only targets that no
earlier window scored, so every token after the first is scored exactly once (the first has no
prefix to be predicted from).

- Non-overlapping windows (the default, ``stride = seq_len``) are the cheapest: each token is
  seen once, but tokens early in a window have little context, which overstates the loss.
- A sliding ``stride < seq_len`` re-reads ``seq_len - stride`` tokens of context in every window
  and scores only the last ``stride`` targets, so (after the first window) every token is
  predicted from at least ``seq_len - stride`` tokens: a fairer estimate, at seq_len/stride
  times the cost.

Bits per byte. Perplexity is per token, so it depends on the tokenizer: a tokenizer with longer
tokens makes fewer, harder predictions for the same text. The total NLL of a text, however, is
-ln p(text) under the model (the chain rule over its tokens), whatever the segmentation; divided
by ln 2 and by the text's length in UTF-8 bytes it gives bits per byte, which compares models
with different tokenizers, and an n-gram model, on the same text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from kilnlm.train import autocast, eval_mode

# --------------------------------------------------------------------------------------------
# Result


@dataclass(frozen=True)
class EvalResult:
    """How well a model predicts a held-out token sequence."""

    tokens: int
    """Tokens scored (the sequence's length minus the first token, which has no prefix)."""
    mean_nll: float
    """Cross-entropy in nats per scored token."""
    perplexity: float
    """exp(mean_nll): the effective number of equally likely choices per token."""
    bits_per_byte: float
    """Total NLL / ln 2 / UTF-8 bytes of the text: tokenizer-independent."""

    @classmethod
    def from_total_nll(cls, total_nll: float, tokens: int, n_bytes: int) -> EvalResult:
        if tokens < 1:
            raise ValueError("no tokens were scored; evaluate a sequence of at least 2 tokens")
        if n_bytes < 1:
            raise ValueError(
                f"n_bytes must be >= 1 (UTF-8 bytes of the evaluated text), got {n_bytes}"
            )
        mean = total_nll / tokens
        return cls(
            tokens=tokens,
            mean_nll=mean,
            perplexity=math.exp(mean),
            bits_per_byte=total_nll / math.log(2) / n_bytes,
        )


# --------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    """Inputs ids[begin:end] predict targets ids[begin+1:end+1]; targets from index ``score_from``
    on are scored (earlier ones were scored by a previous window and only serve as context)."""

    begin: int
    end: int
    score_from: int


def windows(n_tokens: int, seq_len: int, stride: int | None = None) -> list[Window]:
    """Cover targets 1..n_tokens-1 exactly once with windows of at most seq_len inputs."""
    stride = seq_len if stride is None else stride
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    out: list[Window] = []
    last = 0  # index of the last target scored so far
    begin = 0
    while last < n_tokens - 1:
        end = min(begin + seq_len, n_tokens - 1)
        out.append(Window(begin, end, last + 1))
        last = end
        begin += stride
    return out


# --------------------------------------------------------------------------------------------
# Scoring


def as_ids(ids: Tensor | np.ndarray | Sequence[int]) -> Tensor:
    """A 1-D int64 CPU tensor from a tensor, numpy array or list of token ids."""
    t = torch.as_tensor(np.asarray(ids) if not isinstance(ids, Tensor) else ids)
    if t.dim() != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError("token ids must be integers")
    return t.long().cpu()


def context_length(model: nn.Module, seq_len: int | None) -> int:
    block = getattr(getattr(model, "config", None), "block_size", None)
    if seq_len is None:
        if block is None:
            raise ValueError("pass seq_len: the model has no config.block_size to default to")
        return block
    if block is not None and seq_len > block:
        raise ValueError(f"seq_len {seq_len} is longer than the model's context ({block})")
    return seq_len


@torch.no_grad()
def token_logprobs(
    model: nn.Module,
    ids: Tensor | np.ndarray | Sequence[int],
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """ln p(ids[t] | ids[:t]) for t = 1..N-1: a float32 CPU tensor of N-1 values.

    Element i belongs to token i+1; the first token has no prefix and so no log-probability.
    Sequences longer than ``seq_len`` (default: the model's block_size) are windowed as the
    module docstring describes. The model's train/eval mode is kept.
    """
    ids = as_ids(ids)
    n = len(ids)
    if n < 2:
        raise ValueError(f"need at least 2 tokens to score (one to predict from), got {n}")
    L = context_length(model, seq_len)
    wins = windows(n, L, stride)
    out = torch.empty(n - 1, dtype=torch.float32)
    with eval_mode(model):
        for i in range(0, len(wins), batch_size):
            score_windows(model, ids, wins[i : i + batch_size], L, out, autocast_dtype)
    return out


def score_windows(
    model: nn.Module,
    ids: Tensor,
    wins: list[Window],
    L: int,
    out: Tensor,
    autocast_dtype: torch.dtype | None,
) -> None:
    """Run one batch of windows and write the scored targets' log-probs into ``out``."""
    device = next(model.parameters()).device
    # Windows are right-padded to the longest; a causal model's earlier positions never see it.
    T = max(w.end - w.begin for w in wins)
    x = torch.zeros(len(wins), T, dtype=torch.long)  # (B, T)
    for row, w in enumerate(wins):
        x[row, : w.end - w.begin] = ids[w.begin : w.end]
    x = x.to(device)
    with autocast(device, autocast_dtype):
        logits = model(x)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    for row, w in enumerate(wins):
        first = w.score_from - 1 - w.begin  # position whose output predicts target score_from
        targets = ids[w.score_from : w.end + 1].to(device)  # (k,)
        rows = logp[row, first : w.end - w.begin]  # (k, V)
        picked = rows.gather(-1, targets[:, None]).squeeze(-1)  # (k,)
        out[w.score_from - 1 : w.end] = picked.cpu()


def evaluate(
    model: nn.Module,
    ids: Tensor | np.ndarray | Sequence[int],
    n_bytes: int,
    seq_len: int | None = None,
    batch_size: int = 8,
    stride: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Cross-entropy, perplexity and bits per byte of ``model`` on held-out token ids.

    ``n_bytes`` is the UTF-8 length of the text the ids encode. The first token is not scored
    (nothing precedes it), so its bytes slightly dilute bits per byte; over a held-out set of
    thousands of tokens that is negligible, and prepending a BOS token removes it.
    """
    lp = token_logprobs(model, ids, seq_len, stride, batch_size, autocast_dtype)
    total = -float(lp.double().sum())
    return EvalResult.from_total_nll(total, tokens=len(lp), n_bytes=n_bytes)


def perplexity(
    model: nn.Module, ids: Tensor | np.ndarray | Sequence[int], stride: int | None = None
) -> float:
    """exp(mean NLL per token) of ``ids`` (a 1-D list, array or tensor, at least 2 tokens)."""
    lp = token_logprobs(model, ids, stride=stride)
    return math.exp(-float(lp.double().mean()))


__all__ = ["EvalResult", "Window", "evaluate", "perplexity", "token_logprobs", "windows"]
