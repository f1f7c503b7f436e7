"""The engine's settings (``EngineConfig``), its dtypes, and ``QueueFull``: what a caller sets
before the engine exists, apart from the engine that runs with them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kilnlm.engine.weights import SwapMode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QueueFull(RuntimeError):
    """Too many requests are waiting; the gateway answers RESOURCE_EXHAUSTED (retry later)."""


@dataclass
class EngineConfig:
    """How the engine batches and how much memory its KV cache reserves."""

    block_size: int = 16
    """Token slots per KV block."""
    kv_budget_mib: float | None = None
    """KV cache size in MiB; overrides kv_budget_fraction."""
    kv_budget_fraction: float | None = None
    """Share of free device memory (of available RAM on CPU) for the KV cache; default 0.5,
    capped at twice what max_num_seqs full-context sequences need."""
    max_num_seqs: int = 64
    """Sequences (beams count one each) running at once."""
    max_num_batched_tokens: int = 512
    """Tokens computed per step (all decodes + prefill chunks): the chunked-prefill budget."""
    max_queue: int = 256
    """Requests waiting to start; one more raises QueueFull."""
    max_tokens_limit: int = 4096
    """The largest max_tokens a request may ask for."""
    swap_mode: SwapMode = "double"
    """Hot-swap: "double" keeps both weight sets on the device; "drain" stages to host memory."""
    dtype: str | None = None
    """"float32", "bfloat16" or "float16"; None keeps the model's dtype."""
    device: str | None = None
    """"cpu", "cuda", "cuda:1", ...; None keeps the model's device."""
    enable_prefix_caching: bool = True
    batch_invariant: bool = True
    """Fixed-shape kernels so a row's numbers do not depend on the batch (invariant.py)."""

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if self.kv_budget_mib is not None and not self.kv_budget_mib > 0:
            raise ValueError(f"kv_budget_mib must be > 0, got {self.kv_budget_mib}")
        f = self.kv_budget_fraction
        if f is not None and not 0 < f <= 1:
            raise ValueError(f"kv_budget_fraction must be in (0, 1], got {f}")
        if self.swap_mode not in ("double", "drain"):
            raise ValueError(f"swap_mode must be 'double' or 'drain', got {self.swap_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, got {self.dtype!r}")


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the KV cache will live: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil  # optional: more accurate (counts reclaimable page cache)

        return int(psutil.virtual_memory().available)
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


__all__ = ["DTYPES", "EngineConfig", "QueueFull", "free_memory_bytes"]
