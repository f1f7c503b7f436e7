"""One training step, and the plain in-process loop built on it.

``train_step`` is the unit that ``kilnlm.cluster`` wraps on every Ray Train worker: it knows
nothing of process groups, so the same function trains a plain module on a laptop CPU and an
FSDP2-sharded one on GPUs (gradients may be DTensors; ``clip_grad_norm_`` handles them). The
caller decides device and dtype: batches arrive on the model's device and bf16 autocast is
switched on by passing ``autocast_dtype``.

``train`` is the loop the local main job runs: it pulls micro-batches from a callable, steps,
evaluates now and then, and shows a progress bar.

Objectives. Both causal LM ("clm") and masked LM ("mlm") reduce to the same loss: cross-entropy
of the logits at each position against the target at that position, with ``-100`` where nothing
is to be predicted. They differ only in how a batch is made (clm: targets are the inputs shifted
by one; mlm: some inputs are masked and only those positions carry targets) and in the model
(``causal=False`` for mlm). So the batch maker owns the objective and ``lm_loss`` serves both.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
"""Target value that contributes nothing to the loss (padding, prompt tokens, unmasked mlm slots)."""

Batch = tuple[Tensor, Tensor]
"""(x, y): input ids (B, T) and targets (B, T), targets ``IGNORE_INDEX`` where not scored."""

OBJECTIVES = ("clm", "mlm", "sft", "reward", "dpo", "rl")

# --------------------------------------------------------------------------------------------
# Config


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batch shape, cadence. Sizes are per data-parallel rank."""

    lr: float = 3e-4
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 3e-5
    """Learning rate at the end of the cosine decay (and after it)."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps up to lr."""
    max_steps: int = 1000
    """Optimiser steps in the whole run; the cosine reaches min_lr here."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay, applied to 2-D weights only (see build_optimizer)."""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping (the norm is still reported)."""
    batch_size: int = 16
    """Sequences per micro-batch on one rank."""
    seq_len: int = 256
    """Tokens per sequence (at most the model's block_size)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimiser step; the step sees batch_size·grad_accum_steps sequences."""
    eval_every: int = 100
    """Evaluate the held-out loss every this many steps (and after the last); 0 never."""
    eval_batches: int = 20
    """Held-out micro-batches per evaluation."""
    seed: int = 1337
    objective: Literal["clm", "mlm", "sft", "reward", "dpo", "rl"] = "clm"
    """clm: next-token prediction; mlm: masked-token prediction (needs a causal=False model);
    sft, reward, dpo: post-training objectives (``kilnlm.posttrain``), which bring their own
    batches and loss through an ``Objective``."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on CUDA, fp32 elsewhere. Under FSDP2 (cluster/) this is the
    ``MixedPrecisionPolicy`` param dtype: blocks are all-gathered and computed in it while the
    sharded master weights and the optimizer stay fp32; a single process uses autocast."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """With bf16 parameters, the dtype FSDP2 reduce-scatters gradients in: fp32 keeps small
    contributions from many ranks from rounding away; bf16 halves the traffic."""
    meta_init: bool = True
    """cluster/: build the model on the meta device, shard it, then materialise only this rank's
    shard, drawing each full parameter in turn from ``seed`` and keeping its slice: the same
    values as a whole build, while no rank ever holds more than one full parameter. False
    builds the whole fp32 model on every rank, then shards it."""
    activation_checkpointing: bool = False
    """Keep only each block's input for backward and recompute the block: activations fall
    from n_layer blocks' worth to n_layer inputs plus one block, for about 1/3 more compute."""
    compile: bool = False
    """torch.compile each block (fused kernels; needs a C++ compiler on CPU, Triton on GPU)."""
    cpu_offload: bool = False
    """cluster/: FSDP2 ``CPUOffloadPolicy``: sharded parameters, gradients and the optimizer
    step live in host memory; only the blocks being computed are on the GPU."""
    log_every: int = 10
    """Refresh the progress bar's loss/lr/tok/s every this many steps."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (the caller's job, e.g. cluster/); 0 never."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # TOML and JSON give lists
        checks: list[tuple[str, bool, str]] = [
            ("lr", self.lr > 0, "> 0"),
            ("min_lr", 0 <= self.min_lr <= self.lr, "in [0, lr]"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_steps", self.max_steps >= 1, ">= 1"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            (
                "betas",
                len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                "two in [0, 1)",
            ),
            ("eps", self.eps > 0, "> 0"),
            ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("seq_len", self.seq_len >= 1, ">= 1"),
            ("grad_accum_steps", self.grad_accum_steps >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0 never evaluates)"),
            ("eval_batches", self.eval_batches >= 1, ">= 1"),
            ("objective", self.objective in OBJECTIVES, " or ".join(map(repr, OBJECTIVES))),
            ("precision", self.precision in ("auto", "fp32", "bf16"), "'auto', 'fp32' or 'bf16'"),
            ("reduce_dtype", self.reduce_dtype in ("fp32", "bf16"), "'fp32' or 'bf16'"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("checkpoint_every", self.checkpoint_every >= 0, ">= 0 (0 never saves)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {want}, got {getattr(self, name)!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"TrainConfig.warmup_steps ({self.warmup_steps}) exceeds max_steps "
                f"({self.max_steps}); lower warmup_steps or raise max_steps"
            )

    @property
    def tokens_per_step(self) -> int:
        """Tokens one rank feeds per optimiser step; multiply by the data-parallel world size."""
        return self.batch_size * self.seq_len * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown TrainConfig fields: {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Fields at the top level of the file, or under a ``[train]`` table (beside ``[model]``)."""
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
            import tomli as tomllib
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data["train"] if isinstance(data.get("train"), dict) else data)


