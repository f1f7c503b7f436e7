"""FSDP2 applied from outside the model (torchtitan's ``parallelize_*`` pattern).

``kilnlm.model.Transformer`` knows nothing of sharding; this module wraps it. Every block becomes
its own FSDP unit, so only one block's full parameters exist at a time during forward and
backward (all-gather before, free after); the root unit then holds what is left (embedding,
final norm, output projection). Parameters become DTensors sharded on dim 0 across the mesh: with
W ranks each holds about 1/W of every matrix and of the optimizer state that mirrors it.

One function serves CPU and GPU: on CUDA the parameters are all-gathered in bf16 and gradients
reduced in fp32 (``MixedPrecisionPolicy``), on CPU everything stays fp32 and gloo carries it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from kilnlm.model import Transformer


def build_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D data-parallel mesh over every rank of the (already initialised) process group."""
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def mixed_precision(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """Compute in ``param_dtype`` (None: the parameters' own, fp32), reduce gradients in fp32.

    Reducing in fp32 keeps small gradient contributions from W ranks from rounding away; the
    sharded master parameters and the optimizer stay fp32 in both cases.
    """
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def parallelize(
    model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype | None = None
) -> Transformer:
    """Shard ``model`` in place with FSDP2: each block, then the root. Returns the same module.

    The last block keeps its parameters gathered after forward (``reshard_after_forward=False``):
    backward starts with it, so freeing and re-gathering them would be pure waste.
    """
    policy = mixed_precision(param_dtype)
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def local_fraction(param: nn.Parameter) -> float:
    """Share of a (possibly DTensor) parameter's elements that live on this rank."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() / param.numel()


__all__ = ["build_mesh", "local_fraction", "mixed_precision", "parallelize"]
