"""Serving benchmarks, side by side on the same weights in one run.

    python bench/serving.py                 # small-10m: ~4 min on 2 cores at load ~3, ~11 at ~15
    python bench/serving.py --parts 1 --preset base-100m --vocab-size 16384 --kernels library

One random-init model of a preset (vocabulary from a BPE tokenizer trained on the standard
library's sources), exported with ``kilnlm.checkpoint.save_pretrained``; every path below loads
that same export. Greedy decoding everywhere, and the EOS logit is pinned below the others, so
every request generates exactly the number of tokens asked for on every path (equal work).

1. Throughput: ``--streams`` (32) concurrent streaming requests, ``--new-tokens`` each:
   a. through the gateway: real local Ray Serve (one LLMServer replica, one Gateway) and gRPC
      on 127.0.0.1, one asyncio client;
   b. the same engine in-process (``AsyncLLMEngine``, the class each replica runs);
   c. ``transformers`` ``LlamaForCausalLM.generate`` on the same export (``from_pretrained``),
      one left-padded batch of the same prompts;
   d. ``transformers`` ``generate_batch`` (its continuous batching), explicitly sized.
   a/c is the serving speed-up over the reference (goal >= 2), a/b the gateway's overhead
   (goal >= 0.85). Run twice: every request asking for ``--new-tokens`` (the brief's case),
   then mixed lengths (log-uniform 8 .. 2x), where one padded batch must run every row to the
   longest and only each request's own tokens count. The CPU seconds of every process
   (client, gateway, replica) are read from /proc around each run: where the time goes.
2. Continuous vs static batching (in-process engine) under Poisson arrivals with mixed prompt
   and output lengths. Static = the same engine, but a batch is admitted only when the engine is
   empty and ``--static-batch`` requests wait (or no more will come); the batch then runs to
   completion, so only the batching policy differs. Throughput, p50/p99 TTFT and latency, with
   every request arriving at once, then at Poisson times. The arrival rate is ``--load`` times the engine's own capacity on this workload (measured first
   with every request arriving at once), unless ``--rate`` is given.
3. KV memory, from the continuous runs of 2 (all at once: full load; Poisson): share of the reserved (referenced) KV blocks' slots
   holding live tokens, at every step, against contiguous per-request allocation of the same
   live requests reserving the whole context (``max_len``) or, at best, prompt + max_tokens.
4. Prefix reuse: time to first token of requests sharing a 512-token system prompt, prefix
   caching on vs off (``EngineConfig.enable_prefix_caching``), one at a time and in a burst.

The engine's default ``batch_invariant=True`` (fixed-shape kernels: a seeded request's tokens do
not depend on the batch) is measured everywhere, and so are the library's kernels
(``batch_invariant=False``): in-process and through a second Serve application in 1, and in
2-4 unless ``--kernels invariant``. Every process keeps torch to ``--threads`` (1) threads: the
replica, the in-process engine and transformers compute on one core each. Repeats of 1 are
interleaved (so a burst of load from other jobs hits every path alike); medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    export_random_model,
    log_uniform,
    machine_note,
    percentile,
    start_local_ray,
    stdlib_texts,
    stop_local_ray,
    text_prompt,
    token_stream,
    train_tokenizer,
)
from tqdm import tqdm

from kilnlm import checkpoint
from kilnlm.client import AsyncClient
from kilnlm.engine import AsyncLLMEngine, EngineConfig, LLMEngine
from kilnlm.model import Transformer
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer

KERNELS = {"invariant": True, "library": False}  # name -> EngineConfig.batch_invariant
HF = "hf generate (padded batch)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="small-10m", help="ModelConfig preset (random init)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary = model's")
    p.add_argument("--context", type=int, default=1024, help="model block_size")
    p.add_argument("--threads", type=int, default=1, help="torch threads per computing process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    p.add_argument("--kv-mib", type=float, default=64, help="engine KV budget")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=["1", "2", "4"],
        default=["1", "2", "4"],
        help="which parts to run (part 3 comes with part 2)",
    )
    g = p.add_argument_group("1. throughput")
    g.add_argument("--repeats", type=int, default=3, help="interleaved runs per path")
    g.add_argument("--streams", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--prompt", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    g.add_argument("--skip-gateway", action="store_true", help="no Ray: in-process paths only")
    g.add_argument(
        "--stream-interval",
        type=float,
        nargs="+",
        default=None,
        help="ServeConfig.stream_interval_s of the replicas; several values deploy one "
        "application each, side by side (default: ServeConfig's)",
    )
    g.add_argument("--stream-max-tokens", type=int, default=None, help="ServeConfig's likewise")
    g.add_argument("--skip-hf-batch", action="store_true", help="skip generate_batch")
    g = p.add_argument_group("2-3. Poisson arrivals")
    g.add_argument("--poisson-requests", type=int, default=24)
    g.add_argument("--rate", type=float, default=None, help="arrivals/s (default: --load)")
    g.add_argument("--load", type=float, default=0.7, help="share of measured capacity offered")
    g.add_argument("--static-batch", type=int, default=8)
    g.add_argument("--poisson-prompt", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    g.add_argument("--poisson-output", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    g = p.add_argument_group("4. prefix reuse")
    g.add_argument("--system-tokens", type=int, default=512)
    g.add_argument("--prefix-requests", type=int, default=4, help="one at a time, then a burst")
    p.add_argument("--json", default=None, help="also write every figure to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Setup: tokenizer, one export, prompts


@dataclass
class Setup:
    path: Path
    tokenizer: Tokenizer
    model: Transformer
    corpus_ids: list[int]
    prompts: list[tuple[str, list[int]]]
    """Part 1's prompts: (text the gateway gets, the exact ids every path computes)."""


