"""Training throughput side by side: the library's loop vs Ray Train with 1 and 2 FSDP workers.

    python bench/train.py                      # tiny-3m, global batch 8x128, CPU, ~5 min
    python bench/train.py --checkpoint-preset base-100m --ray-checkpoint

Same model, same global batch (sequences x tokens per optimiser step), same data:

  (a) ``kilnlm.train.train``, one process;
  (b) ``kiln train`` with 1 Ray Train worker (the plain module: nothing to shard);
  (c) ``kiln train`` with 2 Ray Train workers, FSDP2-sharded, each with half the batch.

Every process uses one torch thread, so (a) and (b) use one core and (c) two: b/a is Ray Train's
overhead (goal >= 0.9), c/a is data-parallel scaling (ideal 2 on 2 free cores). tokens/s is
measured over steady-state steps (after warmup, before the final checkpoint). The per-step split
comes from the workers' own timers: data (batch building), compute (forward, backward,
optimiser), communication (the share of a profiled step spent in gloo/NCCL collectives),
checkpoint (sharded DCP save incl. sha256, and Ray's upload of it, per save).

Then a sharded checkpoint of a ~100M-parameter model (``base-100m``, model + AdamW state) is
saved, verified, restored and exported in-process; ``--ray-checkpoint`` also saves it from 2
Ray Train workers and restores it in a relaunch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kilnlm.cluster.checkpointing import (
    TrainState,
    export_checkpoint,
    load_sharded,
    save_sharded,
    verify_checkpoint,
)
from kilnlm.cluster.config import ClusterConfig, JobConfig
from kilnlm.data import CorpusConfig, build_corpus
from kilnlm.model import ModelConfig, Transformer, num_params
from kilnlm.shards import CorpusManifest, TokenShards, get_batch
from kilnlm.train import TrainConfig, build_optimizer, train, train_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny-3m")
    p.add_argument(
        "--global-batch", type=int, default=8, help="sequences per optimiser step, all ranks"
    )
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--warmup-steps", type=int, default=10, help="steps left out of tokens/s")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--checkpoint-preset", default="base-100m")
    p.add_argument(
        "--ray-checkpoint", action="store_true", help="also save/restore it on 2 Ray workers"
    )
    p.add_argument("--out", default="runs/bench", help="corpus, runs and train.json go here")
    return p.parse_args()


def corpus(out: Path, vocab_size: int) -> str:
    path = out / f"corpus-{vocab_size}"
    build_corpus(CorpusConfig(max_bytes=3_000_000), path, vocab_size, progress=False)
    return str(path)


def train_config(args: argparse.Namespace, per_rank_batch: int) -> TrainConfig:
    return TrainConfig(
        lr=1e-3,
        min_lr=1e-4,
        warmup_steps=5,
        max_steps=args.steps,
        batch_size=per_rank_batch,
        seq_len=args.seq_len,
        eval_every=0,
        log_every=args.log_every,
        checkpoint_every=0,
    )


# --------------------------------------------------------------------------------------------
# (a) the library's loop


def plain_loop(args: argparse.Namespace, data: str) -> dict[str, float]:
    torch.set_num_threads(1)
    shards = TokenShards(data, "train")
    cfg = train_config(args, args.global_batch)
    model_cfg = ModelConfig.from_preset(args.preset, vocab_size=shards.vocab_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    data_s: list[float] = []
    stamps: list[float] = []

    def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        out = get_batch(shards, cfg.batch_size, cfg.seq_len, i, seed=cfg.seed)
        data_s.append(time.perf_counter() - t)
        return out

    history = train(
        model, cfg, batch, progress=False, callback=lambda m: stamps.append(time.perf_counter())
    )
    w, n = args.warmup_steps, args.log_every
    windows = [  # tokens/s over each log_every steps after warmup, like the workers' reports
        n * cfg.tokens_per_step / (stamps[k + n] - stamps[k])
        for k in range(w - 1, len(stamps) - n, n)
    ]
    return {
        "tokens_per_s": statistics.median(windows),
        "data_s": statistics.mean(data_s[w:]),
        "compute_s": statistics.mean(m.seconds for m in history[w:]),
        "comm_s": 0.0,
    }


# --------------------------------------------------------------------------------------------
# (b), (c) Ray Train


def ray_run(args: argparse.Namespace, data: str, workers: int, name: str) -> dict[str, Any]:
    from kilnlm.cluster.launcher import launch

    cc = ClusterConfig(
        workers=workers,
        storage_path=str(Path(args.out).absolute() / "runs"),
        name=name,
        export=False,
        progress=False,
        checkpoint_upload="sync",
        max_failures=0,
        profile_steps=args.profile_steps if workers > 1 else 0,
    )
    job = JobConfig(
        preset=args.preset,
        train=train_config(args, args.global_batch // workers),
        cluster=cc,
        data_dir=data,
    )
    result = launch(job)
    records = result.history
    # Reports after warmup and before the final one (whose interval holds the last checkpoint).
    steady = [r for r in records if args.warmup_steps < r["step"] < args.steps]
    step_s = statistics.mean(r["step_s"] for r in steady)
    comm = result.worker_result["comm_frac"] or 0.0
    final = records[-1]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "data_s": statistics.mean(r["data_s"] for r in steady),
        "compute_s": step_s * (1 - comm),
        "comm_s": step_s * comm,
        "checkpoint_save_s": final.get("checkpoint_s"),
        "checkpoint_upload_s": result.worker_result.get("last_report_s"),
        "launch_to_end_s": result.seconds,
    }


# --------------------------------------------------------------------------------------------
# A ~100M-parameter checkpoint


def checkpoint_timings(preset: str) -> dict[str, float]:
    """Save (DCP + sha256), verify, restore and export a model + AdamW state in one process."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = ModelConfig.from_preset(preset)
    train_cfg = TrainConfig(batch_size=1, seq_len=32, warmup_steps=1, max_steps=10)
    torch.manual_seed(0)
    model = Transformer(cfg)
    optimizer = build_optimizer(model, train_cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 33))
    train_step(model, optimizer, [(x[:, :-1], x[:, 1:])], train_cfg, 0)  # AdamW state exists
    out: dict[str, float] = {"params": float(num_params(cfg))}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        state = TrainState(1, 32, 1, 1, 1, 0, 0)
        t = time.perf_counter()
        save_sharded(ckpt, model, optimizer, state, rank=0, model_config=cfg)
        out["save_s"] = time.perf_counter() - t
        out["bytes"] = float(sum(p.stat().st_size for p in ckpt.iterdir()))
        t = time.perf_counter()
        verify_checkpoint(ckpt)
        out["verify_s"] = time.perf_counter() - t
        fresh = Transformer(cfg)
        fresh_opt = build_optimizer(fresh, train_cfg)
        t = time.perf_counter()
        load_sharded(ckpt, fresh, fresh_opt, rank=0)
        out["restore_s"] = time.perf_counter() - t
        t = time.perf_counter()
        export_checkpoint(ckpt, Path(tmp) / "export")
        out["export_s"] = time.perf_counter() - t
    return out


