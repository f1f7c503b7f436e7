"""Hot-swap under load: promote N times while concurrent gRPC streams run, per model size.

    python bench/hotswap.py               # small-10m x3 swaps, base-100m x2: ~3 min at load ~5
    python bench/hotswap.py --presets small-10m --swaps 5 --streams 16
    python bench/hotswap.py --swap-mode drain   # new weights in host memory, flip after a drain

For each preset: a random-init model (vocabulary from a BPE tokenizer trained on the standard
library's sources) exported as version 1 and N more exports of the same shape (other seeds);
local Ray, the orchestrator actor and a Serve application of ``--replicas`` LLMServer replicas
behind the gRPC gateway on 127.0.0.1, serving version 1. ``--streams`` client threads then
stream greedy generations back to back over gRPC, and every ``--gap-s`` seconds the bench
registers the next export with the orchestrator (what the trainer's hook does) and promotes
it through the Admin API (what ``kiln promote`` does): the gate (checksums, load, held-out
perplexity, smoke generation), then the two-phase swap on every replica.

Reported per size:
- swap latency: registered -> every replica serving (the orchestrator's record; the gate
  included), and its parts: the swap proper (stage sent -> all committed) and stage per replica;
- requests failed (goal 0), and how many streams were in flight across a swap;
- truth (goal 0 wrong): every stream's greedy tokens against the greedy tokens of the version
  its finish message names, recomputed offline from that version's export (``kilnlm.generate``
  on the loaded export, under the engine's batch-invariant numerics);
- throughput dip: tokens/s the clients received while a swap ran (whole swap, gate phase,
  stage + commit phase, and the worst ``--window-s`` window) against steady state (every
  window with no swap running, after the first seconds of load).

Every process keeps torch to one thread, replicas ask for half a logical CPU: everything fits
on a 2-core machine, and shares it, so the gate and the staging replicas compete with serving
for the same cores. That competition is what the dip measures.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
from _common import (
    export_random_model,
    machine_note,
    start_local_ray,
    stdlib_texts,
    stop_local_ray,
    train_tokenizer,
)
from tqdm import tqdm

from kilnlm.client import Client
from kilnlm.engine import EngineConfig
from kilnlm.proto import admin_pb2, admin_pb2_grpc

TOKEN = "bench-hotswap-token"
PROMPT = "def main():\n    parser = argparse.ArgumentParser("


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["small-10m", "base-100m"])
    p.add_argument("--swaps", type=int, nargs="+", default=[3, 2], help="promotions per preset")
    p.add_argument(
        "--vocab-sizes",
        type=int,
        nargs="+",
        default=[8192, 16384],
        help="BPE vocabulary per preset (16384 puts base-100m at ~100 M parameters)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--streams", type=int, default=8, help="concurrent client streams")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per generation")
    p.add_argument("--gap-s", type=float, default=8.0, help="steady load before/between swaps")
    p.add_argument("--warmup-s", type=float, default=3.0, help="load left out of steady state")
    p.add_argument("--window-s", type=float, default=2.0, help="throughput window")
    p.add_argument("--heldout-tokens", type=int, default=512, help="tokens the gate scores")
    p.add_argument("--swap-mode", choices=["double", "drain"], default="double")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every figure to this file")
    args = p.parse_args(argv)
    for name in ("swaps", "vocab_sizes"):
        if len(getattr(args, name)) != len(args.presets):
            p.error(f"--{name.replace('_', '-')} needs one value per preset")
    return args


# --------------------------------------------------------------------------------------------
# Load: client threads streaming back to back


@dataclass
class Stream:
    sent: float
    end: float = 0.0
    version: int | None = None
    error: str | None = None
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    """(wall time, tokens) of every delta received."""
    tokens: list[int] = field(default_factory=list)


class Load:
    """``n`` client threads, each streaming greedy generations back to back until stopped."""

    def __init__(self, address: str, n: int, max_tokens: int) -> None:
        self.address, self.max_tokens = address, max_tokens
        self.streams: list[Stream] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(n)]

    def __enter__(self) -> Load:
        self.started = time.time()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped = time.time()  # from here on fewer streams run: not steady state
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _client(self) -> None:
        with Client(self.address, timeout=300) as client:
            while not self._stop.is_set():
                self._one(client)

    def _one(self, client: Client) -> None:
        s = Stream(sent=time.time())
        self.streams.append(s)
        try:
            for delta in client.generate_stream(PROMPT, temperature=0, max_tokens=self.max_tokens):
                s.arrivals.append((time.time(), len(delta.token_ids)))
                s.tokens += delta.token_ids
                if delta.finish is not None:
                    s.version = delta.finish.model_version
        except grpc.RpcError as e:
            s.error = f"{e.code().name}: {e.details()}"
        s.end = time.time()


# --------------------------------------------------------------------------------------------
# The system: orchestrator + Serve application


def admin(address: str, method: str, request: Any, timeout: float = 600.0) -> Any:
    with grpc.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return getattr(stub, method)(
            request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=timeout
        )


def wait_for_replicas(address: str, n: int, timeout: float = 300.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(admin(address, "Status", admin_pb2.StatusRequest(), 30).replicas) == n:
            return
        time.sleep(0.5)
    raise SystemExit(f"only some of the {n} replicas attached to the orchestrator in {timeout} s")


@dataclass
class System:
    address: str
    orchestrator: Any
    app_name: str


def start_system(args: argparse.Namespace, preset: str, first: Path, root: Path) -> System:
    from kilnlm.actors import serve_app
    from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator
    from kilnlm.serving_config import ServeConfig

    app_name = f"bench-hotswap-{preset}"
    orchestrator = start_orchestrator(
        OrchestratorConfig(
            storage_path=str(root / "registry"),
            heldout=str(root / "heldout.txt"),
            app_name=app_name,
            max_ppl_increase=float("inf"),  # random models: the margin means nothing here
            heldout_max_tokens=args.heldout_tokens,
            stage_timeout_s=600.0,
        )
    )
    engine = EngineConfig(
        kv_budget_mib=64, max_num_seqs=64, max_tokens_limit=256, swap_mode=args.swap_mode
    )
    config = ServeConfig(
        checkpoint=str(first),
        port=0,
        http_port=0,
        app_name=app_name,
        num_replicas=args.replicas,
        admin_token=TOKEN,
        engine=engine,
        replica_num_cpus=0.5,
    )
    address = serve_app.run(config)
    wait_for_replicas(address, args.replicas)
    system = System(address, orchestrator, app_name)
    register(system, first)  # the files the replicas started with keep their number
    admin(address, "Promote", admin_pb2.PromoteRequest(version=1))  # now promoted: nothing moves
    return system


def stop_system(system: System) -> None:
    import ray
    from ray import serve

    serve.delete(system.app_name)
    ray.kill(system.orchestrator, no_restart=True)


def register(system: System, path: Path) -> int:
    import ray

    return ray.get(system.orchestrator.register.remote(str(path)))


# --------------------------------------------------------------------------------------------
# One preset: exports, load, N promotions


@dataclass
class Swap:
    version: int
    registered: float
    returned: float
    """Wall time the Promote call returned."""
    record: dict[str, Any]


def exports(args: argparse.Namespace, preset: str, vocab: int, n: int, root: Path) -> list[Path]:
    """Version 1 and n more random models of ``preset`` (other seeds), one tokenizer."""
    texts = stdlib_texts(6_000_000 if vocab > 8192 else 2_000_000)
    tokenizer = train_tokenizer(texts, vocab)
    root.mkdir(parents=True, exist_ok=True)
    (root / "heldout.txt").write_text(texts[-1][:20_000], encoding="utf-8")
    paths = []
    for v in tqdm(range(1, n + 2), desc=f"{preset}: exports", unit="ckpt"):
        paths.append(export_random_model(root / f"v{v}", preset, tokenizer, args.seed + v, v))
    return paths


def count_params(path: Path) -> int:
    """Parameters of an export, from the safetensors header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118


