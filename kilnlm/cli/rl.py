"""``kiln rl``: KL-regularised RL through the live system (replicas sample, Ray Train updates,
the orchestrator gates and hot-swaps every new policy).

    kiln rl --policy CKPT --reward module:function --prompts FILE --beta B --samples K \\
            --iterations N --out DIR [--max-staleness S] [--json]
    kiln rl --toy [--beta B] --out DIR [--iterations N]

``--prompts`` is JSONL, one ``{"prompt": "..."}`` per line. ``--toy`` trains the toy's π0
(``kilnlm.rl.toy_policy``), exports it to ``DIR/pi0`` and runs the same loop with sampling
restricted to its alphabet and ``<|eos|>``, reporting the exact KL(πθ‖π*) and TV after every
iteration; with ``--beta`` it runs that β and writes ``DIR/toy.json``, without it the three
``TOY_BETAS`` into ``DIR/beta-<β>/``. Ray is imported inside the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TOY_BETAS = (0.5, 1.0, 2.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="KL-regularised RL (RLOO) through the serving replicas")
    p.add_argument("--policy", help="π0's export (also the KL reference)")
    p.add_argument("--reward", help="package.module:function taking (prompt, completion) text")
    p.add_argument("--prompts", help='JSONL file, one {"prompt": ...} per line')
    p.add_argument("--toy", action="store_true", help="the exactly solvable toy (π* enumerated)")
    p.add_argument("--beta", type=float, help="trust in π0 (default 1.0; --toy: three values)")
    p.add_argument("--samples", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--iterations", type=int, default=3, help="sample/update/swap rounds")
    p.add_argument("--steps", type=int, default=1, help="optimiser steps per iteration")
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate (default 3e-3)")
    p.add_argument("--max-staleness", type=int, default=1, help="versions a sample may lag")
    p.add_argument("--max-tokens", type=int, default=16, help="longest completion (not --toy)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--out", required=True, help="folder for metrics.csv, exports, toy.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_rl)


def read_prompts(path: str) -> tuple[str, ...]:
    """Plain prompts from JSONL (``{"prompt": ...}`` lines); chat lines are not supported yet."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
            raise ValueError(f'{path}:{n}: expected {{"prompt": "..."}} (chat lines: not yet)')
        prompts.append(item["prompt"])
    return tuple(prompts)


def cmd_rl(args: argparse.Namespace) -> int:
    summaries = run_toy(args) if args.toy else [run_policy(args)]
    result: Any = summaries[0] if len(summaries) == 1 else summaries
    if args.json:
        json.dump(result, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0


def loop_config(args: argparse.Namespace, **fields: Any) -> Any:
    from kilnlm.cluster.rl import RLLoopConfig

    common = {
        "samples": args.samples, "iterations": args.iterations, "steps": args.steps,
        "lr": args.lr, "max_staleness": args.max_staleness, "workers": args.workers,
    }  # fmt: skip
    return RLLoopConfig(**{**common, **fields})


def run_policy(args: argparse.Namespace) -> dict[str, Any]:
    from kilnlm.actors.serve_orchestrator import default_heldout
    from kilnlm.cluster.rl_run import run_live

    if not (args.policy and args.reward and args.prompts):
        raise ValueError("kiln rl needs --policy, --reward and --prompts (or --toy)")
    if ":" not in args.reward:
        raise ValueError(
            "--reward as a reward-model checkpoint is not supported yet; give module:function"
        )
    cfg = loop_config(
        args, policy=args.policy, reward=args.reward, prompts=read_prompts(args.prompts),
        beta=args.beta or 1.0, out=args.out, max_tokens=args.max_tokens,
    )  # fmt: skip
    heldout = str(default_heldout(Path(args.out).absolute()))
    return run_live(cfg, heldout, say=_say(args))


def run_toy(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kilnlm.cluster.rl_run import run_live
    from kilnlm.rl.reward import TOY_REWARD, load_reward
    from kilnlm.rl.toy import ToyPosterior
    from kilnlm.rl.toy_policy import PROMPT, export_toy_policy, toy_words, train_toy_policy

    out = Path(args.out).absolute()
    toy = train_toy_policy()
    pi0 = str(export_toy_policy(toy, out / "pi0"))
    heldout = out / "heldout.txt"
    heldout.write_text("\n".join(PROMPT + w for w in toy_words(400, 1)), encoding="utf-8")
    reward = args.reward or TOY_REWARD
    summaries = []
    for beta in [args.beta] if args.beta else TOY_BETAS:
        run_out = out if args.beta else out / f"beta-{beta:g}"
        cfg = loop_config(
            args, policy=pi0, reward=reward, prompts=(PROMPT,), beta=beta, out=str(run_out),
            max_tokens=toy.spec.max_len, allowed_token_ids=toy.spec.allowed_ids,
        )  # fmt: skip
        posterior = ToyPosterior.of(toy.model, toy.spec, load_reward(reward), toy.decode, beta)
        _say(args)(
            f"kiln rl --toy: β {beta:g}, KL(π0‖π*) {posterior.measure(posterior.logp0).kl_to_target:.4f}"
        )
        summaries.append(run_live(cfg, str(heldout), posterior, say=_say(args)))
    return summaries


def _say(args: argparse.Namespace) -> Any:
    return (lambda m: print(m, file=sys.stderr)) if args.json else print
