"""A Shannon count n-gram model over token ids: the baseline every transformer must beat.

Counting. All n-grams of orders 1..n are counted with numpy, not Python dicts: the k-gram
starting at position i is coded as ``id(its (k-1)-gram prefix) · V + last token``, where the
prefix id is its rank among the distinct (k-1)-grams. Codes stay below (distinct prefixes)·V,
so they fit int64 for any vocabulary, and ``np.unique`` over one int64 array per order does all
the counting (a few million tokens, order 5, in a few seconds). Lookups are binary searches in
the sorted codes, vectorised over a whole held-out sequence.

Smoothing: interpolated Kneser-Ney (Chen & Goodman 1998, with one discount per order)::

    p_k(w | h) = max(c_k(h w) - D_k, 0) / c_k(h •)  +  D_k · N1+(h •) / c_k(h •) · p_{k-1}(w | h')

where h' drops h's oldest token, c_n is the raw count at the top order and, below it, the
*continuation* count (how many distinct tokens precede the k-gram: a word that only ever follows
one context gets little weight on its own; the start of the training sequence counts as one more
left neighbour, as a BOS token would, so the sequence's first k-grams are not lost), N1+(h •) is the number of distinct tokens seen after
h, and p_0 is uniform over the vocabulary. A context never seen (or the model's own start of
sequence) backs off to p_{k-1} entirely. Every level sums to one over the vocabulary, so the
whole distribution does, for any context; with D > 0 every token gets a non-zero probability.

D_k defaults to Ney's estimate n1 / (n1 + 2·n2) from the count-of-counts of order k, clamped to
[0.1, 0.9] so the uniform floor never vanishes. ``discount=0`` turns smoothing off: the model is
then the unsmoothed maximum-likelihood estimate c(h w)/c(h) of the longest seen context, which
memorises its training set (training perplexity near 1 at a high enough order) and gives unseen
events probability zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from kilnlm.eval import EvalResult

MIN_DISCOUNT, MAX_DISCOUNT = 0.1, 0.9


@dataclass
class Level:
    """Statistics of one order k: k-grams keyed by (context id, token), contexts by their id."""

    keys: np.ndarray
    """Sorted codes ``context_id · V + token`` of the distinct k-grams; a k-gram's id is its index."""
    counts: np.ndarray
    """Raw counts (top order) or continuation counts (lower orders), aligned with keys."""
    context_total: np.ndarray
    """Per (k-1)-gram id: the sum of counts over the tokens that follow it, c_k(h •)."""
    context_types: np.ndarray
    """Per (k-1)-gram id: how many distinct tokens follow it with a non-zero count, N1+(h •)."""
    discount: float
    vocab_size: int

    def lookup(self, codes: np.ndarray) -> np.ndarray:
        """Index of each code in keys (the k-gram's id), -1 where the k-gram was never seen."""
        if len(self.keys) == 0:
            return np.full(np.shape(codes), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, codes), len(self.keys) - 1)
        return np.where(self.keys[pos] == codes, pos, -1)

    def count(self, codes: np.ndarray) -> np.ndarray:
        idx = self.lookup(codes)
        if len(self.counts) == 0:
            return np.zeros(np.shape(codes), dtype=np.int64)
        return np.where(idx >= 0, self.counts[np.maximum(idx, 0)], 0)

    def interpolate(self, ctx: np.ndarray, tokens: np.ndarray, lower: np.ndarray) -> np.ndarray:
        """p_k for each (context id, token), given p_{k-1}; unseen contexts (-1) keep p_{k-1}."""
        safe = np.maximum(ctx, 0)
        total = np.where(ctx >= 0, self.context_total[safe], 0).astype(np.float64)
        types = self.context_types[safe].astype(np.float64)
        c = self.count(safe * self.vocab_size + tokens).astype(np.float64)
        seen = total > 0
        denom = np.where(seen, total, 1.0)
        p = np.maximum(c - self.discount, 0.0) / denom + self.discount * types / denom * lower
        return np.where(seen, p, lower)


