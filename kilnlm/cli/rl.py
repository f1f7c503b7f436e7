"""``kiln rl``: KL-regularised RL through the live system (replicas sample, Ray Train updates,
the orchestrator gates and hot-swaps every new policy).

    kiln rl --policy CKPT --reward module:function|RM_EXPORT --prompts FILE --beta B \\
            --samples K --iterations N --out DIR [--max-staleness S] [--no-clients] [--json]
    kiln rl --toy [--beta B] --out DIR [--iterations N]
    kiln rl --defaults [--from-dir runs/posttrain] [--beta B] --out DIR

``--reward`` is a Python function ``package.module:function`` or a reward-model export
(``kiln reward train``; scored as ``kiln reward score`` scores, see ``cluster/rl_reward.py``).
``--prompts`` is JSONL, ``{"prompt": "..."}`` or ``{"messages": [...]}`` per line (a chat is
rendered with the policy's chat template and the assistant's generation prompt; see
``kilnlm.rl.prompts``). A background client streams through the gateway for the whole run and
its counts go into the summary (``--no-clients`` turns it off). ``--defaults`` runs post-training
I's SFT export as π0 on held-out prompts of the embedded instruction set with a reward model
trained on the SFT policy's own replies (built in ``--from-dir`` when missing), for three β
chosen from that model's spread (``kilnlm.rl.defaults``), and draws the trade-off of the three
in ``DIR/reward-kl.png``. ``--toy`` trains the toy's π0
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

from kilnlm.cli.output import print_json

TOY_BETAS = (0.5, 1.0, 2.0)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rl", help="KL-regularised RL (RLOO) through the serving replicas")
    p.add_argument("--policy", help="π0's export (also the KL reference)")
    p.add_argument(
        "--reward",
        help="package.module:function taking (prompt, completion) text, or a reward-model export",
    )
    p.add_argument(
        "--prompts", help='JSONL file, {"prompt": "..."} or {"messages": [...]} per line'
    )
    p.add_argument("--toy", action="store_true", help="the exactly solvable toy (π* enumerated)")
    p.add_argument(
        "--defaults",
        action="store_true",
        help="post-training I's SFT model, reward model and held-out prompts (see --from-dir)",
    )
    p.add_argument(
        "--from-dir",
        default="runs/posttrain",
        help="--defaults: the folder with the sft/ and reward/ exports (default runs/posttrain)",
    )
    p.add_argument("--prompt-count", type=int, help="--defaults: held-out prompts used (8)")
    p.add_argument(
        "--beta", type=float, help="trust in π0 (default 1.0; --toy, --defaults: three values)"
    )
    p.add_argument("--samples", type=int, help="samples per prompt (8; --toy 64; --defaults 8)")
    p.add_argument(
        "--iterations", type=int, help="sample/update/swap rounds (3; --toy 20; --defaults 4)"
    )
    p.add_argument("--steps", type=int, help="optimiser steps per iteration (1; --defaults 2)")
    p.add_argument(
        "--lr", type=float, help="peak learning rate (3e-3; --toy 1.5e-3; --defaults 3e-4)"
    )
    p.add_argument("--max-staleness", type=int, default=1, help="versions a sample may lag")
    p.add_argument(
        "--max-tokens", type=int, help="longest completion (16; --defaults 24; not --toy)"
    )
    p.add_argument(
        "--no-clients",
        dest="clients",
        action="store_false",
        help="no background client streaming through the gateway during the run",
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--out", required=True, help="folder for metrics.csv, exports, toy.json")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_rl)


GENERIC = {"samples": 8, "iterations": 3, "steps": 1, "lr": 3e-3, "max_tokens": 16}
"""Defaults of the size flags for --policy (--toy: ``TOY``; --defaults: ``DefaultsSize``)."""

TOY = {**GENERIC, "samples": 64, "iterations": 20, "steps": 4, "lr": 1.5e-3}
"""--toy's sizes: what reaches the 5x tolerance at every β (docs/rl.md, "Live loop")."""


def cmd_rl(args: argparse.Namespace) -> int:
    if args.toy and args.defaults:
        raise ValueError("give one of --toy or --defaults")
    if args.defaults:
        summaries = run_defaults(args)
    else:
        fill_sizes(args, TOY if args.toy else GENERIC)
        summaries = run_toy(args) if args.toy else [run_policy(args)]
    result: Any = summaries[0] if len(summaries) == 1 else summaries
    if args.json:
        print_json(result)
    return 0


def fill_sizes(args: argparse.Namespace, defaults: dict[str, Any]) -> None:
    """Every size flag the user did not give takes the mode's default."""
    for name, value in defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)


