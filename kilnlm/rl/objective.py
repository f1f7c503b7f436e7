"""The RL estimator: REINFORCE with a leave-one-out baseline (RLOO), KL in the reward, truncated IS.

Objective: J(θ) = E_πθ[r(x) − β·(log πθ(x) − log π0(x))] = −β·KL(πθ‖π*) + const, with
π*(x) ∝ π0(x)·exp(r(x)/β) (``kilnlm.rl.toy``). Its gradient is E_πθ[R(x)·∇log πθ(x)] with the
shaped reward R(x) = r(x) − β·(log πθ(x) − log π0(x)) (the term E[∇log πθ] the KL's own θ adds
is zero). Why each piece:

- **Sequence-level KL in the reward**, not a per-token penalty in the loss and not a KL loss
  term: then the estimator is the unbiased gradient of exactly the objective above.
- **Leave-one-out baseline** over the k samples of one prompt: b_i = mean of the other k−1
  shaped rewards. b_i does not depend on x_i, so the estimate stays unbiased, and it removes most
  of the variance. **No division by the group's standard deviation**: that would rescale each
  prompt's reward, i.e. change β per prompt, and the fixed point would no longer be π*.
- **Truncated importance weight** w = min(πθ(x)/μ(x), ``is_cap``): samples come from the
  sampler's weights μ (the serving version, up to ``max_staleness`` versions old, and a different
  numeric path), the gradient is for πθ. The ratio is per sequence, because the reward and the
  KL are per sequence; the cap (2.0, the threshold verl's rollout-IS and the TIS recipe use)
  bounds the variance at the price of a small bias when the policies drift apart.

The loss is −mean_i w_i·(R_i − b_i)·log πθ(x_i): its gradient is minus the estimate of ∇J.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kilnlm.rl.buffer import Sample
from kilnlm.rl.toy import restricted_logprobs

IS_CAP = 2.0
"""Default truncation of the sequence-level importance weight."""


@dataclass(frozen=True)
class RLObjective:
    """The estimator's settings."""

    beta: float
    """Trust in the prior: the weight of KL(πθ‖π0) against the reward."""
    is_cap: float = IS_CAP
    """Importance weights above this are truncated to it (>= 1: on-policy samples weigh 1)."""

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not self.is_cap >= 1:
            raise ValueError(f"is_cap must be >= 1, got {self.is_cap}")


@dataclass
class RLBatch:
    """Samples as tensors: prompt + completion right-padded, and what the sampler reported."""

    input_ids: Tensor
    """(B, S) prompt then completion ids, padded with ``pad_id``."""
    completion_mask: Tensor
    """(B, S) True where the id is a sampled completion id (its log-prob counts)."""
    sampler_logprobs: Tensor
    """(B, S) the sampler's log-prob of each completion id, 0 elsewhere."""
    versions: Tensor
    """(B,) version of the weights that produced each sample."""
    rewards: Tensor
    """(B,) r(x)."""
    groups: Tensor
    """(B,) samples of one prompt share a group id."""

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], pad_id: int) -> RLBatch:
        if not samples:
            raise ValueError("an RL batch needs at least one sample")
        width = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
        B = len(samples)
        ids = torch.full((B, width), pad_id, dtype=torch.long)
        mask = torch.zeros((B, width), dtype=torch.bool)
        lps = torch.zeros((B, width), dtype=torch.float32)
        for i, s in enumerate(samples):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            ids[i, : p + c] = torch.tensor([*s.prompt_ids, *s.completion_ids])
            mask[i, p : p + c] = True
            lps[i, p : p + c] = torch.tensor(s.logprobs)
        return cls(
            ids,
            mask,
            lps,
            torch.tensor([s.version for s in samples]),
            torch.tensor([s.reward for s in samples], dtype=torch.float32),
            torch.tensor([s.group for s in samples]),
        )


@dataclass(frozen=True)
class RLMetrics:
    """What one loss evaluation saw (means over the batch)."""

    mean_reward: float
    kl_estimate: float
    """mean of log πθ(x) − log π0(x) over the samples: KL(πθ‖π0) when they are on-policy."""
    mean_weight: float
    """Mean importance weight after truncation (1 on-policy)."""
    truncated_fraction: float
    """Share of samples whose weight hit the cap."""
    mean_lag: float
    """Mean of policy_version − sample version (0 when no policy version was given)."""


