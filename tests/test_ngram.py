"""The n-gram baseline: equals a by-hand Kneser-Ney, sums to one, memorises, never gives zero."""

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kilnlm.eval import EvalResult
from kilnlm.ngram import NGramModel, best_baseline


def reference_kneser_ney(train: list[int], order: int, V: int, discounts: list[float]):
    """Interpolated Kneser-Ney straight from the formula, with dicts of tuples (slow, obvious)."""
    grams = {
        k: Counter(tuple(train[i : i + k]) for i in range(len(train) - k + 1))
        for k in range(1, order + 1)
    }

    def count(k: int, gram: tuple[int, ...]) -> int:
        if k == order:
            return grams[k][gram]
        left = {g[0] for g in grams[k + 1] if g[1:] == gram}  # distinct left neighbours ...
        return len(left) + (tuple(train[:k]) == gram)  # ... and the start of the sequence

    def prob(context: tuple[int, ...], w: int) -> float:
        p = 1.0 / V
        for k in range(1, order + 1):
            if k - 1 > len(context):
                break
            h = context[len(context) - (k - 1) :]
            counts = {v: count(k, (*h, v)) for v in range(V)}
            total = sum(counts.values())
            if total == 0:
                continue  # unseen context: all weight on the lower order
            types = sum(c > 0 for c in counts.values())
            d = discounts[k - 1]
            p = max(counts[w] - d, 0) / total + d * types / total * p
        return p

    return prob, count


def stdlib_bytes(name: str) -> np.ndarray:
    """Real text every machine with Python has: a standard-library source file, as byte ids."""
    return np.frombuffer((Path(json.__file__).parent / name).read_bytes(), dtype=np.uint8).astype(
        np.int64
    )


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_reference_kneser_ney_and_sums_to_one(order):
    V = 5  # token 4 never occurs in training
    train = np.random.default_rng(order).integers(0, 4, 120).tolist()
    model = NGramModel(order, V).fit(train)
    prob, _ = reference_kneser_ney(train, order, V, model.discounts)
    for length in range(order):
        for context in itertools.product(range(V), repeat=length):
            p = model.next_token_probs(context)
            assert p.sum() == pytest.approx(1.0, abs=1e-12), context
            assert np.all(p > 0), context  # including the never-seen token
            expected = [prob(context, w) for w in range(V)]
            np.testing.assert_allclose(p, expected, rtol=1e-12, atol=0)


def test_discounts_are_neys_estimate_clamped():
    train = np.random.default_rng(0).integers(0, 6, 300).tolist()
    model = NGramModel(3, 6).fit(train)
    _, count = reference_kneser_ney(train, 3, 6, [0, 0, 0])
    for k in (1, 2, 3):
        keys = {g for i in range(len(train) - k + 1) for g in [tuple(train[i : i + k])]}
        cs = [count(k, g) for g in keys]
        n1, n2 = cs.count(1), cs.count(2)
        expected = min(max(n1 / (n1 + 2 * n2), 0.1), 0.9) if n1 + 2 * n2 else 0.5
        assert model.discounts[k - 1] == pytest.approx(expected), k


def test_vectorised_logprobs_equal_one_at_a_time():
    rng = np.random.default_rng(1)
    model = NGramModel(3, 7).fit(rng.integers(0, 7, 500))
    held = rng.integers(0, 7, 60)
    lp = model.token_logprobs(held)
    assert lp.shape == (59,)
    one_by_one = [model.logprob(held[:t], int(held[t])) for t in range(1, 60)]
    np.testing.assert_allclose(lp, one_by_one, rtol=1e-12)


def test_no_discount_is_maximum_likelihood():
    train = stdlib_bytes("decoder.py")
    model = NGramModel(3, 256, discount=0.0).fit(train)
    tri = Counter(zip(train[:-2], train[1:-1], train[2:], strict=True))
    bi = Counter()  # how often each context is followed by something
    for (a, b, _), n in tri.items():
        bi[a, b] += n
    for (a, b, c), n in list(tri.items())[:200]:
        assert model.logprob([a, b], c) == pytest.approx(math.log(n / bi[a, b]), rel=1e-12)


def test_high_order_memorises_its_training_text():
    train, held = stdlib_bytes("decoder.py"), stdlib_bytes("encoder.py")
    train_ppl = [
        NGramModel(n, 256, discount=0.0).fit(train).evaluate(train, len(train)).perplexity
        for n in (2, 6, 24)
    ]
    assert train_ppl[0] > train_ppl[1] > train_ppl[2]  # longer contexts pin the next byte down
    assert train_ppl[2] < 1.05  # order 24 has all but memorised 12 KB of source
    kn = NGramModel(24, 256).fit(train)
    assert kn.evaluate(train, n_bytes=len(train)).perplexity < 1.1
    held_out = kn.evaluate(held, n_bytes=len(held))
    assert 1.5 < held_out.perplexity < 256  # worse than on training text, better than uniform
    assert math.isfinite(held_out.mean_nll)  # smoothing leaves no zero probability


def test_smoothing_helps_held_out_text_and_bits_per_byte_is_consistent():
    train, held = stdlib_bytes("decoder.py"), stdlib_bytes("encoder.py")
    results = [NGramModel(n, 256).fit(train).evaluate(held, n_bytes=len(held)) for n in (1, 3)]
    assert isinstance(results[0], EvalResult)
    assert results[1].mean_nll < results[0].mean_nll < math.log(256)
    r = results[1]
    assert r.tokens == len(held) - 1
    assert r.bits_per_byte == pytest.approx(r.mean_nll * r.tokens / math.log(2) / len(held))


def test_best_baseline_keeps_the_order_that_scores_best_on_held_out_text():
    train, held = stdlib_bytes("decoder.py"), stdlib_bytes("encoder.py")
    baseline = best_baseline(train, held, len(held), 256, orders=(4, 1, 2))
    assert list(baseline.by_order) == [1, 2, 4]
    for k, r in baseline.by_order.items():  # each order is the plain model's own result
        assert r == NGramModel(k, 256).fit(train).evaluate(held, len(held))
    best = min(baseline.by_order.values(), key=lambda r: r.perplexity)
    assert baseline.result == best and baseline.by_order[baseline.order] == best
    assert baseline.order != 1  # bytes of source code: a unigram is never the best
    assert baseline.name == f"{baseline.order}-gram Kneser-Ney"
    with pytest.raises(ValueError, match="orders"):
        best_baseline(train, held, len(held), 256, orders=())


def test_bad_input_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="order"):
        NGramModel(0, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        NGramModel(2, 10).fit([1, 2, 10])
    with pytest.raises(RuntimeError, match="fit"):
        NGramModel(2, 10).token_logprobs([1, 2])
    with pytest.raises(ValueError, match="2 token"):
        NGramModel(2, 10).fit([1, 2, 3]).evaluate([1], n_bytes=1)
