"""Peak memory per rank, measured, beside ``kiln plan``'s estimate: 2 ranks on CPU with gloo.

    python bench/memory.py                      # base-100m, batch 1 x 256: ~3 min at load ~8
    python bench/memory.py --preset small-10m --batch-size 4 --json

For each lever row (every lever off; meta init; + activation checkpointing; + bf16 parameters)
two fresh processes join a gloo group, build the model with ``cluster.parallelize.build_model``
and train ``--steps`` steps (AdamW's state appears at the first). Each rank reads its peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up build of a tiny model, so
imports and first-use allocations are not counted) at two points: after the build, and after
the steps. On a CPU everything ``kiln plan`` puts on the GPU is host memory, so the figures to
compare are the plan's build peak (``host``: the whole model, or shard + largest parameter with
meta init) and its training step (params + grads + optimizer + gathered + activations).
CPU offload is skipped: on a CPU the shards already live in host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
ROWS: dict[str, dict[str, Any]] = {
    "none": {"meta_init": False, "precision": "fp32"},
    "meta_init": {"meta_init": True, "precision": "fp32"},
    "meta_init + activation_checkpointing": {
        "meta_init": True,
        "precision": "fp32",
        "activation_checkpointing": True,
    },
    "meta_init + bf16": {"meta_init": True, "precision": "bf16"},
}


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def rank_main(rank: int, port: int, preset: str, train_kw: dict, steps: int, out: str) -> None:
    from kilnlm.cluster.parallelize import build_model
    from kilnlm.model import ModelConfig
    from kilnlm.train import TrainConfig, build_optimizer, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = ModelConfig.from_preset(preset, block_size=train_kw["seq_len"])
    train = TrainConfig(warmup_steps=1, max_steps=max(steps, 1), **train_kw)
    tiny = ModelConfig.from_preset("test-1m", block_size=train.seq_len)
    warm = build_model(tiny, train, torch.device("cpu"), WORLD)  # imports, first-use allocations
    build_optimizer(warm, train)
    del warm
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
    model = build_model(cfg, train, torch.device("cpu"), WORLD)
    built = status_kb("VmHWM")
    optimizer = build_optimizer(model, train)
    g = torch.Generator().manual_seed(rank)
    for step in range(steps):
        data = torch.randint(0, cfg.vocab_size, (train.batch_size, train.seq_len + 1), generator=g)
        train_step(model, optimizer, [(data[:, :-1], data[:, 1:])], train, step)
    trained = status_kb("VmHWM")
    result = {"build": (built - before) * 1024, "train": (trained - before) * 1024}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(preset: str, train_kw: dict, steps: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(rank_main, args=(port, preset, train_kw, steps, out), nprocs=WORLD)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="base-100m")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from kilnlm.model import ModelConfig
    from kilnlm.scaling import memory_per_rank
    from kilnlm.train import TrainConfig

    cfg = ModelConfig.from_preset(args.preset, block_size=args.seq_len)
    rows = []
    for label, levers in ROWS.items():
        print(f"measuring {label} ...", file=sys.stderr, flush=True)
        kw = {"batch_size": args.batch_size, "seq_len": args.seq_len, **levers}
        ranks = measure(args.preset, kw, args.steps)
        plan = memory_per_rank(cfg, TrainConfig(**kw), WORLD)
        rows.append(
            {
                "levers": label,
                "plan_build": plan.host,
                "measured_build": max(r["build"] for r in ranks),
                "plan_step": plan.step,
                "measured_peak": max(r["train"] for r in ranks),
            }
        )
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    mib = 2**20
    print(
        f"{args.preset}, {WORLD} ranks (CPU, gloo), batch {args.batch_size} x {args.seq_len}, "
        f"{args.steps} step(s); MiB per rank"
    )
    print(f"{'levers':<38}{'plan build':>12}{'measured':>10}{'plan step':>12}{'measured':>10}")
    for r in rows:
        print(
            f"{r['levers']:<38}{r['plan_build'] / mib:>12.0f}{r['measured_build'] / mib:>10.0f}"
            f"{r['plan_step'] / mib:>12.0f}{r['measured_peak'] / mib:>10.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
