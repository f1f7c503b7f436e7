"""The driver side of ``kiln train``: build the data, start a ``TorchTrainer``, watch it.

``launch(job)`` prepares the corpus (once; reused when unchanged), resolves the batch shape for
the world size, and runs ``TorchTrainer(train_loop_per_worker, ...)`` with Ray Train V2's
configs: ``ScalingConfig`` (workers, GPU or not, CPUs per worker), ``RunConfig`` (storage path,
run name, ``FailureConfig(max_failures)``, ``CheckpointConfig(num_to_keep)``, our
``ProgressCallback``). While the trainer runs on a background thread, the driver polls the
metrics sink to show a progress bar and keep ``metrics.csv`` (and TensorBoard, when installed)
up to date; at the end it draws ``loss.png``.

Launching again with the same ``ClusterConfig.name`` and ``storage_path`` resumes the run: Ray
Train V2 finds the run's checkpoint list in storage and hands the newest checkpoint to
``ray.train.get_checkpoint()``.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from kilnlm.checkpoint import remote
from kilnlm.cluster.config import (
    ClusterConfig,
    JobConfig,
    join_uri,
    resolve_grad_accum,
    storage_uri,
)
from kilnlm.cluster.hooks import CheckpointHook, hook_from_config
from kilnlm.cluster.metrics import History, TensorBoardLog, plot_loss, write_csv
from kilnlm.cluster.worker import WorkerSpec, train_loop_per_worker
from kilnlm.data import build_corpus
from kilnlm.model import ModelConfig
from kilnlm.posttrain.job import PostTrainConfig, Prepared
from kilnlm.shards import CorpusManifest
from kilnlm.train import TrainConfig

POLL_S = 0.5
HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


# --------------------------------------------------------------------------------------------
# Metrics from the controller to the driver


@ray.remote(num_cpus=0)
class MetricsSink:
    """Holds the run's History; the controller adds, the driver reads."""

    def __init__(self) -> None:
        self.history = History()
        self.version = 0

    def add(self, record: dict[str, Any]) -> None:
        self.history.add(record)
        self.version += 1

    def snapshot(self, known_version: int) -> tuple[int, list[dict[str, Any]], list[int]] | None:
        """(version, records, rewinds), or None when nothing changed since ``known_version``."""
        if self.version == known_version:
            return None
        return self.version, self.history.records, self.history.rewinds


