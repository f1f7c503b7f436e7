"""bench/serving.py parts 2-4: continuous vs static batching under Poisson arrivals, KV memory
use, prefix reuse (all in-process). See serving.py for the story."""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from _common import (
    log_uniform,
    percentile,
)
from serving_setup import KERNELS, Setup, engine_config, greedy
from tqdm import tqdm

from kilnlm.engine import LLMEngine

# --------------------------------------------------------------------------------------------
# Parts 2 and 3: Poisson arrivals, continuous vs static batching, KV memory


@dataclass
class Arrival:
    at: float
    prompt: list[int]
    max_tokens: int
    first: float | None = None
    end: float | None = None


def poisson_workload(args: argparse.Namespace, corpus_ids: list[int], rate: float) -> list[Arrival]:
    """Mixed lengths (log-uniform), exponential gaps at ``rate``; the same seed for every run.
    The gaps are drawn for rate 1 and scaled, so another rate changes only the spacing."""
    rng = random.Random(args.seed + 1)
    work, at, start = [], 0.0, 0
    for _ in range(args.poisson_requests):
        at += rng.expovariate(1.0) / rate
        n_prompt = log_uniform(rng, *args.poisson_prompt)
        n_out = log_uniform(rng, *args.poisson_output)
        work.append(Arrival(at, corpus_ids[start : start + n_prompt], n_out))
        start += n_prompt
    return work


@dataclass
class KvSample:
    paged: float
    """Live tokens / slots of the referenced blocks (the engine's ``kv_utilization``)."""
    contiguous_context: float
    """Live tokens / (running requests x context length)."""
    contiguous_exact: float
    """Live tokens / sum over running requests of (prompt + max_tokens)."""
    budget_used: float
    running: int


@dataclass
class Replay:
    policy: str
    arrivals: list[Arrival]
    kv: list[KvSample] = field(default_factory=list)
    preemptions: int = 0


def kv_sample(engine: LLMEngine) -> KvSample | None:
    running = engine.scheduler.running
    if not running:
        return None
    stats = engine.stats()
    live = sum(r.seqs[0].num_computed for r in running)
    context = engine.model_config.block_size
    exact = sum(len(r.prompt) + r.params.max_tokens for r in running)
    return KvSample(
        paged=stats["kv_utilization"],
        contiguous_context=live / (len(running) * context),
        contiguous_exact=live / exact,
        budget_used=stats["used_blocks"] / stats["total_blocks"],
        running=len(running),
    )


def admit(engine: LLMEngine, arrivals: list[Arrival], queue: deque, n: int) -> None:
    """Hand the first n queued arrivals to the engine."""
    for _ in range(n):
        i = queue.popleft()
        engine.add_request(str(i), arrivals[i].prompt, greedy(arrivals[i].max_tokens))


def to_admit(policy: str, queue: deque, idle: bool, all_arrived: bool, batch: int) -> int:
    """continuous: every arrival at once (the engine admits at each step); static: a batch of
    ``batch`` once the engine is empty (a smaller one only when no more will come)."""
    if policy == "continuous":
        return len(queue)
    if idle and (len(queue) >= batch or (all_arrived and queue)):
        return min(batch, len(queue))
    return 0


