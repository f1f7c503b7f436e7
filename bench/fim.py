"""Fill-in-the-middle: single-line infill and left-to-right perplexity, FIM rate 0 vs 0.5.

Two models of the same preset are trained from the same seed for the same steps (the same
tokens: compute is matched) on the standard library's short functions, one corpus built with
``fim_rate=0`` and one with ``fim_rate=0.5`` (the same tokenizer: it is trained on the
untransformed train split). Both are then asked, greedily, for a removed body line of
functions from held-out modules (prefix and suffix given, the middle ends at ``<|eos|>``), and
scored left to right on the held-out split, which FIM never touches.

    python bench/fim.py                 # a few minutes on 2 CPU cores
    python bench/fim.py --steps 1000 --cases 400 --json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from kilnlm.fim import infill_ids
from kilnlm.generate import generate
from kilnlm.infill_eval import (
    InfillCase,
    build_function_corpus,
    heldout_nll,
    infill_case,
    score_cases,
    split_functions,
    stdlib_functions,
    train_small,
)
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800, help="training steps per model")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="test-1m")
    p.add_argument("--max-lines", type=int, default=4, help="longest function kept, in lines")
    p.add_argument("--cases", type=int, default=200, help="held-out infill cases")
    p.add_argument("--rates", default="0,0.5", help="comma-separated FIM rates to compare")
    p.add_argument("--out-dir", help="where the corpora go (default: a temporary folder)")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def infill_greedy(model: torch.nn.Module, tok: Tokenizer, case: InfillCase) -> str:
    params = SamplingParams(temperature=0, max_tokens=48)
    ids = infill_ids(tok, case.prefix, case.suffix)
    return generate(model, ids, params, eos_id=tok.eos_id, decode=tok.decode).text


def run(args: argparse.Namespace, root: Path) -> list[dict[str, float]]:
    train_funcs, heldout_funcs = split_functions(list(stdlib_functions(args.max_lines)))
    cases = [c for f in heldout_funcs if (c := infill_case(f.source))][: args.cases]
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        start = time.perf_counter()
        corpus = build_function_corpus(train_funcs, root, rate)
        model = train_small(corpus, args.steps, args.preset, args.seq_len, args.batch_size)
        tok = Tokenizer.load(corpus / "tokenizer.json")
        scores = score_cases(lambda c, m=model, t=tok: infill_greedy(m, t, c), cases)
        nll = heldout_nll(model, corpus, args.seq_len)
        rows.append(
            {"fim_rate": rate, **scores, "heldout_nll": nll, "heldout_ppl": math.exp(nll),
             "cases": len(cases), "seconds": time.perf_counter() - start}
        )  # fmt: skip
        print(format_row(rows[-1]), file=sys.stderr, flush=True)
    return rows


def format_row(r: dict[str, float]) -> str:
    return (
        f"| {r['fim_rate']:.1f} | {r['exact_match']:.3f} | {r['parses']:.3f} | "
        f"{r['heldout_nll']:.3f} | {r['heldout_ppl']:.2f} |"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args, Path(args.out_dir or tmp))
    if args.json:  # stdout holds the one JSON document
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, {args.preset}")
    print("| FIM rate | infill exact match | spliced parses | held-out NLL | held-out ppl |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(format_row(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