def autocast_dtype_for(cfg: TrainConfig, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype ``cfg.precision`` asks for on ``device`` (None: plain fp32)."""
    device_type = torch.device(device).type
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


# --------------------------------------------------------------------------------------------
# Schedule and optimiser


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step ``step`` (0-based): linear warmup, then cosine to min_lr.

    Warmup gives step 0 lr/warmup_steps (not 0, so the first step already learns) and reaches
    the peak at step warmup_steps-1; the cosine then runs from lr at step warmup_steps to min_lr
    at step max_steps, and stays there if training runs on.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = cfg.max_steps - cfg.warmup_steps
    if decay_steps == 0:
        return cfg.min_lr
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2 or more dimensions only (nanoGPT's convention).

    Matrices (linear weights and the token embedding) are decayed; vectors (norm gains, biases)
    are not, since shrinking a norm gain or a bias towards zero regularises nothing useful and
    only fights the normalisation. Tied weights appear once. On CUDA the fused kernel is used
    (one launch for all parameters); elsewhere torch picks its default implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    on_cuda = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        groups,
        lr=lr_at(0, cfg),
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True if on_cuda else None,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------------
# Loss


def lm_loss(
    logits: Tensor, targets: Tensor, loss_mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    """Cross-entropy of logits (B, T, V) against targets (B, T), in nats.

    Positions whose target is IGNORE_INDEX, or where ``loss_mask`` (B, T) is False, do not count;
    "mean" averages over the positions that do, "sum" adds them up (what gradient accumulation
    needs to weight micro-batches by their token counts). Computed in fp32 even under autocast,
    since a bf16 log-softmax over a large vocabulary loses the small probabilities.
    """
    if loss_mask is not None:
        targets = targets.masked_fill(~loss_mask.bool(), IGNORE_INDEX)
    V = logits.size(-1)
    return F.cross_entropy(
        logits.float().reshape(-1, V),  # (B·T, V)
        targets.reshape(-1),  # (B·T,)
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def n_scored(targets: Tensor) -> Tensor:
    """How many targets count towards the loss (a tensor, so no device sync)."""
    return (targets != IGNORE_INDEX).sum()


class Objective(Protocol):
    """What one micro-batch costs: the plug-in point of ``train_step`` for every objective.

    ``count`` is known before any forward (``train_step`` divides each micro-batch's summed
    loss by the whole step's count before ``backward``); ``loss_sum`` runs the forward. A
    micro-batch is a tuple of tensors whose first is the input ids; what the others mean is
    the objective's business (targets, last-token indices, reference log-probs, ...).
    """

    def count(self, batch: tuple[Tensor, ...]) -> Tensor: ...

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor: ...


class TokenLoss:
    """clm, mlm and sft: summed cross-entropy over the targets that are not ``IGNORE_INDEX``."""

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        return n_scored(batch[1])

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        x, y = batch
        return lm_loss(model(x), y, reduction="sum")  # logits (B, T, V)


TOKEN_LOSS = TokenLoss()


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, then back in the mode it was in: an evaluation in
    the middle of training must not leave dropout off, nor one of a frozen model turn it on."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# One step


@dataclass
class StepMetrics:
    """What one optimiser step did."""

    step: int
    loss: float
    """Mean training loss (nats/token) over every scored token of the step's micro-batches."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    tokens: int
    """Input tokens the step processed on this rank (padding included)."""
    seconds: float
    """Wall time of the step (forward, backward, optimiser)."""
    eval_loss: float | None = None
    """Held-out loss, on the steps where the loop evaluated."""

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    cfg: TrainConfig,
    step: int,
    autocast_dtype: torch.dtype | None = None,
    objective: Objective = TOKEN_LOSS,
) -> StepMetrics:
    """One optimiser step over ``cfg.grad_accum_steps`` micro-batches (already on the device).

    Each micro-batch's summed loss is divided by the number of scored items (tokens, or pairs
    for the preference objectives) in the *whole* step before ``backward``, so the accumulated
    gradient is exactly that of the mean loss over one big batch, even when micro-batches score
    different numbers (a plain 1/grad_accum_steps is only right when they all score the same).
    """
    start = time.perf_counter()
    batches = list(batches)
    if len(batches) != cfg.grad_accum_steps:
        raise ValueError(
            f"train_step got {len(batches)} micro-batches but grad_accum_steps is "
            f"{cfg.grad_accum_steps}; pass exactly grad_accum_steps (x, y) pairs"
        )
    lr = lr_at(step, cfg)
    set_lr(optimizer, lr)
    total_scored = sum(objective.count(b) for b in batches).clamp(min=1)
    loss_sum = torch.zeros((), device=batches[0][0].device)
    for batch in batches:
        with autocast(batch[0].device, autocast_dtype):
            micro_sum = objective.loss_sum(model, batch).float()
        (micro_sum / total_scored).backward()
        loss_sum += micro_sum.detach()
    grad_norm = clip_gradients(model, cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = (loss_sum / total_scored).item()  # the one device sync of the step
    return StepMetrics(
        step=step,
        loss=loss,
        grad_norm=grad_norm,
        lr=lr,
        tokens=sum(b[0].numel() for b in batches),
        seconds=time.perf_counter() - start,
    )


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0: don't clip) and return the norm before."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the global norm
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], autocast_dtype: torch.dtype | None = None
) -> float:
    """Mean NLL (nats per scored token) over ``batches``; the model's train/eval mode is kept."""
    total = count = None
    with eval_mode(model):
        for x, y in batches:
            with autocast(x.device, autocast_dtype):
                logits = model(x)  # (B, T, V)
            s, n = lm_loss(logits, y, reduction="sum").double(), n_scored(y)
            total, count = (s, n) if total is None else (total + s, count + n)
    if total is None or int(count) == 0:
        raise ValueError("evaluate_loss got no scored tokens; pass at least one (x, y) batch")
    return float(total / count)