def swap_once(system: System, path: Path) -> Swap:
    registered = time.time()
    version = register(system, path)
    response = admin(system.address, "Promote", admin_pb2.PromoteRequest(version=version))
    rec = response.swap
    record = {
        "outcome": rec.outcome,
        "swap_mode": rec.swap_mode,
        "registered_to_serving_s": rec.registered_to_serving_seconds,
        "swap_s": rec.seconds,
        "started_unix": rec.started_unix,
        "stage_s": [r.stage_seconds for r in rec.replicas],
        "commit_s": [r.commit_seconds for r in rec.replicas],
    }
    return Swap(version, registered, time.time(), record)


def run_preset(args: argparse.Namespace, i: int, root: Path) -> dict[str, Any]:
    preset, n_swaps, vocab = args.presets[i], args.swaps[i], args.vocab_sizes[i]
    paths = exports(args, preset, vocab, n_swaps, root)
    size = count_params(paths[0])
    system = start_system(args, preset, paths[0], root)
    swaps = []
    try:
        with Load(system.address, args.streams, args.max_tokens) as load:
            for path in tqdm(paths[1:], desc=f"{preset}: swaps under load", unit="swap"):
                time.sleep(args.gap_s)
                swaps.append(swap_once(system, path))
            time.sleep(args.gap_s)
    finally:
        stop_system(system)
    streams = [s for s in load.streams if s.end]
    head = {"preset": preset, "vocab_size": vocab, "num_params": size}
    exported = {1: paths[0]} | {w.version: p for w, p in zip(swaps, paths[1:], strict=True)}
    truth = check_truth(args, streams, exported)
    return head | summarize(args, load, streams, swaps) | truth


