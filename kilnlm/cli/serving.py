"""``kiln serve``, ``kiln generate``, ``kiln chat``, ``kiln score``: run a server, talk to one.

``serve`` starts local Ray (or joins ``--ray-address``), the orchestrator (registry, gate,
hot-swap: ``kiln register``/``promote``/``rollback`` work as under ``kiln up``), deploys the Serve
application and keeps it up until Ctrl-C. The other three are gRPC clients (``kilnlm.client``)
of a running server at ``--address`` (default 127.0.0.1:50051); they never import Ray or torch's model code.
Sampling flags (``--temperature``, ``--top-p``, ``--max-tokens``, ``--seed``, ...) left out take
the server's defaults (chat: temperature 0.7, top_p 0.9).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from kilnlm.cli.output import print_json
from kilnlm.config import add_arguments, overrides_from, read_file

DEFAULT_ADDRESS = "127.0.0.1:50051"
ENGINE_PREFIX = "engine_"


def register(subparsers: Any) -> None:
    _register_serve(subparsers)
    _register_generate(subparsers)
    _register_chat(subparsers)
    _register_score(subparsers)
    _register_infill(subparsers)


# --------------------------------------------------------------------------------------------
# kiln serve


def _register_serve(subparsers: Any) -> None:
    from kilnlm.engine import EngineConfig
    from kilnlm.serving_config import ServeConfig

    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over gRPC from Ray Serve replicas",
        description="Start local Ray, the orchestrator and LLM server replicas behind the gRPC "
        "gateway (127.0.0.1:50051 by default) and serve until Ctrl-C. --checkpoint becomes the "
        "registry's first promoted version; `kiln register PATH`, `kiln promote V` and `kiln "
        "rollback` then hot-swap others through the same gate as kiln up. The admin token is "
        "read from $KILN_ADMIN_TOKEN.",
    )
    p.add_argument("--config", help="TOML/JSON/YAML file; its [serve] section is a ServeConfig")
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument(
        "--registry",
        help="folder of the orchestrator's checkpoint registry (default: runs/serve-<app-name>); "
        "kiln register / promote / rollback act on it",
    )
    p.add_argument(
        "--heldout",
        help="held-out data for the validation gate: a corpus folder or a text file (default: "
        "the default corpus's held-out documents)",
    )
    add_arguments(p, ServeConfig, skip=("admin_token", "api_key"))
    add_arguments(p, EngineConfig, prefix=ENGINE_PREFIX)
    p.set_defaults(func=cmd_serve)


def serve_config(args: argparse.Namespace) -> Any:
    """ServeConfig from --config's [serve] section, then flags (--engine-* into .engine)."""
    from kilnlm.config import from_dict
    from kilnlm.engine import EngineConfig
    from kilnlm.serving_config import ServeConfig

    data: dict[str, Any] = dict(read_file(args.config).get("serve", {})) if args.config else {}
    data.update(overrides_from(args, ServeConfig))
    engine = overrides_from(args, EngineConfig, prefix=ENGINE_PREFIX)
    if engine:
        data["engine"] = {**data.get("engine", {}), **engine}
    if os.environ.get("KILN_ADMIN_TOKEN"):
        data["admin_token"] = os.environ["KILN_ADMIN_TOKEN"]
    if os.environ.get("KILN_API_KEY"):  # the HTTP API's key, kept out of shell history too
        data["api_key"] = os.environ["KILN_API_KEY"]
    return from_dict(ServeConfig, data)


def cmd_serve(args: argparse.Namespace) -> int:
    from kilnlm import checkpoint

    config = serve_config(args)
    remote = config.checkpoint is not None and checkpoint.remote.is_remote(config.checkpoint)
    if config.checkpoint is not None and not remote and not Path(config.checkpoint).is_dir():
        raise FileNotFoundError(f"checkpoint directory {config.checkpoint} does not exist")
    if config.checkpoint is not None:  # what the replica would refuse, said here in one line
        try:  # s3://, gs://: fetched and verified into this node's cache, which replicas reuse
            checkpoint.check_servable(checkpoint.remote.local_dir(config.checkpoint))
        except checkpoint.CheckpointError as e:
            print(f"kiln serve: error: {e}", file=sys.stderr)
            return 2
    from kilnlm.actors.serve_app import DeployError, serve_until_interrupted

    # Ctrl-C must stop the server even when the shell started it in the background (which
    # ignores SIGINT); Ray's own SIGTERM handler exits through its `finally` as well.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    heldout = os.path.abspath(args.heldout) if args.heldout else None
    registry = os.path.abspath(args.registry) if args.registry else None
    try:
        return serve_until_interrupted(config, args.ray_address, registry, heldout)
    except DeployError as e:
        print(f"kiln serve: error: {e}", file=sys.stderr)
        return 1


