"""Checkpoint save and restore through an S3-compatible server vs the local disk, side by side.

    python bench/checkpoint_io.py --presets test-1m small-10m base-100m --repeats 3

Starts moto's S3 server on 127.0.0.1 (the one the tests use), then for each preset times, on
the same random-init weights:

- save, local: ``export_content_addressed`` (safetensors + sha256 + fsync + rename);
- save, s3: ``cluster.checkpointing.write_export`` to ``s3://`` (the same export in a temporary
  folder, then every file uploaded, the manifest last);
- restore, local: ``verify_manifest`` + ``checkpoint.load`` (what a replica does on a mount);
- restore, s3 cold: ``remote.fetch`` into an empty cache (download, verify, rename) + load;
- restore, s3 warm: ``remote.fetch`` finding the node's cache (the second replica) + load.

The server runs in this process and stores objects in memory, so "s3" here measures the
protocol and the extra copy, not a network: on AWS/GCS add the bucket's bandwidth. Prints a
Markdown table (median of --repeats) and, with --json, the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import machine_note

from kilnlm import checkpoint
from kilnlm.checkpoint import remote
from kilnlm.cluster.checkpointing import write_export
from kilnlm.model import ModelConfig, Transformer

BUCKET = "kiln-bench"


def start_s3() -> Any:
    """moto's server on a free port of 127.0.0.1, the standard variables pointed at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def one_round(
    preset: str, i: int, state: dict[str, Any], config: ModelConfig, root: Path
) -> tuple[dict[str, float], Path]:
    """Seconds of each operation for one fresh export (a new step, so a new content hash:
    nothing is skipped as already there); returns them and the local export."""
    step, t = 1000 + i, time.perf_counter
    times: dict[str, float] = {}
    start = t()
    local = checkpoint.export_content_addressed(
        state, config, root / f"l-{preset}-{i}", "s", step=step
    )
    times["save_local"] = t() - start
    start = t()
    uri = write_export(f"s3://{BUCKET}/{preset}-{i}", "s", state, config, None, step=step)
    times["save_s3"] = t() - start
    start = t()
    checkpoint.verify_manifest(local)
    checkpoint.load(local, verify=False)
    times["restore_local"] = t() - start
    cache = root / f"cache-{preset}-{i}"
    for key in ("restore_s3_cold", "restore_s3_warm"):  # the second finds the node's cache
        start = t()
        checkpoint.load(remote.fetch(uri, cache).path, verify=False)  # fetch verified it
        times[key] = t() - start
    return times, local


def bench_preset(preset: str, repeats: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    config = ModelConfig.from_preset(preset)
    state = Transformer(config).state_dict()
    rounds = [one_round(preset, i, state, config, root) for i in range(repeats)]
    size = sum(e.size for e in checkpoint.read_manifest(rounds[0][1]).files.values())
    medians = {k: statistics.median(r[0][k] for r in rounds) for k in rounds[0][0]}
    return {"preset": preset, "bytes": size, **medians}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| preset | size | save local | save s3 | restore local | restore s3 (cold) "
        "| restore s3 (cached) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    keys = ("save_local", "save_s3", "restore_local", "restore_s3_cold", "restore_s3_warm")
    lines = [head]
    for r in rows:
        mb = r["bytes"] / 1e6
        cells = [f"{r[k]:.2f} s ({mb / r[k]:.0f} MB/s)" for k in keys]
        lines.append(f"| {r['preset']} | {mb:.1f} MB | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["test-1m", "small-10m", "base-100m"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    server = start_s3()
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-ckpt-io-") as tmp:
            rows = [bench_preset(p, args.repeats, Path(tmp)) for p in args.presets]
    finally:
        server.stop()
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    print(f"\n{machine_note()}")


if __name__ == "__main__":
    main()
