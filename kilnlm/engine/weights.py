"""Hot-swap, engine side: stage new weights beside the serving ones, flip at a step boundary.

DESIGN.md's two phases. ``prepare`` (phase 1) loads and checks new weights without touching
what is serving, so a failure (a tensor missing or of the wrong shape, named in the error)
leaves the engine exactly as it was. It can run in any thread. The engine then installs the
staged weights and, on commit (phase 2), flips at its next step boundary:

- "double": the new weights sit on the device beside the old ones. From the boundary on, new
  requests start on the new version while running ones finish on the weights they started
  with; a step runs one forward pass per live version (the KV pool is shared: same shapes,
  and prefix-cache hashes are salted with the version so keys never cross versions). The old
  weights are dropped when their last request ends.
- "drain": for when two weight sets do not fit on the device. The new weights wait in host
  memory; new requests (and new readers: scores, evaluations) wait at the boundary until every
  request and reader of the old version has finished, then the weights are copied into the
  serving model in place, with nothing reading them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kilnlm.checkpoint.errors import IncompatibleWeightsError
from kilnlm.model import Transformer

SwapMode = Literal["double", "drain"]


@dataclass
class StagedWeights:
    """New weights, checked and ready: a device model ("double") or a host state dict ("drain")."""

    version: int
    mode: SwapMode
    model: Transformer | None
    state_dict: dict[str, Tensor] | None
    stage_s: float
    """Seconds spent loading and checking."""
    payload: Any = None
    """The caller's companion of these weights (``serving.Snapshot.payload``)."""


@dataclass
class SwapReport:
    """What a swap cost, for the orchestrator and the replica's metrics."""

    mode: SwapMode
    from_version: int
    to_version: int
    stage_s: float
    """Loading and checking the new weights (phase 1)."""
    wait_s: float
    """From commit to the flip: one step boundary in double mode; the drain in drain mode."""
    overlap_s: float | None = None
    """Double mode: how long both weight sets served (until the old version's last request ended)."""


def check_state_dict(serving: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> None:
    """Raise IncompatibleWeightsError (a ValueError) naming the first tensor that is missing,
    unexpected or of another shape: the checkpoint's fault, so the orchestrator rejects it."""
    missing = [name for name in serving if name not in new]
    if missing:
        raise IncompatibleWeightsError(
            missing[0],
            f"stage: tensor {missing[0]!r} is missing from the new weights "
            f"({len(missing)} missing in all); was the checkpoint exported from this model shape?",
        )
    unexpected = [name for name in new if name not in serving]
    if unexpected:
        raise IncompatibleWeightsError(
            unexpected[0],
            f"stage: tensor {unexpected[0]!r} is not in the serving model "
            f"({len(unexpected)} unexpected in all); the checkpoint is for another architecture",
        )
    for name, tensor in serving.items():
        if tuple(new[name].shape) != tuple(tensor.shape):
            raise IncompatibleWeightsError(
                name,
                f"stage: tensor {name!r} has shape {tuple(new[name].shape)}, the serving model "
                f"has {tuple(tensor.shape)}; hot-swap needs the same model shape",
            )
        if not new[name].dtype.is_floating_point:
            raise IncompatibleWeightsError(
                name, f"stage: tensor {name!r} has dtype {new[name].dtype}, expected floating point"
            )


def check_config(serving: Transformer, new: Transformer) -> None:
    """The new model must compute with the same recipe (RoPE, window, ...), not only shapes."""
    old_cfg, new_cfg = serving.config.to_dict(), new.config.to_dict()
    for name, value in old_cfg.items():
        if name == "init_std":  # training-only: does not change what the weights compute
            continue
        if new_cfg.get(name) != value:
            raise IncompatibleWeightsError(
                name,
                f"stage: model config field {name!r} is {new_cfg.get(name)!r}, the serving model "
                f"has {value!r}; hot-swap needs the same architecture",
            )


def prepare(
    serving: Transformer,
    source: Transformer | Mapping[str, Tensor],
    version: int,
    mode: SwapMode,
    payload: Any = None,
) -> StagedWeights:
    """Load and check new weights beside ``serving`` (never modified); raises ValueError."""
    t0 = time.perf_counter()
    if isinstance(source, Transformer):
        check_config(serving, source)
    reference = serving.state_dict()
    new_sd = source.state_dict() if isinstance(source, Transformer) else dict(source)
    check_state_dict(reference, new_sd)
    param = next(serving.parameters())
    if mode == "drain":  # host memory: the device holds only the serving weights
        host = {k: v.detach().to("cpu", reference[k].dtype, copy=True) for k, v in new_sd.items()}
        return StagedWeights(version, mode, None, host, time.perf_counter() - t0, payload)
    if isinstance(source, Transformer):
        model = source.to(device=param.device, dtype=param.dtype)
    else:
        model = copy.deepcopy(serving)
        model.load_state_dict(new_sd)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)  # count the copy in stage_s, not in the first step
    return StagedWeights(version, mode, model, None, time.perf_counter() - t0, payload)


__all__ = [
    "StagedWeights",
    "SwapMode",
    "SwapReport",
    "check_config",
    "check_state_dict",
    "prepare",
]
