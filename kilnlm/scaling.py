"""Compute-optimal sizing (Chinchilla) and power-law fits of loss against compute.

Training a dense transformer of N parameters on D tokens costs C ≈ 6·N·D FLOPs (2 for the
forward multiply-adds, 4 for the backward). Hoffmann et al. (2022) found that, for a fixed C,
loss is lowest near D ≈ 20·N; together these give N = sqrt(C / 120) and D = 20·N. N here counts
every parameter, embeddings included, as in the Chinchilla paper.

``fit_power_law`` fits L(C) = a·C^(-α) to measured (compute, loss) points: a straight line in
log-log space, ln L = ln a - α·ln C, solved by least squares.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kilnlm.model import ModelConfig, num_params

FLOPS_PER_PARAM_TOKEN = 6
"""Training FLOPs per parameter per token (forward 2 + backward 4)."""
TOKENS_PER_PARAM = 20.0
"""Chinchilla's compute-optimal ratio D/N."""
HEAD_DIM = 64


@dataclass(frozen=True)
class Plan:
    """A compute-optimal split of a FLOP budget into model size and training tokens."""

    flops: float
    params: int
    tokens: int

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def compute_optimal(flops: float, tokens_per_param: float = TOKENS_PER_PARAM) -> Plan:
    """N and D with 6·N·D = flops and D = tokens_per_param·N (Chinchilla: 20)."""
    if not flops > 0 or not math.isfinite(flops):
        raise ValueError(f"flops must be a positive number, got {flops}")
    if not tokens_per_param > 0:
        raise ValueError(f"tokens_per_param must be > 0, got {tokens_per_param}")
    n = math.sqrt(flops / (FLOPS_PER_PARAM_TOKEN * tokens_per_param))
    return Plan(flops=float(flops), params=round(n), tokens=round(tokens_per_param * n))


# --------------------------------------------------------------------------------------------
# A model shape for a budget


def shape(n_layer: int, n_embd: int, vocab_size: int, block_size: int) -> ModelConfig:
    """The house recipe (RMSNorm, SwiGLU, RoPE, untied) at head_dim 64 and full multi-head attention."""
    n_head = n_embd // HEAD_DIM
    return ModelConfig(
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
    )


def bracket_width(
    target: int, n_layer: int, vocab_size: int, block_size: int, max_width: int
) -> list[ModelConfig]:
    """The two widths (multiples of 64) whose models bracket ``target`` params at this depth."""
    lo, hi = 1, max_width  # width index w gives n_embd = 64·w; params grow with w
    while lo < hi:  # smallest w whose model reaches the target
        mid = (lo + hi) // 2
        if num_params(shape(n_layer, HEAD_DIM * mid, vocab_size, block_size)) >= target:
            hi = mid
        else:
            lo = mid + 1
    return [
        shape(n_layer, HEAD_DIM * w, vocab_size, block_size) for w in sorted({max(lo - 1, 1), lo})
    ]


def suggest_config(
    flops: float,
    vocab_size: int,
    block_size: int = 1024,
    aspect_ratio: float = 64.0,
    tolerance: float = 0.1,
    max_layers: int = 128,
) -> ModelConfig:
    """A ModelConfig near the compute-optimal size for ``flops`` (see ``compute_optimal``).

    Heads are 64 wide, so n_embd is a multiple of 64. Among the shapes whose parameter count is
    within ``tolerance`` (relative) of the target, the one whose n_embd / n_layer is closest to
    ``aspect_ratio`` wins: Kaplan et al. (2020) saw loss barely move for ratios from ~20 to ~200,
    and 64 is GPT-2 small's (768/12). With no shape that close, the nearest in size wins.
    """
    target = compute_optimal(flops).params
    smallest = num_params(shape(1, HEAD_DIM, vocab_size, block_size))
    if smallest > 2 * target:
        raise ValueError(
            f"{flops:.3g} FLOPs buys a ~{human(target)}-parameter model, but the smallest shape "
            f"(1 layer, n_embd 64) with vocab_size {vocab_size} has {human(smallest)}: raise "
            f"--flops to at least {FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM * (smallest / 2) ** 2:.2g} "
            "or use a smaller vocabulary"
        )
    candidates = [
        cfg
        for n_layer in range(1, max_layers + 1)
        for cfg in bracket_width(target, n_layer, vocab_size, block_size, max_width=256)
    ]

    def size_error(cfg: ModelConfig) -> float:
        return abs(math.log(num_params(cfg) / target))

    def aspect_error(cfg: ModelConfig) -> float:
        return abs(math.log(cfg.n_embd / cfg.n_layer / aspect_ratio))

    close = [c for c in candidates if size_error(c) <= math.log1p(tolerance)]
    if close:
        return min(close, key=lambda c: (aspect_error(c), size_error(c)))
    return min(candidates, key=lambda c: (size_error(c), aspect_error(c)))


# --------------------------------------------------------------------------------------------
# Power laws


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> tuple[float, float]:
    """(a, α) of L(C) = a·C^(-α), by least squares on ln L = ln a - α·ln C."""
    c, y = np.asarray(compute, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if c.shape != y.shape or c.ndim != 1:
        raise ValueError(f"compute and loss must be 1-D and equally long, got {c.shape}, {y.shape}")
    if len(c) < 2:
        raise ValueError(f"a power law needs at least 2 points, got {len(c)}")
    if not (np.all(c > 0) and np.all(y > 0) and np.all(np.isfinite(c)) and np.all(np.isfinite(y))):
        raise ValueError("compute and loss must all be positive and finite (the fit takes logs)")
    x = np.log(c)
    if np.ptp(x) == 0:
        raise ValueError("every point has the same compute; a power law needs at least two budgets")
    slope, intercept = np.polyfit(x, np.log(y), deg=1)
    return float(math.exp(intercept)), float(-slope)


def predict_loss(compute: float, a: float, alpha: float) -> float:
    """L(C) = a·C^(-α)."""
    return a * compute ** (-alpha)


# --------------------------------------------------------------------------------------------
# Printing


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_plan(plan: Plan, config: ModelConfig | None = None) -> str:
    """What ``kiln plan`` prints: the budget, the split, and optionally a shape for it."""
    lines = [
        f"compute    {plan.flops:.3g} FLOPs",
        f"params     {human(plan.params)} ({plan.params:,})",
        f"tokens     {human(plan.tokens)} ({plan.tokens:,}; {plan.tokens_per_param:.0f} per param)",
    ]
    if config is not None:
        n = num_params(config)
        lines += [
            f"shape      n_layer={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} "
            f"(head_dim {config.head_dim}) intermediate={config.intermediate_size} "
            f"vocab={config.vocab_size} block={config.block_size}",
            f"its params {human(n)} ({n:,}; {n / plan.params - 1:+.1%} from the plan)",
        ]
    return "\n".join(lines)


__all__ = [
    "Plan",
    "compute_optimal",
    "fit_power_law",
    "format_plan",
    "human",
    "predict_loss",
    "suggest_config",
]
