"""``kiln sweep``: a small scaling-law experiment on Ray.

For each compute budget C the sweep picks a model of about N = sqrt(C / (6·r)) parameters
(r = ``tokens_per_param``; Chinchilla's compute-optimal r is 20) with the library's shape search,
trains it with the library's plain loop for D = C / (6·N) tokens, and records the held-out loss.
The runs are independent Ray tasks, so they train in parallel on whatever CPUs (or GPUs) the
cluster has. A least-squares fit of L(C) = a·C^(−α) over the points (``kilnlm.scaling``) gives
α, drawn with the points on log-log axes; each point is printed beside ``kiln plan``'s
compute-optimal N and D for its budget, so the distance from the optimum is visible.

Laptop budgets (~1e11 FLOPs) buy models of ~1e5 parameters, dominated by their embeddings and
far below the scale of the published fits: α measured here describes this toy regime only.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kilnlm.model import ModelConfig

FLOPS_PER_PARAM_TOKEN = 6


@dataclass
class SweepConfig:
    """The budgets and the fixed recipe every point trains with."""

    budgets: list[float] = field(default_factory=lambda: [3e11, 1e12, 3e12])
    """Training FLOPs of each run (C ≈ 6·N·D)."""
    tokens_per_param: float = 20.0
    """D/N of each run; 20 is compute-optimal (Chinchilla). Lower it to afford bigger models."""
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 2e-3
    eval_batches: int = 8
    seed: int = 0
    cpus_per_run: float = 1.0
    """Logical CPUs per run (Ray task); each run's torch uses one thread."""
    out_dir: str = "runs/sweep"
    """Where sweep.csv and the log-log plot go (and the corpus when none is given)."""

    def __post_init__(self) -> None:
        self.budgets = [float(b) for b in self.budgets]
        if len(self.budgets) < 2 or any(not b > 0 for b in self.budgets):
            raise ValueError(
                f"SweepConfig.budgets needs at least 2 positive FLOP counts, got {self.budgets}"
            )
        positive = (
            "tokens_per_param",
            "batch_size",
            "seq_len",
            "lr",
            "eval_batches",
            "cpus_per_run",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"SweepConfig.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class SweepPoint:
    flops: float
    """Compute actually spent: 6·N·D with D rounded to whole steps."""
    params: int
    tokens: int
    steps: int
    n_layer: int
    n_embd: int
    heldout_loss: float
    seconds: float


@dataclass
class SweepResult:
    points: list[SweepPoint]
    a: float
    alpha: float
    csv_path: Path | None = None
    png_path: Path | None = None


def model_for_budget(
    flops: float, tokens_per_param: float, vocab_size: int, block_size: int
) -> ModelConfig:
    """The shape search of ``kilnlm.scaling`` aimed at N = sqrt(C / (6·tokens_per_param)).

    ``suggest_config`` aims at Chinchilla's N for a budget; asking it for the budget at which our
    target N is Chinchilla-optimal (6·20·N²) reuses its search for any tokens_per_param.
    """
    from kilnlm.scaling import TOKENS_PER_PARAM, suggest_config

    target = math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))
    equivalent = FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM * target**2
    return suggest_config(equivalent, vocab_size=vocab_size, block_size=block_size)