def offline_greedy(path: Path, max_tokens: int) -> list[int]:
    """PROMPT's greedy tokens under the export at ``path``, computed here with the reference
    generator under the engine's batch-invariant numerics (the replicas' default)."""
    from kilnlm import checkpoint
    from kilnlm.engine import batch_invariant
    from kilnlm.generate import generate
    from kilnlm.sampling import SamplingParams

    tok = checkpoint.load_tokenizer(path)
    model = checkpoint.load(path)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    with batch_invariant():
        out = generate(model, tok.encode_prompt(PROMPT), params, eos_id=tok.eos_id)
    return out.token_ids


def check_truth(
    args: argparse.Namespace, streams: list[Stream], exported: dict[int, Path]
) -> dict[str, Any]:
    """Each finished stream's tokens against the named version's offline greedy tokens."""
    expected = {v: offline_greedy(path, args.max_tokens) for v, path in exported.items()}
    finished = [s for s in streams if s.error is None and s.version is not None]
    wrong = [s for s in finished if s.tokens != expected.get(s.version, [])[: len(s.tokens)]]
    short = [s for s in finished if len(s.tokens) != args.max_tokens]
    return {
        "streams_checked": len(finished),
        "streams_wrong_tokens": len(wrong),
        "streams_short": len(short),
        "wrong_examples": [{"version": s.version, "tokens": s.tokens[:8]} for s in wrong[:3]],
    }


# --------------------------------------------------------------------------------------------
# Analysis


def tokens_between(streams: list[Stream], start: float, end: float) -> int:
    return sum(n for s in streams for t, n in s.arrivals if start <= t < end)


def rate(streams: list[Stream], start: float, end: float) -> float:
    return tokens_between(streams, start, end) / max(end - start, 1e-9)