# --------------------------------------------------------------------------------------------
# Client commands


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port")
    p.add_argument("--timeout", type=float, default=None, help="deadline per call, in seconds")
    p.add_argument("--tls-ca", help="PEM file to verify a TLS server with (plaintext if absent)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    from kilnlm.sampling import SamplingParams

    add_arguments(p, SamplingParams)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    from kilnlm.sampling import SamplingParams

    sampling = overrides_from(args, SamplingParams)
    if args.stop:
        sampling["stop"] = args.stop
    return sampling


def _client(args: argparse.Namespace) -> Any:
    from kilnlm.client import Client

    return Client(args.address, timeout=args.timeout, tls_ca=args.tls_ca)


def _rpc_error(command: str, e: Any) -> int:
    print(f"kiln {command}: {e.code().name}: {e.details()}", file=sys.stderr)
    return 1


def _register_generate(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt on a running server")
    p.add_argument("prompt")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _client_flags(p)
    _sampling_flags(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    import grpc

    try:
        with _client(args) as client:
            if args.stream:
                finish = None
                for delta in client.generate_stream(args.prompt, **_sampling(args)):
                    print(delta.text, end="", flush=True)
                    finish = delta.finish or finish
                print()
            else:
                completion = client.generate(args.prompt, **_sampling(args))
                print(completion.text)
                finish = completion.finish
    except grpc.RpcError as e:
        return _rpc_error("generate", e)
    if finish is not None:
        print(
            f"[{finish.finish_reason}: {finish.completion_tokens} tokens, model version "
            f"{finish.model_version}, seed {finish.seed}]",
            file=sys.stderr,
        )
    return 0


def _register_chat(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "chat",
        help="talk to a running server (one message per line on stdin)",
        description="An interactive chat that keeps the conversation. Reads one user message "
        "per line from stdin (so it can be scripted); /reset forgets the conversation, "
        "/exit or end of input quits.",
    )
    p.add_argument("--system", help="system message that opens the conversation")
    _client_flags(p)
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    prompt = "you> " if sys.stdin.isatty() else ""
    with _client(args) as client:
        while True:
            print(prompt, end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            text = line.rstrip("\n")
            if text.strip() == "/reset":
                messages = list(opening)
                continue
            if text.strip():
                messages = _chat_turn(client, messages, text, args)


def _chat_turn(
    client: Any, messages: list[dict[str, str]], text: str, args: argparse.Namespace
) -> list[dict[str, str]]:
    """Send one user message and stream the reply; the conversation with both, or unchanged on error."""
    import grpc

    asked = [*messages, {"role": "user", "content": text}]
    reply = []
    try:
        for delta in client.chat_stream(asked, **_sampling(args)):
            print(delta.text, end="", flush=True)
            reply.append(delta.text)
        print(flush=True)
    except grpc.RpcError as e:
        print()
        _rpc_error("chat", e)
        return messages
    return [*asked, {"role": "assistant", "content": "".join(reply)}]


def _register_score(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "score", help="perplexity and bits per byte of a text file under the served model"
    )
    p.add_argument("file", help="UTF-8 text file, or - for stdin")
    p.add_argument("--per-token", action="store_true", help="also print each token's logprob")
    _client_flags(p)
    p.set_defaults(func=cmd_score)


def cmd_score(args: argparse.Namespace) -> int:
    import grpc

    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    try:
        with _client(args) as client:
            result = client.score(text)
    except grpc.RpcError as e:
        return _rpc_error("score", e)
    if args.per_token:
        for token_id, logprob in zip(result.token_ids, result.logprobs, strict=True):
            print(f"{token_id}\t{logprob:.4f}")
    print(
        f"{args.file}: {len(result.token_ids)} tokens, {result.num_bytes} bytes, "
        f"perplexity {result.perplexity:.3f}, bits per byte {result.bits_per_byte:.4f} "
        f"(model version {result.model_version})"
    )
    return 0


def _register_infill(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "infill",
        help="write the middle between a prefix and a suffix (a model trained with --fim-rate)",
    )
    p.add_argument("--prefix", default=None, help="text before the gap")
    p.add_argument("--suffix", default=None, help="text after the gap")
    p.add_argument("--prefix-file", help="UTF-8 file holding the text before the gap")
    p.add_argument("--suffix-file", help="UTF-8 file holding the text after the gap")
    p.add_argument("--json", action="store_true", help="print the middle and its finish as JSON")
    _client_flags(p)
    _sampling_flags(p)
    p.set_defaults(func=cmd_infill)


def _text_arg(text: str | None, path: str | None, name: str) -> str:
    if text is not None and path is not None:
        raise SystemExit(f"kiln infill: give --{name} or --{name}-file, not both")
    return Path(path).read_text(encoding="utf-8") if path is not None else (text or "")


def cmd_infill(args: argparse.Namespace) -> int:
    import grpc

    prefix = _text_arg(args.prefix, args.prefix_file, "prefix")
    suffix = _text_arg(args.suffix, args.suffix_file, "suffix")
    try:
        with _client(args) as client:
            if args.json:
                done = client.infill(prefix, suffix, **_sampling(args))
                finish = done.finish
                summary = {"middle": done.text, **{k: getattr(finish, k) for k in _FINISH_KEYS}}
                print_json(summary)
                return 0
            finish = None
            for delta in client.infill_stream(prefix, suffix, **_sampling(args)):
                print(delta.text, end="", flush=True)
                finish = delta.finish or finish
            print()
    except grpc.RpcError as e:
        return _rpc_error("infill", e)
    if finish is not None:
        print(
            f"[{finish.finish_reason}: {finish.completion_tokens} tokens, model version "
            f"{finish.model_version}]",
            file=sys.stderr,
        )
    return 0


_FINISH_KEYS = ("finish_reason", "completion_tokens", "model_version", "seed", "request_id")
