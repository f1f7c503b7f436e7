"""``kiln up``: the main job. Train, validate, hot-swap and serve in one Ray cluster, live.

``--local`` (the default) starts local Ray and runs the loop here; ``--ray-address ADDRESS`` joins
a running cluster and runs it here (what the job does on a head node); ``--cluster ADDRESS``
submits it as a Ray job to that dashboard address and follows its output. This module parses
and delegates to ``kilnlm.actors.up_app``; Ray is imported only inside the command.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import replace
from typing import Any

from kilnlm import config
from kilnlm.cli.output import print_json
from kilnlm.cli.training import add_fim_argument

NOT_FORWARDED = {"help", "local", "cluster", "ray_address", "no_follow", "func", "command"}
"""Flags of `kiln up` that concern the submitting side only (the job runs on the head)."""


def register(sub: argparse._SubParsersAction) -> None:
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.data import CorpusConfig
    from kilnlm.model import ModelConfig
    from kilnlm.train import TrainConfig

    p = sub.add_parser(
        "up",
        help="the main job: train, validate and hot-swap checkpoints into serving, live",
        description="Train with Ray Train workers while the orchestrator validates each "
        "checkpoint and hot-swaps the good ones into Ray Serve replicas behind the gRPC gateway "
        "(127.0.0.1:50051); prints a generation after each promotion and a summary at the end. "
        "Flags override the --config file (a `kiln train` JobConfig), which overrides the "
        "laptop defaults. The admin token comes from $KILN_ADMIN_TOKEN.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="start local Ray (the default)")
    where.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="submit the loop as a Ray job to this Jobs API address (http://127.0.0.1:8265) "
        "and follow its output; --config/--serve-config files travel with the job",
    )
    where.add_argument(
        "--ray-address", help="join this running Ray cluster ('auto' on its head) and run here"
    )
    p.add_argument("--no-follow", action="store_true", help="with --cluster: submit and return")
    p.add_argument("--config", help="JobConfig file (train.yaml): preset, data_dir, [train], ...")
    p.add_argument("--serve-config", help="file whose [serve] section is a ServeConfig")
    p.add_argument(
        "--exit-after",
        type=float,
        metavar="SECONDS",
        help="after training ends and its last checkpoint is settled, serve this long, then "
        "stop (0: stop at once); default: serve until Ctrl-C",
    )
    p.add_argument("--prompt", help="prompt each promoted version completes (greedy)")
    p.add_argument("--prompt-tokens", type=int, help="tokens of that generation (default 48)")
    p.add_argument("--load-clients", type=int, help="concurrent background streams (default 1)")
    p.add_argument("--max-ppl-increase", type=float, help="gate margin (default 0.05: 5 %%)")
    p.add_argument("--port", type=int, help="gateway port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--http-port", type=int, help="OpenAI-compatible HTTP API port (default 8000; 0: off)"
    )
    p.add_argument(
        "--grid-g-per-kwh",
        type=float,
        help="carbon intensity of your electricity for the CO2 figures (default 475, the world's)",
    )
    p.add_argument("--host", help="gateway address (default 127.0.0.1)")
    p.add_argument("--num-replicas", type=int, help="LLM server replicas (default 2)")
    p.add_argument("--app-name", help="Serve application name (default kiln)")
    p.add_argument(
        "--replica-resource",
        metavar="NAME",
        help="custom Ray resource each replica asks one unit of, so replicas run only on the "
        "nodes that advertise it (with --worker-resource: trainers and replicas on separate "
        "nodes; docs/deploy.md, multi-node)",
    )
    p.add_argument("--preset", help="model preset (kilnlm.model.PRESETS), default tiny-3m")
    p.add_argument("--data", help="a corpus folder built by kilnlm.data.build_corpus")
    p.add_argument("--source", action="append", help="text/JSONL file or folder (repeatable)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    config.add_arguments(p, TrainConfig)
    config.add_arguments(p, ClusterConfig)
    config.add_arguments(p, ModelConfig, skip=("vocab_size",))
    config.add_arguments(p, CorpusConfig, prefix="corpus_")
    add_fim_argument(p)
    p.set_defaults(func=cmd_up, up_actions=[a for a in p._actions if a.option_strings])


def job_from_args(args: argparse.Namespace) -> Any:  # -> JobConfig (imports stay inside)
    """The --config file's JobConfig (or the laptop default of ``kiln up``), then the flags."""
    from kilnlm.actors.up_app import default_job
    from kilnlm.cli.training import job_from_args as with_flags

    return with_flags(args, default=default_job)


