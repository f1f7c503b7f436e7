"""The RL objective as a post-training plug-in: one Ray Train update of the live loop.

``cluster.worker.WorkerLoop`` trains any ``PostTrainPlugin``; this one carries the samples of one
iteration of ``kiln rl`` (prompt ids, completion ids, the sampler's per-token log-probs and
version, the reward) and the loss of ``kilnlm.rl.objective`` (RLOO, the sequence-level KL in the
reward, the truncated importance weight).

**π0's log-probs are computed once per batch by the driver** (``reference_logps``), as DPO's
reference log-probs are: π0 never changes, so a frozen copy on every worker would hold a second
model (and its shards) for one no-grad forward the driver already can do. One float per sample
travels inside the plug-in.

**A group never straddles ranks**: the leave-one-out baseline of a sample is the mean of the
other samples of its prompt, so every rank takes whole groups (group g goes to rank g mod world)
and each micro-batch is all of that rank's groups. The step count is the caller's choice; with
more than one step the later ones reuse the samples under the importance weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from kilnlm.posttrain.plugin import PostTrainPlugin
from kilnlm.rl.buffer import Sample
from kilnlm.rl.objective import (
    RLBatch,
    RLObjective,
    rloo_loss_given_reference,
    sequence_logprob,
)
from kilnlm.rl.toy import allowed_mask
from kilnlm.train import Objective


@torch.no_grad()
def reference_logps(
    reference: nn.Module,
    samples: Sequence[Sample],
    pad_id: int,
    allowed: Sequence[int] | None = None,
) -> list[float]:
    """log π0(completion | prompt) per sample, restricted to ``allowed`` as the sampler was."""
    batch = RLBatch.from_samples(samples, pad_id)
    device = next(reference.parameters()).device
    mask = None if allowed is None else allowed_mask(allowed, reference.config.vocab_size, device)
    was_training = reference.training
    reference.eval()
    try:
        return sequence_logprob(reference, batch, mask).cpu().tolist()
    finally:
        reference.train(was_training)


@dataclass(frozen=True)
class RLLoss:
    """``kilnlm.train.Objective`` for RL: counts samples, sums the per-sample RLOO loss.

    A micro-batch is ``(input_ids, completion_mask, sampler_logprobs, versions, rewards, groups,
    reference_logps)``: the fields of ``RLBatch`` then π0's sequence log-probs.
    """

    objective: RLObjective
    allowed_ids: tuple[int, ...] | None
    policy_version: int | None = None

    def count(self, batch: tuple[Tensor, ...]) -> Tensor:
        return torch.tensor(batch[0].size(0), device=batch[0].device)

    def loss_sum(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        rl_batch = RLBatch(*batch[:6])
        mask = None
        if self.allowed_ids is not None:
            mask = allowed_mask(self.allowed_ids, model.config.vocab_size, batch[0].device)
        loss, _ = rloo_loss_given_reference(
            model, batch[6], rl_batch, self.objective, mask, self.policy_version
        )
        return loss * batch[0].size(0)  # rloo_loss is a mean over the micro-batch


@dataclass
class RLPlugin(PostTrainPlugin):
    """RL as a plug-in of the one worker (see ``kilnlm.posttrain.plugin``)."""

    beta: float = 0.1
    is_cap: float = 2.0
    samples: list[Sample] = field(default_factory=list)
    ref_logps: list[float] = field(default_factory=list)
    """log π0(completion | prompt) of each sample (``reference_logps``)."""
    allowed_ids: tuple[int, ...] | None = None
    """Sampling was restricted to these ids (the toy); the loss restricts both models alike."""
    policy_version: int | None = None
    """The version the trainer starts from (the parent export's): lag = it − sample.version."""

    objective_name = "rl"

    def __post_init__(self) -> None:
        RLObjective(self.beta, self.is_cap)  # validates beta and is_cap
        if not self.samples:
            raise ValueError("RLPlugin needs at least one sample; generate before training")
        if len(self.ref_logps) != len(self.samples):
            raise ValueError(
                f"{len(self.ref_logps)} reference log-probs for {len(self.samples)} samples; "
                "compute them with kilnlm.rl.plugin.reference_logps"
            )

    @property
    def loss(self) -> Objective:
        return RLLoss(RLObjective(self.beta, self.is_cap), self.allowed_ids, self.policy_version)

    def n_train(self) -> int:
        return len(self.samples)

    def share(self, rank: int, world: int) -> list[int]:
        """Indices of the samples of the groups this rank trains on (group g: rank g mod world)."""
        groups = sorted({s.group for s in self.samples})
        mine = set(groups[rank::world])
        rows = [i for i, s in enumerate(self.samples) if s.group in mine]
        if not rows:
            raise ValueError(
                f"rank {rank} of {world} has no group to train on ({len(groups)} groups): "
                "use fewer workers or more prompts"
            )
        return rows

    def batch(self, index: int, rank: int, world: int) -> tuple[Tensor, ...]:
        rows = self.share(rank, world)
        b = RLBatch.from_samples([self.samples[i] for i in rows], self.pad_id)
        ref = torch.tensor([self.ref_logps[i] for i in rows], dtype=torch.float32)
        return (
            b.input_ids,
            b.completion_mask,
            b.sampler_logprobs,
            b.versions,
            b.rewards,
            b.groups,
            ref,
        )

    def heldout(
        self, model: nn.Module, rank: int, world: int, autocast_dtype: torch.dtype | None
    ) -> dict[str, float]:
        return {}  # the live loop measures the served policy itself (rewards, KL, the toy's π*)

    def manifest_fields(self) -> dict[str, object]:
        return {
            **super().manifest_fields(),
            "beta": self.beta,
            "is_cap": self.is_cap,
            "samples": len(self.samples),
        }


__all__ = ["RLLoss", "RLPlugin", "reference_logps"]
