"""``kiln corpus``: build a training corpus on Ray Data (``kilnlm.cluster.corpus``) into a folder
that ``kiln train --data`` and ``kiln up --data`` take. Ray is imported inside the command."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from kilnlm import config
from kilnlm.cli.output import print_json

DEFAULT_PRESET = "tiny-3m"
"""The vocabulary defaults to this preset's, the model `kiln train` and `kiln up` build."""


def register(sub: argparse._SubParsersAction) -> None:
    from kilnlm.data import CorpusConfig
    from kilnlm.model import ModelConfig

    p = sub.add_parser(
        "corpus",
        help="build a corpus on Ray Data: filters, PII, dedup, BPE, token shards",
        description="Reads text/JSONL/Parquet files, folders or URIs (the standard library when "
        "no --source is given), filters, redacts and deduplicates them, trains a BPE tokenizer and "
        "writes token shards into --out, the same folder kilnlm.data.build_corpus writes. The "
        "filter flags are CorpusConfig's fields.",
    )
    p.add_argument("--out", required=True, help="output folder (kiln train/up --data take it)")
    p.add_argument(
        "--source",
        action="append",
        help="file, folder or URI (s3://, gs://, any pyarrow filesystem); repeatable",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=ModelConfig.from_preset(DEFAULT_PRESET).vocab_size,
        help=f"BPE vocabulary (default: the {DEFAULT_PRESET} preset's)",
    )
    p.add_argument("--workers", type=int, help="concurrent tasks per stage (default: all CPUs)")
    p.add_argument(
        "--ray-address", help="join this Ray cluster (default: $RAY_ADDRESS, else local)"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    config.add_arguments(p, CorpusConfig, skip=("sources",))
    p.set_defaults(func=cmd_corpus)


def cmd_corpus(args: argparse.Namespace) -> int:
    import ray

    from kilnlm.cluster.corpus import build_corpus_ray, default_workers
    from kilnlm.cluster.launcher import ensure_ray
    from kilnlm.data import CorpusConfig
    from kilnlm.shards import MANIFEST_NAME

    cfg = CorpusConfig(sources=args.source or [], **config.overrides_from(args, CorpusConfig))
    if args.ray_address:
        ray.init(address=args.ray_address, log_to_driver=False)
    else:
        ensure_ray(args.workers or 1)
    workers = args.workers or default_workers()
    if not args.json:  # Ray Data's per-dataset INFO lines would bury the stage bars
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    manifest_path = Path(args.out) / MANIFEST_NAME
    before = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    start = time.perf_counter()
    manifest = build_corpus_ray(cfg, args.out, args.vocab_size, workers, progress=not args.json)
    seconds = time.perf_counter() - start
    summary = corpus_summary(manifest, args.out, seconds, workers)
    summary["reused"] = before is not None and manifest_path.stat().st_mtime_ns == before
    if args.json:
        print_json(summary)
    else:
        print(format_summary(summary))
    return 0


def corpus_summary(manifest: Any, out: str, seconds: float, workers: int) -> dict[str, Any]:
    """What a build produced and how fast: for the terminal, --json and the benchmark."""
    stats = manifest.stats
    tokens = {name: split.n_tokens for name, split in manifest.splits.items()}
    return {
        "out": str(Path(out).resolve()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "documents": stats.n_input,
        "kept": {name: split.n_documents for name, split in manifest.splits.items()},
        "tokens": tokens,
        "vocab_size": manifest.vocab_size,
        "documents_per_s": round(stats.n_input / seconds, 1),
        "tokens_per_s": round(sum(tokens.values()) / seconds, 1),
        "stage_seconds": manifest.stage_seconds,
        "stats": vars(stats),
    }


def format_summary(s: dict[str, Any]) -> str:
    st = s["stats"]
    dropped = ("too_short", "too_long", "generated", "non_text", "repeated_lines", "unsafe")
    return "\n".join(
        [
            f"corpus    {s['out']}  ({s['seconds']:.1f} s{', reused' if s.get('reused') else ''})",
            f"documents {s['documents']} read, kept {s['kept']['train']} train + "
            f"{s['kept']['heldout']} held-out",
            "dropped   "
            + ", ".join(f"{k} {st[k]}" for k in dropped)
            + f", duplicates {st['exact_duplicates']} exact + {st['near_duplicates']} near",
            f"cleaned   {st['boilerplate_headers']} licence headers ({st['boilerplate_bytes']} "
            f"bytes); PII: {st['pii_emails']} e-mails, {st['pii_ip_addresses']} IPs, "
            f"{st['pii_keys']} keys",
            f"tokens    {s['tokens']['train']} train, {s['tokens']['heldout']} held-out "
            f"(vocab {s['vocab_size']})",
            f"speed     {s['documents_per_s']} documents/s, {s['tokens_per_s']} tokens/s "
            f"({s['workers']} workers)",
        ]
    )