def serve_from_args(args: argparse.Namespace, token: str | None) -> Any:  # -> ServeConfig
    from kilnlm.actors.up_app import default_serve
    from kilnlm.config import from_dict, read_file
    from kilnlm.serving_config import ServeConfig

    serve = default_serve()
    if args.serve_config:
        serve = from_dict(ServeConfig, dict(read_file(args.serve_config).get("serve", {})))
    names = ("port", "http_port", "host", "num_replicas", "app_name", "replica_resource")
    flags = {k: getattr(args, k) for k in names}
    return replace(serve, admin_token=token, **{k: v for k, v in flags.items() if v is not None})


def up_config(args: argparse.Namespace, token: str | None) -> Any:  # -> UpConfig
    from kilnlm.actors.up_app import LoadConfig, UpConfig

    given = {
        k: getattr(args, k)
        for k in ("prompt", "prompt_tokens", "max_ppl_increase", "exit_after", "ray_address")
        if getattr(args, k) is not None
    }
    load = LoadConfig() if args.load_clients is None else LoadConfig(clients=args.load_clients)
    if args.grid_g_per_kwh is not None:
        from kilnlm.energy import EnergyConfig

        given["energy"] = EnergyConfig(grid_g_per_kwh=args.grid_g_per_kwh)
    return UpConfig(job=job_from_args(args), serve=serve_from_args(args, token), load=load, **given)


def cmd_up(args: argparse.Namespace) -> int:
    if args.cluster:
        return cmd_submit(args)
    from kilnlm.actors.up_app import admin_token, run_up

    cfg = up_config(args, admin_token(local=args.ray_address is None, say=print))
    # Ctrl-C must stop the loop even when a shell started it in the background (SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        summary = run_up(cfg)
    except KeyboardInterrupt:
        print("kiln up: stopped", file=sys.stderr)
        return 0
    if args.json:
        print_json(summary.to_dict())
    return 0 if summary.ok else 1


def cmd_submit(args: argparse.Namespace) -> int:
    from kilnlm.actors.up_app import submit_up

    token = os.environ.get("KILN_ADMIN_TOKEN")
    if not token:
        raise ValueError(
            "set $KILN_ADMIN_TOKEN first (export KILN_ADMIN_TOKEN=$(openssl rand -hex 32)): the "
            "job's gateway needs it for promote/rollback, and you for kiln status"
        )
    files = {
        flag: path
        for flag, path in (("--config", args.config), ("--serve-config", args.serve_config))
        if path
    }
    for path in files.values():
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist")
    try:
        return submit_up(
            args.cluster, forwarded_flags(args), files, token, follow=not args.no_follow
        )
    except ConnectionError as e:  # submit_up turns Ray's errors into one: print a clear line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"kiln up: cannot submit to the Ray Jobs API at {args.cluster}: {first}\n"
            "  is the dashboard reachable (ray dashboard deploy/aws.yaml, or kubectl port-forward)?"
            " With Ray's token authentication on, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN.",
            file=sys.stderr,
        )
        return 1


def forwarded_flags(args: argparse.Namespace) -> list[str]:
    """The flags given here, as the job's `kiln up` on the head must get them (config files
    excepted: ``submit_up`` ships those)."""
    out: list[str] = []
    skip = NOT_FORWARDED | {"config", "serve_config"}
    for action in args.up_actions:
        value = getattr(args, action.dest, None)
        if action.dest in skip or value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):  # --flag / --no-flag
            out.append(action.option_strings[0 if value else 1])
        elif value is True:  # store_true
            out.append(action.option_strings[0])
        elif isinstance(value, list):  # append
            for item in value:
                out += [action.option_strings[0], str(item)]
        elif value is not False:
            out += [action.option_strings[0], str(value)]
    return out
