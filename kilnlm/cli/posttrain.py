"""``kiln finetune``, ``kiln reward train|score`` and ``kiln dpo``: post-training on Ray Train.

One contract for the three trainers, so scripts chain them::

    kiln finetune     --from CKPT --data FILE --out DIR [--json] [--workers N]
    kiln reward train --from CKPT --data FILE --out DIR [--json] [--workers N]
    kiln dpo          --from CKPT --data FILE --out DIR [--json] [--workers N] [--beta B]
    kiln reward score --model DIR --data FILE --json

``--data`` is a JSONL file or a folder of them (chat lines for finetune, preference lines for the
others; see ``kilnlm.posttrain.data``); without it, the embedded stdlib defaults. ``--from`` is any
export. Training flags (``--max-steps``, ``--lr``, ``--batch-size``, ...) and cluster flags
(``--workers``, ``--storage-path``, ``--name``, ...) are those of ``kiln train``. Ray is imported
inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

from kilnlm import config
from kilnlm.cli.output import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="SFT on chat JSONL: loss on assistant tokens only")
    _trainer_arguments(p)
    p.set_defaults(func=cmd_train, objective="sft")

    p = sub.add_parser("dpo", help="direct preference optimisation on preference JSONL")
    _trainer_arguments(p)
    p.add_argument("--beta", type=float, default=0.1, help="KL strength β (default 0.1)")
    p.set_defaults(func=cmd_train, objective="dpo")

    reward = sub.add_parser("reward", help="reward model: train (Bradley–Terry) or score pairs")
    rsub = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    p = rsub.add_parser("train", help="train a scalar-head reward model on preference JSONL")
    _trainer_arguments(p)
    p.set_defaults(func=cmd_train, objective="reward")
    p = rsub.add_parser("score", help="score each preference line: one JSON list, in file order")
    p.add_argument("--model", required=True, help="a reward-model export (kiln reward train)")
    p.add_argument("--data", help="preference JSONL file or folder (default: embedded held-out)")
    p.add_argument("--json", action="store_true", help="print the JSON list (default: a table)")
    p.set_defaults(func=cmd_score)


def _trainer_arguments(p: argparse.ArgumentParser) -> None:
    from kilnlm.cli.admin import admin_flags
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.train import TrainConfig

    p.add_argument(
        "--from",
        dest="parent",
        required=True,
        help="the export to start from: a folder, or a version registered with the orchestrator "
        "at --address (e.g. 3 or v3)",
    )
    p.add_argument("--data", help="JSONL file or folder (default: the embedded stdlib set)")
    p.add_argument("--out", required=True, help="the export folder to write")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--register",
        action="store_true",
        help="register the export with the orchestrator at --address (kiln serve / kiln up)",
    )
    admin_flags(p, timeout=60.0, json=False)
    config.add_arguments(p, TrainConfig, skip=("objective",))
    config.add_arguments(p, ClusterConfig)


def resolve_parent(args: argparse.Namespace) -> str:
    """``--from``: a folder as it is; a version number: the URI the orchestrator registered."""
    from pathlib import Path

    value = args.parent
    if Path(value).exists() or not value.removeprefix("v").isdigit():
        return value
    from kilnlm.cli.admin import admin_call
    from kilnlm.proto import admin_pb2

    version = int(value.removeprefix("v"))
    status = admin_call(args, "Status", admin_pb2.StatusRequest())
    for c in status.checkpoints:
        if c.version == version:
            return c.uri.removeprefix("file://")
    raise ValueError(f"--from {value}: the orchestrator has no version {version}; see kiln status")


def register_export(args: argparse.Namespace, path: str) -> int:
    """Hand the export to the running orchestrator; its version (Admin.Register)."""
    from kilnlm.cli.admin import admin_call
    from kilnlm.client import checkpoint_uri
    from kilnlm.proto import admin_pb2

    response = admin_call(args, "Register", admin_pb2.RegisterRequest(uri=checkpoint_uri(path)))
    return int(response.version)


def configs_from_args(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(PostTrainConfig, TrainConfig, ClusterConfig) from the flags over the objective's defaults."""
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.posttrain.job import DEFAULT_TRAIN, SHARED_TRAIN, PostTrainConfig
    from kilnlm.train import TrainConfig

    kind = args.objective
    cfg = PostTrainConfig(
        objective=kind,
        parent=resolve_parent(args),
        out=args.out,
        data=args.data,
        beta=getattr(args, "beta", 0.1),
    )
    train = TrainConfig(
        **{**SHARED_TRAIN, **DEFAULT_TRAIN[kind], "objective": kind, "seq_len": _seq_len(cfg)}
    )
    train = replace(train, **config.overrides_from(args, TrainConfig))
    name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    cluster = replace(ClusterConfig(name=name), **config.overrides_from(args, ClusterConfig))
    return cfg, train, cluster


