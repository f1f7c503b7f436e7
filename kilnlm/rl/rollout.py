"""In-process sampling and the in-process reference run: what the live loop must reproduce.

``sample_group`` draws k completions of one prompt from a model with sampling restricted to the
toy's allowed ids, returning each with its per-token log-probs and the version of the weights
that drew it: what the serving replicas return in the live loop.

``train_in_process`` is the whole RL loop without Ray: sample from the serving weights (which may
lag the trainer by ``sampler_lag`` versions, as replicas do between hot-swaps), put the samples in
the staleness buffer, take the fresh ones, one RLOO step, promote (version + 1). It records the
exact KL(πθ‖π*) after every step, so the live ``kiln rl --toy`` has a curve to match.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from kilnlm.rl.buffer import Sample, StalenessBuffer
from kilnlm.rl.objective import RLBatch, RLMetrics, RLObjective, rloo_loss
from kilnlm.rl.toy import ToyMetrics, ToyPosterior, ToySpec, allowed_mask, restricted_logprobs


@torch.no_grad()
def sample_group(
    model: nn.Module,
    spec: ToySpec,
    k: int,
    generator: torch.Generator,
    version: int,
    reward: Callable[[Sequence[int]], float],
    group: int,
) -> list[Sample]:
    """k completions of the spec's prompt: restricted draws, stop at eos or ``max_len`` ids."""
    device = next(model.parameters()).device
    mask = allowed_mask(spec.allowed_ids, model.config.vocab_size, device)
    idx = torch.tensor(spec.prompt_ids, device=device).expand(k, -1)
    done = torch.zeros(k, dtype=torch.bool, device=device)
    ids, lps = [], []
    for _ in range(spec.max_len):
        logp = restricted_logprobs(model(idx, last_only=True)[:, 0], mask)  # (k, V)
        nxt = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]  # (k,)
        ids.append(torch.where(done, -1, nxt))
        lps.append(logp.gather(1, nxt[:, None])[:, 0])
        done = done | (nxt == spec.eos_id)
        idx = torch.cat([idx, nxt[:, None]], dim=1)
        if bool(done.all()):
            break
    return [
        _sample(
            spec, [int(t[i]) for t in ids], [float(lp[i]) for lp in lps], version, reward, group
        )
        for i in range(k)
    ]


def _sample(
    spec: ToySpec,
    ids: list[int],
    lps: list[float],
    version: int,
    reward: Callable[[Sequence[int]], float],
    group: int,
) -> Sample:
    n = ids.index(-1) if -1 in ids else len(ids)
    completion = tuple(ids[:n])
    return Sample(spec.prompt_ids, completion, tuple(lps[:n]), version, reward(completion), group)


@dataclass(frozen=True)
class ReferenceRunConfig:
    """The in-process run; the defaults are the figures docs/rl.md records."""

    beta: float
    steps: int = 200
    groups_per_step: int = 4
    """Rounds of k samples per step (the toy has one prompt; each round is its own group)."""
    k: int = 8
    """Samples per prompt: the leave-one-out baseline averages the other k − 1."""
    lr: float = 3e-3
    """Adam's peak rate, decayed linearly to 0 over the steps: the last steps average out the
    sampling noise instead of jumping around π* (the exact KL's floor is set by the final rate)."""
    is_cap: float = 2.0
    sampler_lag: int = 0
    """Samples come from the weights this many versions behind the trainer (replicas between
    swaps); > 0 exercises the importance weight."""
    max_staleness: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "groups_per_step", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(
                f"k must be >= 2 (the leave-one-out baseline needs another), got {self.k}"
            )
        if self.sampler_lag < 0 or self.max_staleness < 0:
            raise ValueError("sampler_lag and max_staleness must be >= 0")


@dataclass
class ReferenceRun:
    """The trained policy and the exact figures after every step."""

    policy: nn.Module
    start: ToyMetrics
    history: list[ToyMetrics] = field(default_factory=list)
    losses: list[RLMetrics] = field(default_factory=list)
    dropped: int = 0

    @property
    def final(self) -> ToyMetrics:
        return self.history[-1]


def train_in_process(
    pi0: nn.Module, posterior: ToyPosterior, cfg: ReferenceRunConfig
) -> ReferenceRun:
    """RLOO from πθ = π0 towards π*, measured exactly after every step."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=next(pi0.parameters()).device).manual_seed(cfg.seed)
    policy = copy.deepcopy(pi0).train()
    reference = pi0.eval()
    objective = RLObjective(cfg.beta, cfg.is_cap)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.steps)
    mask = allowed_mask(posterior.spec.allowed_ids, pi0.config.vocab_size, gen.device)
    served: deque[tuple[int, nn.Module]] = deque([(0, copy.deepcopy(policy).eval())])
    buffer = StalenessBuffer(cfg.max_staleness)
    run = ReferenceRun(policy, posterior.measure_model(policy))
    for step in range(cfg.steps):
        version, sampler = served[0]
        buffer.put(
            s
            for g in range(cfg.groups_per_step)
            for s in sample_group(
                sampler, posterior.spec, cfg.k, gen, version, posterior.reward_of, g
            )
        )
        batch = RLBatch.from_samples(buffer.take(), pad_id=posterior.spec.eos_id)
        loss, metrics = rloo_loss(policy, reference, batch, objective, mask, buffer.version)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay.step()
        buffer.advance(step + 1)  # promote: the trainer's weights are version step + 1
        served.append((step + 1, copy.deepcopy(policy).eval()))
        while len(served) > cfg.sampler_lag + 1:
            served.popleft()
        run.losses.append(metrics)
        run.history.append(posterior.measure_model(policy))
    run.dropped = buffer.dropped
    return run


__all__ = ["ReferenceRun", "ReferenceRunConfig", "sample_group", "train_in_process"]