def replay(engine: LLMEngine, work: list[Arrival], policy: str, static_batch: int) -> Replay:
    """Feed ``work`` to the engine at its arrival times (wall clock) under a batching policy."""
    arrivals = [Arrival(a.at, a.prompt, a.max_tokens) for a in work]
    result, queue, next_i, done = Replay(policy, arrivals), deque(), 0, 0
    t0 = time.perf_counter()
    while done < len(arrivals):
        now = time.perf_counter() - t0
        while next_i < len(arrivals) and arrivals[next_i].at <= now:
            queue.append(next_i)
            next_i += 1
        idle, all_arrived = not engine.has_unfinished(), next_i == len(arrivals)
        admit(engine, arrivals, queue, to_admit(policy, queue, idle, all_arrived, static_batch))
        if not engine.has_unfinished():
            if next_i < len(arrivals):
                time.sleep(max(0.0, arrivals[next_i].at - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        t = time.perf_counter() - t0
        for out in outputs:
            a = arrivals[int(out.request_id)]
            if a.first is None and out.token_ids:
                a.first = t
            if out.finished:
                a.end, done = t, done + 1
        sample = kv_sample(engine)
        if sample is not None:
            result.kv.append(sample)
    result.preemptions = engine.stats()["num_preemptions"]
    return result


def summarize_replay(r: Replay) -> dict:
    a = r.arrivals
    tokens = sum(x.max_tokens for x in a)
    span = max(x.end for x in a) - min(x.at for x in a)  # type: ignore[type-var]
    ttft = [x.first - x.at for x in a]  # type: ignore[operator]
    latency = [x.end - x.at for x in a]  # type: ignore[operator]
    return {
        "output_tokens_per_s": tokens / span,
        "requests_per_s": len(a) / span,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "latency_p50_s": percentile(latency, 50),
        "latency_p99_s": percentile(latency, 99),
        "preemptions": r.preemptions,
    }


def summarize_kv(r: Replay) -> dict:
    busy = max(s.running for s in r.kv)
    loaded = [s for s in r.kv if s.running >= busy / 2] or r.kv

    def mean(xs: list[KvSample], key: str) -> float:
        return statistics.fmean(getattr(s, key) for s in xs)

    return {
        "steps_sampled": len(r.kv),
        "peak_running": busy,
        "paged_mean": mean(r.kv, "paged"),
        "paged_min": min(s.paged for s in r.kv),
        "paged_mean_loaded": mean(loaded, "paged"),
        "contiguous_context_mean": mean(r.kv, "contiguous_context"),
        "contiguous_exact_mean": mean(r.kv, "contiguous_exact"),
        "budget_used_max": max(s.budget_used for s in r.kv),
    }


def batching(args: argparse.Namespace, setup: Setup) -> dict:
    """Parts 2 and 3: the workload all at once (capacity, KV memory at full load), then at
    Poisson arrival times, under both policies; a fresh engine for every run."""
    burst = poisson_workload(args, setup.corpus_ids, 1.0)
    for a in burst:
        a.at = 0.0
    out: dict[str, Any] = {}
    runs = [(k, p) for k in args.kernels for p in ("continuous", "static")]
    for kernels, policy in tqdm(runs, desc="part 2: all at once", unit="run"):
        engine = LLMEngine(setup.model, engine_config(args, batch_invariant=KERNELS[kernels]))
        r = replay(engine, burst, policy, args.static_batch)
        out[f"burst: {policy}, {kernels}"] = summarize_replay(r)
        if policy == "continuous":
            out[f"kv_memory, {kernels}"] = summarize_kv(r)
    capacity = out[f"burst: continuous, {args.kernels[0]}"]["requests_per_s"]
    rate = args.rate or args.load * capacity
    out |= {"capacity_requests_per_s": capacity, "rate_per_s": rate}
    work = poisson_workload(args, setup.corpus_ids, rate)
    for kernels, policy in tqdm(runs, desc="part 2: Poisson arrivals", unit="run"):
        engine = LLMEngine(setup.model, engine_config(args, batch_invariant=KERNELS[kernels]))
        r = replay(engine, work, policy, args.static_batch)
        out[f"poisson: {policy}, {kernels}"] = summarize_replay(r)
        if policy == "continuous":
            out[f"kv_memory_poisson, {kernels}"] = summarize_kv(r)
    return out


# --------------------------------------------------------------------------------------------
# Part 4: prefix reuse


def first_token(engine: LLMEngine, ids: list[str]) -> dict[str, float]:
    """Step until each request of ``ids`` has its first token; seconds from now to it.
    The requests then run to their end (untimed) so the next measurement starts clean."""
    start, ttft = time.perf_counter(), {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and out.request_id in ids and out.request_id not in ttft:
                ttft[out.request_id] = time.perf_counter() - start
    return ttft


def prefix_once(args: argparse.Namespace, setup: Setup, kernels: str, reuse: bool) -> dict:
    ids, k = setup.corpus_ids, args.prefix_requests
    system = ids[-args.system_tokens :]
    questions = [ids[i * 32 : (i + 1) * 32] for i in range(2 * k + 1)]
    config = engine_config(args, batch_invariant=KERNELS[kernels], enable_prefix_caching=reuse)
    engine = LLMEngine(setup.model, config)
    engine.add_request("warm", system + questions[0], greedy(4))  # the system prompt is seen
    first_token(engine, ["warm"])
    one_by_one = []
    for i in range(1, k + 1):
        engine.add_request(f"s{i}", system + questions[i], greedy(4))
        one_by_one += first_token(engine, [f"s{i}"]).values()
    burst_ids = [f"b{i}" for i in range(k)]
    for i, rid in enumerate(burst_ids):
        engine.add_request(rid, system + questions[k + 1 + i], greedy(4))
    burst = list(first_token(engine, burst_ids).values())
    stats = engine.stats()
    return {
        "ttft_one_at_a_time_median_s": statistics.median(one_by_one),
        "ttft_burst_p50_s": percentile(burst, 50),
        "ttft_burst_max_s": max(burst),
        "prefix_hit_share": stats["prefix_hit_tokens"] / max(stats["prefix_query_tokens"], 1),
    }


def prefix_reuse(args: argparse.Namespace, setup: Setup) -> dict:
    runs = [(k, reuse) for k in args.kernels for reuse in (True, False)]
    return {
        f"{'on' if reuse else 'off'}, {k}": prefix_once(args, setup, k, reuse)
        for k, reuse in tqdm(runs, desc="part 4: prefix reuse", unit="run")
    }


def print_batching(res: dict, args: argparse.Namespace) -> None:
    print(
        f"\n2. {args.poisson_requests} requests, prompts {args.poisson_prompt[0]}-"
        f"{args.poisson_prompt[1]} tokens, outputs {args.poisson_output[0]}-"
        f"{args.poisson_output[1]} (log-uniform); static batch = {args.static_batch}. All at once, "
        f"then Poisson arrivals at {res['rate_per_s']:.2f}/s (= {args.load:.0%} of the "
        f"{res['capacity_requests_per_s']:.2f}/s continuous managed all at once, unless --rate)"
    )
    print(
        f"{'arrivals: policy, kernels':<34} | tok/s | TTFT p50 / p99 s | "
        "latency p50 / p99 s | preempted"
    )
    for arrivals in ("burst", "poisson"):
        for k in args.kernels:
            for policy in ("continuous", "static"):
                name = f"{arrivals}: {policy}, {k}"
                r = res[name]
                print(
                    f"{name:<34} | {r['output_tokens_per_s']:>5.0f} | "
                    f"{r['ttft_p50_s']:>7.2f} / {r['ttft_p99_s']:<6.2f} | "
                    f"{r['latency_p50_s']:>8.2f} / {r['latency_p99_s']:<8.2f} | "
                    f"{r['preemptions']}"
                )
    print("\n3. KV memory, continuous: live tokens / reserved slots")
    for key in [k for k in res if k.startswith("kv_memory")]:
        kv = res[key]
        where = "all at once" if key.startswith("kv_memory,") else "Poisson"
        print(
            f"  {where}, {key.split(', ')[1]} kernels ({kv['steps_sampled']} steps, peak "
            f"{kv['peak_running']} running): paged {kv['paged_mean']:.1%} mean (min "
            f"{kv['paged_min']:.1%}; {kv['paged_mean_loaded']:.1%} at >= half the peak); "
            f"contiguous max_len = context {kv['contiguous_context_mean']:.1%}, "
            f"= prompt + max_tokens {kv['contiguous_exact_mean']:.1%}"
        )


def print_prefix(res: dict, args: argparse.Namespace) -> None:
    print(
        f"\n4. Prefix reuse: {args.system_tokens}-token shared system prompt + 32-token question, "
        f"TTFT one at a time (median of {args.prefix_requests}) and in a burst of "
        f"{args.prefix_requests}"
    )
    for k in args.kernels:
        on, off = res[f"on, {k}"], res[f"off, {k}"]
        one_on, one_off = on["ttft_one_at_a_time_median_s"], off["ttft_one_at_a_time_median_s"]
        print(
            f"  {k} kernels: one at a time {one_on * 1000:.0f} ms (reuse on) vs "
            f"{one_off * 1000:.0f} ms (off) = {one_off / one_on:.1f}x; burst p50 "
            f"{on['ttft_burst_p50_s'] * 1000:.0f} vs {off['ttft_burst_p50_s'] * 1000:.0f} ms, max "
            f"{on['ttft_burst_max_s'] * 1000:.0f} vs {off['ttft_burst_max_s'] * 1000:.0f} ms; "
            f"prompt tokens from the cache {on['prefix_hit_share']:.0%} (on)"
        )
