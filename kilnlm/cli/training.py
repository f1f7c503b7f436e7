"""``kiln train`` and ``kiln sweep``: pretraining on Ray Train and a scaling sweep on Ray tasks.

Ray is imported inside the commands, so ``kiln --help`` and the library's commands never load it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kilnlm import config
from kilnlm.cli.output import print_json


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
    add_fim_argument(p)
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


def add_fim_argument(p: argparse.ArgumentParser) -> None:
    """``--fim-rate``: the short name of ``--corpus-fim-rate`` (``kiln train`` and ``kiln up``)."""
    p.add_argument(
        "--fim-rate",
        dest="corpus_fim_rate",
        type=float,
        metavar="RATE",
        help="share of train documents rearranged for fill-in-the-middle (0 = off, the default; "
        "0.5 the usual rate); the corpus is rebuilt for a new rate",
    )


def add_memory_plan_arguments(p: argparse.ArgumentParser) -> None:
    """``kiln plan``'s GPU-memory flags (the plan command itself lives with the library's)."""
    from kilnlm.model import ModelConfig

    p.add_argument("--gpus", type=int, help="GPUs in the run (FSDP2 ranks): plan memory per rank")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB, 80GiB, 24GB")
    p.add_argument("--preset", default="llama-1b", help="model preset (kilnlm.model.PRESETS)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    p.add_argument(
        "--seq-len", type=int, help="tokens per sequence (default: the preset's context)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    config.add_arguments(p, ModelConfig, skip=("vocab_size", "block_size"))


def cmd_plan_memory(args: argparse.Namespace) -> int:
    """Per-rank memory with every lever off, each alone and all on; the largest preset that fits."""
    from kilnlm.model import ModelConfig, num_params
    from kilnlm.scaling import GPU_RESERVE, memory_plan, parse_bytes

    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    overrides = config.overrides_from(args, ModelConfig)  # --vocab-size included, if given
    cfg = ModelConfig.from_preset(args.preset, **overrides)
    seq_len = args.seq_len or cfg.block_size
    cfg = ModelConfig.from_preset(args.preset, **{**overrides, "block_size": seq_len})
    gpu_bytes = parse_bytes(args.gpu_memory)
    rows = memory_plan(cfg, args.batch_size, seq_len, args.gpus, gpu_bytes)
    summary = {
        "preset": args.preset + "".join(f" {k}={v}" for k, v in sorted(overrides.items())),
        "params": num_params(cfg),
        "gpus": args.gpus,
        "gpu_memory_bytes": gpu_bytes,
        "usable_bytes": gpu_bytes * (1 - GPU_RESERVE),
        "batch_size": args.batch_size,
        "seq_len": seq_len,
        "rows": rows,
    }
    if args.json:
        print_json(summary)
    else:
        print(format_memory_plan(summary))
    return 0


def format_memory_plan(summary: dict[str, Any]) -> str:
    """The table ``kiln plan --gpus`` prints, in GiB per rank."""
    from kilnlm.scaling import human

    gib = 2**30
    head = (
        f"{summary['preset']} ({human(summary['params'])} parameters) on {summary['gpus']} GPUs of "
        f"{summary['gpu_memory_bytes'] / gib:.1f} GiB ({summary['usable_bytes'] / gib:.1f} usable), "
        f"batch {summary['batch_size']} x {summary['seq_len']} tokens per rank; GiB per rank:"
    )
    cols = ["params", "grads", "optimizer", "gathered", "activations", "init", "peak", "host"]
    lines = [head, f"{'levers':<25}" + "".join(f"{c:>12}" for c in cols) + "  fits  largest"]
    for r in summary["rows"]:
        cells = "".join(f"{r[c] / gib:>12.2f}" for c in cols)
        fits = "yes" if r["fits"] else "no"
        lines.append(f"{r['levers']:<25}{cells}  {fits:<4}  {r['largest_preset'] or '-'}")
    lines.append(
        "peak = max(init, params + grads + optimizer + gathered + activations); compile is not "
        "modelled (a speed lever); 'largest' = the biggest preset whose peak fits."
    )
    return "\n".join(lines)


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
        print_json(summary)
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
        print_json(sweep_summary(result))
    else:
        print(format_sweep(result))
        print(f"plot      {result.png_path}\ntable     {result.csv_path}")
    return 0
