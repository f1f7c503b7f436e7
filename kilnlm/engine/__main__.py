"""Quick in-process throughput probe: ``python -m kilnlm.engine --preset tiny-3m --requests 32``.

Random weights, random prompts, greedy decoding: it measures the engine (scheduling, paged
cache, batched forward passes), not a model. bench/serving.py holds the real benchmarks.
"""

from __future__ import annotations

import argparse
import time

import torch

from kilnlm.engine.engine import EngineConfig, LLMEngine
from kilnlm.model import ModelConfig, Transformer
from kilnlm.sampling import SamplingParams


def probe(args: argparse.Namespace) -> dict[str, float]:
    """Run args.requests concurrent greedy requests; tokens/s and KV utilisation under load."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    config = EngineConfig(
        kv_budget_mib=args.kv_mib,
        max_num_seqs=args.requests,
        batch_invariant=not args.library_kernels,
        device=args.device,
        dtype=args.dtype,
    )
    engine = LLMEngine(model, config)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for i in range(args.requests):
        n = int(torch.randint(args.min_prompt, args.max_prompt + 1, (1,), generator=g))
        prompt = torch.randint(0, vocab, (n,), generator=g).tolist()
        engine.add_request(
            f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens)
        )
    tokens, utilisation = 0, []
    start = time.perf_counter()
    while engine.has_unfinished():
        tokens += sum(len(o.token_ids) for o in engine.step())
        stats = engine.stats()
        if stats["num_running"] == args.requests:
            utilisation.append(stats["kv_utilization"])
    seconds = time.perf_counter() - start
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "kv_utilization_mean": sum(utilisation) / max(len(utilisation), 1),
        "kv_utilization_min": min(utilisation, default=0.0),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-3m")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=64)
    p.add_argument("--kv-mib", type=float, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--library-kernels", action="store_true", help="batch_invariant=False")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = probe(args)
    kernels = "library" if args.library_kernels else "batch-invariant"
    print(
        f"{args.preset}, {args.requests} concurrent greedy requests x {args.max_tokens} tokens, "
        f"{kernels} kernels: {result['tokens']} tokens in {result['seconds']:.2f} s = "
        f"{result['tokens_per_s']:.0f} tokens/s; KV utilisation while all run: "
        f"mean {result['kv_utilization_mean']:.1%}, min {result['kv_utilization_min']:.1%}"
    )


if __name__ == "__main__":
    main()
