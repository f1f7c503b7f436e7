"""Serving benchmarks, side by side on the same weights in one run.

    python bench/serving.py                 # small-10m: ~4 min on 2 cores at load ~3, ~11 at ~15
    python bench/serving.py --parts 1 --preset base-100m --vocab-size 16384 --kernels library
    python bench/serving.py --parts 1 --preset llama-4x256 --vocab-size 4096 --new-tokens 32

Part 1 lives in serving_throughput.py, parts 2-4 in serving_batching.py, the shared setup in
serving_setup.py.

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
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_note
from serving_batching import batching, prefix_reuse, print_batching, print_prefix
from serving_setup import KERNELS, SHAPES, build
from serving_throughput import print_throughput, throughput_with_gateway


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--preset",
        default="small-10m",
        help=f"ModelConfig preset or one of {sorted(SHAPES)} (random init)",
    )
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
