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
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from kilnlm.model import PRESETS, ModelConfig, num_params
from kilnlm.train import TrainConfig

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
# Memory per rank on GPUs (``kiln plan --gpus``)

GPU_RESERVE = 0.10
"""Share of each GPU the plan leaves free: CUDA context, NCCL buffers, allocator fragmentation."""
LEVERS: dict[str, dict[str, Any]] = {
    "none": {},
    "meta_init": {"meta_init": True},
    "bf16": {"precision": "bf16"},
    "activation_checkpointing": {"activation_checkpointing": True},
    "cpu_offload": {"cpu_offload": True},
    "compile": {"compile": True},
    "all": {
        "meta_init": True,
        "precision": "bf16",
        "activation_checkpointing": True,
        "cpu_offload": True,
        "compile": True,
    },
}
"""The plan's rows: every lever off, each alone, all on (TrainConfig field overrides)."""
NO_LEVERS: dict[str, Any] = {
    "meta_init": False,
    "precision": "fp32",
    "activation_checkpointing": False,
    "cpu_offload": False,
    "compile": False,
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds on its GPU (and on its host) training with FSDP2 and AdamW.

    ``compile`` is not modelled: it fuses kernels (speed); what it saves in activations depends
    on the fusions and is left out, so its row equals the one without it.
    """

    params: float
    """Sharded fp32 master weights (0 with CPU offload)."""
    grads: float
    """Sharded fp32 gradients (0 with CPU offload)."""
    optimizer: float
    """AdamW's two moments, fp32, sharded (0 with CPU offload)."""
    gathered: float
    """Unsharded working set in the compute dtype: the root unit (embedding, output) and two
    blocks (FSDP prefetches the next), the gradients of the root and one block."""
    activations: float
    """Saved for backward at batch_size x seq_len, plus the loss's fp32 log-probabilities and
    their gradient (often the largest term for a small model with a large vocabulary)."""
    init: float
    """On the GPU while building: the whole fp32 model without meta init, else the shard."""
    host: float
    """Host memory: offloaded state, or while building the whole model (meta: shard + one
    full parameter)."""

    @property
    def step(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations

    @property
    def peak(self) -> float:
        return max(self.step, self.init)


def saved_activation_bytes(
    cfg: ModelConfig, tokens: int, dtype_bytes: int, checkpointed: bool = False
) -> float:
    """Bytes autograd keeps for backward over ``tokens`` tokens in a ``dtype_bytes`` compute dtype.

    Per layer and token a block saves 8·C + 2·kv + 4·H values in the compute dtype (norm
    outputs, q/k/v before and after RoPE, attention output, the MLP's four H-wide tensors;
    SDPA keeps no T×T matrix) and its two norms keep their input in fp32; the loss keeps fp32
    log-probabilities (V per token). tests/test_scaling.py measures this with
    ``saved_tensors_hooks``. With checkpointing only each block's input stays, and one block's
    activations exist at a time, while it is recomputed.
    """
    C, V, H = cfg.n_embd, cfg.vocab_size, cfg.intermediate_size
    assert H is not None and cfg.n_kv_head is not None
    kv = cfg.n_kv_head * cfg.head_dim
    layer = dtype_bytes * (8 * C + 2 * kv + 4 * H) + 2 * C * (4 - dtype_bytes)
    blocks = cfg.n_layer * C * dtype_bytes + layer if checkpointed else cfg.n_layer * layer
    return float(tokens * (blocks + 4 * V))


def activation_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int, checkpointed: bool) -> float:
    """The saved activations plus the loss's gradients when backward starts (fp32 and compute
    dtype, V per token each): for a small model and a large vocabulary, often the largest term."""
    loss_grads = tokens * (4 + dtype_bytes) * cfg.vocab_size
    return saved_activation_bytes(cfg, tokens, dtype_bytes, checkpointed) + loss_grads


def memory_per_rank(cfg: ModelConfig, train: TrainConfig, world: int) -> MemoryEstimate:
    """Per-rank memory of training ``cfg`` with ``train``'s batch shape and levers on ``world``
    GPUs (``precision`` auto means bf16 here)."""
    n, L = num_params(cfg), cfg.n_layer
    shard = n / world
    p = 4 if train.precision == "fp32" else 2
    sharded = world > 1 or train.cpu_offload
    block = num_params(replace(cfg, n_layer=2)) - num_params(replace(cfg, n_layer=1))
    root = n - L * block
    if sharded:
        gathered = float((root + 2 * block) * p + (root + block) * p)
    else:  # one plain module: autocast keeps a bf16 copy of every weight it casts
        gathered = float(n * p) if p < 4 else 0.0
    on_gpu = 0.0 if train.cpu_offload else 1.0
    largest = max(cfg.vocab_size * cfg.n_embd, cfg.n_embd * (cfg.intermediate_size or 0))
    build_host = 4.0 * (shard + largest) if train.meta_init else 4.0 * n
    return MemoryEstimate(
        params=4 * shard * on_gpu,
        grads=4 * shard * on_gpu,
        optimizer=8 * shard * on_gpu,
        gathered=gathered,
        activations=activation_bytes(
            cfg, train.batch_size * train.seq_len, p, train.activation_checkpointing
        ),
        init=(4 * shard * on_gpu) if train.meta_init else 4.0 * n,
        host=max(16 * shard * (1 - on_gpu), build_host),
    )


def gpu_budget(gpu_bytes: float) -> float:
    return gpu_bytes * (1 - GPU_RESERVE)


def largest_fitting_preset(train: TrainConfig, world: int, gpu_bytes: float) -> str | None:
    """The preset with the most parameters whose peak fits the budget (the context set to
    ``train.seq_len``, as kiln train does), or None."""
    fitting = [
        (num_params(cfg), name)
        for name, cfg in PRESETS.items()
        if memory_per_rank(replace(cfg, block_size=train.seq_len), train, world).peak
        <= gpu_budget(gpu_bytes)
    ]
    return max(fitting)[1] if fitting else None


def memory_plan(
    cfg: ModelConfig, batch_size: int, seq_len: int, world: int, gpu_bytes: float
) -> list[dict[str, Any]]:
    """One row per entry of LEVERS: the estimate, whether it fits, the largest preset that does."""
    rows = []
    for label, levers in LEVERS.items():
        train = TrainConfig(batch_size=batch_size, seq_len=seq_len, **{**NO_LEVERS, **levers})
        est = memory_per_rank(cfg, train, world)
        rows.append(
            {
                "levers": label,
                **asdict(est),
                "step": est.step,
                "peak": est.peak,
                "fits": est.peak <= gpu_budget(gpu_bytes),
                "largest_preset": largest_fitting_preset(train, world, gpu_bytes),
            }
        )
    return rows


def parse_bytes(text: str) -> float:
    """'80GB', '80GiB', '80G' or '80' -> 80·2^30 bytes; MB, TB alike. Binary, as GPUs are
    labelled: an "80GB" card has 80 GiB (nvidia-smi: 81559 MiB)."""
    units = {"": 2**30, "b": 1}
    for i, prefix in enumerate("kmgt", start=1):
        units |= {prefix: 2 ** (10 * i), prefix + "b": 2 ** (10 * i), prefix + "ib": 2 ** (10 * i)}
    t = text.strip().lower().replace(" ", "")
    number = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ValueError(f"memory size {text!r} not understood; write e.g. 80GB or 80GiB")
    return value * units[unit]


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
    "LEVERS",
    "MemoryEstimate",
    "Plan",
    "activation_bytes",
    "compute_optimal",
    "fit_power_law",
    "format_plan",
    "human",
    "largest_fitting_preset",
    "memory_per_rank",
    "memory_plan",
    "parse_bytes",
    "predict_loss",
    "saved_activation_bytes",
    "suggest_config",
]
