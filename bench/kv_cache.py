"""Naive vs KV-cached greedy generation, side by side on the same model in one run.

The naive path recomputes the whole sequence every step (quadratic in the length); the cached
path runs the prompt once and then one token per step against the preallocated KVCache. Both
produce the same greedy tokens (checked here too), so the ratio is the cache's speed-up.

    python bench/kv_cache.py                      # tiny-3m, block_size 2048, 128/512/1024 tokens
    python bench/kv_cache.py --preset small-10m --new-tokens 128 512
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kilnlm.generate import generate
from kilnlm.model import ModelConfig, Transformer, kv_cache_bytes_per_token
from kilnlm.sampling import SamplingParams


@dataclass
class Row:
    new_tokens: int
    naive_s: float
    cached_s: float
    same_tokens: bool

    @property
    def speedup(self) -> float:
        return self.naive_s / self.cached_s


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-3m", help="ModelConfig preset (default tiny-3m)")
    p.add_argument("--block-size", type=int, default=2048, help="context length of the model")
    p.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512, 1024])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per size; the table shows the fastest of each"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="model and cache dtype"
    )
    return p.parse_args(argv)


def build_model(args: argparse.Namespace) -> Transformer:
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset, block_size=args.block_size)
    need = args.prompt_len + max(args.new_tokens)
    if need > cfg.block_size:
        raise SystemExit(f"--block-size {cfg.block_size} is too small for {need} tokens")
    dtype = getattr(torch, args.dtype)
    return Transformer(cfg).to(device=args.device, dtype=dtype).eval()


def timed(
    model: Transformer, prompt: list[int], n: int, use_cache: bool
) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=n)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, params, use_cache=use_cache)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    assert not isinstance(out, list)
    return time.perf_counter() - start, out.token_ids


def run(args: argparse.Namespace) -> list[Row]:
    torch.set_num_threads(args.threads)
    model = build_model(args)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_len,), generator=g).tolist()
    timed(model, prompt, 8, True), timed(model, prompt, 8, False)  # warm-up (allocator, kernels)
    rows = []
    runs = [(n, r) for n in args.new_tokens for r in range(args.repeats)]
    best: dict[int, Row] = {}
    for n, _ in tqdm(runs, desc="naive + cached runs", unit="pair"):
        # interleaved, so a burst of load on a shared machine hits both paths alike
        cached_s, cached = timed(model, prompt, n, use_cache=True)
        naive_s, naive = timed(model, prompt, n, use_cache=False)
        old = best.get(n, Row(n, math.inf, math.inf, True))
        best[n] = Row(n, min(old.naive_s, naive_s), min(old.cached_s, cached_s), cached == naive)
    rows = [best[n] for n in args.new_tokens]
    return rows


def print_table(args: argparse.Namespace, model_cfg: ModelConfig, rows: list[Row]) -> None:
    per_token = kv_cache_bytes_per_token(model_cfg, getattr(torch, args.dtype))
    print(
        f"\n{args.preset} (block_size {model_cfg.block_size}), prompt {args.prompt_len} tokens, "
        f"{args.device} {args.dtype}, {args.threads} threads, seed {args.seed}; "
        f"KV cache {per_token} B/token; best of {args.repeats}; "
        f"load average now {os.getloadavg()[0]:.1f} (other processes skew wall times)"
    )
    print(
        f"{'new tokens':>10} | {'naive s':>8} | {'cached s':>8} | {'ms/token':>8} | "
        f"{'speed-up':>8} | same tokens"
    )
    print(f"{'-' * 10}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 11}")
    for r in rows:
        print(
            f"{r.new_tokens:>10} | {r.naive_s:>8.2f} | {r.cached_s:>8.2f} | "
            f"{1000 * r.cached_s / r.new_tokens:>8.2f} | {r.speedup:>7.1f}x | {r.same_tokens}"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = run(args)
    print_table(args, ModelConfig.from_preset(args.preset, block_size=args.block_size), rows)


if __name__ == "__main__":
    main()
