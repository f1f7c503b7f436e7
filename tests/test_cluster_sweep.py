"""``kiln sweep``: budgets trained as parallel Ray tasks, a power-law fit, a plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kilnlm.cluster.sweep import SweepConfig, format_sweep, model_for_budget, run_sweep
from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.model import num_params
from kilnlm.scaling import compute_optimal


def test_bigger_budgets_get_bigger_models_near_the_target_size() -> None:
    sizes = [
        num_params(model_for_budget(c, 20.0, vocab_size=512, block_size=64)) for c in (1e13, 1e15)
    ]
    assert sizes[0] < sizes[1]
    target = compute_optimal(1e15).params  # tokens_per_param 20 = Chinchilla's plan
    assert abs(math.log(sizes[1] / target)) < math.log(1.5)


def test_sweep_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="budgets"):
        SweepConfig(budgets=[1e12])
    with pytest.raises(ValueError, match="tokens_per_param"):
        SweepConfig(tokens_per_param=0)


@pytest.mark.ray
def test_sweep_fits_a_falling_power_law_and_plots_it(ray_cluster, tmp_path: Path) -> None:
    data = tmp_path / "corpus"
    build_corpus(CorpusConfig(max_bytes=300_000), data, vocab_size=512, progress=False)
    cfg = SweepConfig(
        budgets=[1.2e10, 2.4e10],
        tokens_per_param=0.5,
        batch_size=8,
        seq_len=64,
        eval_batches=2,
        cpus_per_run=1,
        out_dir=str(tmp_path / "sweep"),
    )
    result = run_sweep(cfg, str(data))
    flops = [p.flops for p in result.points]
    assert flops == sorted(flops) and flops[1] == pytest.approx(2 * flops[0], rel=0.05)
    for p, budget in zip(result.points, cfg.budgets, strict=True):
        assert p.flops == pytest.approx(budget, rel=0.05)  # whole steps round D a little
        assert p.flops == 6 * p.params * p.tokens
    assert result.points[1].heldout_loss < result.points[0].heldout_loss
    assert result.alpha > 0  # more compute, lower loss
    assert result.png_path is not None and result.png_path.read_bytes()[:4] == b"\x89PNG"
    assert result.csv_path is not None and len(result.csv_path.read_text().splitlines()) == 3
    table = format_sweep(result)
    assert f"alpha = {result.alpha:.4f}" in table and "plan N" in table
