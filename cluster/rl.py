"""``kiln rl``'s live loop: the serving replicas sample, a Ray task scores, Ray Train updates, and
the orchestrator gates and hot-swaps every new policy while clients keep being served.

One iteration:

1. **sample** — k requests per prompt go to the application's ``LLMServer`` deployment through
   the streaming ``DeploymentHandle`` the gateway itself uses, each pinned to the promoted
   version (``pin_version``, checked where the engine admits the request), with
   ``logprobs=0``; every returned chunk names the ``model_version`` whose weights made it, and
   a sample is tagged with that version, never with the driver's guess;
2. **reward** — a Ray task calls the ``module:function`` reward on (prompt, completion) text,
   or reads a reward-model export's head (``cluster/rl_reward.py``);
3. **staleness** — samples go into ``kilnlm.rl.buffer.StalenessBuffer``: older than
   ``max_staleness`` versions are dropped and counted, the rest are trained on;
4. **update** — π0's log-probs of the samples are computed here once
   (``kilnlm.rl.plugin.reference_logps``) and the batch goes to the run's one long-lived Ray
   Train run (``cluster/rl_trainer.py``), which trains ``steps`` steps on it and exports;
5. **swap** — the export is registered with the orchestrator, gated and promoted (the two-phase
   hot-swap); the next iteration's requests are pinned to the new version.

The engine does not return the log-prob of the ``<|eos|>`` that ended a reply (it is not a
returned token), so that one number is recomputed here from the export of the version that
served the sample (the same weights; its numeric path is the trainer's, not the engine's).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import torch

from kilnlm.actors.protocol import GenerationChunk, GenerationRequest, merge_chunks
from kilnlm.cluster.rl_reward import reward_env, score_rewards, score_task
from kilnlm.cluster.rl_trainer import PersistentTrainer, start_trainer
from kilnlm.rl.buffer import Sample, StalenessBuffer
from kilnlm.rl.plugin import reference_logps
from kilnlm.rl.prompts import RLPrompt, as_prompt, prompt_ids
from kilnlm.rl.toy import ToyPosterior, ToySpec, restricted_logprobs
from kilnlm.sampling import SamplingParams


@dataclass(frozen=True)
class RLLoopConfig:
    """One ``kiln rl`` run."""

    policy: str
    """π0's export: the first served version and the KL reference."""
    reward: str
    """``package.module:function`` taking (prompt, completion) text, or a reward-model export."""
    prompts: tuple[str | RLPrompt, ...]
    """Plain text or chats (``kilnlm.rl.prompts``; a bare string is plain text)."""
    beta: float
    out: str
    samples: int = 8
    """Samples per prompt (k): the leave-one-out baseline averages the other k − 1."""
    iterations: int = 3
    max_staleness: int = 1
    steps: int = 1
    """Optimiser steps per iteration (the later ones reuse the samples under the IS weight)."""
    lr: float = 3e-3
    max_tokens: int = 16
    allowed_token_ids: tuple[int, ...] | None = None
    """Sampling (and the loss) restricted to these ids; the toy's alphabet and eos."""
    is_cap: float = 2.0
    seed: int = 0
    workers: int = 1
    drill_kill_step: int | None = None
    """Fault drill (tests): the trainer's last rank kills itself once, before this step
    (``ClusterConfig.drill_kill_step``); the run must resume and carry on."""

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("--prompts holds no prompt; give a JSONL file with at least one")
        if self.samples < 2:
            raise ValueError(f"--samples must be >= 2 (leave-one-out), got {self.samples}")
        for name in ("iterations", "steps", "max_tokens", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.max_staleness < 0:
            raise ValueError(f"--max-staleness must be >= 0, got {self.max_staleness}")


@dataclass
class IterationRecord:
    """What one iteration measured (a row of metrics.csv)."""

    iteration: int
    version: int
    """The version that served this iteration's samples."""
    new_version: int
    mean_reward: float
    kl_estimate: float
    """Mean of log μ(x) − log π0(x) over the fresh samples: KL(served‖π0) (they are on-policy)."""
    used: int
    dropped: int
    train_s: float
    swap_s: float
    exact: dict[str, float] = field(default_factory=dict)
    """The toy: exact KL(πθ‖π*), KL(πθ‖π0), TV and E[r] of the new version."""


# --------------------------------------------------------------------------------------------
# Sampling through the replicas


def sample_requests(
    prompts: Sequence[str | RLPrompt], cfg: RLLoopConfig, version: int, iteration: int
) -> list[tuple[int, GenerationRequest]]:
    """(prompt index, request) for k samples per prompt, pinned to ``version``, each seeded."""
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(cfg.samples):
            params = SamplingParams(
                temperature=1.0,
                top_p=1.0,
                max_tokens=cfg.max_tokens,
                seed=(cfg.seed * 1_000_003 + iteration * 10_007 + p * cfg.samples + j),
                logprobs=0,
                allowed_token_ids=(
                    None if cfg.allowed_token_ids is None else list(cfg.allowed_token_ids)
                ),
            )
            request = GenerationRequest(
                request_id=f"rl-{uuid.uuid4().hex[:12]}",
                params=params,
                **as_prompt(prompt).request_fields(),
            )
            out.append((p, replace(request, pin_version=version)))
    return out


def generate_through(handle: Any, requests: Sequence[GenerationRequest]) -> list[GenerationChunk]:
    """Every request through the streaming DeploymentHandle (submitted together, so the engine
    batches them), each merged into one chunk (its version, ids, logprobs and finish)."""
    streams = [handle.options(stream=True).generate.remote(r) for r in requests]
    return [merge_chunks(list(stream)) for stream in streams]


@torch.no_grad()
def eos_logprob(model: Any, prompt_ids: Sequence[int], letters: Sequence[int], eos_id: int,
                allowed: Sequence[int] | None) -> float:  # fmt: skip
    """log μ(eos | prompt, letters) under ``model``, restricted as the sampler was."""
    idx = torch.tensor([[*prompt_ids, *letters]])
    logits = model(idx, last_only=True)[:, 0].float()  # (1, V)
    return float(restricted_logprobs(logits, allowed)[0, eos_id])


def to_sample(
    chunk: GenerationChunk,
    prompt_ids: tuple[int, ...],
    group: int,
    eos_id: int,
    eos_lp: Callable[[list[int]], float],
) -> Sample:
    """A replica's reply as a ``Sample`` tagged with the version that produced it (reward 0 until
    scored). An eos ending is part of the completion (its log-prob counts)."""
    if chunk.finish is None:
        raise RuntimeError(f"a sampling stream ended without a finish: {chunk}")
    ids = list(chunk.token_ids)
    lps = [lp.logprob for lp in chunk.logprobs]
    if chunk.finish.finish_reason == "eos":
        lps.append(eos_lp(ids))
        ids.append(eos_id)
    return Sample(prompt_ids, tuple(ids), tuple(lps), chunk.finish.model_version, 0.0, group)


# --------------------------------------------------------------------------------------------
# The loop


class RLLoop:
    """The driver's state: the served version, its export, the staleness buffer, π0."""

    def __init__(
        self,
        cfg: RLLoopConfig,
        handle: Any,
        orchestrator: Any,
        version: int,
        toy: ToyPosterior | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        from kilnlm.checkpoint import load, load_tokenizer

        self.cfg, self.handle, self.orchestrator, self.toy, self.say = (
            cfg, handle, orchestrator, toy, say,
        )  # fmt: skip
        self.pi0 = load(cfg.policy).eval()
        self.tokenizer = load_tokenizer(cfg.policy)
        self.version = version
        self.exports: dict[int, str] = {version: str(Path(cfg.policy).absolute())}
        self.promoted: list[int] = [version]
        self.buffer = StalenessBuffer(cfg.max_staleness, version)
        self._served_models: dict[int, Any] = {}
        self.trainer: PersistentTrainer | None = None
        self.updates = 0
        """Updates given to the trainer (its iteration index: steps ``updates·steps`` onwards)."""
        self.records: list[IterationRecord] = []
        self.drawn: list[Sample] = []
        """The last iteration's samples as the replicas returned them (scored)."""

    # ---- steps ------------------------------------------------------------------------------

    def sample(self, iteration: int) -> list[Sample]:
        """k samples per prompt from the replicas, pinned to the served version, scored."""
        requests = sample_requests(self.cfg.prompts, self.cfg, self.version, iteration)
        chunks = generate_through(self.handle, [r for _, r in requests])
        samples = []
        for (p, _), chunk in zip(requests, chunks, strict=True):
            ids = tuple(prompt_ids(self.tokenizer, self.cfg.prompts[p]))
            group = iteration * len(self.cfg.prompts) + p
            eos = self.tokenizer.eos_id
            version = chunk.finish.model_version if chunk.finish else 0
            samples.append(
                to_sample(
                    chunk,
                    ids,
                    group,
                    eos,
                    lambda letters, v=version, q=ids: self._eos_logprob(v, q, letters),
                )
            )
        return self.score(samples, [as_prompt(self.cfg.prompts[p]) for p, _ in requests])

    def _eos_logprob(self, version: int, prompt_ids: Sequence[int], letters: list[int]) -> float:
        from kilnlm.checkpoint import load

        if version not in self._served_models:
            self._served_models = {version: load(self.exports[version]).eval()}
        model = self._served_models[version]
        return eos_logprob(model, prompt_ids, letters, self.tokenizer.eos_id,
                           self.cfg.allowed_token_ids)  # fmt: skip

    def score(self, samples: list[Sample], prompts: Sequence[RLPrompt]) -> list[Sample]:
        """Rewards in a Ray task (``cluster/rl_reward.py``); a function sees the prompt ids
        decoded (special tokens written out) and the completion's text without the eos, a
        reward model the prompt's conversation and the same completion text."""
        decode = self.tokenizer.decode
        eos = self.tokenizer.eos_id
        texts = [decode(s.prompt_ids) for s in samples]
        completions = [decode([t for t in s.completion_ids if t != eos]) for s in samples]
        rewards = score_rewards(self.cfg.reward, prompts, texts, completions)
        return [replace(s, reward=r) for s, r in zip(samples, rewards, strict=True)]

    def train(self, samples: list[Sample], refs: list[float]) -> tuple[str, float]:
        """One update of the run's one Ray Train run (``cluster/rl_trainer.py``), started at the
        first update from the served export; (the export that ends it, seconds)."""
        start = time.perf_counter()
        if self.trainer is None:
            self.trainer = self.start_trainer()
        export = self.trainer.update(self.updates, samples, refs)
        self.updates += 1
        return export, time.perf_counter() - start

    def start_trainer(self) -> PersistentTrainer:
        """The long-lived run: ``iterations × steps`` steps from the served export, fed one
        iteration at a time; AdamW's moments and the learning-rate schedule span the whole run."""
        import json

        from kilnlm.checkpoint import config_from_hf

        parent = Path(self.exports[self.version])
        model_cfg = config_from_hf(json.loads((parent / "config.json").read_text()))
        plugin_fields = {
            "data": f"kiln rl, β {self.cfg.beta:g}, reward {self.cfg.reward}",
            "batch_size": self.cfg.samples * len(self.cfg.prompts),
            "seed": self.cfg.seed,
            "pad_id": self.tokenizer.eos_id,
            "beta": self.cfg.beta,
            "is_cap": self.cfg.is_cap,
            "allowed_ids": self.cfg.allowed_token_ids,
            "policy_version": self.version,
        }
        return start_trainer(model_cfg, str(parent), plugin_fields, self.cfg, self.cfg.out)

    def close(self) -> None:
        """Stop the Ray Train run (it ends by itself after the last iteration)."""
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None

    def swap(self, export: str) -> tuple[int, float]:
        """Register, gate and promote ``export``; (its version, seconds from register to served)."""
        start = time.perf_counter()
        version = ray.get(self.orchestrator.register.remote(export), timeout=120)
        ray.get(self.orchestrator.promote.remote(version), timeout=600)
        seconds = time.perf_counter() - start
        self.exports[version] = export
        self.promoted.append(version)
        self.version = version
        self.buffer.advance(version)
        return version, seconds

    # ---- one iteration ----------------------------------------------------------------------

    def admit(self, samples: Sequence[Sample]) -> list[Sample]:
        """Put samples in the buffer (the stale ones are dropped there) and take the fresh ones."""
        self.buffer.put(samples)
        return self.buffer.take()

    def iterate(self, iteration: int) -> IterationRecord:
        served = self.version
        dropped_before = self.buffer.dropped
        self.drawn = self.sample(iteration)
        fresh = self.admit(self.drawn)
        if not fresh:
            raise RuntimeError(f"iteration {iteration}: every sample was stale")
        refs = reference_logps(self.pi0, fresh, self.tokenizer.eos_id, self.cfg.allowed_token_ids)
        kl = sum(sum(s.logprobs) - r for s, r in zip(fresh, refs, strict=True)) / len(fresh)
        export, train_s = self.train(fresh, refs)
        version, swap_s = self.swap(export)
        record = IterationRecord(
            iteration=iteration,
            version=served,
            new_version=version,
            mean_reward=sum(s.reward for s in fresh) / len(fresh),
            kl_estimate=float(kl),
            used=len(fresh),
            dropped=self.buffer.dropped - dropped_before,
            train_s=train_s,
            swap_s=swap_s,
            exact=self.exact(export),
        )
        self.records.append(record)
        return record

    def exact(self, export: str) -> dict[str, float]:
        """The toy's exact figures of an export (empty without a toy)."""
        if self.toy is None:
            return {}
        from kilnlm.checkpoint import load

        m = self.toy.measure_model(load(export).eval())
        return {
            "kl_to_target": m.kl_to_target,
            "kl_to_reference": m.kl_to_reference,
            "total_variation": m.total_variation,
            "exact_mean_reward": m.mean_reward,
        }

    def toy_json(self, spec: ToySpec) -> dict[str, Any]:
        """``toy.json`` as issue 13 names its keys: enough to recompute π* and every KL."""
        return {
            **spec.to_dict(),
            "beta": self.cfg.beta,
            "pi0": self.exports[self.promoted[0]],
            "versions": [{"version": v, "path": self.exports[v]} for v in self.promoted],
        }


__all__ = [
    "IterationRecord",
    "RLLoop",
    "RLLoopConfig",
    "generate_through",
    "reward_env",
    "sample_requests",
    "score_task",
    "to_sample",
]
