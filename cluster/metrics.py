"""Training metrics: MFU (with the peak table), the driver-side history, and its outputs.

Metrics travel the Ray Train V2 way: every rank calls ``ray.train.report(metrics)`` every
``log_every`` steps; the controller hands the reports to ``ProgressCallback.after_report`` (a
``ray.train.UserCallback`` running in the controller process), which forwards rank 0's dict to a
``MetricsSink`` actor; the driver polls the sink to draw its progress bar and write the CSV.

After a worker failure the new worker group resumes from the last checkpoint and reports the
steps after it again. The sink keeps one record per step: a report for a step at or before the
newest one it holds means "the run went back", and every record from that step on is dropped
first. The history therefore has each step once, with the values of the attempt that survived.

MFU = model FLOPs per second ÷ peak FLOPs per second of the devices used, where model FLOPs per
token are ``flops_per_token`` (6·N for the matmuls of forward and backward, plus the attention
score term of PaLM's appendix B). The peaks below are dense (no sparsity) vendor figures.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kilnlm.plots import pyplot, save_figure

# Dense peak TFLOPS per device for the dtype training computes in (vendor data sheets).
# Matched by substring of torch.cuda.get_device_name(), first match wins (order matters).
PEAK_TFLOPS: list[tuple[str, str, float]] = [
    ("H200", "bf16", 989.0),
    ("H100 PCIe", "bf16", 756.0),
    ("H100 NVL", "bf16", 835.0),
    ("H100", "bf16", 989.0),  # SXM
    ("B200", "bf16", 2250.0),
    ("A100", "bf16", 312.0),
    ("L40S", "bf16", 362.0),
    ("L4", "bf16", 121.0),
    ("A10", "bf16", 125.0),
    ("H200", "fp32", 67.0),  # fp32 without TF32: CUDA cores
    ("H100", "fp32", 67.0),
    ("A100", "fp32", 19.5),
]


def cuda_peak_tflops(device_name: str, dtype: str) -> float | None:
    for fragment, kind, peak in PEAK_TFLOPS:
        if fragment in device_name and kind == dtype:
            return peak
    return None


def cpu_peak_tflops(threads: int) -> float | None:
    """An *estimate* of fp32 peak for ``threads`` cores: cores · GHz · FLOPs per cycle.

    FLOPs per cycle from the vector extensions (two FMA units assumed: AVX2 32, AVX-512 64);
    the clock is /proc/cpuinfo's current MHz, so turbo makes the real peak differ. Treat CPU MFU
    as a rough indication. None where /proc/cpuinfo is unavailable (not Linux).
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
    flags = re.search(r"flags\s*:(.*)", info)
    if mhz is None or flags is None:
        return None
    names = set(flags.group(1).split())
    per_cycle = 64 if "avx512f" in names else 32 if {"avx2", "fma"} <= names else 8
    return threads * float(mhz.group(1)) * 1e6 * per_cycle / 1e12


def device_peak_tflops(device: torch.device, dtype: str, threads: int = 1) -> float | None:
    """Peak TFLOPS of one worker's device, or None when unknown (MFU is then not reported)."""
    if device.type == "cuda":
        return cuda_peak_tflops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return cpu_peak_tflops(threads)
    return None


def mfu(
    flops_per_token: float, tokens_per_s: float, peak_tflops_total: float | None
) -> float | None:
    """Model FLOPs utilisation in [0, 1], None without a peak."""
    if not peak_tflops_total or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / (peak_tflops_total * 1e12)


# --------------------------------------------------------------------------------------------
# History: one record per step, rewound after a restart


@dataclass
class History:
    """Metric records by step; a record for an earlier step rewinds the history to it."""

    records: list[dict[str, Any]] = field(default_factory=list)
    rewinds: list[int] = field(default_factory=list)
    """Steps the run went back to (one entry per restart that replayed reported steps)."""

    def add(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        if self.records and step <= int(self.records[-1]["step"]):
            self.rewinds.append(step)
            self.records = [r for r in self.records if int(r["step"]) < step]
        self.records.append(dict(record))

    @property
    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records]

    def column(self, key: str) -> list[Any]:
        return [r.get(key) for r in self.records]


CSV_FIRST = (
    "step",
    "loss",
    "heldout_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "tokens_seen",
)
"""Columns that lead metrics.csv; the rest follow in the order they first appear."""


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    """All records as CSV, one column per key seen in any record (blank where absent)."""
    path = Path(path)
    seen = {k for r in records for k in r}
    keys = [k for k in CSV_FIRST if k in seen]
    for r in records:
        keys += [k for k in r if k not in keys]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(path)
    return path


def plot_loss(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Training (and held-out) loss against step as a PNG; None when matplotlib is missing."""
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    held = [(r["step"], r["heldout_loss"]) for r in records if r.get("heldout_loss") is not None]
    if held:
        ax.plot(*zip(*held, strict=True), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(plt, fig, path)


class TensorBoardLog:
    """Scalars to TensorBoard when torch's writer (or tensorboardX) is installed; else nothing."""

    def __init__(self, log_dir: str | Path) -> None:
        self.writer: Any = None
        for module in ("torch.utils.tensorboard", "tensorboardX"):
            try:
                writer_cls = __import__(module, fromlist=["SummaryWriter"]).SummaryWriter
            except ImportError:
                continue
            self.writer = writer_cls(str(log_dir))
            break

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and value is not None:
                self.writer.add_scalar(key, value, int(record["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


__all__ = [
    "PEAK_TFLOPS",
    "History",
    "TensorBoardLog",
    "cpu_peak_tflops",
    "cuda_peak_tflops",
    "device_peak_tflops",
    "mfu",
    "plot_loss",
    "write_csv",
]
