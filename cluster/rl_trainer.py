"""``kiln rl``'s one long-lived Ray Train run: the trainer stays up for the whole RL run and is fed
one iteration's samples at a time, as verl's and OpenRLHF's trainer groups are.

Why not one Ray Train run per update: starting a run (controller, worker group, process group,
model build, resume) costs ~20 s on 2 CPU cores, against well under a second for the update
itself, and the toy needs tens of updates; one run also gives the learning-rate schedule its
natural meaning (one cosine over ``iterations × steps``) and keeps AdamW's moments in memory.

The driver and the workers meet in ``RLFeed``, an async Ray actor with no CPU:

- the driver ``put``s iteration u's samples (and π0's log-probs of them); the workers' plug-in
  (``kilnlm.rl.plugin.RLPlugin`` with a ``FeedSource``) ``get``s them at step u·steps and trains
  ``steps`` optimiser steps on them, then waits for iteration u + 1;
- every ``steps`` steps the worker loop checkpoints and rank 0 exports, as in any run; the
  export's hook (``FeedHook``) tells the feed "step s is exported at URI", and the driver, which
  waits for step (u + 1)·steps, registers, gates and hot-swaps that export.

Ray Train's semantics are unchanged: a failed worker group restarts and resumes from the newest
checkpoint (an iteration boundary), asks the feed for that iteration's samples again (the feed
keeps every iteration's batch, a few KB each) and recomputes the same steps; a re-export of a
step the driver already took is ignored (exports are content-addressed, so it never overwrites
a served one). What is not covered: rank 0 dying in the short window after checkpoint s is
committed and before export s is written leaves the driver without export s; it then fails with
a clear message after ``export_timeout_s``.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from kilnlm.rl.buffer import Sample

EXPORT_STEP = re.compile(r"step-(\d+)-[0-9a-f]+/?$")


def export_step(uri: str) -> int:
    """The step of an export folder (``checkpointing.export_dir_name`` plus the content hash)."""
    m = EXPORT_STEP.search(uri.rstrip("/"))
    if m is None:
        raise ValueError(f"{uri} is not a step export (step-<n>-<hash>)")
    return int(m.group(1))


@ray.remote(num_cpus=0)
class RLFeed:
    """Batches from the driver to the workers, exports from the workers to the driver."""

    def __init__(self) -> None:
        self.batches: dict[int, tuple[list[Sample], list[float]]] = {}
        self.exports: dict[int, str] = {}
        """First export of each step (a re-export after a restart is ignored)."""
        self.requested = -1
        """The highest iteration a worker has asked for."""
        self.closed = False
        self.changed = asyncio.Condition()

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def put(self, iteration: int, samples: list[Sample], ref_logps: list[float]) -> None:
        if iteration in self.batches:
            raise ValueError(f"iteration {iteration}'s batch was already given")
        self.batches[iteration] = (samples, ref_logps)
        await self._notify()

    async def get(
        self, iteration: int, timeout_s: float
    ) -> tuple[list[Sample], list[float]] | str | None:
        """Iteration's batch; None when not there within ``timeout_s`` (ask again); "closed"
        once the driver has stopped."""
        self.requested = max(self.requested, iteration)
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: iteration in self.batches or self.closed),
                    timeout_s,
                )
            except TimeoutError:
                return None
        return "closed" if self.closed else self.batches[iteration]

    async def exported(self, step: int, uri: str) -> None:
        self.exports.setdefault(step, uri)
        await self._notify()

    async def export_of(self, step: int, timeout_s: float) -> str | None:
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: step in self.exports), timeout_s
                )
            except TimeoutError:
                return None
        return self.exports[step]

    async def close(self) -> None:
        self.closed = True
        await self._notify()


@dataclass(frozen=True)
class FeedHook:
    """The export hook of the RL run (``cluster.hooks.CheckpointHook``): tells the feed."""

    feed: Any

    def __call__(self, uri: str) -> None:
        ray.get(self.feed.exported.remote(export_step(uri), uri), timeout=60)


class FeedClosedError(RuntimeError):
    """The kiln rl driver stopped while the trainer waited for a batch."""


@dataclass(frozen=True)
class FeedSource:
    """The plug-in's ``source`` (``kilnlm.rl.plugin.RLPlugin``): iteration → its batch, blocking
    in the Ray Train worker until the driver has given it (``kilnlm/`` itself has no Ray)."""

    feed: Any
    poll_s: float = 5.0

    def __call__(self, iteration: int) -> tuple[list[Sample], list[float]]:
        while True:
            got = ray.get(self.feed.get.remote(iteration, self.poll_s))
            if got == "closed":
                raise FeedClosedError(
                    f"kiln rl stopped before giving iteration {iteration}'s samples"
                )
            if got is not None:
                return got


class PersistentTrainer:
    """The driver's side: the run on a thread, ``update`` = give a batch, wait for its export."""

    def __init__(self, spec: Any, feed: Any, steps: int, export_timeout_s: float = 900.0) -> None:
        self.spec, self.feed, self.steps = spec, feed, steps
        self.export_timeout_s = export_timeout_s
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kilnlm-rl-train", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from kilnlm.cluster.launcher import launch_spec

        try:
            self.result = launch_spec(self.spec, raise_on_error=False)
            self.error = self.result.error
        except BaseException as e:  # reported to the driver by update()
            self.error = e

    def update(self, iteration: int, samples: list[Sample], ref_logps: list[float]) -> str:
        """Train iteration's ``steps`` steps on ``samples``; the URI of the export that ends it."""
        ray.get(self.feed.put.remote(iteration, samples, ref_logps))
        step = (iteration + 1) * self.steps
        deadline = time.monotonic() + self.export_timeout_s
        while time.monotonic() < deadline:
            uri = ray.get(self.feed.export_of.remote(step, 1.0))
            if uri is not None:
                return uri
            if not self.thread.is_alive():
                raise RuntimeError(
                    f"the RL Ray Train run ended without exporting step {step}: "
                    f"{self.error or 'no error reported'}; see {self.spec.run_uri}"
                )
        raise TimeoutError(
            f"no export of step {step} within {self.export_timeout_s:.0f} s; the run's "
            f"checkpoints are in {self.spec.run_uri}"
        )

    def close(self, timeout_s: float = 120.0) -> None:
        """Let the run end: it ends by itself after its last step; else the feed is closed, the
        waiting workers stop (Ray Train may retry them once per ``max_failures``)."""
        self.thread.join(timeout=5.0)
        if self.thread.is_alive():
            ray.get(self.feed.close.remote())
            self.thread.join(timeout=timeout_s)
        ray.kill(self.feed)


