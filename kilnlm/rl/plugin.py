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

**One plug-in for a whole RL run**: with a ``source`` (``cluster/rl_trainer.py``'s
``FeedSource``, a Ray actor behind it) the plug-in holds no samples itself; step s trains on
iteration s // ``steps_per_iteration``'s batch, fetched from the source once and kept until the
next iteration. The batch of a step is still a pure function of the step (the source keeps
every iteration's batch), so a resumed worker group recomputes exactly the steps it lost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    source: Callable[[int], tuple[list[Sample], list[float]]] | None = None
    """iteration → (samples, π0 log-probs) for a run fed iteration by iteration; None: train on
    ``samples`` at every step."""
    steps_per_iteration: int = 1
    """Optimiser steps on each iteration's batch (with a ``source``)."""
    _cached: tuple[int, list[Sample], list[float]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    objective_name = "rl"

    def __post_init__(self) -> None:
        RLObjective(self.beta, self.is_cap)  # validates beta and is_cap
        if self.steps_per_iteration < 1:
            raise ValueError(f"steps_per_iteration must be >= 1, got {self.steps_per_iteration}")
        if self.source is None and not self.samples:
            raise ValueError("RLPlugin needs at least one sample; generate before training")
        check_refs(self.samples, self.ref_logps)

    def iteration_data(self, index: int) -> tuple[list[Sample], list[float]]:
        """(samples, π0 log-probs) that micro-batch ``index`` trains on."""
        if self.source is None:
            return self.samples, self.ref_logps
        iteration = index // self.steps_per_iteration
        if self._cached is None or self._cached[0] != iteration:
            samples, refs = self.source(iteration)
            check_refs(samples, refs)
            self._cached = (iteration, list(samples), list(refs))
        return self._cached[1], self._cached[2]

    @property
    def loss(self) -> Objective:
        return RLLoss(RLObjective(self.beta, self.is_cap), self.allowed_ids, self.policy_version)

    def n_train(self) -> int:
        return len(self.samples)

    def share(self, rank: int, world: int, samples: Sequence[Sample] | None = None) -> list[int]:
        """Indices of the samples (``self.samples`` by default) of the groups this rank trains
        on (group g: rank g mod world)."""
        samples = self.samples if samples is None else samples
        groups = sorted({s.group for s in samples})
        mine = set(groups[rank::world])
        rows = [i for i, s in enumerate(samples) if s.group in mine]
        if not rows:
            raise ValueError(
                f"rank {rank} of {world} has no group to train on ({len(groups)} groups): "
                "use fewer workers or more prompts"
            )
        return rows

    def batch(self, index: int, rank: int, world: int) -> tuple[Tensor, ...]:
        samples, refs = self.iteration_data(index)
        rows = self.share(rank, world, samples)
        b = RLBatch.from_samples([samples[i] for i in rows], self.pad_id)
        ref = torch.tensor([refs[i] for i in rows], dtype=torch.float32)
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
            **self.fed_fields(),
        }

    def fed_fields(self) -> dict[str, object]:
        """How many samples the export's last steps trained on (and, when fed, which iteration)."""
        if self.source is None:
            return {"samples": len(self.samples)}
        if self._cached is None:
            return {}
        return {"samples": len(self._cached[1]), "rl_iteration": self._cached[0]}


def check_refs(samples: Sequence[Sample], ref_logps: Sequence[Any]) -> None:
    if len(ref_logps) != len(samples):
        raise ValueError(
            f"{len(ref_logps)} reference log-probs for {len(samples)} samples; "
            "compute them with kilnlm.rl.plugin.reference_logps"
        )


__all__ = ["RLLoss", "RLPlugin", "reference_logps"]
