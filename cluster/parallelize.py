"""The model built and sharded from outside (torchtitan's ``parallelize_*`` pattern).

``kilnlm.model.Transformer`` knows nothing of sharding; this module builds it for one rank:

1. **meta init** (``TrainConfig.meta_init``): the model is built on the meta device (shapes, no
   memory), so no rank ever holds the whole fp32 model;
2. **per-block levers**: activation checkpointing and ``torch.compile`` on every block;
3. **FSDP2**: every block becomes its own ``fully_shard`` unit, so only one block's full
   parameters exist at a time during forward and backward (all-gather before, free after), and
   the root unit holds the rest (embedding, final norm, output projection). Parameters become
   DTensors sharded on dim 0: with W ranks each holds about 1/W of every matrix and of the
   optimizer state that mirrors it. ``MixedPrecisionPolicy`` computes in bf16 on GPUs (fp32 on
   CPU) and reduces gradients in ``reduce_dtype``; ``CPUOffloadPolicy`` keeps the shards and the
   optimizer step in host memory;
4. **materialise**: ``to_empty`` allocates only this rank's shards, then every parameter is drawn
   whole from the seed's generator, in the model's own order, and the rank keeps its slice; so
   the values are exactly those of ``Transformer.reset_parameters(generator)`` on an unsharded
   model (at most one full parameter exists at a time), and the derived buffers (RoPE
   frequencies) are recomputed.

One function serves CPU (fp32, gloo) and GPU (bf16, NCCL); what runs is chosen from the device
and the config at run time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Replicate, Shard

from kilnlm.model import ModelConfig, Transformer
from kilnlm.train import TrainConfig, autocast_dtype_for

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(
    model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, world_size: int
) -> Transformer:
    """This rank's model: built (on meta or whole), levers applied, sharded, initialised from
    ``cfg.seed``. With one rank and no CPU offload nothing is sharded: FSDP would only add copies
    (about 30% of a CPU step for tiny-3m), and DCP checkpoints reshard between the two anyway."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.meta_init:
        with torch.device("meta"):
            model = Transformer(model_cfg, init_weights=False)
    else:
        model = Transformer(model_cfg, init_weights=False)
        model.reset_parameters(generator)
        model.to(device)
    apply_block_levers(model, cfg)
    if world_size > 1 or cfg.cpu_offload:
        param_dtype = autocast_dtype_for(cfg, device)
        parallelize(
            model,
            build_mesh(device, world_size),
            param_dtype,
            DTYPES[cfg.reduce_dtype] if param_dtype is not None else None,
            cfg.cpu_offload,
        )
    if cfg.meta_init:
        materialize(model, torch.device("cpu") if cfg.cpu_offload else device, generator, device)
    return model


def build_mesh(device: torch.device, world_size: int) -> DeviceMesh:
    """A 1-D data-parallel mesh over every rank of the (already initialised) process group."""
    return init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp",))


def mixed_precision(
    param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None = torch.float32
) -> MixedPrecisionPolicy:
    """Compute in ``param_dtype`` (None: the parameters' own, fp32), reduce in ``reduce_dtype``.

    Reducing in fp32 keeps small gradient contributions from W ranks from rounding away; the
    sharded master parameters and the optimizer stay fp32 in every case.
    """
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def apply_block_levers(model: Transformer, cfg: TrainConfig) -> None:
    """Activation checkpointing and torch.compile on every block, before sharding.

    Both keep the parameter names that checkpoints and exports use: checkpointing is the
    composable API (hooks, no wrapper module) and compile replaces only the block's ``forward``,
    so FSDP's and checkpointing's hooks stay outside the compiled graph.
    """
    for block in model.blocks:
        if cfg.activation_checkpointing:
            checkpoint(block)
        if cfg.compile:
            block.forward = torch.compile(block.forward)


def parallelize(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    cpu_offload: bool = False,
) -> Transformer:
    """Shard ``model`` in place with FSDP2: each block, then the root. Returns the same module.

    The last block keeps its parameters gathered after forward (``reshard_after_forward=False``):
    backward starts with it, so freeing and re-gathering them would be pure waste.
    """
    policy = mixed_precision(param_dtype, reduce_dtype)
    # Pinned host memory needs CUDA; on a CPU-only machine the shards are host memory already.
    offload = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    )
    blocks = list(model.blocks)
    for i, block in enumerate(blocks):
        last = i == len(blocks) - 1
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            offload_policy=offload,
            reshard_after_forward=not last,
        )
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    return model


def materialize(
    model: Transformer,
    device: torch.device,
    generator: torch.Generator,
    buffer_device: torch.device | None = None,
) -> None:
    """Allocate a meta-built model's parameters (only this rank's shards) on ``device`` and
    give them their initial values; buffers go to ``buffer_device`` (the compute device)."""
    model.to_empty(device=device)
    init_shards(model, generator)
    model.reset_buffers(buffer_device or device)


@torch.no_grad()
def init_shards(model: Transformer, generator: torch.Generator) -> None:
    """Draw each parameter whole on the CPU, in ``named_parameters`` order, and keep this rank's
    slice: exactly ``model.reset_parameters(generator)`` of an unsharded model. Every rank draws
    every parameter (the generator must advance the same everywhere), into one scratch buffer
    the size of the largest: host memory holds the shards plus that one full parameter."""
    params = list(model.named_parameters())
    scratch = torch.empty(max(p.numel() for _, p in params))
    for name, p in params:
        full = scratch[: p.numel()].view(p.shape)
        model.init_parameter(name, full, generator)
        local = p.to_local() if isinstance(p, DTensor) else p
        local.copy_(own_slice(full, p) if isinstance(p, DTensor) else full)


def own_slice(full: Tensor, p: DTensor) -> Tensor:
    """This rank's part of ``full`` under ``p``'s placements, as a view: DTensor's Shard(d) is
    ``torch.chunk`` along d (trailing ranks may get less, or nothing); Replicate keeps it all."""
    coordinate = p.device_mesh.get_coordinate()
    assert coordinate is not None, "this rank is not in the parameter's mesh"
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            chunks = full.chunk(p.device_mesh.size(mesh_dim), dim=placement.dim)
            index = coordinate[mesh_dim]
            full = chunks[index] if index < len(chunks) else full.narrow(placement.dim, 0, 0)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"cannot initialise a parameter placed as {placement}")
    return full


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 manages ``model`` (then its MixedPrecisionPolicy, not autocast, casts)."""
    return isinstance(model, FSDPModule)


def local_fraction(param: nn.Parameter) -> float:
    """Share of a (possibly DTensor) parameter's elements that live on this rank."""
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.numel() / param.numel()


__all__ = [
    "apply_block_levers",
    "build_mesh",
    "build_model",
    "init_shards",
    "is_sharded",
    "local_fraction",
    "materialize",
    "mixed_precision",
    "own_slice",
    "parallelize",
]