def start_trainer(
    model_cfg: Any,
    parent: str,
    plugin_fields: dict[str, Any],
    cfg: Any,
    out: str,
) -> PersistentTrainer:
    """The RL run of ``cfg`` (an ``RLLoopConfig``) from ``parent``: ``iterations × steps`` steps,
    a checkpoint and an export every ``steps``, the cosine from ``lr`` to 0 over the whole run;
    its own run name, so a second ``kiln rl`` into the same folder never resumes this one."""
    from kilnlm.cluster.config import ClusterConfig
    from kilnlm.cluster.worker import WorkerSpec
    from kilnlm.rl.plugin import RLPlugin
    from kilnlm.train import TrainConfig

    feed = RLFeed.remote()
    plugin = RLPlugin(
        parent=parent, source=FeedSource(feed), steps_per_iteration=cfg.steps, **plugin_fields
    )
    train = TrainConfig(
        objective="rl", lr=cfg.lr, min_lr=0.0, warmup_steps=0,
        max_steps=cfg.iterations * cfg.steps, batch_size=cfg.samples * len(cfg.prompts),
        seq_len=model_cfg.block_size, eval_every=0, log_every=cfg.steps,
        checkpoint_every=cfg.steps, weight_decay=0.0, seed=cfg.seed, grad_accum_steps=1,
    )  # fmt: skip
    cluster = ClusterConfig(
        workers=cfg.workers, storage_path=str(Path(out).absolute() / "train"),
        name=f"rl-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", progress=False,
        num_to_keep=1, cpus_per_worker=0.5, checkpoint_upload="sync",
        drill_kill_step=cfg.drill_kill_step,
    )  # fmt: skip
    spec = WorkerSpec(
        model=model_cfg,
        train=train,
        cluster=cluster,
        data_dir=parent,
        run_uri=cluster.run_uri,
        hook=FeedHook(feed),
        posttrain=plugin,
    )
    return PersistentTrainer(spec, feed, cfg.steps)


__all__ = [
    "FeedClosedError",
    "FeedHook",
    "FeedSource",
    "PersistentTrainer",
    "RLFeed",
    "export_step",
    "start_trainer",
]
