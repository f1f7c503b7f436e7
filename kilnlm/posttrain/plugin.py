"""What the one Ray Train worker asks of a post-training objective, and the parts they share.

``cluster.worker.WorkerLoop`` runs pretraining; given a ``PostTrainPlugin`` in its spec it runs
a post-training objective with the same loop, the same ``train_step``, the same FSDP2 sharding,
checkpoints, resume and exports. The plug-in answers five questions, nothing else:

* ``init_weights(model)``: start from the parent export (after the model is built and sharded);
* ``loss``: the ``kilnlm.train.Objective`` that ``train_step`` calls per micro-batch;
* ``batch(index, rank, world)``: micro-batch ``index`` of ``rank``, a pure function of
  (index, rank, world, seed), so a resumed run sees exactly the data it would have seen;
* ``heldout(model, rank, world, autocast_dtype)``: held-out figures of this rank's share;
* ``manifest_fields()``: what every export's manifest says about where it came from.

Examples are token-id lists held in the plug-in (it is pickled into each worker): post-training
sets are thousands of short examples, not token shards. Batches are **padded**, not packed: each
micro-batch is right-padded to its longest example, rounded up to a multiple of 8 (pad targets
are ``IGNORE_INDEX``), so no example attends to another and the last-token reads of the
preference objectives stay where they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor, nn

from kilnlm.train import Objective

PAD_MULTIPLE = 8


@lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The order of ``n`` examples in ``epoch`` (a fresh shuffle per epoch, from the seed alone)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_rows(n: int, batch_size: int, index: int, rank: int, world: int, seed: int) -> list[int]:
    """Example indices of micro-batch ``index`` on ``rank``: consecutive slots of the epoch stream.

    Slot s of the stream is example ``perm(s // n)[s % n]``; micro-batch i of rank r takes slots
    ``(i·world + r)·B .. +B``, so ranks are disjoint within a step and every epoch is a full pass.
    """
    start = (index * world + rank) * batch_size
    rows = []
    for slot in range(start, start + batch_size):
        epoch, k = divmod(slot, n)
        rows.append(epoch_permutation(n, seed, epoch)[k])
    return rows


def pad_to(length: int) -> int:
    return -(-length // PAD_MULTIPLE) * PAD_MULTIPLE


def right_pad(rows: list[list[int]], value: int, length: int | None = None) -> Tensor:
    """(len(rows), length) int64, each row right-padded with ``value``."""
    length = length or pad_to(max(len(r) for r in rows))
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def rank_share(items: list[Any], rank: int, world: int, cap: int) -> list[Any]:
    """This rank's equal share of at most ``cap·world`` held-out items (every rank gets as many,
    so the mean of the ranks' means is the mean over all)."""
    per_rank = min(len(items) // world, cap)
    return items[rank * per_rank : (rank + 1) * per_rank]


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load a full (unsharded) state dict into ``model``, sharded by FSDP2 or not."""
    sharded = any(hasattr(p, "to_local") for p in model.parameters())
    if not sharded:
        model.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True))


def parent_state_dict(parent: str) -> dict[str, Tensor]:
    """The parent export's weights under our module names (checked against its manifest)."""
    from kilnlm.checkpoint import load

    return {k: v.detach().clone() for k, v in load(parent).state_dict().items()}


@dataclass
class PostTrainPlugin:
    """Shared state of every objective; subclasses add examples, the loss and held-out figures."""

    parent: str
    """The export training starts from (a local folder)."""
    data: str
    """What was trained on: a path, or "embedded stdlib defaults"."""
    batch_size: int
    seed: int
    pad_id: int
    eval_cap: int = 16
    """Held-out examples per rank the worker scores at each evaluation."""
    extra_fields: dict[str, Any] = field(default_factory=dict)

    objective_name = "posttrain"

    @property
    def loss(self) -> Objective:
        raise NotImplementedError

    def n_train(self) -> int:
        raise NotImplementedError

    def prepare_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Change the parent's weights before training (the reward model zeroes its head)."""
        return state_dict

    def init_weights(self, model: nn.Module) -> None:
        load_full_state_dict(model, self.prepare_state_dict(parent_state_dict(self.parent)))

    def rows(self, index: int, rank: int, world: int) -> list[int]:
        return batch_rows(self.n_train(), self.batch_size, index, rank, world, self.seed)

    def manifest_fields(self) -> dict[str, Any]:
        from kilnlm.checkpoint import read_manifest

        parent_fields = read_manifest(self.parent).fields
        return {  # the objective itself is TrainConfig.objective, which the worker writes
            "parent_export": self.parent,
            "parent_version": parent_fields.get("version"),
            "data": self.data,
            **self.extra_fields,
        }


__all__ = [
    "PostTrainPlugin",
    "batch_rows",
    "epoch_permutation",
    "load_full_state_dict",
    "pad_to",
    "rank_share",
    "right_pad",
]
