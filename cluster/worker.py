"""The per-worker training loop that Ray Train runs on every rank.

Each rank builds the model from the library on the meta device, shards it with FSDP2 and
materialises only its own shard, with the values a whole build from the seed would have
(``cluster.parallelize.build_model``, which also applies the memory levers); it then repeats
the library's ``train_step`` on its own slice of the data: micro-batch i of rank r is
``kilnlm.shards.get_batch(shards, ..., step=i, rank=r, world_size=W)``, disjoint from every other
rank's and a pure function of (i, r, seed). Every ``log_every`` steps all ranks average their
numbers and call ``ray.train.report``; every ``checkpoint_every`` steps they also write a sharded
checkpoint, and rank 0 hands a consolidated copy of the weights to a background export.

A restarted worker group resumes from ``ray.train.get_checkpoint()`` (verified first; see
``cluster.checkpointing.choose_resume``, which also sees a checkpoint whose report Ray
never collected) and continues at the step after it, so a run
interrupted any number of times computes the same losses as one that never was.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kilnlm.cluster.checkpointing import (
    EXPORTS,
    Exporter,
    TrainState,
    capture_rng,
    checkpoint_dir_name,
    choose_resume,
    gather_full_state_dict,
    load_sharded,
    local_copy,
    restore_rng,
    save_sharded,
    verify_checkpoint,
)
from kilnlm.cluster.config import ClusterConfig, join_uri
from kilnlm.cluster.hooks import CheckpointHook
from kilnlm.cluster.metrics import device_peak_tflops, mfu
from kilnlm.cluster.parallelize import build_model, is_sharded, local_fraction
from kilnlm.mlm import MaskingConfig, evaluate_mlm, mask_tokens, mlm_generator
from kilnlm.model import ModelConfig, Transformer, flops_per_token
from kilnlm.posttrain.plugin import PostTrainPlugin
from kilnlm.shards import TokenShards, get_batch, steps_per_epoch
from kilnlm.tokenizer import Tokenizer
from kilnlm.train import (
    TOKEN_LOSS,
    Batch,
    TrainConfig,
    autocast_dtype_for,
    build_optimizer,
    check_objective,
    evaluate_loss,
    is_eval_step,
    train_step,
)

COMM_EVENT_PREFIXES = ("gloo:", "nccl:")
"""Profiler events of the collectives themselves (gloo's CPU ops, NCCL's record_function)."""


@dataclass
class WorkerSpec:
    """Everything a worker needs, built on the driver; pickled into each worker."""

    model: ModelConfig
    train: TrainConfig
    """With grad_accum_steps already resolved for the world size."""
    cluster: ClusterConfig
    data_dir: str
    run_uri: str
    hook: CheckpointHook | None = None
    posttrain: PostTrainPlugin | None = None
    """A post-training objective (SFT, reward model, DPO): it supplies the starting weights, the
    batches, the loss and the held-out figures; the loop, sharding, checkpoints and exports stay
    these. ``data_dir`` is then the parent export (for its tokenizer)."""


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (``TorchTrainer(train_loop_per_worker, train_loop_config=...)``)."""
    import ray.train
    import ray.train.torch

    spec: WorkerSpec = config["spec"]
    torch.set_num_threads(spec.cluster.torch_threads)
    ctx = ray.train.get_context()
    loop = WorkerLoop(
        spec, ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    )
    return loop.run()


