"""Compute-optimal sizing and power-law fits: Chinchilla's own numbers, exact recovery, clear errors."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from kilnlm.model import PRESETS, ModelConfig, Transformer, num_params
from kilnlm.scaling import (
    LEVERS,
    compute_optimal,
    fit_power_law,
    format_plan,
    largest_fitting_preset,
    memory_per_rank,
    memory_plan,
    parse_bytes,
    predict_loss,
    saved_activation_bytes,
    suggest_config,
)
from kilnlm.train import TrainConfig, lm_loss


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


# --------------------------------------------------------------------------------------------
# Memory per rank (kiln plan --gpus)


def measured_saved_bytes(cfg: ModelConfig, tokens: tuple[int, int], dtype: torch.dtype) -> int:
    """What autograd really keeps for backward: every saved tensor's storage, once, parameters
    aside (a model whose parameters are in ``dtype`` is what FSDP2's MixedPrecisionPolicy runs)."""
    model = Transformer(cfg).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, tokens, generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(x), x)
    return sum(seen.values())


@pytest.mark.parametrize("preset", ["test-1m", "small-10m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_activation_estimate_matches_autograd(preset: str, dtype: torch.dtype) -> None:
    cfg = ModelConfig.from_preset(preset, n_layer=3, block_size=128)
    measured = measured_saved_bytes(cfg, (2, 128), dtype)
    estimate = saved_activation_bytes(cfg, 2 * 128, dtype.itemsize)
    assert estimate == pytest.approx(measured, rel=0.1)


def test_memory_per_rank_worked_example() -> None:
    cfg = ModelConfig.from_preset("base-100m")
    n, world = num_params(cfg), 4
    base = TrainConfig(batch_size=2, seq_len=256, precision="fp32", meta_init=False)
    plain = memory_per_rank(cfg, base, world)
    assert (plain.params, plain.grads, plain.optimizer) == (4 * n / 4, 4 * n / 4, 8 * n / 4)
    assert plain.init == 4 * n  # every rank holds the whole fp32 model before sharding
    meta = memory_per_rank(cfg, replace(base, meta_init=True), world)
    assert meta.init == 4 * n / world and meta.step == plain.step
    offload = memory_per_rank(cfg, replace(base, cpu_offload=True, meta_init=True), world)
    assert offload.params == offload.grads == offload.optimizer == offload.init == 0
    assert offload.host == 16 * n / world
    bf16 = memory_per_rank(cfg, replace(base, precision="bf16"), world)
    assert bf16.gathered == plain.gathered / 2 and bf16.activations < plain.activations
    assert bf16.params == plain.params  # the sharded master weights stay fp32
    ac = memory_per_rank(cfg, replace(base, activation_checkpointing=True), world)
    assert ac.activations < plain.activations / 2
    assert memory_per_rank(cfg, replace(base, compile=True), world) == plain  # not modelled


def test_memory_plan_rows_and_the_largest_preset_that_fits() -> None:
    cfg = ModelConfig.from_preset("llama-1b", block_size=2048)
    rows = {r["levers"]: r for r in memory_plan(cfg, 8, 2048, 8, parse_bytes("24GB"))}
    assert list(rows) == list(LEVERS)
    assert not rows["none"]["fits"] and rows["all"]["fits"]
    assert rows["all"]["peak"] < min(r["peak"] for k, r in rows.items() if k != "all")
    assert rows["none"]["largest_preset"] in PRESETS and rows["all"]["largest_preset"] == "llama-1b"
    # More memory never fits a smaller preset.
    train = TrainConfig(batch_size=8, seq_len=1024, precision="fp32", meta_init=False)
    sizes = [
        num_params(PRESETS[name]) if name else 0
        for name in (largest_fitting_preset(train, 2, parse_bytes(f"{g}GB")) for g in (1, 4, 80))
    ]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]


@pytest.mark.parametrize(
    "text,value",
    [("80GB", 80 * 2**30), ("80GiB", 80 * 2**30), ("80", 80 * 2**30), ("512MB", 2**29)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["", "GB", "-1GB", "80XB"])
def test_parse_bytes_says_what_to_write(bad: str) -> None:
    with pytest.raises(ValueError, match="80GB"):
        parse_bytes(bad)


def test_kiln_plan_gpus_prints_the_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    from kilnlm.cli import main

    argv = ["plan", "--gpus", "2", "--gpu-memory", "24GB", "--preset", "base-100m"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "base-100m" in table and all(label in table for label in LEVERS)
    assert main([*argv, "--n-layer", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["preset"] == "base-100m n_layer=4" and summary["seq_len"] == 1024
    assert summary["params"] == num_params(ModelConfig.from_preset("base-100m", n_layer=4))
    assert [r["levers"] for r in summary["rows"]] == list(LEVERS)
    assert main(["plan"]) == 2  # neither --flops nor --gpus: one line saying which to give