def token_logprobs(model: nn.Module, input_ids: Tensor, allowed: Tensor | None = None) -> Tensor:
    """(B, S) log-prob of each id given the ids before it (0 at position 0), restricted to
    ``allowed`` ids when given: the distribution the sampler drew from."""
    logp = restricted_logprobs(model(input_ids[:, :-1]), allowed)  # (B, S-1, V)
    picked = logp.gather(-1, input_ids[:, 1:, None])[..., 0]  # (B, S-1)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def sequence_logprob(model: nn.Module, batch: RLBatch, allowed: Tensor | None = None) -> Tensor:
    """(B,) log π(completion | prompt): the sum over the completion ids."""
    lp = token_logprobs(model, batch.input_ids.to(_device(model)), allowed)
    return lp.masked_fill(~batch.completion_mask.to(lp.device), 0.0).sum(dim=1)


def leave_one_out(values: Tensor, groups: Tensor) -> Tensor:
    """values − the mean of the other members of each group (0 for a group of one: no baseline,
    so the sample carries no gradient rather than an unbaselined, high-variance one)."""
    ids, inverse = torch.unique(groups, return_inverse=True)
    sums = torch.zeros(len(ids), dtype=values.dtype, device=values.device)
    counts = torch.zeros(len(ids), dtype=values.dtype, device=values.device)
    sums.index_add_(0, inverse, values)
    counts.index_add_(0, inverse, torch.ones_like(values))
    n = counts[inverse]
    baseline = (sums[inverse] - values) / (n - 1).clamp(min=1)
    return torch.where(n > 1, values - baseline, torch.zeros_like(values))


def rloo_loss(
    policy: nn.Module,
    reference: nn.Module,
    batch: RLBatch,
    objective: RLObjective,
    allowed: Tensor | None = None,
    policy_version: int | None = None,
) -> tuple[Tensor, RLMetrics]:
    """The loss whose gradient is −(the RLOO estimate of ∇J), and what the batch looked like.

    ``reference`` is π0 (no gradient flows into it); ``allowed`` restricts both models to the ids
    the sampler was restricted to (None: the full vocabulary).
    """
    with torch.no_grad():
        seq_ref = sequence_logprob(reference, batch, allowed)
    return rloo_loss_given_reference(policy, seq_ref, batch, objective, allowed, policy_version)


def rloo_loss_given_reference(
    policy: nn.Module,
    seq_ref: Tensor,
    batch: RLBatch,
    objective: RLObjective,
    allowed: Tensor | None = None,
    policy_version: int | None = None,
) -> tuple[Tensor, RLMetrics]:
    """``rloo_loss`` with log π0(completion | prompt) (B,) given: computed once by the driver, so
    the Ray Train workers do not hold π0 beside the policy (as DPO's reference log-probs)."""
    seq_theta = sequence_logprob(policy, batch, allowed)  # (B,) with grad
    device = seq_theta.device
    seq_ref = seq_ref.to(device)
    seq_sampler = (batch.sampler_logprobs * batch.completion_mask).sum(dim=1).to(device)
    rewards = batch.rewards.to(device)
    kl_seq = seq_theta.detach() - seq_ref
    advantage = leave_one_out(rewards - objective.beta * kl_seq, batch.groups.to(device))
    raw_weight = (seq_theta.detach() - seq_sampler).exp()
    weight = raw_weight.clamp(max=objective.is_cap)
    loss = -(weight * advantage * seq_theta).mean()
    lag = 0.0 if policy_version is None else float((policy_version - batch.versions).float().mean())
    metrics = RLMetrics(
        mean_reward=float(rewards.mean()),
        kl_estimate=float(kl_seq.mean()),
        mean_weight=float(weight.mean()),
        truncated_fraction=float((raw_weight > objective.is_cap).float().mean()),
        mean_lag=lag,
    )
    return loss, metrics


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = [
    "IS_CAP",
    "RLBatch",
    "RLMetrics",
    "RLObjective",
    "leave_one_out",
    "rloo_loss",
    "rloo_loss_given_reference",
    "sequence_logprob",
    "token_logprobs",
]
