"""The Prometheus series vLLM users already graph, under kilnlm's prefix (``kiln_`` for ``vllm:``).

A dashboard built for vLLM reads these with one find-and-replace of the prefix: same names after
it, same units, same label (``finished_reason``), same meaning. Why ``kiln_`` and not
``kiln:``: Ray 2.60 exports application metrics through OpenTelemetry, which refuses ``:`` in a
name (a ``kiln:`` gauge is dropped with a FutureWarning), and prefixes them with ``ray_``; so the
scraped names are ``ray_kiln_num_requests_running`` and so on, as Ray Serve LLM's own vLLM
series are ``ray_vllm_…``. ``deploy/grafana-kiln.json`` is a dashboard over them.

| series | kind | what |
|---|---|---|
| ``kiln_num_requests_running`` | gauge | sequences in the engine's running batch |
| ``kiln_num_requests_waiting`` | gauge | requests queued in the engine |
| ``kiln_kv_cache_usage_perc`` | gauge | fraction (0–1) of the KV-cache blocks in use |
| ``kiln_time_to_first_token_seconds`` | histogram | arrival to first generated token |
| ``kiln_inter_token_latency_seconds`` | histogram | time between consecutive generated tokens |
| ``kiln_e2e_request_latency_seconds`` | histogram | arrival to the last token |
| ``kiln_prompt_tokens_total`` | counter | prompt tokens of finished requests |
| ``kiln_generation_tokens_total`` | counter | generated tokens |
| ``kiln_request_success_total`` | counter | finished requests by ``finished_reason`` (stop, length) |
| ``kiln_model_version`` | gauge | the version the replica serves |
| ``kiln_energy_joules_total`` | counter | the replica's energy (``source``: nvml, rapl, estimate; kilnlm/energy.py) |

Replicas coalesce deltas (actors/streaming.py), so a message may carry several tokens: the
interval since the previous message is spread evenly over its tokens, one observation each.
"""

from __future__ import annotations

import time

from ray.util import metrics

from kilnlm.actors.protocol import GenerationChunk, ModelInfo
from kilnlm.energy import EnergyMeter

LATENCY_BOUNDARIES_S = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
]  # fmt: skip
"""vLLM's buckets for request latencies (seconds)."""
TOKEN_BOUNDARIES_S = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0]
"""vLLM's buckets for per-token latencies (seconds)."""
_REASON = {"eos": "stop", "stop": "stop", "length": "length"}
TAGS = ("model_name",)


class KilnMetrics:
    """One replica's ``kiln_`` series; every series carries ``model_name`` (the HTTP model id)."""

    def __init__(self, model_name: str) -> None:
        tags = {"model_name": model_name}

        def gauge(name: str, doc: str) -> metrics.Gauge:
            g = metrics.Gauge(f"kiln_{name}", doc, tag_keys=TAGS)
            g.set_default_tags(tags)
            return g

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> metrics.Counter:
            c = metrics.Counter(f"kiln_{name}", doc, tag_keys=(*TAGS, *extra))
            c.set_default_tags(tags)
            return c

        def histogram(name: str, doc: str, bounds: list[float]) -> metrics.Histogram:
            h = metrics.Histogram(f"kiln_{name}", doc, boundaries=bounds, tag_keys=TAGS)
            h.set_default_tags(tags)
            return h

        self.running = gauge("num_requests_running", "Requests in the engine's running batch")
        self.waiting = gauge("num_requests_waiting", "Requests waiting in the engine's queue")
        self.kv_usage = gauge("kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent")
        self.version = gauge("model_version", "Model version this replica serves")
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token", LATENCY_BOUNDARIES_S
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Inter-token latency", TOKEN_BOUNDARIES_S
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency", LATENCY_BOUNDARIES_S
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = counter("generation_tokens_total", "Generation tokens produced")
        self.success = counter(
            "request_success_total", "Finished requests", extra=("finished_reason",)
        )
        self.meter = EnergyMeter("process")
        self.energy = counter("energy_joules_total", "Energy used by the replica", ("source",))
        self._joules = 0.0

    def sample(self, info: ModelInfo) -> None:
        """The gauges, from the replica's periodic ``info()``."""
        self.running.set(info.running)
        self.waiting.set(info.waiting)
        self.kv_usage.set(info.blocks_used / info.blocks_total if info.blocks_total else 0.0)
        self.version.set(info.version)
        joules = self.meter.read()
        if joules > self._joules:
            self.energy.inc(joules - self._joules, tags={"source": self.meter.source})
            self._joules = joules

    def request(self) -> RequestObserver:
        return RequestObserver(self)


class RequestObserver:
    """One request's latencies and counts, fed each chunk the replica yields."""

    def __init__(self, m: KilnMetrics) -> None:
        self.m = m
        self.start = self.last = time.monotonic()
        self.first = True

    def chunk(self, chunk: GenerationChunk) -> None:
        n = len(chunk.token_ids)
        now = time.monotonic()
        if n:
            self.m.generation_tokens.inc(n)
            if self.first:
                self.m.ttft.observe(now - self.start)
                self.first, n = False, n - 1  # the first token's interval is the TTFT
            for _ in range(n):
                self.m.itl.observe((now - self.last) / max(n, 1))
            self.last = now
        if chunk.finish is not None:
            self.m.e2e.observe(now - self.start)
            self.m.prompt_tokens.inc(chunk.finish.prompt_tokens)
            reason = _REASON.get(chunk.finish.finish_reason, chunk.finish.finish_reason)
            self.m.success.inc(1, tags={"finished_reason": reason})


__all__ = ["KilnMetrics", "RequestObserver"]