def train_point(flops: float, cfg: SweepConfig, data_dir: str) -> SweepPoint:
    """One run of the sweep (runs inside a Ray task, or anywhere)."""
    import torch

    from kilnlm.model import Transformer, num_params
    from kilnlm.shards import CorpusManifest, TokenShards, get_batch, steps_per_epoch
    from kilnlm.train import TrainConfig, train

    torch.set_num_threads(1)
    vocab = CorpusManifest.load(data_dir).vocab_size
    model_cfg = model_for_budget(flops, cfg.tokens_per_param, vocab, cfg.seq_len)
    n = num_params(model_cfg)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    steps = max(1, round(flops / (FLOPS_PER_PARAM_TOKEN * n) / tokens_per_step))
    train_cfg = TrainConfig(
        lr=cfg.lr,
        min_lr=cfg.lr / 10,
        warmup_steps=max(1, steps // 10),
        max_steps=steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        eval_every=steps,
        eval_batches=cfg.eval_batches,
        seed=cfg.seed,
        log_every=max(1, steps // 10),
    )
    shards, heldout = TokenShards(data_dir, "train"), TokenShards(data_dir, "heldout")
    B, T = cfg.batch_size, cfg.seq_len
    n_eval = min(cfg.eval_batches, steps_per_epoch(len(heldout), B, T))
    held = [get_batch(heldout, B, T, i, seed=cfg.seed) for i in range(n_eval)]
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    start = time.perf_counter()
    history = train(
        model, train_cfg, lambda i: get_batch(shards, B, T, i, seed=cfg.seed), held, progress=False
    )
    loss = history[-1].eval_loss
    if loss is None:
        raise ValueError(f"the held-out split of {data_dir} is too small for one {B}x{T} batch")
    return SweepPoint(
        flops=float(FLOPS_PER_PARAM_TOKEN * n * steps * tokens_per_step),
        params=n,
        tokens=steps * tokens_per_step,
        steps=steps,
        n_layer=model_cfg.n_layer,
        n_embd=model_cfg.n_embd,
        heldout_loss=float(loss),
        seconds=time.perf_counter() - start,
    )


def run_sweep(cfg: SweepConfig, data_dir: str) -> SweepResult:
    """Every budget as a parallel Ray task; then the fit, the table and the plot."""
    import ray

    from kilnlm.scaling import fit_power_law

    task = ray.remote(train_point).options(num_cpus=cfg.cpus_per_run)
    points = ray.get([task.remote(c, cfg, data_dir) for c in cfg.budgets])
    points.sort(key=lambda p: p.flops)
    a, alpha = fit_power_law([p.flops for p in points], [p.heldout_loss for p in points])
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = SweepResult(points, a, alpha)
    result.csv_path = write_points(points, out / "sweep.csv")
    result.png_path = plot_sweep(result, out / "sweep.png")
    return result


def write_points(points: list[SweepPoint], path: Path) -> Path:
    from kilnlm.cluster.metrics import write_csv

    return write_csv([asdict(p) for p in points], path)


def plot_sweep(result: SweepResult, path: Path) -> Path | None:
    """Points and the fitted line on log-log axes; None without matplotlib."""
    from kilnlm.plots import pyplot, save_figure

    if (plt := pyplot()) is None:
        return None
    c = [p.flops for p in result.points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(c, [p.heldout_loss for p in result.points], "o", label="runs (held-out loss)")
    grid = [min(c) * (max(c) / min(c)) ** (i / 50) for i in range(51)]
    ax.loglog(
        grid,
        [result.a * x ** (-result.alpha) for x in grid],
        "-",
        label=f"L = {result.a:.3g}·C^(-{result.alpha:.3f})",
    )
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(plt, fig, path)


def format_sweep(result: SweepResult) -> str:
    """The table ``kiln sweep`` prints: each run beside the compute-optimal plan for its budget."""
    from kilnlm.scaling import compute_optimal, human

    lines = [
        f"{'compute':>9} {'params':>8} {'tokens':>8} {'D/N':>6} {'loss':>7} {'plan N':>8} "
        f"{'plan D':>8} {'N/plan':>7} {'secs':>6}"
    ]
    for p in result.points:
        plan = compute_optimal(p.flops)
        lines.append(
            f"{p.flops:9.3g} {human(p.params):>8} {human(p.tokens):>8} {p.tokens / p.params:6.1f} "
            f"{p.heldout_loss:7.3f} {human(plan.params):>8} {human(plan.tokens):>8} "
            f"{p.params / plan.params:7.2f} {p.seconds:6.1f}"
        )
    lines.append(
        f"fit: L(C) = {result.a:.4g} · C^(-{result.alpha:.4f})   alpha = {result.alpha:.4f}"
    )
    biggest = max(p.flops for p in result.points) * 10
    plan = compute_optimal(biggest)
    lines.append(
        f"at 10x the largest budget ({biggest:.3g} FLOPs) the fit predicts loss "
        f"{result.a * biggest ** (-result.alpha):.3f}; compute-optimal there: "
        f"N={human(plan.params)}, D={human(plan.tokens)}"
    )
    return "\n".join(lines)


def sweep_summary(result: SweepResult) -> dict[str, Any]:
    return {"a": result.a, "alpha": result.alpha, "points": [asdict(p) for p in result.points]}


__all__ = [
    "SweepConfig",
    "SweepPoint",
    "SweepResult",
    "format_sweep",
    "model_for_budget",
    "run_sweep",
    "sweep_summary",
    "train_point",
]