class ProgressCallback(UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's metrics of every report to the sink."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        record = dict(metrics[0])
        if checkpoint is not None:
            record["checkpoint"] = os.path.basename(checkpoint.path)
        self.sink.add.remote(record)


# --------------------------------------------------------------------------------------------
# Launch


@dataclass
class RunResult:
    """What a finished (or failed) run left behind."""

    run_uri: str
    history: list[dict[str, Any]]
    rewinds: list[int]
    """Steps the metrics went back to after worker-group restarts."""
    exports: list[str] = field(default_factory=list)
    worker_result: dict[str, Any] | None = None
    """Rank 0's return value: exports, hook errors, sharding report, ..."""
    checkpoint: str | None = None
    """Storage path of the newest checkpoint."""
    csv_path: Path | None = None
    png_path: Path | None = None
    error: BaseException | None = None
    seconds: float = 0.0


def prepare_data(job: JobConfig, progress: bool = True) -> tuple[str, int]:
    """(corpus folder, vocab size): the given one, or the default corpus built once into
    ``<storage_path>/corpus`` (build_corpus reuses it when nothing changed)."""
    if job.data_dir is not None:
        return job.data_dir, CorpusManifest.load(job.data_dir).vocab_size
    storage = job.cluster.storage_path
    if "://" in storage:
        raise ValueError(
            "with a remote storage_path, build the corpus first (kilnlm.data.build_corpus) on a "
            "filesystem every node can read, and pass it as --data"
        )
    out = os.path.join(os.path.abspath(storage), "corpus")
    wanted = ModelConfig.from_preset(job.preset, **job.model).vocab_size
    manifest = build_corpus(job.corpus, out, vocab_size=wanted, progress=progress)
    return out, manifest.vocab_size


def ensure_ray(cpus_needed: float = 1.0) -> None:
    """Connect to RAY_ADDRESS (or the cluster ``ray start`` runs here), else start local Ray with
    at least ``cpus_needed`` logical CPUs (a scheduling budget, not cores: see DESIGN.md)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):  # a shared cluster: its nodes bring their own credentials
        ray.init(log_to_driver=False, runtime_env=_storage_runtime_env(secrets=False))
        return
    num_cpus = max(os.cpu_count() or 1, math.ceil(cpus_needed) + 1)
    # Worker logs stay in Ray's session folder (/tmp/ray/session_latest/logs): streamed to the
    # terminal they bury the progress bar. Failures still reach the driver with their traceback.
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=_storage_runtime_env(secrets=True),
        )
    except ValueError:  # `ray start` left a cluster running on this machine: join it instead
        ray.init(log_to_driver=False, runtime_env=_storage_runtime_env(secrets=False))


def _storage_runtime_env(secrets: bool) -> dict[str, Any] | None:
    """This shell's object-storage settings (AWS_ENDPOINT_URL, AWS_REGION, ...) for every Ray
    process, so trainers, the gate and replicas reach the bucket the driver reaches."""
    env = remote.storage_env(secrets=secrets)
    return {"env_vars": env} if env else None


_poll_set_by_us: str | None = None


def set_poll_interval(seconds: float) -> None:
    """Set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S for the next trainer, unless the user set it."""
    global _poll_set_by_us
    if os.environ.get(HEALTH_CHECK_ENV) not in (None, _poll_set_by_us):
        return
    _poll_set_by_us = os.environ[HEALTH_CHECK_ENV] = str(seconds)


def use_gpu(cluster: ClusterConfig) -> bool:
    if cluster.use_gpu is not None:
        return cluster.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= cluster.workers


def launch(
    job: JobConfig, hook: CheckpointHook | None = None, raise_on_error: bool = True
) -> RunResult:
    """Train ``job`` on Ray Train and return its history; see the module docstring."""
    cc = job.cluster
    data_dir, vocab_size = prepare_data(job, progress=cc.progress)
    model_cfg = job.model_config(vocab_size)
    train_cfg = resolve_grad_accum(job.train, cc, cc.workers)
    if train_cfg.objective not in ("clm", "mlm"):
        raise ValueError(
            f"objective {train_cfg.objective!r} is post-training: run kiln finetune, "
            "kiln reward train or kiln dpo (they bring its data and loss)"
        )
    if train_cfg.seq_len > model_cfg.block_size:
        raise ValueError(
            f"TrainConfig.seq_len ({train_cfg.seq_len}) exceeds the model's block_size "
            f"({model_cfg.block_size}); lower seq_len or raise block_size"
        )
    spec = WorkerSpec(
        model=model_cfg,
        train=train_cfg,
        cluster=cc,
        data_dir=os.path.abspath(data_dir),
        run_uri=cc.run_uri,
        hook=hook or hook_from_config(cc.hook_actor, cc.hook_namespace),
    )
    return launch_spec(spec, raise_on_error)


def launch_spec(spec: WorkerSpec, raise_on_error: bool = True) -> RunResult:
    """Run a ready ``WorkerSpec`` on Ray Train: ``launch`` for pretraining, ``kilnlm.posttrain``
    (through ``kiln finetune``/``reward``/``dpo``) for a post-training objective."""
    cc, train_cfg = spec.cluster, spec.train
    ensure_ray(cc.workers * cc.cpus_per_worker)
    gpu = use_gpu(cc)
    # V2's controller takes one report per worker each time it polls the workers (every 2 s by
    # default) and a worker's result queue holds one report, so a worker reporting more often
    # than that blocks. Poll faster unless the user chose (Ray propagates this to the controller).
    set_poll_interval(cc.poll_interval_s)
    # On the driver's node, as Ray Train places its controller: losing a worker node mid-run
    # must not take the metrics (and with them the driver's wait loop) along.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = MetricsSink.options(scheduling_strategy=here).remote()
    trainer = build_trainer(spec, gpu, sink)
    result = watch(trainer, sink, train_cfg, cc)
    ray.kill(sink)
    if result.error is not None and raise_on_error:
        raise result.error
    return result


def posttrain_spec(
    cfg: PostTrainConfig, train: TrainConfig, cluster: ClusterConfig
) -> tuple[WorkerSpec, Prepared]:
    """The worker spec of a post-training run (the parent's model, the objective's plug-in) and
    what ``kilnlm.posttrain.job.finish`` needs afterwards."""
    from kilnlm.checkpoint import config_from_hf
    from kilnlm.posttrain.job import prepare

    model_cfg = config_from_hf(json.loads((Path(cfg.parent) / "config.json").read_text()))
    if train.seq_len > model_cfg.block_size:
        raise ValueError(
            f"--seq-len {train.seq_len} exceeds the parent's context ({model_cfg.block_size}); "
            f"pass --seq-len {model_cfg.block_size} or less"
        )
    prep = prepare(cfg, train.seq_len, train.batch_size, train.seed)
    return WorkerSpec(
        model=model_cfg,
        train=resolve_grad_accum(replace(train, objective=cfg.objective), cluster, cluster.workers),
        cluster=cluster,
        data_dir=str(Path(cfg.parent).absolute()),
        run_uri=cluster.run_uri,
        hook=hook_from_config(cluster.hook_actor, cluster.hook_namespace),
        posttrain=prep.plugin,
    ), prep


def launch_posttrain(
    cfg: PostTrainConfig, train: TrainConfig, cluster: ClusterConfig
) -> tuple[dict[str, Any] | None, RunResult]:
    """SFT, reward model or DPO (``cfg.objective``) from ``cfg.parent``: prepare the data and the
    plug-in here, train on the one worker, then score and export to ``cfg.out``.

    Returns (summary, run); the summary is None when the run failed (``run.error`` says why).
    """
    from kilnlm.posttrain.job import finish

    spec, prep = posttrain_spec(cfg, train, cluster)
    result = launch_spec(spec, raise_on_error=False)
    if result.error is not None or not result.exports:
        return None, result
    # A bucket's export is scored from this machine's verified cached copy.
    return finish(remote.local_dir(result.exports[-1]), prep, cfg), result


def build_trainer(spec: WorkerSpec, gpu: bool, sink: Any) -> TorchTrainer:
    """The TorchTrainer of a run: V2's scaling, storage, failure and checkpoint configs."""
    cc = spec.cluster
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=cc.timeout_s),
        scaling_config=ScalingConfig(
            num_workers=cc.workers,
            use_gpu=gpu,
            resources_per_worker=worker_resources(cc, gpu),
        ),
        run_config=RunConfig(
            name=cc.name,
            storage_path=storage_uri(cc.storage_path),
            failure_config=FailureConfig(max_failures=cc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cc.num_to_keep),
            callbacks=[ProgressCallback(sink)],
        ),
    )


