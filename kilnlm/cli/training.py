"""``kiln train`` and ``kiln sweep``: pretraining on Ray Train and a scaling sweep on Ray tasks.

Ray is imported inside the commands, so ``kiln --help`` and the library's commands never load it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kilnlm import config


def register(sub: argparse._SubParsersAction) -> None:
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.cluster.sweep import SweepConfig
    from kilnlm.data import CorpusConfig
    from kilnlm.model import ModelConfig
    from kilnlm.train import TrainConfig

    p = sub.add_parser(
        "train",
        help="pretrain on Ray Train: FSDP2 workers, sharded checkpoints, exports for serving",
        description="Flags override the --config file, which overrides the job's laptop defaults. "
        "Launching again with the same --name and --storage-path resumes the run.",
    )
    p.add_argument(
        "--config", help="TOML/JSON/YAML: preset, data_dir, [model], [train], [cluster], [corpus]"
    )
    p.add_argument("--preset", help="model preset (kilnlm.model.PRESETS), default tiny-3m")
    p.add_argument(
        "--data", help="a corpus folder built by kilnlm.data.build_corpus (default: build one)"
    )
    p.add_argument(
        "--source", action="append", help="text/JSONL file or folder for the corpus (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    config.add_arguments(p, TrainConfig)
    config.add_arguments(p, ClusterConfig)
    config.add_arguments(p, ModelConfig, skip=("vocab_size",))
    config.add_arguments(p, CorpusConfig, prefix="corpus_")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sweep", help="runs at increasing compute as Ray tasks; fit L(C) = a·C^-alpha"
    )
    p.add_argument("--budgets", help="comma-separated FLOP budgets, e.g. 3e11,1e12,3e12")
    p.add_argument(
        "--data", help="a corpus folder (default: build a small-vocabulary one in --out-dir)"
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=512,
        help="vocabulary of the corpus built when --data is absent",
    )
    p.add_argument(
        "--corpus-max-bytes", type=int, default=4_000_000, help="text read for that corpus"
    )
    p.add_argument("--json", action="store_true", help="print the points and the fit as JSON")
    config.add_arguments(p, SweepConfig)
    p.set_defaults(func=cmd_sweep)


def job_from_args(args: argparse.Namespace, default: Callable[[], Any] | None = None) -> Any:
    """The --config file's JobConfig (else ``default()``, else JobConfig's own defaults) with the
    command line's flags applied, each config re-validated. Returns a JobConfig; its imports stay
    inside so that ``kiln --help`` never loads Ray."""
    from kilnlm.cluster.config import ClusterConfig, load_job
    from kilnlm.data import CorpusConfig
    from kilnlm.model import ModelConfig
    from kilnlm.train import TrainConfig

    job = load_job(args.config) if args.config or default is None else default()
    corpus = replace(job.corpus, **config.overrides_from(args, CorpusConfig, prefix="corpus_"))
    if args.source:
        corpus = replace(corpus, sources=list(args.source))
    return replace(
        job,
        preset=args.preset or job.preset,
        data_dir=args.data or job.data_dir,
        model={**job.model, **config.overrides_from(args, ModelConfig)},
        train=replace(job.train, **config.overrides_from(args, TrainConfig)),
        cluster=replace(job.cluster, **config.overrides_from(args, ClusterConfig)),
        corpus=corpus,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from kilnlm.cluster.launcher import launch

    job = job_from_args(args)
    result = launch(job, raise_on_error=False)
    last = result.history[-1] if result.history else {}
    held = [r["heldout_loss"] for r in result.history if "heldout_loss" in r]
    if args.json:
        summary = {
            "run": result.run_uri,
            "last": last,
            "exports": result.exports,
            "csv": str(result.csv_path),
            "png": str(result.png_path),
            "seconds": result.seconds,
        }
        json.dump(summary, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(f"run       {result.run_uri}  ({result.seconds:.0f} s)")
        if last:
            print(
                f"step      {last['step']}  loss {last['loss']:.4f}"
                + (f"  held-out {held[-1]:.4f}" if held else "")
            )
        if result.rewinds:
            print(f"restarts  resumed at steps {result.rewinds}")
        print(f"metrics   {result.csv_path}  plot {result.png_path}")
        for uri in result.exports:
            print(f"export    {uri}")
    if result.error is not None:
        print(f"kiln train: error: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from kilnlm.cluster.launcher import ensure_ray
    from kilnlm.cluster.sweep import SweepConfig, format_sweep, run_sweep, sweep_summary
    from kilnlm.data import CorpusConfig, build_corpus

    overrides = config.overrides_from(args, SweepConfig)
    if args.budgets:
        overrides["budgets"] = [float(b) for b in args.budgets.split(",")]
    cfg = SweepConfig(**overrides)
    data_dir = args.data
    if data_dir is None:
        data_dir = f"{cfg.out_dir}/corpus"
        build_corpus(CorpusConfig(max_bytes=args.corpus_max_bytes), data_dir, args.vocab_size)
    ensure_ray(cfg.cpus_per_run * len(cfg.budgets))
    result = run_sweep(cfg, data_dir)
    if args.json:
        json.dump(sweep_summary(result), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_sweep(result))
        print(f"plot      {result.png_path}\ntable     {result.csv_path}")
    return 0
