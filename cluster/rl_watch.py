"""What a ``kiln rl`` run shows besides its updates: clients served all along, and the policy
before and after.

``RunWatch`` is started once serving is up (π0 promoted) and finished after the last swap:

- **clients**: a ``kilnlm.rl.traffic.BackgroundClient`` streams through the application's gRPC
  gateway (the address its ingress reports, checked with grpc.health.v1 first) for the whole
  run; at the end it waits (bounded) for one response from the last promoted version, so the
  counts cover every swap. The summary holds requests, failed, responses per version and the
  versions seen that the orchestrator never promoted (must be none);
- **generations**: greedy replies to the first few prompts, through the replicas, pinned to π0
  at the start and to the final version at the end, each with its reward;
- **before / after**: mean reward, its spread within a prompt's group (what RLOO's advantages
  are made of) and the KL(πθ‖π0) estimate of one sampling pass of π0 before the first update
  and of the final version after the last: the loop's own requests (same prompts, k,
  max_tokens; seeds no iteration uses), no update. π0's KL to itself is 0 by construction.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Sequence
from typing import Any

from kilnlm.actors.protocol import GenerationRequest
from kilnlm.cluster.rl import RLLoop, RLLoopConfig, generate_through, sample_requests
from kilnlm.cluster.rl_reward import score_rewards
from kilnlm.rl.plugin import reference_logps
from kilnlm.rl.prompts import RLPrompt, as_prompt, prompt_ids
from kilnlm.rl.traffic import BackgroundClient, TrafficCounts
from kilnlm.sampling import SamplingParams

FINAL_VERSION_WAIT_S = 120.0
"""How long the client may take to get one response from the last promoted version."""


def gateway_address(app: str) -> str:
    """host:port of the application's gRPC gateway; a clear error when it does not answer."""
    from ray import serve

    from kilnlm.client import Client

    address = serve.get_app_handle(app).address.remote().result()
    with Client(address) as client:
        status = client.health(timeout=30.0)
    if status != "SERVING":
        raise RuntimeError(f"the gateway at {address} answers {status}, not SERVING")
    return address


def greedy_generations(
    handle: Any, cfg: RLLoopConfig, tokenizer: Any, prompts: Sequence[RLPrompt], version: int
) -> list[dict[str, Any]]:
    """Greedy replies through the replicas, pinned to ``version``, each scored by the reward."""
    params = SamplingParams(
        temperature=0.0,
        max_tokens=cfg.max_tokens,
        allowed_token_ids=None if cfg.allowed_token_ids is None else list(cfg.allowed_token_ids),
    )
    requests = [
        GenerationRequest(
            request_id=f"rl-greedy-{uuid.uuid4().hex[:12]}",
            params=params,
            pin_version=version,
            **p.request_fields(),
        )
        for p in prompts
    ]
    chunks = generate_through(handle, requests)
    texts = [tokenizer.decode(prompt_ids(tokenizer, p)) for p in prompts]  # as RLLoop.score
    rewards = score_rewards(cfg.reward, prompts, texts, [c.text for c in chunks])
    return [
        {
            "prompt": p.label(),
            "completion": c.text,
            "reward": r,
            "version": c.finish.model_version if c.finish else 0,
        }
        for p, c, r in zip(prompts, chunks, rewards, strict=True)
    ]


def reward_figures(rewards: Sequence[float], groups: Sequence[int]) -> dict[str, Any]:
    """Mean reward and the mean over prompts of the rewards' standard deviation in a group."""
    by_group: dict[int, list[float]] = {}
    for r, g in zip(rewards, groups, strict=True):
        by_group.setdefault(g, []).append(r)
    within = [statistics.pstdev(g) for g in by_group.values()]
    return {
        "mean_reward": sum(rewards) / len(rewards),
        "reward_sd_within_prompt": sum(within) / len(within),
        "samples": len(rewards),
    }


def evaluate_start(handle: Any, cfg: RLLoopConfig, tokenizer: Any, version: int) -> dict[str, Any]:
    """π0's figures: the loop's requests pinned to π0, scored; its KL to itself is 0."""
    requests = sample_requests(cfg.prompts, cfg, version, cfg.iterations + 1)
    chunks = generate_through(handle, [r for _, r in requests])
    prompts = [as_prompt(cfg.prompts[p]) for p, _ in requests]
    texts = [tokenizer.decode(prompt_ids(tokenizer, p)) for p in prompts]
    rewards = score_rewards(cfg.reward, prompts, texts, [c.text for c in chunks])
    figures = reward_figures(rewards, [p for p, _ in requests])
    return {"version": version, **figures, "kl_estimate": 0.0}


def evaluate_served(loop: RLLoop, iteration: int) -> dict[str, Any]:
    """The served version's figures: mean reward, its spread, and the KL(served‖π0) estimate
    (log μ − log π0 over its own samples: on-policy)."""
    samples = loop.sample(iteration)
    refs = reference_logps(loop.pi0, samples, loop.tokenizer.eos_id, loop.cfg.allowed_token_ids)
    kl = sum(sum(s.logprobs) - r for s, r in zip(samples, refs, strict=True)) / len(samples)
    figures = reward_figures([s.reward for s in samples], [s.group for s in samples])
    return {"version": loop.version, **figures, "kl_estimate": float(kl)}


class RunWatch:
    """Started after π0 is served, finished after the last swap, closed in any case."""

    def __init__(
        self, cfg: RLLoopConfig, app: str, handle: Any, version: int, clients: bool = True,
        examples: int = 3,
    ) -> None:  # fmt: skip
        from kilnlm.checkpoint import load_tokenizer

        self.cfg, self.handle = cfg, handle
        self.tokenizer = load_tokenizer(cfg.policy)
        self.prompts = [as_prompt(p) for p in cfg.prompts[:examples]]
        self.address = gateway_address(app)
        self.client = (
            BackgroundClient(self.address, [p.label() for p in self.prompts]).start()
            if clients
            else None
        )
        self.before = greedy_generations(handle, cfg, self.tokenizer, self.prompts, version)
        self.start = evaluate_start(handle, cfg, self.tokenizer, version)
        self.after: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.counts: TrafficCounts | None = None

    def finish(self, loop: RLLoop) -> None:
        """The final version's figures and generations; the client stops once it saw it."""
        self.final = evaluate_served(loop, self.cfg.iterations)
        self.after = greedy_generations(
            self.handle, self.cfg, self.tokenizer, self.prompts, loop.version
        )
        if self.client is not None:
            self.client.wait_for_version(loop.version, FINAL_VERSION_WAIT_S)
        self.close()

    def close(self) -> None:
        if self.client is not None and self.counts is None:
            self.counts = self.client.stop()

    def summary(self, loop: RLLoop) -> dict[str, Any]:
        out: dict[str, Any] = {
            "gateway": self.address,
            "before": self.start,
            "after": self.final,
            "generations": {"before": self.before, "after": self.after},
        }
        if self.counts is not None:
            seen = set(self.counts.versions)
            out["clients"] = {
                **self.counts.to_dict(),
                "promoted": list(loop.promoted),
                "unpromoted_versions_seen": sorted(seen - set(loop.promoted)),
            }
        return out


__all__ = ["RunWatch", "evaluate_served", "gateway_address", "greedy_generations"]