def ray_checkpoint_timings(args: argparse.Namespace, out: Path) -> dict[str, float]:
    """2 FSDP workers save a base-100m checkpoint (and export it); a relaunch restores it."""
    from kilnlm.cluster.launcher import launch

    data = corpus(out, ModelConfig.from_preset(args.checkpoint_preset).vocab_size)
    name = f"ckpt-{int(time.time())}"
    cc = ClusterConfig(
        workers=2,
        storage_path=str(out.absolute() / "runs"),
        name=name,
        progress=False,
        checkpoint_upload="sync",
        max_failures=0,
        torch_threads=1,
    )
    train_cfg = TrainConfig(
        batch_size=1,
        seq_len=64,
        warmup_steps=1,
        max_steps=2,
        eval_every=0,
        log_every=1,
        checkpoint_every=1,
    )
    job = JobConfig(
        preset=args.checkpoint_preset,
        train=train_cfg,
        data_dir=data,
        cluster=replace(cc, stop_at_step=1),
    )
    first = launch(job)
    second = launch(replace(job, cluster=replace(cc, export=False)))
    saved = first.history[0]
    vocab = CorpusManifest.load(data).vocab_size
    return {
        "params": float(
            num_params(ModelConfig.from_preset(args.checkpoint_preset, vocab_size=vocab))
        ),
        "save_s": saved["checkpoint_s"],
        "gather_s": saved.get("gather_s", float("nan")),
        "upload_s": first.worker_result.get("last_report_s") or float("nan"),
        "restore_s": second.history[0]["restore_s"],
    }


