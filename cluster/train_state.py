"""What a training checkpoint holds besides the tensors: one rank's ``TrainState``.

Why the data position is just the step: ``kilnlm.shards.get_batch`` is a pure function of
(step, rank, seed), so restoring the step restores the sampler, and the learning-rate schedule is
a pure function of the step too (``kilnlm.train.lr_at``). Only the RNG state needs storing; it
is kept as base64 JSON, so nothing here is ever unpickled.
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass
class TrainState:
    """The non-tensor state of one rank after ``step`` optimiser steps."""

    step: int
    """Completed optimiser steps: the next step to run. Also the LR schedule's position."""
    tokens_seen: int
    """Tokens consumed by all ranks so far."""
    data_position: int
    """Next micro-batch index for get_batch (= step · grad_accum_steps)."""
    world_size: int
    grad_accum_steps: int
    seed: int
    resumed_from: int
    """Step the attempt that wrote this checkpoint started from (0 for a fresh run)."""
    heldout_loss: float | None = None
    """Held-out loss of these weights, when it was measured at this step."""
    cpu_rng: str = ""
    """torch's CPU generator state, base64."""
    cuda_rng: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        return cls(**json.loads(text))


def capture_rng(device: torch.device) -> tuple[str, str | None]:
    """(cpu, cuda) generator states as base64 strings."""
    cpu = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
    cuda = None
    if device.type == "cuda":
        cuda = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode()
    return cpu, cuda


def restore_rng(state: TrainState, device: torch.device) -> None:
    if state.cpu_rng:
        torch.set_rng_state(_bytes_tensor(state.cpu_rng))
    if state.cuda_rng and device.type == "cuda":
        torch.cuda.set_rng_state(_bytes_tensor(state.cuda_rng), device)


def _bytes_tensor(b64: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)
