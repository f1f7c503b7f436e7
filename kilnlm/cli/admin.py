"""``kiln register PATH``, ``kiln status``, ``kiln promote V``, ``kiln rollback [V]``: the Admin
API from a shell.

Each command is one gRPC call to the gateway's ``kiln.v1.Admin`` service (which forwards it to
the orchestrator), authenticated with the bearer token from ``--token`` or, better (it stays out
of the shell history), ``$KILN_ADMIN_TOKEN``. No Ray and no torch here: these run anywhere a
gateway is reachable. ``--json`` prints the response as JSON for scripts.

Exit codes: 0 done, 1 the server refused (its status and reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from kilnlm.cli.output import print_text

DEFAULT_ADDRESS = "127.0.0.1:50051"
TOKEN_ENV = "KILN_ADMIN_TOKEN"
STATE_NAMES = {
    0: "?",
    1: "registered",
    2: "validated",
    3: "promoted",
    4: "rejected",
    5: "validating",
    6: "retired",
}


def register(subparsers: Any) -> None:
    _register_register(subparsers)
    _register_status(subparsers)
    _register_promote(subparsers)
    _register_rollback(subparsers)


# --------------------------------------------------------------------------------------------
# Flags and the call


def admin_flags(p: argparse.ArgumentParser, timeout: float, json: bool = True) -> None:
    """How a command reaches the Admin API (``admin_call`` reads them); ``json=False`` for a
    command that prints a summary of its own (post-training's ``--register``)."""
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="gateway host:port")
    p.add_argument("--token", help=f"admin bearer token (default: ${TOKEN_ENV})")
    p.add_argument("--timeout", type=float, default=timeout, help="deadline in seconds")
    p.add_argument("--tls-ca", help="PEM file to verify a TLS gateway with (plaintext if absent)")
    if json:
        p.add_argument("--json", action="store_true", help="print the response as JSON")


def admin_call(args: argparse.Namespace, method: str, request: Any) -> Any:
    """One authenticated Admin call; grpc.RpcError propagates to the command."""
    import grpc

    from kilnlm.proto import admin_pb2_grpc

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"no admin token: set ${TOKEN_ENV} (or pass --token)")
    if args.tls_ca:
        with open(args.tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.address, creds)
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        metadata = (("authorization", f"Bearer {token}"),)
        return getattr(stub, method)(request, metadata=metadata, timeout=args.timeout)


def _run(command: str, args: argparse.Namespace, method: str, request: Any) -> Any:
    """The response, or None after printing the server's refusal."""
    import grpc

    try:
        return admin_call(args, method, request)
    except grpc.RpcError as e:
        print(f"kiln {command}: {e.code().name}: {e.details()}", file=sys.stderr)
        return None


def _print_json(message: Any) -> None:
    from google.protobuf.json_format import MessageToJson

    print_text(MessageToJson(message, preserving_proto_field_name=True))


# --------------------------------------------------------------------------------------------
# kiln register


def _register_register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register",
        help="record an export made anywhere (kiln train, post-training) as a new version",
        description="Register the export at PATH with the orchestrator (kiln serve or kiln up) "
        "and print its version; registering the same content again prints the same version. "
        "PATH must be readable by the orchestrator and every replica (a shared filesystem). "
        "Then `kiln promote VERSION` validates and hot-swaps it.",
    )
    p.add_argument("path", help="export directory (model.safetensors + manifest.json), or file://")
    admin_flags(p, timeout=60.0)
    p.set_defaults(func=cmd_register)


def cmd_register(args: argparse.Namespace) -> int:
    from kilnlm.client import checkpoint_uri
    from kilnlm.proto import admin_pb2

    uri = checkpoint_uri(args.path)
    response = _run("register", args, "Register", admin_pb2.RegisterRequest(uri=uri))
    if response is None:
        return 1
    if args.json:
        _print_json(response)
        return 0
    c = response.checkpoint
    step = f", step {c.step}" if c.step else ""
    print(
        f"kiln register: {uri} is version {response.version} "
        f"({STATE_NAMES.get(c.state, '?')}{step}); next: kiln promote {response.version}"
    )
    return 0


# --------------------------------------------------------------------------------------------
# kiln status


def _register_status(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status",
        help="promoted version, replicas, checkpoints, swap history, training progress",
    )
    admin_flags(p, timeout=30.0)
    p.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from kilnlm.proto import admin_pb2

    response = _run("status", args, "Status", admin_pb2.StatusRequest())
    if response is None:
        return 1
    if args.json:
        _print_json(response)
    else:
        print(format_status(response))
    return 0


