"""``kiln run``, ``kiln plan``, ``kiln eval``, ``kiln sample``: the library's commands (no Ray)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from kilnlm import config
from kilnlm.cli.output import print_json


def register(sub: argparse._SubParsersAction) -> None:
    from kilnlm.sampling import SamplingParams

    p = sub.add_parser(
        "run", help="the in-process main job: corpus, tokenizer, train, evaluate, sample"
    )
    p.add_argument("--config", help="TOML/JSON/YAML file of LocalRunConfig fields")
    p.add_argument("--out-dir", help="where the corpus, model and summary go (default runs/local)")
    p.add_argument("--time-budget-s", type=float, help="stop training after this many seconds")
    p.add_argument("--max-steps", type=int, help="optimiser steps")
    p.add_argument(
        "--source",
        action="append",
        help="a folder or file of text/JSONL (repeatable); default: stdlib",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "plan",
        help="compute-optimal parameters and tokens for a FLOP budget (--flops), or GPU memory "
        "per rank with and without each memory lever (--gpus)",
    )
    p.add_argument("--flops", type=float, help="training compute C in FLOPs, e.g. 1e18")
    p.add_argument(
        "--vocab-size", type=int, help="vocabulary (default: 32000 for --flops, the preset's)"
    )
    from kilnlm.cli.training import add_memory_plan_arguments

    add_memory_plan_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("eval", help="perplexity and bits per byte of a checkpoint on a text file")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="an export directory, a HF Llama directory, or an export's s3:// / gs:// URI",
    )
    p.add_argument("--text", required=True, help="a UTF-8 text file")
    p.add_argument(
        "--stride", type=int, help="sliding-window stride (default: non-overlapping windows)"
    )
    p.add_argument("--json", action="store_true", help="print JSON, including per-token logprobs")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sample", help="generate from a checkpoint in-process")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--no-cache", action="store_true", help="naive generation (full recompute each step)"
    )
    p.add_argument("--json", action="store_true", help="print JSON (text and token ids)")
    config.add_arguments(p, SamplingParams, skip=("stop", "stop_token_ids"))
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.set_defaults(func=cmd_sample)


def cmd_run(args: argparse.Namespace) -> int:
    from kilnlm.pipeline import LocalRunConfig, run

    cfg = config.load(LocalRunConfig, args.config)
    if args.out_dir:
        cfg.out_dir = args.out_dir
    if args.time_budget_s is not None:
        cfg.time_budget_s = args.time_budget_s
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.source:
        cfg.corpus.sources = list(args.source)
    run(cfg)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from kilnlm.scaling import compute_optimal, format_plan, suggest_config

    if args.gpus is not None:
        from kilnlm.cli.training import cmd_plan_memory

        return cmd_plan_memory(args)
    if args.flops is None:
        raise ValueError("kiln plan needs --flops (model size for a budget) or --gpus (memory)")
    plan = compute_optimal(args.flops)
    try:
        shape = suggest_config(args.flops, args.vocab_size or 32000)
    except ValueError as e:  # budget too small for any shape: still print the plan
        print(f"(no model shape: {e})", file=sys.stderr)
        shape = None
    if args.json:
        from dataclasses import asdict

        from kilnlm.model import num_params

        shape_json = None if shape is None else {**asdict(shape), "params": num_params(shape)}
        print_json({**asdict(plan), "tokens_per_param": plan.tokens_per_param, "shape": shape_json})
    else:
        print(format_plan(plan, shape))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kilnlm.eval import EvalResult, token_logprobs

    model, tok = _load(args.checkpoint)
    text = _read_text(args.text)
    ids = tok.encode_prompt(text)  # a Hugging Face tokenizer's BOS first, as transformers does
    if len(ids) < 2:
        raise ValueError(f"{args.text}: need at least 2 tokens of text to score, got {len(ids)}")
    lp = token_logprobs(model, ids, stride=args.stride)
    result = EvalResult.from_total_nll(-float(lp.double().sum()), len(lp), len(text.encode()))
    if args.json:
        _print_json(
            {
                **_as_dict(result),
                "token_ids": ids,
                "token_logprobs": [round(x, 6) for x in lp.tolist()],
            }
        )
    else:
        print(
            f"tokens {result.tokens}  mean NLL {result.mean_nll:.4f}  perplexity {result.perplexity:.3f}  "
            f"bits/byte {result.bits_per_byte:.4f}"
        )
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from kilnlm.generate import generate
    from kilnlm.sampling import SamplingParams

    model, tok = _load(args.checkpoint)
    overrides = config.overrides_from(args, SamplingParams)
    if args.stop:
        overrides["stop"] = args.stop
    params = SamplingParams(**overrides)
    prompt_ids = tok.encode(args.prompt)
    result = generate(
        model, prompt_ids, params, use_cache=not args.no_cache, eos_id=tok.eos_id, decode=tok.decode
    )
    if args.json:
        _print_json(
            {
                "prompt": args.prompt,
                "text": result.text,
                "token_ids": result.token_ids,
                "finish_reason": result.finish_reason,
                "prompt_tokens": result.num_prompt_tokens,
            }
        )
    else:
        print(args.prompt + (result.text or ""))
    return 0


def _load(path: str) -> tuple[Any, Any]:
    from kilnlm.checkpoint import load, load_tokenizer, remote

    path = remote.local_dir(path)  # s3://, gs://: this machine's verified cached copy
    model = load(path).eval()
    tok = load_tokenizer(path)
    if tok is None:
        raise FileNotFoundError(
            f"{path} has no tokenizer.json; export the model with its tokenizer"
        )
    return model, tok


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e


def _as_dict(result: Any) -> dict[str, Any]:
    from dataclasses import asdict

    d = asdict(result)
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _print_json(obj: dict[str, Any]) -> None:
    print_json(obj)
