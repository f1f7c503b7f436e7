"""Compute-optimal sizing and power-law fits: Chinchilla's own numbers, exact recovery, clear errors."""

import math

import numpy as np
import pytest

from kilnlm.model import Transformer, num_params
from kilnlm.scaling import compute_optimal, fit_power_law, format_plan, predict_loss, suggest_config


def test_compute_optimal_worked_values():
    plan = compute_optimal(120e12)  # 6·N·20N = 120·N² → N = 1e6
    assert (plan.params, plan.tokens) == (1_000_000, 20_000_000)
    assert 6 * plan.params * plan.tokens == pytest.approx(plan.flops)
    # Chinchilla itself: 5.76e23 FLOPs → ~70B parameters on ~1.4T tokens.
    chinchilla = compute_optimal(5.76e23)
    assert chinchilla.params == pytest.approx(69.3e9, rel=0.01)
    assert chinchilla.tokens == pytest.approx(1.39e12, rel=0.01)
    assert chinchilla.tokens_per_param == pytest.approx(20, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_compute_optimal_rejects_bad_budgets(bad):
    with pytest.raises(ValueError, match="flops"):
        compute_optimal(bad)


@pytest.mark.parametrize("flops", [1e16, 1e17, 1e18, 1e20, 1e22])
def test_suggested_shape_is_near_the_optimal_size(flops):
    cfg = suggest_config(flops, vocab_size=32000)
    target = compute_optimal(flops).params
    assert abs(num_params(cfg) / target - 1) <= 0.1
    assert cfg.head_dim == 64 and cfg.n_embd % 64 == 0
    assert 20 <= cfg.n_embd / cfg.n_layer <= 200  # Kaplan's flat region


def test_suggested_shapes_grow_with_compute_and_count_like_the_model():
    sizes = [num_params(suggest_config(f, vocab_size=8192)) for f in (1e16, 1e17, 1e18, 1e19)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    cfg = suggest_config(1e16, vocab_size=8192, block_size=256)
    assert Transformer(cfg).num_params() == num_params(cfg)
    assert cfg.block_size == 256


def test_too_small_a_budget_says_what_to_do():
    with pytest.raises(ValueError, match="raise --flops"):
        suggest_config(1e10, vocab_size=32000)


def test_power_law_fit_recovers_exact_parameters():
    a, alpha = 40.0, 0.05
    compute = np.logspace(15, 21, 7)
    a_hat, alpha_hat = fit_power_law(compute, [predict_loss(c, a, alpha) for c in compute])
    assert a_hat == pytest.approx(a, rel=1e-9)
    assert alpha_hat == pytest.approx(alpha, rel=1e-9)
    # two points determine the line exactly
    assert fit_power_law([1.0, 100.0], [4.0, 1.0]) == pytest.approx(
        (4.0, math.log(4) / math.log(100))
    )


@pytest.mark.parametrize(
    "compute,loss,match",
    [
        ([1e18], [3.0], "at least 2"),
        ([1e18, 1e19], [3.0], "equally long"),
        ([1e18, 0.0], [3.0, 2.0], "positive"),
        ([1e18, 1e19], [3.0, -2.0], "positive"),
        ([1e18, 1e18], [3.0, 2.0], "same compute"),
    ],
)
def test_power_law_fit_rejects_bad_points(compute, loss, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(compute, loss)


def test_format_plan_prints_the_numbers():
    plan = compute_optimal(1e18)
    text = format_plan(plan)
    assert "1e+18" in text and "91.3M" in text and "1.83B" in text and "20 per param" in text
    cfg = suggest_config(1e18, vocab_size=8192)
    text = format_plan(plan, cfg)
    assert f"n_layer={cfg.n_layer}" in text and f"n_embd={cfg.n_embd}" in text
    assert f"{num_params(cfg):,}" in text