def build(args: argparse.Namespace, root: Path) -> Setup:
    texts = stdlib_texts(2_000_000)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    path = export_random_model(
        root / "model", args.preset, tokenizer, args.seed, block_size=args.context
    )
    corpus_ids = token_stream(tokenizer, texts[::-1], 200_000)  # other files than the BPE's head
    rng = random.Random(args.seed)
    prompts, start = [], 0
    for _ in range(args.streams):
        n = log_uniform(rng, *args.prompt)
        prompts.append(text_prompt(tokenizer, corpus_ids[start : start + n]))
        start += n
    model = checkpoint.load(path).eval()
    return Setup(path, tokenizer, model, corpus_ids[start:], prompts)


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    return EngineConfig(
        kv_budget_mib=args.kv_mib, max_num_seqs=64, max_tokens_limit=args.context, **overrides
    )


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


# --------------------------------------------------------------------------------------------
# Part 1: 32 concurrent streams on each path


@dataclass
class Run:
    tokens: int
    seconds: float
    outputs: list[list[int]]
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds each process spent during the run (where the time goes)."""
    ttft_s: list[float] = field(default_factory=list)
    """Per stream: seconds from the run's start to its first delta (streaming paths only)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc; 0 elsewhere."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def timed(fn: Callable[[], tuple[Any, ...]], pids: dict[str, int]) -> Run:
    """Run fn (returns outputs, seconds and maybe first-delta times) and charge the CPU time of
    the named processes."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    before["bench (client / in-process)"] = cpu_seconds()
    outputs, seconds, *ttft = fn()
    cpu = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
    cpu["bench (client / in-process)"] = cpu_seconds() - before["bench (client / in-process)"]
    return Run(sum(map(len, outputs)), seconds, outputs, cpu, ttft[0] if ttft else [])


async def _grpc_streams(address: str, prompts: list[str], ns: list[int]) -> tuple:
    firsts: list[float] = []

    async def one(client: AsyncClient, prompt: str, n: int) -> list[int]:
        ids: list[int] = []
        async for delta in client.generate_stream(prompt, temperature=0, max_tokens=n):
            if not ids:
                firsts.append(time.perf_counter() - start)
            ids += delta.token_ids
        return ids

    async with AsyncClient(address, timeout=600) as client:
        start = time.perf_counter()
        outputs = await asyncio.gather(
            *(one(client, p, n) for p, n in zip(prompts, ns, strict=True))
        )
        return list(outputs), time.perf_counter() - start, firsts


async def _engine_streams(engine: AsyncLLMEngine, prompts: list[list[int]], ns: list[int]) -> tuple:
    firsts: list[float] = []

    async def one(i: int, prompt: list[int], n: int) -> list[int]:
        ids: list[int] = []
        async for out in engine.generate(f"r{i}-{time.monotonic_ns()}", prompt, greedy(n)):
            if not ids:
                firsts.append(time.perf_counter() - start)
            ids += out.token_ids
        return ids

    start = time.perf_counter()
    outputs = await asyncio.gather(
        *(one(i, p, n) for i, (p, n) in enumerate(zip(prompts, ns, strict=True)))
    )
    return list(outputs), time.perf_counter() - start, firsts


@torch.inference_mode()
def hf_generate(
    hf: Any, prompts: list[list[int]], ns: list[int], pad_id: int
) -> tuple[list, float]:
    """One left-padded batch through transformers' generate, greedy. A batch has one length:
    every row runs to max(ns) and row i keeps its first ns[i] tokens (the useful work)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, T)
    start = time.perf_counter()
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(ns),
        do_sample=False,
        eos_token_id=None,  # never stop early: the same work as the other paths
        pad_token_id=pad_id,
    )
    seconds = time.perf_counter() - start
    return [row[width : width + n].tolist() for row, n in zip(out, ns, strict=True)], seconds


