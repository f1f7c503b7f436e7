"""The ``kiln`` command. ``main()`` parses and delegates; each area registers its own subcommands.

Subcommand modules import their heavy dependencies (Ray, gRPC, transformers) inside the command
functions, so ``kiln --help``, ``kiln eval`` and ``import kilnlm`` never load Ray.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kilnlm.cli.output import json_mode

# Each module defines ``register(subparsers)``; a command sets ``func`` (args -> exit code).
COMMAND_MODULES = (
    "kilnlm.cli.library",  # run, plan, eval, sample
    "kilnlm.cli.serving",  # serve, generate, chat, score
    "kilnlm.cli.training",  # train, sweep
    "kilnlm.cli.corpus",  # corpus (on Ray Data)
    "kilnlm.cli.posttrain",  # finetune, reward train|score, dpo
    "kilnlm.cli.admin",  # status, promote, rollback
    "kilnlm.cli.up",  # up (the main job)
    "kilnlm.cli.rl",  # rl (the live RL loop)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a missing dependency inside an existing module is a real error
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with json_mode(bool(getattr(args, "json", False))):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
