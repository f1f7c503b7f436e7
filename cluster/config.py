"""Typed configs of a distributed pretraining run: how many workers, where state goes, what to do
on failure. The library's ``ModelConfig``/``TrainConfig``/``CorpusConfig`` say *what* to train;
``ClusterConfig`` says *how* to run it on Ray. Everything here pickles across Ray processes and
loads from a TOML/JSON/YAML file (``[cluster]`` table) or ``--flags`` via ``kilnlm.config``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Literal

from kilnlm.data import CorpusConfig
from kilnlm.model import ModelConfig
from kilnlm.train import TrainConfig


@dataclass
class ClusterConfig:
    """How a run is placed on Ray and made durable."""

    workers: int = 2
    """Ray Train workers (data-parallel ranks, each holding a 1/workers FSDP2 shard)."""
    use_gpu: bool | None = None
    """One GPU per worker, bf16 + NCCL; None: use GPUs when the Ray cluster has at least
    ``workers`` of them, else CPU (fp32 + gloo)."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker asks Ray for; fractional lets trainers, replicas and the gateway
    share a 2-core laptop (DESIGN.md: Ray resources are logical)."""
    worker_resource: str | None = None
    """A custom Ray resource each worker asks one unit of, e.g. "kiln_trainer": the training
    workers then land only on the nodes that advertise it (``ray start --resources
    '{"kiln_trainer": 8}'``, or ``resources:`` of a ``ray up`` node type), so a cluster can keep
    trainers and serving replicas on different nodes. None: any node with the CPUs (and GPUs)."""
    torch_threads: int = 1
    """torch intra-op threads per worker; keep workers x threads <= physical cores."""
    storage_path: str = "runs"
    """Where checkpoints, exports and metrics go: a local folder or any pyarrow URI (s3://, gs://)."""
    name: str = "pretrain"
    """Run name: the folder under ``storage_path``. Launching again with the same name resumes."""
    global_batch_tokens: int | None = None
    """Tokens per optimiser step over all workers; sets grad_accum_steps = this / (workers ·
    batch_size · seq_len), which must be a whole number. None keeps TrainConfig.grad_accum_steps."""
    num_to_keep: int = 2
    """Sharded checkpoints kept in storage (older ones are deleted by Ray Train)."""
    max_failures: int = 2
    """Worker-group restarts allowed (each resumes from the last checkpoint); -1 = unlimited."""
    checkpoint_upload: Literal["sync", "async"] = "async"
    """async: Ray uploads the shard in a background thread while training goes on; sync: the
    step waits for the upload (deterministic placement of checkpoints, used by tests)."""
    export: bool = True
    """Consolidate every checkpoint into the serving format (model.safetensors + manifest)."""
    hook_actor: str | None = None
    """Name of a Ray actor whose ``register(uri)`` is called after each export (the orchestrator)."""
    hook_namespace: str | None = None
    """Ray namespace of ``hook_actor``; None = the job's namespace."""
    stop_at_step: int | None = None
    """Stop after this many steps although the schedule runs to max_steps (train in pieces)."""
    peak_tflops: float | None = None
    """Per-device peak for MFU; None: look the device up in cluster.metrics.PEAK_TFLOPS."""
    progress: bool = True
    """Driver progress bar."""
    poll_interval_s: float = 0.25
    """How often the Ray Train controller collects reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    unless set in the environment). A worker that reports more often than this waits."""
    drill_kill_step: int | None = None
    """Fault drill: SIGKILL one worker process when it reaches this step, once per run."""
    drill_kill_rank: int = -1
    """Fault drill: which rank dies; -1 = the last one (rank 0 also runs the exports)."""
    timeout_s: int = 1800
    """Collective timeout of the torch process group."""
    profile_steps: int = 0
    """Profile this many steps after the first report to split step time into compute and
    communication (reported as comm_frac); 0 = off."""

    def __post_init__(self) -> None:
        checks: list[tuple[str, bool, str]] = [
            ("workers", self.workers >= 1, ">= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "> 0"),
            ("torch_threads", self.torch_threads >= 1, ">= 1"),
            ("worker_resource", _custom_resource(self.worker_resource), CUSTOM_RESOURCE),
            ("storage_path", bool(self.storage_path), "a folder or URI"),
            ("name", bool(self.name) and "/" not in self.name, "a non-empty name without '/'"),
            ("num_to_keep", self.num_to_keep >= 1, ">= 1"),
            ("max_failures", self.max_failures >= -1, ">= -1 (-1 = unlimited)"),
            ("checkpoint_upload", self.checkpoint_upload in ("sync", "async"), "'sync' or 'async'"),
            ("global_batch_tokens", _none_or(self.global_batch_tokens, 1), ">= 1 or None"),
            ("stop_at_step", _none_or(self.stop_at_step, 1), ">= 1 or None"),
            ("peak_tflops", _none_or(self.peak_tflops, 1e-9), "> 0 or None"),
            ("drill_kill_step", _none_or(self.drill_kill_step, 1), ">= 1 or None"),
            ("drill_kill_rank", -1 <= self.drill_kill_rank < self.workers, "in [-1, workers)"),
            ("timeout_s", self.timeout_s >= 1, ">= 1"),
            ("poll_interval_s", self.poll_interval_s > 0, "> 0"),
            ("profile_steps", self.profile_steps >= 0, ">= 0"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(
                    f"ClusterConfig.{name} must be {want}, got {getattr(self, name)!r}"
                )

    @property
    def run_uri(self) -> str:
        """The run's folder: ``storage_path/name`` (local paths made absolute, as Ray wants)."""
        return join_uri(storage_uri(self.storage_path), self.name)


LAPTOP_TRAIN: dict[str, Any] = {
    "lr": 2e-3,
    "min_lr": 2e-4,
    "warmup_steps": 30,
    "max_steps": 300,
    "batch_size": 8,
    "seq_len": 128,
    "eval_every": 50,
    "eval_batches": 4,
    "log_every": 5,
    "checkpoint_every": 100,
}
"""JobConfig's training defaults: ``kiln train --workers 2`` in a few minutes on a laptop."""


@dataclass
class JobConfig:
    """One pretraining job: the model, how to train it, on what data, on which cluster."""

    preset: str = "tiny-3m"
    """Model preset (ModelConfig.from_preset); the ``model`` table overrides its fields."""
    model: dict = field(default_factory=dict)
    """ModelConfig field overrides (vocab_size comes from the tokenizer)."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**LAPTOP_TRAIN))
    """Per-rank batch shape and schedule; the default finishes in minutes on 2 CPU cores."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(max_bytes=6_000_000))
    data_dir: str | None = None
    """A corpus built by kilnlm.data.build_corpus; None builds ``corpus`` into
    ``<storage_path>/corpus`` (reused when nothing changed)."""

    def __post_init__(self) -> None:
        ModelConfig.from_preset(self.preset, **self.model)  # fail early, naming the bad field

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The model to train; mlm forces a bidirectional model (a causal one cannot see the right).

        Unless the ``model`` table sets ``block_size``, the context is the training sequence
        length (as torchtitan's max_seq_len): positions a model never trained on are not ones
        it should be evaluated or served at, and a preset's longer block_size would let the
        gate and the server use them.
        """
        overrides = {"block_size": self.train.seq_len, **self.model, "vocab_size": vocab_size}
        if self.train.objective == "mlm":
            overrides["causal"] = False
        return ModelConfig.from_preset(self.preset, **overrides)


def load_job(path: str | os.PathLike[str] | None = None) -> JobConfig:
    """A JobConfig from a TOML/JSON/YAML file whose tables override JobConfig's defaults.

    Unlike building each table from scratch, a ``[train]`` table that sets only ``lr`` keeps the
    job's other training defaults. Unknown keys are errors that name them.
    """
    from kilnlm.config import from_dict, read_file

    data = read_file(path) if path is not None else {}
    default = JobConfig()
    merged: dict[str, Any] = {}
    for f in fields(JobConfig):
        value = data.pop(f.name, None)
        base = getattr(default, f.name)
        if is_dataclass(base) and isinstance(value, dict):
            value = from_dict(type(base), {**asdict(base), **value}, f"JobConfig.{f.name}")
        merged[f.name] = base if value is None else value
    if data:
        raise ValueError(
            f"unknown JobConfig keys {sorted(data)}; known: {[f.name for f in fields(JobConfig)]}"
        )
    return JobConfig(**merged)


def _none_or(value: float | None, least: float) -> bool:
    return value is None or value >= least


CUSTOM_RESOURCE = "None or the name of a custom Ray resource (not CPU, GPU, memory, ...)"
BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "TPU", "memory", "object_store_memory"})


def _custom_resource(name: str | None) -> bool:
    """None, or a custom resource's name: a built-in one would double what the worker already
    asks for (``cpus_per_worker``, ``use_gpu``) instead of naming the nodes it may use."""
    return name is None or (bool(name.strip()) and name not in BUILTIN_RESOURCES)


def resolve_grad_accum(train: TrainConfig, cluster: ClusterConfig, world_size: int) -> TrainConfig:
    """``train`` with grad_accum_steps set so a step covers ``global_batch_tokens`` over all ranks."""
    if cluster.global_batch_tokens is None:
        return train
    micro = train.batch_size * train.seq_len * world_size
    accum, rest = divmod(cluster.global_batch_tokens, micro)
    if accum < 1 or rest:
        raise ValueError(
            f"ClusterConfig.global_batch_tokens ({cluster.global_batch_tokens}) must be a whole "
            f"multiple of workers·batch_size·seq_len = {world_size}·{train.batch_size}·"
            f"{train.seq_len} = {micro}; use e.g. {max(accum, 1) * micro}"
        )
    return replace(train, grad_accum_steps=accum)


def storage_uri(path: str) -> str:
    """A pyarrow-understood location: URIs as they are, local paths absolute."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def join_uri(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


__all__ = [
    "LAPTOP_TRAIN",
    "ClusterConfig",
    "JobConfig",
    "join_uri",
    "load_job",
    "resolve_grad_accum",
    "storage_uri",
]
