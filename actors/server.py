"""LLMServer: the Ray Serve deployment that holds one engine per replica.

Each replica wraps one ``ServingModel`` (weights + tokenizer + ``AsyncLLMEngine`` and its step
loop) and adds only what belongs to Serve: replica resources (fractional ``num_cpus``, one torch
thread, so replicas, gateway, orchestrator and trainers fit on a 2-core laptop), ``check_health``,
metrics through ``ray.util.metrics``, and its swap agent (actors/swap_agent.py): the one path
by which weights change, driven by the orchestrator's two-phase hot-swap (DESIGN.md,
"Hot-swap"). The deployment has no stage/commit/load methods of its own: a second control
path would let a replica serve what the registry does not know.

A replica started without a checkpoint has no model: ``info().version`` is 0, requests raise
``NoModelError`` (UNAVAILABLE at the gateway) and the gateway's health reports NOT_SERVING. It
still passes ``check_health`` — it is alive, only empty — so Serve does not restart it in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from ray import serve
from ray.util import metrics

from kilnlm.actors.metrics import KilnMetrics
from kilnlm.actors.protocol import (
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    RewardRequest,
    RewardResult,
    ScoreRequest,
    ScoreResult,
    merge_chunks,
)
from kilnlm.actors.serving_model import ServingModel
from kilnlm.actors.streaming import StreamShape, coalesce
from kilnlm.actors.swap_agent import SwapAgent
from kilnlm.checkpoint import remote
from kilnlm.serving_config import ServeConfig

METRICS_PERIOD_S = 1.0
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class ReplicaMetrics:
    """The replica's series: gauges sampled every second, latencies observed per request."""

    def __init__(self) -> None:
        self.queue_depth = metrics.Gauge(
            "kiln_queue_depth", "Requests waiting in the engine's queue"
        )
        self.running = metrics.Gauge("kiln_running_sequences", "Sequences in the running batch")
        self.kv_blocks_used = metrics.Gauge("kiln_kv_blocks_used", "KV-cache blocks holding tokens")
        self.kv_blocks_total = metrics.Gauge("kiln_kv_blocks_total", "KV-cache blocks reserved")
        self.tokens_per_s = metrics.Gauge("kiln_tokens_per_second", "Generated tokens per second")
        self.tokens = metrics.Counter("kiln_generated_tokens", "Generated tokens")
        self.tpot = metrics.Histogram(
            "kiln_time_per_output_token_seconds",
            "Mean time between a request's generated tokens after the first",
            boundaries=LATENCY_BOUNDARIES_S,
        )

    def sample(self, info: ModelInfo, tokens_per_s: float) -> None:
        self.queue_depth.set(info.waiting)
        self.running.set(info.running)
        self.kv_blocks_used.set(info.blocks_used)
        self.kv_blocks_total.set(info.blocks_total)
        self.tokens_per_s.set(tokens_per_s)


class RequestTimer:
    """Time to first token and time per output token of one request."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.first: float | None = None
        self.tokens = 0

    def tokens_arrived(self, n: int, m: ReplicaMetrics) -> None:
        if n and self.first is None:  # kiln_time_to_first_token_seconds: actors/metrics.py
            self.first = time.monotonic()
        self.tokens += n

    def finished(self, m: ReplicaMetrics) -> None:
        if self.first is not None and self.tokens > 1:
            m.tpot.observe((time.monotonic() - self.first) / (self.tokens - 1))


def _n_tokens(chunk: GenerationChunk) -> int:
    return len(chunk.token_ids)


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class LLMServer:
    """One engine per replica; options (replicas, autoscaling, queue bounds) come from ServeConfig."""

    async def __init__(self, config: ServeConfig) -> None:
        torch.set_num_threads(config.torch_threads)
        self.model = ServingModel(config)
        sources: dict[str, str] = {}
        if config.checkpoint is not None:  # s3://, gs://: this node's verified cached copy
            path = await asyncio.to_thread(remote.local_dir, config.checkpoint)
            if remote.is_remote(config.checkpoint):
                sources[path] = config.checkpoint
            await self.model.load(path, config.version)
        # [orchestrator] The replica side of the hot-swap protocol (actors/swap_agent.py): attach
        # to the application's orchestrator, if one runs, and load its promoted version before
        # this constructor returns, so Serve never routes to an old or empty replica.
        self.swap_agent = await SwapAgent.start_in_replica(self.model, sources=sources)
        self.metrics = ReplicaMetrics()
        self.kiln_metrics = KilnMetrics(config.model_id)  # vLLM's series (actors/metrics.py)
        self._tokens_total = 0
        self._metrics_task = asyncio.create_task(self._report_metrics())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream one request (called through a streaming DeploymentHandle by the gateway).

        When the gateway cancels the call (client gone, deadline), Serve cancels this task; the
        CancelledError unwinds through ServingModel.generate, which aborts the engine request.
        """
        timer = RequestTimer()
        observer = self.kiln_metrics.request()
        config = self.model.config
        shape = StreamShape(config.stream_interval_s, config.stream_max_tokens)
        deltas = coalesce(self.model.generate(request), merge_chunks, _n_tokens, shape)
        async with contextlib.aclosing(deltas) as chunks:
            async for chunk in chunks:
                n = len(chunk.token_ids)
                timer.tokens_arrived(n, self.metrics)
                observer.chunk(chunk)
                self._tokens_total += n
                if n:
                    self.metrics.tokens.inc(n)
                yield chunk
        timer.finished(self.metrics)

    async def score(self, request: ScoreRequest) -> ScoreResult:
        return await self.model.score(request)

    async def reward(self, request: RewardRequest) -> RewardResult:
        return await self.model.reward(request)

    async def info(self) -> ModelInfo:
        return await self.model.info()

    async def tokenizer(self) -> Any:
        """The served tokenizer (None while empty): the HTTP ingress names logprob tokens with
        it and reads the model's generation defaults from it."""
        return None if self.model.current is None else self.model.current.tokenizer

    # ---- Serve hooks ---------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Fail (Serve restarts the replica) only when the engine's step loop has died."""
        if not self.model.healthy:
            raise RuntimeError("the engine's step loop died; Serve replaces this replica")
        if self._metrics_task.done() and not self._metrics_task.cancelled():
            raise RuntimeError(f"metrics loop died: {self._metrics_task.exception()!r}")
        self.swap_agent.check()  # [orchestrator] not serving the promoted version yet

    async def _report_metrics(self) -> None:
        last_tokens, last_time = 0, time.monotonic()
        while True:
            await asyncio.sleep(METRICS_PERIOD_S)
            now = time.monotonic()
            rate = (self._tokens_total - last_tokens) / max(now - last_time, 1e-9)
            last_tokens, last_time = self._tokens_total, now
            info = await self.model.info()
            self.metrics.sample(info, rate)
            self.kiln_metrics.sample(info)

    async def __del__(self) -> None:
        """Stop what __init__ started, and only that: a replica whose checkpoint could not load
        never got its swap agent or metrics task, and its shutdown must not add an error."""
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        agent = getattr(self, "swap_agent", None)
        if agent is not None:
            await agent.stop()  # [orchestrator]
        model = getattr(self, "model", None)
        if model is not None:
            model.shutdown()