def _seq_len(cfg: Any) -> int:
    """The parent's context, capped at 256 (the default sets' examples are shorter)."""
    from pathlib import Path

    from kilnlm.checkpoint import config_from_hf

    parent = Path(cfg.parent)
    if not (parent / "config.json").is_file():
        raise FileNotFoundError(f"--from {parent}: no export there (config.json missing)")
    return min(256, config_from_hf(json.loads((parent / "config.json").read_text())).block_size)


def cmd_train(args: argparse.Namespace) -> int:
    from kilnlm.cluster.launcher import launch_posttrain

    cfg, train, cluster = configs_from_args(args)
    summary, result = launch_posttrain(cfg, train, cluster)
    if summary is None:
        print(
            f"kiln {args.command}: error: {result.error or 'no export was written'}",
            file=sys.stderr,
        )
        return 1
    summary.update(
        {"run": result.run_uri, "csv": str(result.csv_path), "png": str(result.png_path),
         "seconds": round(result.seconds, 1), "restarts": result.rewinds}
    )  # fmt: skip
    if args.register:
        summary["registered_version"] = register_export(args, summary["export"])
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The figures as a few aligned lines (the JSON has everything)."""
    lines = [f"{s['objective']:<10}{s['export']}  (from {s['parent']}, {s['seconds']} s)"]
    data = s["data"]
    lines.append(f"data      {json.dumps(data, default=str)}")
    for when, figures in s["figures"].items():
        nums = {k: v for k, v in figures.items() if isinstance(v, int | float)}
        lines.append(f"{when:<10}" + "  ".join(f"{k} {v:.4g}" for k, v in nums.items()))
    for sample in s["figures"].get("after", {}).get("samples", [])[:2]:
        lines.append(f"sample    {sample['prompt']!r} -> {sample['answer']!r}")
    lines.append(f"metrics   {s['csv']}  plot {s['png']}")
    if "registered_version" in s:
        lines.append(
            f"version   {s['registered_version']} (next: kiln promote {s['registered_version']})"
        )
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> int:
    """``{"chosen": r_c, "rejected": r_r}`` per preference line, in file order."""
    from kilnlm.checkpoint import load_tokenizer
    from kilnlm.posttrain.data import read_preferences
    from kilnlm.posttrain.reward import encode_pairs, load_reward_model, score_pairs

    model, head_id = load_reward_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.data is None:
        from kilnlm.posttrain.defaults import default_sets

        pairs = default_sets().heldout_pairs
    else:
        pairs, _ = read_preferences(args.data, dedup=False)
    skipped: dict[str, int] = {}
    examples = encode_pairs(tokenizer, pairs, model.config.block_size, skipped)
    if skipped:
        raise ValueError(
            f"{skipped['too_long']} pairs are longer than the model's context "
            f"({model.config.block_size}); shorten them"
        )
    scores = score_pairs(model, examples, tokenizer.pad_id, head_id)
    rows = [{"chosen": c, "rejected": r} for c, r in scores]
    if args.json:
        print_json(rows, indent=None)
    else:
        for i, row in enumerate(rows):
            print(f"{i:>5}  chosen {row['chosen']:+.4f}  rejected {row['rejected']:+.4f}")
    return 0