def hf_generate_batch(
    hf: Any, prompts: list[list[int]], n: int, num_blocks: int
) -> tuple[list, float]:
    """transformers' continuous batching. Sized by hand: left to size itself on CPU it probes
    memory (without psutil it cannot) and took a minute before generating anything here."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    cb = ContinuousBatchingConfig(
        page_size=16, num_blocks=num_blocks, max_batch_tokens=512, max_requests_per_batch=64
    )
    start = time.perf_counter()
    result = hf.generate_batch(
        prompts, generation_config=gen, continuous_batching_config=cb, warmup=False
    )
    seconds = time.perf_counter() - start
    by_prompt = {tuple(o.prompt_ids): o.generated_tokens for o in result.values()}
    return [list(by_prompt[tuple(p)]) for p in prompts], seconds


def load_hf(path: Path) -> Any:
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@dataclass
class App:
    address: str
    pids: dict[str, int]
    """Process ids of the replica and the gateway (for CPU accounting)."""


def deploy(args: argparse.Namespace, setup: Setup) -> dict[str, App]:
    """One Serve application (gateway + 1 replica) per kernel choice."""
    from kilnlm.actors import serve_app
    from kilnlm.serving_config import ServeConfig

    apps = {}
    intervals = args.stream_interval or [None]
    for name in args.kernels:
        for interval in intervals:
            label = name if len(intervals) == 1 else f"{name}, stream {interval * 1000:.0f} ms"
            config = ServeConfig(
                checkpoint=str(setup.path),
                port=0,
                http_port=0,
                app_name=f"bench-serving-{label.replace(', stream ', '-').replace(' ', '')}",
                num_replicas=1,
                torch_threads=args.threads,
                engine=engine_config(args, batch_invariant=KERNELS[name]),
                **stream_options(args, interval),
            )
            address = serve_app.run(config)
            apps[label] = App(address, serve_pids(config.app_name))
    return apps


def stream_options(args: argparse.Namespace, interval: float | None) -> dict[str, Any]:
    """The replicas' stream coalescing, where the command line sets it."""
    options = {
        "stream_interval_s": interval,
        "stream_max_tokens": args.stream_max_tokens,
    }
    return {k: v for k, v in options.items() if v is not None}


def serve_pids(app_name: str) -> dict[str, int]:
    """The pids of an application's LLMServer replica and Gateway: Ray titles each actor's
    process ``ray::ServeReplica:<app>:<deployment>`` (Linux /proc; empty elsewhere)."""
    pids = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        for role, deployment in (("replica", "LLMServer"), ("gateway", "Gateway")):
            if title.startswith(f"ray::ServeReplica:{app_name}:{deployment}"):
                pids[role] = int(proc.name)
    return pids