@dataclass
class Interval:
    """Sums since the last report (per rank)."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    data_s: float = 0.0
    step_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class WorkerLoop:
    """One rank's run: setup (model, shards, data, resume), then the step loop."""

    def __init__(self, spec: WorkerSpec, rank: int, world_size: int, device: torch.device) -> None:
        self.spec, self.rank, self.world, self.device = spec, rank, world_size, device
        self.cfg, self.cc = spec.train, spec.cluster
        self.stop = min(self.cfg.max_steps, self.cc.stop_at_step or self.cfg.max_steps)
        self.tokenizer = Tokenizer.load(spec.data_dir)
        self.shards = None if spec.posttrain else TokenShards(spec.data_dir, "train")
        self.objective = spec.posttrain.loss if spec.posttrain else TOKEN_LOSS
        self.param_dtype = autocast_dtype_for(self.cfg, device)
        self.model = self._build_model()
        if spec.posttrain is not None:  # start from the parent export (before any resume)
            spec.posttrain.init_weights(self.model)
        self.optimizer = build_optimizer(self.model, self.cfg)
        self.flops_per_token = flops_per_token(spec.model, self.cfg.seq_len)
        self.tokens_per_step = self.cfg.tokens_per_step * world_size
        self.masking = MaskingConfig(random_low=max(self.tokenizer.special_ids) + 1)
        self.eval_batches = self._eval_batches()
        self.exporter = self._exporter() if rank == 0 and self.cc.export else None
        self.state = TrainState(
            step=0,
            tokens_seen=0,
            data_position=0,
            world_size=world_size,
            grad_accum_steps=self.cfg.grad_accum_steps,
            seed=self.cfg.seed,
            resumed_from=0,
        )
        self.skipped_checkpoints: list[str] = []
        self.comm_frac: float | None = None
        self.restore_s: float | None = None
        """Seconds the resume took (choose, verify, load); reported once."""
        self.report_s: float | None = None
        """Seconds the previous ray.train.report took (with a sync checkpoint: the upload)."""

    # ---- setup --------------------------------------------------------------------------------

    def _build_model(self) -> Transformer:
        """The library's model for this rank: meta init, the TrainConfig memory levers and FSDP2
        when there is more than one rank (``cluster.parallelize.build_model``); same seed, same
        initial weights on every rank."""
        model = build_model(self.spec.model, self.cfg, self.device, self.world)
        check_objective(model, self.cfg)
        return model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """FSDP's MixedPrecisionPolicy casts sharded models; an unsharded one needs autocast."""
        return None if is_sharded(self.model) else self.param_dtype

    def _eval_batches(self) -> list[Batch]:
        """This rank's fixed held-out batches (disjoint from other ranks'); [] if the split is
        too small to give every rank one batch."""
        if self.cfg.eval_every == 0 or self.spec.posttrain is not None:
            return []
        heldout = TokenShards(self.spec.data_dir, "heldout")
        B, T = self.cfg.batch_size, self.cfg.seq_len
        windows = max((len(heldout) - 1) // T, 0)
        B = min(B, windows // self.world)
        if B == 0:
            return []
        n = min(self.cfg.eval_batches, steps_per_epoch(len(heldout), B, T, self.world))
        batches = [
            get_batch(heldout, B, T, i, self.rank, self.world, self.cfg.seed) for i in range(n)
        ]
        if self.cfg.objective == "mlm":
            batches = [self._mask(x, 10**9 + i) for i, (x, _) in enumerate(batches)]
        return [(x.to(self.device), y.to(self.device)) for x, y in batches]

    def _exporter(self) -> Exporter:
        return Exporter(
            join_uri(self.spec.run_uri, EXPORTS),
            self.spec.model,
            tokenizer=self.tokenizer,
            hook=self.spec.hook,
        )

    def _mask(self, x: Tensor, index: int) -> Batch:
        g = mlm_generator(self.cfg.seed, index, self.rank)
        return mask_tokens(x, self.tokenizer.mask_id, self.spec.model.vocab_size, g, self.masking)

    # ---- resume -------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load the newest intact checkpoint, if the run has one. Rank 0 picks it (hashing every
        file once, not once per rank) and tells the others; a run with none starts at step 0."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        start = time.perf_counter()
        choice: list[Any] = [None]
        if self.rank == 0:
            choice[0] = self._choose_checkpoint(checkpoint)
        dist.broadcast_object_list(choice, src=0)
        path, skipped = choice[0]
        if path is None:
            if skipped:
                raise RuntimeError(skipped[0])
            return
        with local_copy(path) as local:
            self.state = load_sharded(local, self.model, self.optimizer, self.rank)
        restore_rng(self.state, self.device)
        self.skipped_checkpoints = skipped
        self.state.resumed_from = self.state.step
        # DCP resharded the tensors if the world size changed; the counters describe this run.
        self.state.world_size, self.state.grad_accum_steps = self.world, self.cfg.grad_accum_steps
        self.restore_s = time.perf_counter() - start

    def _choose_checkpoint(self, checkpoint: Any) -> tuple[str | None, list[str]]:
        """(path, refusals) of the checkpoint to resume from; (None, []) for a fresh run."""
        import pyarrow.fs

        from kilnlm.checkpoint import CheckpointError

        if checkpoint is not None and not isinstance(
            checkpoint.filesystem, pyarrow.fs.LocalFileSystem
        ):
            # Remote storage: verify the one Ray offers on a local copy (no fallback scan).
            uri = checkpoint.filesystem.type_name + "://" + checkpoint.path
            with checkpoint.as_directory() as local:
                try:
                    verify_checkpoint(local)
                except CheckpointError as e:
                    return None, [str(e)]
            return uri, []
        if "://" in self.spec.run_uri and not self.spec.run_uri.startswith("file://"):
            return None, []  # remote run folder and no tracked checkpoint: a fresh run
        run_dir = self.spec.run_uri.removeprefix("file://")
        try:
            point = choose_resume(None if checkpoint is None else checkpoint.path, run_dir)
        except CheckpointError as e:
            return None, [str(e)]
        return (None, []) if point is None else (str(point.path), point.skipped)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.resume()
        sharding = self.sharding_report()
        interval = Interval()
        for step in range(self.state.step, self.stop):
            self.maybe_drill_kill(step)
            profiling = self._profile_window(step)
            metrics = self.one_step(step, interval, profiling)
            done = step + 1
            checkpoint_now = self.is_checkpoint_step(done)
            heldout = self.heldout(step, force=checkpoint_now and self.cc.export)
            # Only a loss measured at this very step describes a checkpoint taken now.
            self.state.heldout_loss = heldout.get("heldout_loss")
            if done % self.cfg.log_every == 0 or checkpoint_now or heldout or done == self.stop:
                self.report(done, interval, metrics, heldout, checkpoint_now)
                interval = Interval()
        if self.exporter is not None:
            self.exporter.close()
        return {
            "final_step": self.state.step,
            "resumed_from": self.state.resumed_from,
            "exports": self.exporter.exported if self.exporter else [],
            "hook_errors": self.exporter.hook_errors if self.exporter else [],
            "skipped_checkpoints": self.skipped_checkpoints,
            "sharding": sharding,
            "comm_frac": self.comm_frac,
            "last_report_s": self.report_s,
        }

    def one_step(self, step: int, interval: Interval, profiling: bool) -> Any:
        t0 = time.perf_counter()
        accum, first = self.cfg.grad_accum_steps, self.state.data_position
        batches = [self.batch(first + k) for k in range(accum)]
        t1 = time.perf_counter()
        metrics = self._profiled_step(batches, step) if profiling else self._step(batches, step)
        t2 = time.perf_counter()
        self.state.step = step + 1
        self.state.tokens_seen += self.tokens_per_step
        self.state.data_position = first + accum
        interval.steps += 1
        interval.loss += metrics.loss
        interval.grad_norm += metrics.grad_norm
        interval.data_s += t1 - t0
        interval.step_s += t2 - t1
        return metrics

    def batch(self, index: int) -> Batch:
        """Micro-batch ``index`` of this rank: clm (x, next tokens) or mlm (masked x, originals);
        a post-training plug-in's own tuple of tensors."""
        if self.spec.posttrain is not None:
            micro = self.spec.posttrain.batch(index, self.rank, self.world)
            return tuple(t.to(self.device, non_blocking=True) for t in micro)
        x, y = get_batch(
            self.shards,
            self.cfg.batch_size,
            self.cfg.seq_len,
            index,
            self.rank,
            self.world,
            self.cfg.seed,
        )
        if self.cfg.objective == "mlm":
            x, y = self._mask(x, index)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def is_checkpoint_step(self, done: int) -> bool:
        every = self.cfg.checkpoint_every
        return done == self.stop or (every > 0 and done % every == 0)

    # ---- held-out -----------------------------------------------------------------------------

    def heldout(self, step: int, force: bool = False) -> dict[str, float]:
        """Held-out metrics averaged over ranks (every rank scores as many batches, so the mean
        of rank means is the global mean); {} when not an eval step."""
        if self.spec.posttrain is not None:
            return self.posttrain_heldout(step, force)
        if not self.eval_batches or not (force or is_eval_step(step, self.cfg)):
            return {}
        if self.cfg.objective == "mlm":
            x0 = self.eval_batches[0][0]
            originals = torch.where(self.eval_batches[0][1] >= 0, self.eval_batches[0][1], x0)
            r = evaluate_mlm(
                self.model, self.eval_batches, originals[:1], self.tokenizer.mask_id, 32
            )
            values = [r.loss, r.accuracy, r.pseudo_perplexity]
            keys = ["heldout_loss", "masked_accuracy", "pseudo_perplexity"]
        else:
            values = [
                evaluate_loss(self.model, self.eval_batches, autocast_dtype=self.autocast_dtype)
            ]
            keys = ["heldout_loss"]
        return dict(zip(keys, self.mean_over_ranks(values), strict=True))

    def posttrain_heldout(self, step: int, force: bool) -> dict[str, float]:
        if self.cfg.eval_every == 0 or not (force or is_eval_step(step, self.cfg)):
            return {}
        figures = self.spec.posttrain.heldout(
            self.model, self.rank, self.world, self.autocast_dtype
        )
        return dict(zip(figures, self.mean_over_ranks(list(figures.values())), strict=True))

    def mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    # ---- report and checkpoint ----------------------------------------------------------------

    def report(
        self,
        done: int,
        interval: Interval,
        last: Any,
        heldout: dict[str, float],
        checkpoint_now: bool,
    ) -> None:
        import ray.train

        loss, grad_norm = self.mean_over_ranks(
            [interval.loss / interval.steps, interval.grad_norm / interval.steps]
        )
        checkpoint, timings = self.save_checkpoint() if checkpoint_now else (None, {})
        elapsed = time.perf_counter() - interval.start
        tokens_per_s = interval.steps * self.tokens_per_step / elapsed
        metrics = {
            "step": done,
            "loss": loss,
            **heldout,
            "lr": last.lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": self.mfu(tokens_per_s),
            "tokens_seen": self.state.tokens_seen,
            "data_s": interval.data_s / interval.steps,
            "step_s": interval.step_s / interval.steps,
            **timings,
            "comm_frac": self.comm_frac,
            "restore_s": self.restore_s,
            "report_s": self.report_s,
            "resumed_from": self.state.resumed_from,
            "time": time.time(),
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}
        self.restore_s = None  # once
        start = time.perf_counter()
        if checkpoint is None:
            ray.train.report(metrics)
        else:
            directory, name = checkpoint
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=name,
                checkpoint_upload_mode=_upload_mode(self.cc),
                delete_local_checkpoint_after_upload=True,
            )
        self.report_s = time.perf_counter() - start

    def save_checkpoint(self) -> tuple[tuple[str, str], dict[str, float]]:
        """Write this rank's shard to a local temporary folder (Ray uploads and merges it) and,
        with export on, gather the full weights for rank 0's background export.

        Returns (folder, checkpoint name) and the seconds each part took.
        """
        self.state.cpu_rng, self.state.cuda_rng = capture_rng(self.device)
        t0 = time.perf_counter()
        directory = tempfile.mkdtemp(prefix=f"kilnlm-ckpt-r{self.rank}-")
        save_sharded(directory, self.model, self.optimizer, self.state, self.rank, self.spec.model)
        timings = {"checkpoint_s": time.perf_counter() - t0}
        if self.cc.export:
            t1 = time.perf_counter()
            full = gather_full_state_dict(self.model)  # collective; full only on rank 0
            timings["gather_s"] = time.perf_counter() - t1
            if self.exporter is not None:
                self.exporter.submit(
                    full,
                    self.state.step,
                    tokens_seen=self.state.tokens_seen,
                    heldout_loss=self.state.heldout_loss,
                    objective=self.cfg.objective,
                    run=self.cc.name,
                    **(self.spec.posttrain.manifest_fields() if self.spec.posttrain else {}),
                )
        name = checkpoint_dir_name(self.state.step, self.state.resumed_from)
        return (directory, name), timings

    def mfu(self, tokens_per_s: float) -> float | None:
        dtype = "bf16" if self.param_dtype == torch.bfloat16 else "fp32"
        peak = self.cc.peak_tflops or device_peak_tflops(self.device, dtype, self.cc.torch_threads)
        return mfu(self.flops_per_token, tokens_per_s, peak and peak * self.world)

    # ---- diagnostics --------------------------------------------------------------------------

    def sharding_report(self) -> list[dict[str, Any]]:
        """Per rank: how a block weight is split (placements, local rows, whether the local part
        is exactly its slice of the full tensor). Collective."""
        p = self.model.blocks[0].mlp.up_proj.weight
        sharded = hasattr(p, "to_local")
        local, full = (p.to_local(), p.full_tensor()) if sharded else (p.detach(), p.detach())
        rows = -(-full.shape[0] // self.world)  # FSDP2 pads to equal chunks of dim 0
        own = full[self.rank * rows : self.rank * rows + local.shape[0]]
        mine = {
            "rank": self.rank,
            "placements": [str(pl) for pl in p.placements] if sharded else [],
            "local_numel": local.numel(),
            "full_numel": full.numel(),
            "is_own_slice": bool(torch.equal(local, own)),
            "local_params": sum(local_fraction(q) * q.numel() for q in self.model.parameters()),
            "total_params": sum(q.numel() for q in self.model.parameters()),
        }
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, mine)
        return gathered

    def maybe_drill_kill(self, step: int) -> None:
        """Fault drill: the chosen rank SIGKILLs itself at the chosen step, once per run (a
        marker in the run folder keeps the restarted worker alive)."""
        victim = self.cc.drill_kill_rank % self.world  # -1: the last rank
        if self.cc.drill_kill_step != step + 1 or self.rank != victim:
            return
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(
            join_uri(self.spec.run_uri, f"drill-killed-{step + 1}")
        )
        if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
            return
        with fs.open_output_stream(path) as f:
            f.write(str(os.getpid()).encode())
        os.kill(os.getpid(), signal.SIGKILL)

    def _profile_window(self, step: int) -> bool:
        first = self.state.resumed_from + 1  # skip the first step: it warms caches and allocators
        return self.cc.profile_steps > 0 and first <= step < first + self.cc.profile_steps

    def _step(self, batches: list[Batch], step: int) -> Any:
        """One optimiser step of this rank (the library's ``train_step``)."""
        return train_step(
            self.model,
            self.optimizer,
            batches,
            self.cfg,
            step,
            autocast_dtype=self.autocast_dtype,
            objective=self.objective,
        )

    def _profiled_step(self, batches: list[Batch], step: int) -> Any:
        """``_step`` under the profiler; accumulates the share of time spent in collectives."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        t = time.perf_counter()
        with profile(activities=activities) as prof:
            metrics = self._step(batches, step)
        wall = time.perf_counter() - t
        comm_us = sum(
            (e.device_time_total if self.device.type == "cuda" else e.cpu_time_total)
            for e in prof.key_averages()
            if e.key.startswith(COMM_EVENT_PREFIXES) or "nccl" in e.key.lower()
        )
        frac = min(comm_us / 1e6 / wall, 1.0)
        self.comm_frac = frac if self.comm_frac is None else (self.comm_frac + frac) / 2
        return metrics


def _upload_mode(cc: ClusterConfig) -> Any:
    from ray.train import CheckpointUploadMode

    return (
        CheckpointUploadMode.ASYNC if cc.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
    )


__all__ = ["WorkerLoop", "WorkerSpec", "train_loop_per_worker"]