class NGramModel:
    """Interpolated Kneser-Ney n-gram model over token ids 0..vocab_size-1."""

    def __init__(self, order: int, vocab_size: int, discount: float | None = None):
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if discount is not None and not 0.0 <= discount <= 1.0:
            raise ValueError(f"discount must be in [0, 1] or None (estimate), got {discount}")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.levels: list[Level] = []  # levels[k-1] holds order k

    # ---- fitting ---------------------------------------------------------------------------

    def fit(self, ids: np.ndarray | Sequence[int]) -> NGramModel:
        """Count every n-gram of orders 1..order in ``ids`` (replacing any earlier fit)."""
        ids = self.check_ids(ids, minimum=1)
        V, N = self.vocab_size, len(ids)
        self.levels = []
        prev_ids = np.zeros(N + 1, dtype=np.int64)  # id of the (k-1)-gram at each position
        n_contexts = 1  # distinct (k-1)-grams: one empty 0-gram
        pending = None  # order k-1, waiting for order k to give its continuation counts
        for k in range(1, self.order + 1):
            m = max(N - k + 1, 0)  # k-grams in the sequence
            codes = prev_ids[:m] * V + ids[k - 1 : k - 1 + m]  # (m,)
            keys, first, k_ids, counts = np.unique(
                codes, return_index=True, return_inverse=True, return_counts=True
            )
            if pending is not None:
                # Continuation count of a (k-1)-gram: distinct k-grams ending with it, i.e.
                # distinct tokens seen before it. The k-gram at i ends with the one at i+1.
                p_keys, p_contexts = pending
                cont = np.bincount(prev_ids[first + 1], minlength=len(p_keys))
                if len(p_keys):  # the sequence start is one more left neighbour, as a BOS would be
                    cont[prev_ids[0]] += 1
                self.levels.append(self.make_level(p_keys, cont, p_contexts))
            pending = (keys, n_contexts)
            prev_ids, n_contexts = k_ids.reshape(-1).astype(np.int64), len(keys)
        assert pending is not None
        self.levels.append(self.make_level(pending[0], counts, pending[1]))  # raw counts on top
        return self

    def make_level(self, keys: np.ndarray, counts: np.ndarray, n_contexts: int) -> Level:
        ctx = keys // self.vocab_size
        total = np.bincount(ctx, weights=counts, minlength=n_contexts).astype(np.int64)
        types = np.bincount(ctx[counts > 0], minlength=n_contexts).astype(np.int64)
        return Level(
            keys=keys.astype(np.int64),
            counts=counts.astype(np.int64),
            context_total=total,
            context_types=types,
            discount=self.estimate_discount(counts) if self.discount is None else self.discount,
            vocab_size=self.vocab_size,
        )

    @staticmethod
    def estimate_discount(counts: np.ndarray) -> float:
        """Ney's D = n1 / (n1 + 2·n2), clamped so some mass always reaches the uniform floor."""
        n1, n2 = int(np.sum(counts == 1)), int(np.sum(counts == 2))
        d = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
        return min(max(d, MIN_DISCOUNT), MAX_DISCOUNT)

    @property
    def discounts(self) -> list[float]:
        """The discount in use at each order 1..order."""
        return [lvl.discount for lvl in self.levels]

    # ---- probabilities ---------------------------------------------------------------------

    def next_token_probs(self, context: Sequence[int]) -> np.ndarray:
        """p(w | context) for every token w: a (vocab_size,) float64 array that sums to 1."""
        self.check_fitted()
        context = [int(t) for t in context][-(self.order - 1) :] if self.order > 1 else []
        tokens = np.arange(self.vocab_size, dtype=np.int64)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k, level in enumerate(self.levels, start=1):
            if k - 1 > len(context):
                break
            ctx = self.context_id(context[len(context) - (k - 1) :])
            p = level.interpolate(np.full(self.vocab_size, ctx, dtype=np.int64), tokens, p)
        return p

    def logprob(self, context: Sequence[int], token: int) -> float:
        """ln p(token | context); only the last order-1 tokens of context matter."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"token {token} is outside the vocabulary [0, {self.vocab_size})")
        return math.log(self.next_token_probs(context)[token])

    def context_id(self, context: Sequence[int]) -> int:
        """Id of a (k-1)-gram in the training counts (0 for the empty one), -1 if never seen."""
        ctx = 0
        for j, tok in enumerate(context, start=1):
            ctx = int(self.levels[j - 1].lookup(np.array([ctx * self.vocab_size + tok]))[0])
            if ctx < 0:
                return -1
        return ctx

    def token_logprobs(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """ln p(ids[t] | ids[:t]) for t = 1..N-1, vectorised over the whole sequence."""
        self.check_fitted()
        ids = self.check_ids(ids, minimum=2)
        N, V = len(ids), self.vocab_size
        targets = ids[1:]  # target t sits at index t-1
        t = np.arange(1, N)
        p = np.full(N - 1, 1.0 / V)
        ctx_ids = np.zeros(N + 1, dtype=np.int64)  # id of the j-gram starting at each position
        for k, level in enumerate(self.levels, start=1):
            j = k - 1  # context length at this order
            if j > 0:
                prev = self.levels[j - 1]
                m = N - j + 1
                codes = np.maximum(ctx_ids[:m], 0) * V + ids[j - 1 : j - 1 + m]
                ctx_ids = np.where(ctx_ids[:m] >= 0, prev.lookup(codes), -1)
            start = t - j
            ctx = np.where(start >= 0, ctx_ids[np.maximum(start, 0)], -1)
            p = level.interpolate(ctx, targets, p)
        return np.log(p)

    def evaluate(self, ids: np.ndarray | Sequence[int], n_bytes: int) -> EvalResult:
        """Cross-entropy, perplexity and bits per byte on held-out ids (as kilnlm.eval.evaluate)."""
        lp = self.token_logprobs(ids)
        return EvalResult.from_total_nll(-float(lp.sum()), tokens=len(lp), n_bytes=n_bytes)

    # ---- checks ----------------------------------------------------------------------------

    def check_ids(self, ids: np.ndarray | Sequence[int], minimum: int) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
        if len(arr) < minimum:
            raise ValueError(f"need at least {minimum} token(s), got {len(arr)}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got [{arr.min()}, {arr.max()}]: "
                "raise vocab_size to the tokenizer's"
            )
        return arr

    def check_fitted(self) -> None:
        if not self.levels:
            raise RuntimeError("the n-gram model has no counts yet: call fit(ids) first")


@dataclass(frozen=True)
class Baseline:
    """The strongest count baseline on a held-out set: the best of several orders."""

    order: int
    result: EvalResult
    by_order: dict[int, EvalResult] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.order}-gram Kneser-Ney"


def best_baseline(
    train_ids: np.ndarray | Sequence[int],
    heldout_ids: np.ndarray | Sequence[int],
    n_bytes: int,
    vocab_size: int,
    orders: Iterable[int] = (2, 3, 4, 5),
) -> Baseline:
    """Fit a Kneser-Ney model of each order on ``train_ids``; keep the best on ``heldout_ids``.

    Choosing the order on the held-out set itself flatters the baseline, never the neural model
    it stands beside, so a transformer that beats it beats every order tried.
    """
    orders = sorted(set(orders))
    if not orders:
        raise ValueError("orders must name at least one n-gram order")
    train = np.asarray(train_ids, dtype=np.int64)
    heldout = np.asarray(heldout_ids, dtype=np.int64)
    by_order = {k: NGramModel(k, vocab_size).fit(train).evaluate(heldout, n_bytes) for k in orders}
    best = min(by_order, key=lambda k: by_order[k].perplexity)
    return Baseline(best, by_order[best], by_order)


__all__ = ["Baseline", "NGramModel", "best_baseline"]