def windows(start: float, end: float, width: float) -> list[tuple[float, float]]:
    n = int((end - start) // width)
    return [(start + k * width, start + (k + 1) * width) for k in range(n)]


def summarize(
    args: argparse.Namespace, load: Load, streams: list[Stream], swaps: list[Swap]
) -> dict[str, Any]:
    busy = [(w.registered, w.returned) for w in swaps]

    def overlaps(a: float, b: float) -> bool:
        return any(a < hi and lo < b for lo, hi in busy)

    span = windows(load.started + args.warmup_s, load.stopped, args.window_s)
    steady_windows = [w for w in span if not overlaps(*w)]
    steady = statistics.median(rate(streams, *w) for w in steady_windows)
    per_swap, before_from = [], load.started + args.warmup_s
    for w in swaps:  # the gap just before each swap is its local baseline (load drifts)
        per_swap.append(swap_figures(args, streams, w, steady, before_from))
        before_from = w.returned
    failed = [s for s in streams if s.error is not None]
    return {
        "steady_tokens_per_s": steady,
        "steady_windows": len(steady_windows),
        "streams": len(streams),
        "failed": len(failed),
        "failed_during_swaps": sum(overlaps(s.sent, s.end) for s in failed),
        "errors": sorted({s.error for s in failed if s.error})[:5],
        "straddling_swaps": sum(overlaps(s.sent, s.end) for s in streams),
        "versions_served": sorted({s.version for s in streams if s.version is not None}),
        "swaps": per_swap,
    }


def swap_figures(
    args: argparse.Namespace, streams: list[Stream], w: Swap, steady: float, before_from: float
) -> dict[str, Any]:
    start, end = w.registered, w.returned
    stage_start = w.record["started_unix"]
    inside = windows(start, end, args.window_s) or [(start, end)]
    during, before = rate(streams, start, end), rate(streams, before_from, start)
    return w.record | {
        "version": w.version,
        "client_register_to_promoted_s": end - start,
        "tokens_per_s_before": before,
        "tokens_per_s_whole_swap": during,
        "tokens_per_s_gate_phase": rate(streams, start, stage_start),
        "tokens_per_s_stage_commit_phase": rate(streams, stage_start, end),
        "tokens_per_s_worst_window": min(rate(streams, *x) for x in inside),
        "dip_vs_before": 1 - during / before,
        "dip_vs_steady": 1 - during / steady,
    }


def print_preset(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\n{res['preset']} ({res['num_params'] / 1e6:.1f} M parameters, vocab "
        f"{res['vocab_size']}), {args.replicas} replicas, swap mode {args.swap_mode}, "
        f"{args.streams} concurrent streams of {args.max_tokens} tokens"
    )
    print(
        f"  requests: {res['streams']} streams completed or failed, {res['failed']} failed "
        f"({res['failed_during_swaps']} overlapping a swap); {res['straddling_swaps']} overlapped "
        f"a swap; versions named by responses: {res['versions_served']}"
    )
    for e in res["errors"]:
        print(f"    error: {e}")
    print(
        f"  truth: {res['streams_checked']} streams checked against their version's offline "
        f"greedy tokens: {res['streams_wrong_tokens']} wrong, {res['streams_short']} short"
    )
    print(
        f"  steady state: {res['steady_tokens_per_s']:.0f} tokens/s ({res['steady_windows']} windows)"
    )
    print(
        "  v | registered->serving s | swap (stage+commit) s | stage s per replica | "
        "tok/s: before / swap / gate / stage+commit / worst window | dip vs before (vs steady)"
    )
    for s in res["swaps"]:
        stages = ", ".join(f"{x:.2f}" for x in s["stage_s"])
        rates = " / ".join(
            f"{s[k]:.0f}"
            for k in (
                "tokens_per_s_before",
                "tokens_per_s_whole_swap",
                "tokens_per_s_gate_phase",
                "tokens_per_s_stage_commit_phase",
                "tokens_per_s_worst_window",
            )
        )
        print(
            f"  {s['version']} | {s['registered_to_serving_s']:>21.2f} | {s['swap_s']:>21.2f} | "
            f"{stages:>19} | {rates} | {s['dip_vs_before']:.0%} ({s['dip_vs_steady']:.0%})"
            + ("" if s["outcome"] == "ok" else f"  outcome {s['outcome']}")
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    results: dict[str, Any] = {"args": vars(args), "machine_before": machine_note(), "presets": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-hotswap-") as tmp:
        start_local_ray(8, Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp")))
        try:
            for i, preset in enumerate(args.presets):
                results["presets"].append(run_preset(args, i, Path(tmp) / preset))
        finally:
            stop_local_ray()
    results["machine_after"] = machine_note()
    print(f"\n{time.perf_counter() - started:.0f} s in all, CPU fp32, 1 torch thread per process")
    print(f"machine before: {results['machine_before']}")
    print(f"machine after:  {results['machine_after']}")
    for res in results["presets"]:
        print_preset(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    bad = [r for r in results["presets"] if r["failed"] or r["streams_wrong_tokens"]]
    if bad:
        raise SystemExit(f"failed or wrong streams in {[r['preset'] for r in bad]}")


if __name__ == "__main__":
    main()
