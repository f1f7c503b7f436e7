"""DPO on the toy: the preference pairs the toy implies, and DPO against the same exact π*.

Under the Bradley–Terry model with the reward as its utility, a pair (y1, y2) drawn from π0
prefers y1 with probability σ(r(y1) − r(y2)). DPO at β fits β·(log πθ − log π0) to that utility:
its population loss over such pairs is minimised exactly when β·(log πθ − log π0) = r + const
on the support, i.e. πθ = π0·exp(r/β)/Z = π* (labels drawn with σ((r1 − r2)/β) instead would
put DPO's optimum at π0·exp(r/β²)/Z: β must enter once, in the loss, not also in the labels): the same target as the online
RLOO loop, reached offline from pairs instead of samples and rewards. ``population_dpo_loss``
is that loss computed exactly over every pair of the enumeration (no sampling), so its minimiser
can be checked against π*; ``toy_preference_pairs`` draws a finite set of pairs and
``train_dpo`` fits them with post-training I's own loss (``kilnlm.posttrain.dpo.DPOLoss``).

One difference from the online loop: post-training I's DPO scores a reply with the full
vocabulary's log-probs, while the toy's π and π* are restricted to the alphabet and eos. The two
agree where the policy puts (almost) no mass outside the allowed ids, as the toy π0 does (it was
trained on letters and eos only); docs/rl.md reports what remains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kilnlm.posttrain.dpo import DPOLoss, collate_dpo, reference_logps
from kilnlm.posttrain.reward import PairExample
from kilnlm.rl.toy import ToyPosterior


def preference_probability(posterior: ToyPosterior, i: int, j: int) -> float:
    """P(completion i preferred to completion j) under Bradley–Terry on the reward: σ(r_i − r_j)."""
    return float(torch.sigmoid(posterior.rewards[i] - posterior.rewards[j]))


def toy_preference_pairs(
    posterior: ToyPosterior, n_pairs: int, generator: torch.Generator
) -> list[PairExample]:
    """n pairs: both completions drawn from π0 (exactly, from the enumeration), the preferred one
    drawn by Bradley–Terry on the reward. Pairs of one completion with itself carry no preference: skipped
    (so a few fewer than n may come back)."""
    p0 = posterior.logp0.exp()
    a = torch.multinomial(p0, n_pairs, replacement=True, generator=generator)
    b = torch.multinomial(p0, n_pairs, replacement=True, generator=generator)
    u = torch.rand(n_pairs, generator=generator, dtype=torch.float64)
    win = torch.sigmoid(posterior.rewards[a] - posterior.rewards[b])
    prompt = posterior.spec.prompt_ids
    pairs = []
    for i, j, first in zip(a.tolist(), b.tolist(), (u < win).tolist(), strict=True):
        if i == j:
            continue
        chosen, rejected = (i, j) if first else (j, i)
        pairs.append(
            PairExample(
                len(prompt),
                (*prompt, *posterior.completions[chosen]),
                (*prompt, *posterior.completions[rejected]),
            )
        )
    return pairs


def population_dpo_loss(logp: Tensor, posterior: ToyPosterior) -> Tensor:
    """E over pairs (y1, y2) ~ π0×π0 and Bradley–Terry labels of −log σ(β·(h(y_w) − h(y_l))),
    with h = log πθ − log π0, computed exactly over every pair of the enumeration."""
    h = posterior.beta * (logp.double() - posterior.logp0)  # (N,)
    margin = h[:, None] - h[None, :]  # (N, N): y1 = row, y2 = column
    win = torch.sigmoid(posterior.rewards[:, None] - posterior.rewards[None, :])
    per_pair = -(win * F.logsigmoid(margin) + (1 - win) * F.logsigmoid(-margin))
    p0 = posterior.logp0.exp()
    return (p0[:, None] * p0[None, :] * per_pair).sum()


@dataclass(frozen=True)
class ToyDPOConfig:
    """Full-batch DPO over a fixed set of pairs."""

    n_pairs: int = 2048
    steps: int = 200
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_pairs < 1 or self.steps < 1 or not self.lr > 0:
            raise ValueError("n_pairs and steps must be >= 1 and lr > 0")


def train_dpo(
    pi0: nn.Module, posterior: ToyPosterior, cfg: ToyDPOConfig
) -> tuple[nn.Module, list[PairExample]]:
    """Post-training I's DPO loss on pairs the toy implies; returns the policy and the pairs."""
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = toy_preference_pairs(posterior, cfg.n_pairs, gen)
    pad = posterior.spec.eos_id
    batch = collate_dpo(pairs, reference_logps(pi0, pairs, pad, batch_size=len(pairs)), pad)
    policy = copy.deepcopy(pi0).train()
    loss_fn = DPOLoss(posterior.beta)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        loss = loss_fn.loss_sum(policy, batch) / len(pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return policy.eval(), pairs


__all__ = [
    "ToyDPOConfig",
    "population_dpo_loss",
    "preference_probability",
    "toy_preference_pairs",
    "train_dpo",
]