def loop_config(args: argparse.Namespace, **fields: Any) -> Any:
    from kilnlm.cluster.rl import RLLoopConfig

    common = {
        "samples": args.samples, "iterations": args.iterations, "steps": args.steps,
        "lr": args.lr, "max_staleness": args.max_staleness, "workers": args.workers,
    }  # fmt: skip
    return RLLoopConfig(**{**common, **fields})


def run_policy(args: argparse.Namespace) -> dict[str, Any]:
    from kilnlm.rl.prompts import read_prompts

    if not (args.policy and args.reward and args.prompts):
        raise ValueError("kiln rl needs --policy, --reward and --prompts (or --toy, --defaults)")
    prompts = read_prompts(args.prompts)
    return run_checked(args, args.policy, args.reward, prompts, args.beta or 1.0, args.out)


def run_checked(
    args: argparse.Namespace, policy: str, reward: str, prompts: Any, beta: float, out: str
) -> dict[str, Any]:
    """Check what can be checked before Ray starts (the reward, the lengths), then run."""
    from kilnlm.actors.serve_orchestrator import default_heldout
    from kilnlm.cluster.rl_run import run_live
    from kilnlm.rl.prompts import check_fits
    from kilnlm.rl.reward import reward_kind

    kind = reward_kind(reward)
    check_fits(policy, prompts, args.max_tokens, "the policy")
    if kind == "model":
        check_fits(reward, prompts, args.max_tokens + 1, "the reward model")
    cfg = loop_config(
        args, policy=policy, reward=reward, prompts=prompts, beta=beta, out=out,
        max_tokens=args.max_tokens,
    )  # fmt: skip
    heldout = str(default_heldout(Path(out).absolute()))
    return run_live(cfg, heldout, say=_say(args), clients=args.clients)


def run_defaults(args: argparse.Namespace) -> list[dict[str, Any]]:
    """π0 = DIR/sft, reward = DIR/reward, held-out prompts; one run per β, the trade-off PNG."""
    from dataclasses import asdict

    from kilnlm.rl import defaults

    if args.policy or args.reward or args.prompts:
        raise ValueError("--defaults picks --policy, --reward and --prompts itself; drop them")
    size = defaults.DefaultsSize()
    fill_sizes(args, {k: v for k, v in asdict(size).items() if k != "prompts"})
    policy, embedded_reward = defaults.find_exports(args.from_dir)
    reward, onpolicy = defaults.ensure_onpolicy_reward(
        args.from_dir, policy, embedded_reward, _say(args)
    )
    prompts = defaults.heldout_prompts(args.prompt_count or size.prompts)
    out = Path(args.out).absolute()

    def quality(export: str) -> dict[str, Any]:
        return defaults.policy_quality(export, reward, prompts, args.samples, args.max_tokens)

    pi0 = quality(policy)
    summaries = []
    for beta in [args.beta] if args.beta else onpolicy["betas"]:
        _say(args)(f"kiln rl --defaults: β {beta:g}, π0 {policy}, reward {reward}")
        run_out = str(out / f"beta-{beta:g}")
        summary = run_checked(args, policy, reward, prompts, beta, run_out)
        summary["quality"] = {"before": pi0, "after": quality(defaults.final_export(run_out))}
        summaries.append(summary)
    png = defaults.plot_tradeoff(summaries, out / "reward-kl.png")
    table = {
        "reward_model": onpolicy,
        "tradeoff": defaults.tradeoff_rows(summaries),
        "png": None if png is None else str(png),
    }
    (out / "defaults.json").write_text(json.dumps({**table, "runs": summaries}, indent=2) + "\n")
    for row in table["tradeoff"]:
        _say(args)(
            f"β {row['beta']:g}: reward {row['reward_before']:.3f} -> {row['reward_after']:.3f}, "
            f"KL(πθ‖π0)~ {row['kl_before']:.3f} -> {row['kl_after']:.3f}, "
            f"ROUGE-L {row['rouge_l_before']:.3f} -> {row['rouge_l_after']:.3f}"
        )
    return [{**table, "runs": summaries}]


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
    if ":" not in reward:
        raise ValueError("--toy needs a Python reward (module:function): π* is computed from it")
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
        summaries.append(
            run_live(cfg, str(heldout), posterior, say=_say(args), clients=args.clients)
        )
    if not args.beta:
        from kilnlm.cluster.rl_run import plot_toy_betas

        plot_toy_betas(summaries, out / "toy-betas.png")
    return summaries


def _say(args: argparse.Namespace) -> Any:
    return (lambda m: print(m, file=sys.stderr)) if args.json else print
