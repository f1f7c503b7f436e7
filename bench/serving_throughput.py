"""bench/serving.py part 1: ``--streams`` concurrent streams on every path (gRPC via Serve,
the engine in-process, transformers' padded-batch ``generate`` and ``generate_batch``), with
the CPU seconds of every process and the time to first delta. See serving.py for the story.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import (
    log_uniform,
    start_local_ray,
    stop_local_ray,
)
from serving_setup import HF, KERNELS, Setup, engine_config, greedy
from tqdm import tqdm

from kilnlm.client import AsyncClient
from kilnlm.engine import AsyncLLMEngine, LLMEngine

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