def worker_resources(cc: ClusterConfig, gpu: bool) -> dict[str, float]:
    """What one Ray Train worker asks for: its CPUs, a GPU, and one unit of
    ``worker_resource`` (the nodes set aside for training) when named."""
    resources = {"CPU": cc.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    if cc.worker_resource:
        resources[cc.worker_resource] = 1
    return resources


def watch(trainer: TorchTrainer, sink: Any, train_cfg: Any, cc: ClusterConfig) -> RunResult:
    """Run ``trainer.fit()`` on a thread; meanwhile mirror the sink into the bar, CSV and TB."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # reported to the caller through RunResult.error
            outcome["error"] = e

    start = time.perf_counter()
    thread = threading.Thread(target=fit, name="kilnlm-fit", daemon=True)
    thread.start()
    out_dir = local_output_dir(cc)
    view = DriverView(
        out_dir,
        total=min(train_cfg.max_steps, cc.stop_at_step or train_cfg.max_steps),
        enabled=cc.progress,
    )
    while thread.is_alive():
        thread.join(POLL_S)
        view.update(sink)
    view.update(sink)
    view.close(title=cc.name)
    fit_result = outcome.get("result")
    error = outcome.get("error") or getattr(fit_result, "error", None)
    worker_result = getattr(fit_result, "return_value", None)
    checkpoint = getattr(fit_result, "checkpoint", None)
    return RunResult(
        run_uri=cc.run_uri,
        history=view.records,
        rewinds=view.rewinds,
        exports=list((worker_result or {}).get("exports", [])),
        worker_result=worker_result,
        checkpoint=checkpoint.path if checkpoint is not None else None,
        csv_path=view.csv_path if view.records else None,
        png_path=view.png_path,
        error=error,
        seconds=time.perf_counter() - start,
    )


def local_output_dir(cc: ClusterConfig) -> Path:
    """Where the driver writes metrics.csv / loss.png / tensorboard: the run folder when local."""
    remote = "://" in cc.run_uri
    path = Path(cc.name + "-metrics").absolute() if remote else Path(cc.run_uri)
    path.mkdir(parents=True, exist_ok=True)
    return path


class DriverView:
    """Progress bar + CSV + TensorBoard, fed from sink snapshots."""

    def __init__(self, out_dir: Path, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.out_dir = out_dir
        self.csv_path = out_dir / "metrics.csv"
        self.png_path: Path | None = None
        self.bar = tqdm(
            total=total, desc="train", unit="step", disable=not enabled, dynamic_ncols=True
        )
        self.tb = TensorBoardLog(out_dir / "tensorboard")
        self.version = 0
        self.tb_step = 0
        self.records: list[dict[str, Any]] = []
        self.rewinds: list[int] = []

    def update(self, sink: Any) -> None:
        snapshot = ray.get(sink.snapshot.remote(self.version))
        if snapshot is None:
            return
        self.version, self.records, self.rewinds = snapshot
        last = self.records[-1]
        self.bar.n = int(last["step"])
        self.bar.set_postfix(_postfix(self.records), refresh=True)
        write_csv(self.records, self.csv_path)
        for r in self.records:
            if int(r["step"]) > self.tb_step:
                self.tb.add(r)
                self.tb_step = int(r["step"])

    def close(self, title: str) -> None:
        self.bar.close()
        self.tb.close()
        if self.records:
            self.png_path = plot_loss(self.records, self.out_dir / "loss.png", title=title)


def _postfix(records: list[dict[str, Any]]) -> dict[str, str]:
    last = records[-1]
    out = {
        "loss": f"{last['loss']:.3f}",
        "lr": f"{last['lr']:.1e}",
        "tok/s": f"{last['tokens_per_s']:,.0f}",
    }
    held = [r["heldout_loss"] for r in records if "heldout_loss" in r]
    if held:
        out["heldout"] = f"{held[-1]:.3f}"
    if "mfu" in last:
        out["mfu"] = f"{last['mfu']:.1%}"
    return out


def with_overrides(job: JobConfig, **cluster: Any) -> JobConfig:
    """``job`` with ClusterConfig fields replaced (re-validated)."""
    return replace(job, cluster=replace(job.cluster, **cluster))


__all__ = [
    "MetricsSink",
    "ProgressCallback",
    "RunResult",
    "ensure_ray",
    "join_uri",
    "launch",
    "launch_posttrain",
    "launch_spec",
    "posttrain_spec",
    "prepare_data",
    "use_gpu",
    "with_overrides",
]