# --------------------------------------------------------------------------------------------
# The in-process loop


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: nn.Module,
    cfg: TrainConfig,
    get_batch: Callable[[int], Batch],
    eval_batches: Sequence[Batch] | None = None,
    progress: bool = True,
    callback: Callable[[StepMetrics], bool | None] | None = None,
    start_step: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
) -> list[StepMetrics]:
    """Train from ``start_step`` to ``cfg.max_steps`` and return every step's metrics.

    ``get_batch(i)`` returns micro-batch number i = step·grad_accum_steps + k, so a run resumed
    at any step sees exactly the data it would have seen; batches are moved to the model's
    device. The first ``cfg.eval_batches`` of ``eval_batches`` are scored every
    ``cfg.eval_every`` steps and after the last. ``callback`` sees each step's metrics (to log,
    save a checkpoint, ...) and stops training by returning True. Seeded with ``cfg.seed``, so
    the same model initialisation and data give the same losses.
    """
    check_objective(model, cfg)
    torch.manual_seed(cfg.seed)
    device = model_device(model)
    amp = autocast_dtype_for(cfg, device)
    optimizer = optimizer or build_optimizer(model, cfg)
    held_out = [to_device(b, device) for b in (eval_batches or [])[: cfg.eval_batches]]
    model.train()
    history: list[StepMetrics] = []
    bar = progress_bar(range(start_step, cfg.max_steps), progress)
    for step in bar:
        micro = range(step * cfg.grad_accum_steps, (step + 1) * cfg.grad_accum_steps)
        batches = [to_device(get_batch(i), device) for i in micro]
        metrics = train_step(model, optimizer, batches, cfg, step, autocast_dtype=amp)
        if held_out and is_eval_step(step, cfg):
            metrics.eval_loss = evaluate_loss(model, held_out, autocast_dtype=amp)
        history.append(metrics)
        if step % cfg.log_every == 0 or metrics.eval_loss is not None:
            show(bar, metrics)
        if callback is not None and callback(metrics):
            break
    return history


def check_objective(model: nn.Module, cfg: TrainConfig) -> None:
    """mlm predicts a token from both sides, which a causal model cannot see."""
    model_cfg = getattr(model, "config", None)
    if cfg.objective == "mlm" and getattr(model_cfg, "causal", False):
        raise ValueError(
            "objective 'mlm' needs a bidirectional model: build it with ModelConfig(causal=False)"
        )


def is_eval_step(step: int, cfg: TrainConfig) -> bool:
    last = step == cfg.max_steps - 1
    return cfg.eval_every > 0 and ((step + 1) % cfg.eval_every == 0 or last)


def to_device(batch: Batch, device: torch.device) -> Batch:
    x, y = batch
    return (
        torch.as_tensor(x).to(device, non_blocking=True),
        torch.as_tensor(y).to(device, non_blocking=True),
    )


def progress_bar(steps: range, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(steps, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def show(bar: Any, m: StepMetrics) -> None:
    postfix = {"loss": f"{m.loss:.3f}", "lr": f"{m.lr:.2e}", "tok/s": f"{m.tokens_per_second:,.0f}"}
    if m.eval_loss is not None:
        postfix["eval"] = f"{m.eval_loss:.3f}"
    bar.set_postfix(postfix, refresh=False)


__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "TOKEN_LOSS",
    "Batch",
    "Objective",
    "StepMetrics",
    "TokenLoss",
    "TrainConfig",
    "autocast_dtype_for",
    "build_optimizer",
    "clip_gradients",
    "evaluate_loss",
    "lm_loss",
    "lr_at",
    "train",
    "train_step",
]