def throughput(args: argparse.Namespace, setup: Setup, apps: dict[str, App]) -> dict:
    """Part 1: every path on two workloads, ``--repeats`` interleaved rounds."""
    texts = [t for t, _ in setup.prompts]
    ids = [i for _, i in setup.prompts]
    hf = load_hf(setup.path)
    engines = {
        k: AsyncLLMEngine(LLMEngine(setup.model, engine_config(args, batch_invariant=KERNELS[k])))
        for k in args.kernels
    }
    num_blocks = len(ids) * -(-(args.prompt[1] + args.new_tokens) // 16) + 64
    pad = setup.tokenizer.pad_id

    def paths(ns: list[int]) -> dict[str, Callable[[], Run]]:
        """Every path, generating ns[i] tokens for prompt i (the first len(ns) prompts)."""
        k = len(ns)
        out = {HF: lambda: timed(lambda: hf_generate(hf, ids[:k], ns, pad), {})}
        if not args.skip_hf_batch and len(set(ns)) == 1:  # one GenerationConfig for all
            out["hf generate_batch"] = lambda: timed(
                lambda: hf_generate_batch(hf, ids[:k], ns[0], num_blocks), {}
            )
        for name, e in engines.items():
            out[f"engine in-process, {name}"] = lambda e=e: timed(
                lambda: asyncio.run(_engine_streams(e, ids[:k], ns)), {}
            )
        for name, app in apps.items():
            out[f"gRPC via Serve, {name}"] = lambda a=app: timed(
                lambda: asyncio.run(_grpc_streams(a.address, texts[:k], ns)), a.pids
            )
        return out

    for run in tqdm(paths([8] * min(8, len(ids))).values(), desc="warm-up", unit="path"):
        run()
    rng = random.Random(args.seed + 2)
    workloads = {
        "equal": [args.new_tokens] * len(ids),
        "mixed": [log_uniform(rng, 8, 2 * args.new_tokens) for _ in ids],
    }
    try:
        return {
            name: summarize_throughput(interleaved(paths(ns), args.repeats, name), ns)
            for name, ns in workloads.items()
        } | {"mixed_lengths": workloads["mixed"]}
    finally:
        for engine in engines.values():
            engine.shutdown()


def interleaved(paths: dict[str, Callable[[], Run]], repeats: int, label: str) -> dict:
    """Run every path ``repeats`` times, rotating the order each round."""
    runs: dict[str, list[Run]] = {name: [] for name in paths}
    names = list(paths)
    with tqdm(total=len(names) * repeats, desc=f"part 1: {label} lengths", unit="run") as bar:
        for r in range(repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                runs[name].append(paths[name]())
                bar.update()
    return runs


def summarize_throughput(runs: dict[str, list[Run]], ns: list[int]) -> dict:
    reference = runs[HF][0].outputs
    table = {}
    for name, rs in runs.items():
        rates = [r.tokens_per_s for r in rs]
        same = sum(a == b for a, b in zip(rs[0].outputs, reference, strict=True))
        table[name] = {
            "tokens_per_s_median": statistics.median(rates),
            "tokens_per_s_min": min(rates),
            "tokens_per_s_max": max(rates),
            "same_tokens_as_hf_generate": f"{same}/{len(reference)}",
            "every_request_got_its_tokens": all([len(o) for o in r.outputs] == ns for r in rs),
            "cpu_s_per_1k_tokens": {
                proc: 1000 * statistics.fmean(r.cpu_s[proc] / r.tokens for r in rs)
                for proc in rs[0].cpu_s
            },
        }
        ttft = sorted(t for r in rs for t in r.ttft_s)
        if ttft:  # streaming paths: when each stream's first delta arrived, from the burst
            table[name]["ttft_s_p50"] = ttft[len(ttft) // 2]
            table[name]["ttft_s_p99"] = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    return table


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


# --------------------------------------------------------------------------------------------
# Report


def ratio(table: dict, a: str, b: str) -> float:
    return table[a]["tokens_per_s_median"] / table[b]["tokens_per_s_median"]


def print_throughput(res: dict, args: argparse.Namespace) -> None:
    mixed = res["mixed_lengths"]
    titles = {
        "equal": f"{args.new_tokens} new tokens each",
        "mixed": f"{min(mixed)}-{max(mixed)} new tokens (log-uniform, {sum(mixed)} in all; "
        f"HF generate runs every row to {max(mixed)})",
    }
    for workload, title in titles.items():
        table = res[workload]
        print(f"\n1{workload[0]}. {args.streams} concurrent greedy requests, {title}")
        print(
            f"{'path':<44} | tok/s median |   min-max | same as HF | TTFT p50/p99 s | "
            "CPU s per 1k tokens"
        )
        for name, row in table.items():
            spread = f"{row['tokens_per_s_min']:.0f}-{row['tokens_per_s_max']:.0f}"
            cpu = ", ".join(
                f"{p.split()[0]} {s:.2f}" for p, s in row["cpu_s_per_1k_tokens"].items()
            )
            short = "" if row["every_request_got_its_tokens"] else " (a request got fewer tokens!)"
            ttft = (
                f"{row['ttft_s_p50']:.3f}/{row['ttft_s_p99']:.3f}" if "ttft_s_p50" in row else "-"
            )
            print(
                f"{name:<44} | {row['tokens_per_s_median']:>12.0f} | {spread:>9} | "
                f"{row['same_tokens_as_hf_generate']:>10} | {ttft:>14} | {cpu}{short}"
            )
        for k in args.kernels:
            local = f"engine in-process, {k}"
            print(f"  {k} kernels: in-process / HF generate = {ratio(table, local, HF):.2f}x")
            for grpc in (n for n in table if n.startswith(f"gRPC via Serve, {k}")):
                print(
                    f"    {grpc.removeprefix('gRPC via Serve, ')}: gRPC / HF generate = "
                    f"{ratio(table, grpc, HF):.2f}x (goal >= 2); gRPC / in-process = "
                    f"{ratio(table, grpc, local):.2f} (goal >= 0.85)"
                )


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


def throughput_with_gateway(args: argparse.Namespace, setup: Setup) -> dict:
    """Part 1, with local Ray and the Serve applications up only while it runs (idle replicas
    would still poll the orchestrator's name during parts 2-4)."""
    apps = {}
    if not args.skip_gateway:
        start_local_ray(8, Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")))
    try:
        if not args.skip_gateway:
            apps = deploy(args, setup)
        return throughput(args, setup, apps)
    finally:
        if not args.skip_gateway:
            stop_local_ray()


def run(args: argparse.Namespace, root: Path) -> dict:
    torch.set_num_threads(args.threads)
    setup = build(args, root)
    results: dict[str, Any] = {
        "args": vars(args),
        "num_params": setup.model.num_params(),
        "machine_before": machine_note(),
    }
    if "1" in args.parts:
        results["throughput"] = throughput_with_gateway(args, setup)
    if "2" in args.parts:
        results["batching"] = batching(args, setup)
    if "4" in args.parts:
        results["prefix"] = prefix_reuse(args, setup)
    results["machine_after"] = machine_note()
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-serving-") as tmp:
        results = run(args, Path(tmp))
    print(
        f"\n{args.preset} ({results['num_params'] / 1e6:.1f} M parameters, context "
        f"{args.context}, vocab {args.vocab_size}), CPU fp32, {args.threads} torch thread(s) per "
        f"process, seed {args.seed}; {time.perf_counter() - start:.0f} s in all"
    )
    print(f"machine before: {results['machine_before']}")
    print(f"machine after:  {results['machine_after']}")
    if "throughput" in results:
        print_throughput(results["throughput"], args)
    if "batching" in results:
        print_batching(results["batching"], args)
    if "prefix" in results:
        print_prefix(results["prefix"], args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