# --------------------------------------------------------------------------------------------


def fmt_row(name: str, r: dict[str, Any]) -> str:
    ms = {k: 1000 * r[k] for k in ("data_s", "compute_s", "comm_s")}
    saved = r.get("checkpoint_save_s")
    checkpoint = f"{saved:.2f} + {r['checkpoint_upload_s']:.2f}" if saved else "–"
    return (
        f"| {name} | {r['tokens_per_s']:,.0f} | {ms['data_s']:.1f} | {ms['compute_s']:.0f} | "
        f"{ms['comm_s']:.0f} | {checkpoint} |"
    )


RUNS = {
    "a1": "(a) library loop, 1 process",
    "b": "(b) Ray Train, 1 worker",
    "a2": "(a) library loop, again",
    "c": "(c) Ray Train, 2 FSDP workers",
    "a3": "(a) library loop, again",
}


def measure(args: argparse.Namespace, data: str) -> dict[str, Any]:
    """a, b, a, c, a: the machine may be shared, so each Ray run is compared with the mean of
    the two library-loop runs beside it."""
    import ray

    results: dict[str, Any] = {"load_before": os.getloadavg()}
    results["a1"] = plain_loop(args, data)
    ray.init(
        address="local",  # a fresh instance: never a cluster someone else left running
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    stamp = int(time.time())
    results["b"] = ray_run(args, data, 1, f"bench-b-{stamp}")
    results["a2"] = plain_loop(args, data)
    results["c"] = ray_run(args, data, 2, f"bench-c-{stamp}")
    results["a3"] = plain_loop(args, data)
    results["load_after"] = os.getloadavg()
    a = {k: results[k]["tokens_per_s"] for k in ("a1", "a2", "a3")}
    results["b_over_a"] = results["b"]["tokens_per_s"] / statistics.mean([a["a1"], a["a2"]])
    results["c_over_a"] = results["c"]["tokens_per_s"] / statistics.mean([a["a2"], a["a3"]])
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    print(
        f"\nmodel {args.preset}, global batch {args.global_batch}x{args.seq_len} tokens, "
        f"{args.steps} steps, 1 torch thread per process, {os.cpu_count()} cores; tokens/s is the "
        f"median over {args.log_every}-step windows after {args.warmup_steps} warmup steps"
    )
    print(
        "| run | tokens/s | data ms/step | compute ms/step | comm ms/step | checkpoint s (save + upload) |"
    )
    print("|---|---|---|---|---|---|")
    for key, name in RUNS.items():
        print(fmt_row(name, results[key]))
    print(
        f"\nb/a = {results['b_over_a']:.2f}   c/a = {results['c_over_a']:.2f}   (load average "
        f"{results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after)"
    )
    ck = results["checkpoint"]
    print(
        f"\n{args.checkpoint_preset}: {ck['params'] / 1e6:.0f}M params, checkpoint "
        f"{ck['bytes'] / 2**20:,.0f} MiB (model + AdamW), one process: save {ck['save_s']:.2f} s, "
        f"verify {ck['verify_s']:.2f} s, restore {ck['restore_s']:.2f} s, export {ck['export_s']:.2f} s"
    )
    if "ray_checkpoint" in results:
        r = results["ray_checkpoint"]
        print(
            f"2 Ray workers ({r['params'] / 1e6:.0f}M params with the corpus' vocabulary): "
            f"save {r['save_s']:.2f} s per rank, gather for export {r['gather_s']:.2f} s, "
            f"upload {r['upload_s']:.2f} s, restore {r['restore_s']:.2f} s"
        )


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = corpus(out, ModelConfig.from_preset(args.preset).vocab_size)
    results = {"args": vars(args), "cpu_count": os.cpu_count(), **measure(args, data)}
    results["checkpoint"] = checkpoint_timings(args.checkpoint_preset)
    if args.ray_checkpoint:
        results["ray_checkpoint"] = ray_checkpoint_timings(args, out)
    (out / "train.json").write_text(json.dumps(results, indent=2))
    report(args, results)


if __name__ == "__main__":
    main()
