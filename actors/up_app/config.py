"""What ``kiln up`` runs: the job to train, the replicas to serve, the load, the prompt."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kilnlm.checkpoint import remote
from kilnlm.cluster.config import ClusterConfig, JobConfig, join_uri
from kilnlm.energy import EnergyConfig
from kilnlm.engine import EngineConfig
from kilnlm.serving_config import ServeConfig
from kilnlm.train import TrainConfig

DEFAULT_PROMPT = "class Config:\n\n    def __init__(self"
"""The prompt every promoted version completes (greedy), printed after each promotion."""

LOAD_PROMPTS = (
    "import os\n",
    "class Queue:\n",
    "def main():\n",
    "    return ",
    "# Copyright",
    'if __name__ == "__main__":\n',
)
"""What the background clients ask for: short code openings from the corpus's own world."""

UP_TRAIN: dict[str, Any] = {
    "lr": 3e-3,
    "min_lr": 3e-4,
    "warmup_steps": 50,
    "max_steps": 640,
    "batch_size": 8,
    "seq_len": 128,
    "eval_every": 160,
    "eval_batches": 4,
    "log_every": 5,
    "checkpoint_every": 160,
}
"""The local job's schedule: 4 checkpoints (4 chances to promote) on 2 workers, a global batch
of 16 × 128 tokens (kiln run's recipe, 640 steps instead of 900 so the whole loop stays inside
10 minutes on 2 busy cores): the last version beats the best n-gram on the gate's tokens."""


def run_name() -> str:
    """A fresh run name per invocation, so a second `kiln up` trains again instead of resuming
    a finished run (pass --name to resume one on purpose)."""
    return time.strftime("up-%Y%m%d-%H%M%S")


def default_job() -> JobConfig:
    """tiny-3m on 6 MB of the standard library, 2 CPU workers: the laptop main job."""
    return JobConfig(
        preset="tiny-3m",
        train=TrainConfig(**UP_TRAIN),
        cluster=ClusterConfig(workers=2, cpus_per_worker=1.0, storage_path="runs", name=run_name()),
    )


def default_serve() -> ServeConfig:
    """Two replicas (so a swap is all-or-nothing across more than one) with a small KV cache."""
    return ServeConfig(num_replicas=2, engine=EngineConfig(kv_budget_mib=32, max_num_seqs=32))


@dataclass
class LoadConfig:
    """The background clients: a few concurrent streams, back to back, through gRPC."""

    clients: int = 1
    """Concurrent streams (0 = no load)."""
    max_tokens: int = 24
    temperature: float = 0.8
    top_p: float = 0.95
    pause_s: float = 1.0
    """Pause between one client's requests: keeps the load light next to training (on 2 cores,
    2 clients 0.2 s apart took half the trainers' throughput, 1 client 0.5 s apart a third)."""
    timeout_s: float = 60.0
    """Deadline per request; one that passes counts as failed."""

    def __post_init__(self) -> None:
        if self.clients < 0:
            raise ValueError(f"LoadConfig.clients must be >= 0, got {self.clients}")
        if self.max_tokens < 1:
            raise ValueError(f"LoadConfig.max_tokens must be >= 1, got {self.max_tokens}")
        for name in ("pause_s", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"LoadConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"LoadConfig.top_p must be in (0, 1], got {self.top_p}")
        if not self.timeout_s > 0:
            raise ValueError(f"LoadConfig.timeout_s must be > 0, got {self.timeout_s}")


@dataclass
class UpConfig:
    """Everything ``kiln up`` runs: what to train, how to serve, what to show."""

    job: JobConfig = field(default_factory=default_job)
    serve: ServeConfig = field(default_factory=default_serve)
    load: LoadConfig = field(default_factory=LoadConfig)
    prompt: str = DEFAULT_PROMPT
    prompt_tokens: int = 48
    """Greedy tokens generated from ``prompt`` after each promotion."""
    max_ppl_increase: float = 0.05
    """The gate's margin: a checkpoint worse than the promoted one by more is rejected."""
    heldout_tokens: int = 16384
    """Held-out tokens the gate scores each checkpoint on, and the n-gram baseline too."""
    ngram_orders: tuple[int, ...] = (2, 3, 4, 5)
    """Kneser-Ney orders fitted on the training split; the summary shows the best on the
    held-out tokens beside the promoted versions (empty: no baseline)."""
    exit_after: float | None = None
    """Seconds to keep serving once training has ended and the last checkpoint is settled;
    None serves until Ctrl-C (or SIGTERM)."""
    settle_timeout_s: float = 180.0
    """After training, how long to wait for the last checkpoints' validation and swaps."""
    ray_address: str | None = None
    """Join this Ray cluster ("auto" on a head node); None starts local Ray (unless one runs)."""
    ray_num_cpus: int = 8
    """Logical CPUs of a local Ray: enough for 2 trainers, 2 replicas, gateway and orchestrator."""
    status_poll_s: float = 1.0
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    """Grid carbon intensity (g CO2/kWh) and the per-core watts of the CPU estimate."""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("UpConfig.prompt must be non-empty text")
        if self.prompt_tokens < 1:
            raise ValueError(f"UpConfig.prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.heldout_tokens < 2:
            raise ValueError(f"UpConfig.heldout_tokens must be >= 2, got {self.heldout_tokens}")
        self.ngram_orders = tuple(self.ngram_orders)  # TOML and JSON give lists
        if any(k < 1 for k in self.ngram_orders):
            raise ValueError(f"UpConfig.ngram_orders must be >= 1 each, got {self.ngram_orders}")
        if self.exit_after is not None and self.exit_after < 0:
            raise ValueError(f"UpConfig.exit_after must be >= 0 or None, got {self.exit_after}")
        for name in ("settle_timeout_s", "status_poll_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"UpConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.ray_num_cpus < 1:
            raise ValueError(f"UpConfig.ray_num_cpus must be >= 1, got {self.ray_num_cpus}")
        if not self.job.cluster.export:
            raise ValueError("ClusterConfig.export must be on: the orchestrator promotes exports")
        if self.job.train.checkpoint_every < 1:
            raise ValueError(
                "TrainConfig.checkpoint_every must be >= 1 under kiln up: each checkpoint is a "
                "version to promote (0 would promote only the last)"
            )
        if remote.is_remote(self.job.cluster.storage_path) and self.job.data_dir is None:
            raise ValueError(
                "ClusterConfig.storage_path is object storage: build the corpus first (kiln "
                "corpus --out DIR on a filesystem every node reads) and pass it as --data"
            )

    @property
    def run_uri(self) -> str:
        """The run's folder or object-store prefix: checkpoints, exports and the registry."""
        return self.job.cluster.run_uri.removeprefix("file://")

    @property
    def registry_uri(self) -> str:
        """Where the orchestrator keeps registry.json (in the run, so a restart finds it)."""
        return join_uri(self.run_uri, "orchestrator")

    @property
    def run_dir(self) -> Path:
        """A local folder for the summary: the run's folder, or ``<name>-metrics`` here (beside
        the driver's metrics) when the run is in object storage."""
        if remote.is_remote(self.run_uri):
            return Path(self.job.cluster.name + "-metrics").absolute()
        return Path(self.run_uri)