def format_status(st: Any) -> str:
    """A person's view of a StatusResponse."""
    lines = [
        f"promoted version: {st.promoted_version or 'none'}"
        f"   rollback target: {st.rollback_version or 'none'}   policy: {st.policy}"
        + (f"   swapping in: {st.swapping_version}" if st.swapping_version else "")
    ]
    t = st.training
    if t.step:
        loss = f"   loss {t.loss:.4f}" if t.loss else ""
        held = f"   held-out loss {t.heldout_loss:.4f}" if t.heldout_loss else ""
        lines.append(f"training: step {t.step}   tokens {t.tokens_seen:,}{loss}{held}")
    lines.append(f"\nreplicas ({len(st.replicas)}):")
    for r in st.replicas:
        staged = f"  staged v{r.staged_version}" if r.staged_version else ""
        lines.append(
            f"  {r.replica_id:<28} v{r.version:<4} running {r.running:<3} waiting {r.waiting:<3} "
            f"kv {r.kv_blocks_used}/{r.kv_blocks_total} blocks  {r.swap_mode}{staged}"
        )
    lines += _energy_lines(st.replicas)
    lines.append(f"\ncheckpoints ({len(st.checkpoints)}):")
    lines += [_checkpoint_line(c) for c in st.checkpoints]
    if st.swaps:
        lines.append("\nrecent swaps:")
        lines += [_swap_line(s) for s in st.swaps[-10:]]
    return "\n".join(lines)


def _energy_lines(replicas: Any) -> list[str]:
    """The replicas' energy since they started, with CO2 at the default grid intensity and per
    1,000 generated tokens; labelled an estimate where it is one (kilnlm/energy.py)."""
    from kilnlm.energy import EnergyConfig, report

    metered = [r for r in replicas if r.energy_source]
    if not metered:
        return []
    sources = sorted({r.energy_source for r in metered})
    tokens = sum(r.generated_tokens for r in metered)
    total = report(sum(r.energy_joules for r in metered), 0.0, "+".join(sources), EnergyConfig(),
                   tokens=tokens or None)  # fmt: skip
    return [f"energy: replicas {total.format()}"]


def _checkpoint_line(c: Any) -> str:
    ppl = f"ppl {c.heldout_perplexity:8.3f}" if c.heldout_perplexity else " " * 12
    step = f"step {c.step}" if c.step else ""
    gone = " (files deleted)" if c.deleted else ""
    reason = f"  — {c.reason}" if c.reason else ""
    return (
        f"  v{c.version:<4} {STATE_NAMES.get(c.state, '?'):<10} {ppl}  {step:<10} "
        f"{c.uri}{gone}{reason}"
    )


def _swap_line(s: Any) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(s.started_unix))
    took = f"{s.seconds:.2f} s" if s.seconds else "-"
    tail = f"  — {s.reason}" if s.reason else ""
    return (
        f"  #{s.swap_id:<3} {when} {s.kind:<15} v{s.previous_version or 0} → v{s.version}  "
        f"{s.outcome:<11} {took} {s.swap_mode}{tail}"
    )


# --------------------------------------------------------------------------------------------
# kiln promote / kiln rollback


def _register_promote(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "promote",
        help="validate a checkpoint version and hot-swap it into every replica",
        description="Validate VERSION (if not yet) and hot-swap it into every replica, all or "
        "nothing: on any failure every replica keeps the current version.",
    )
    p.add_argument("version", type=int)
    canary = p.add_mutually_exclusive_group()
    canary.add_argument(
        "--canary",
        dest="canary",
        action="store_true",
        default=None,
        help="one replica first; compare it with the current version, then the rest or undo",
    )
    canary.add_argument("--no-canary", dest="canary", action="store_false")
    admin_flags(p, timeout=900.0)
    p.set_defaults(func=cmd_promote)


def cmd_promote(args: argparse.Namespace) -> int:
    from kilnlm.proto import admin_pb2

    request = admin_pb2.PromoteRequest(version=args.version)
    if args.canary is not None:
        request.canary = args.canary
    return _report_swap(args, "promote", _run("promote", args, "Promote", request))


def _register_rollback(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rollback",
        help="promote an earlier version again (default: the one before the current one)",
    )
    p.add_argument("version", type=int, nargs="?", default=None)
    admin_flags(p, timeout=900.0)
    p.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    from kilnlm.proto import admin_pb2

    request = admin_pb2.RollbackRequest()
    if args.version is not None:
        request.version = args.version
    return _report_swap(args, "rollback", _run("rollback", args, "Rollback", request))


def _report_swap(args: argparse.Namespace, command: str, response: Any) -> int:
    if response is None:
        return 1
    if args.json:
        _print_json(response)
        return 0
    s = response.swap
    serving = (
        f", registered → serving {s.registered_to_serving_seconds:.2f} s"
        if s.registered_to_serving_seconds
        else ""
    )
    print(
        f"kiln {command}: version {response.version} serves on every replica (was "
        f"{response.previous_version or 'none'}): swap {response.swap_seconds:.2f} s, "
        f"mode {response.swap_mode or '-'}{serving}"
    )
    for r in s.replicas:
        done = "already serving" if r.skipped else f"stage {r.stage_seconds:.3f} s"
        print(f"  {r.replica_id}: {done}, commit {r.commit_seconds:.3f} s")
    if s.canary:
        c = s.canary
        print(
            f"  canary: perplexity {c['canary_perplexity']:.3f} vs "
            f"{c['reference_perplexity']:.3f} on {int(c['tokens'])} held-out tokens"
        )
    if s.reason:
        print(f"  note: {s.reason}")
    return 0


__all__ = [
    "cmd_promote",
    "cmd_register",
    "cmd_rollback",
    "cmd_status",
    "format_status",
    "register",
]
