"""The main job, ``kiln up``: train, validate, hot-swap and serve, in one Ray cluster, live.

This is what makes kilnlm one system. One function, ``run_up(config)``, sequences parts that each
live elsewhere and only wires them together:

1. Ray: joins the running cluster (``ray.is_initialized()``, or ``ray_address``) or starts a
   local one with more logical CPUs than cores (every piece asks for a fraction; DESIGN.md).
2. Data: the embedded default corpus and its BPE tokenizer (``kilnlm.data.build_corpus``, through
   the launcher's ``prepare_data``: built once, reused while unchanged).
3. The orchestrator actor (``actors/orchestrator.py``) with the "auto" policy: every registered
   checkpoint is validated and, if it passes, hot-swapped into every replica.
4. Serving (``actors/serve_app.py``): LLM server replicas that start empty (NOT_SERVING) and pick
   up each promoted version through their swap agents, behind the gRPC gateway.
5. Training (``cluster/launcher.py``): Ray Train workers with FSDP2; after each export the
   trainer calls ``cluster.hooks.ActorHook``, which registers the checkpoint with the orchestrator.

Meanwhile a ``PromotionWatcher`` prints, after each promotion, a greedy generation of a fixed
prompt from the new version through the real gRPC client (a person watches the model improve),
and a bounded ``ClientLoad`` of streaming requests runs through the gateway, so the closing
summary can say honestly how many requests were served and failed across the swaps.

The loop cleans up what it deployed (the Serve application and the orchestrator actor) and
stops Ray only if it started it, so it runs inside a test session's Ray as well.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import shlex
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kilnlm.cluster.config import ClusterConfig, JobConfig
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

SETTLED = ("promoted", "rejected", "retired")
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Every Ray process: one OpenMP thread (2 cores shared by ~8 processes), no tokenizers pool."""
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray in a job's driver: its presence means this process runs inside a Ray job."""


# --------------------------------------------------------------------------------------------
# Configuration


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
        storage = self.job.cluster.storage_path
        if "://" in storage and not storage.startswith("file://"):
            raise ValueError(
                f"ClusterConfig.storage_path {storage!r}: kiln up serves checkpoints from a "
                "filesystem every replica can read, and the orchestrator keeps its registry "
                "there; pass --storage-path on a shared mount (NFS, EFS, Filestore, or a bucket "
                "mounted with FUSE) instead of an object-store URI"
            )

    @property
    def run_dir(self) -> Path:
        """The run's folder: checkpoints, exports, metrics, the registry and the summary."""
        return Path(self.job.cluster.run_uri.removeprefix("file://"))


# --------------------------------------------------------------------------------------------
# Ray


def connect_ray(config: UpConfig) -> bool:
    """Use the Ray this process already has, join ``ray_address``, or start a local one.

    Returns whether this call started Ray (then the loop stops it at the end)."""
    import ray

    if ray.is_initialized():
        return False
    # Inside a Ray job the job's runtime env already applies to every process (submit_up puts
    # ENV there), and Ray refuses a driver's runtime env that repeats its fields.
    in_job = JOB_CONFIG_ENV in os.environ
    env = None if in_job else {"env_vars": dict(ENV)}
    # Worker logs stay in Ray's session folder: streamed here they would bury the progress bar
    # and the generations. Failures still reach the summary (rejection reasons, errors).
    if config.ray_address is not None:
        ray.init(address=config.ray_address, runtime_env=env, log_to_driver=False)
    else:
        cpus = max(config.ray_num_cpus, os.cpu_count() or 1)
        # "local": a new cluster of our own, even if another one on this machine could be found
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=env,
        )
    return True


# --------------------------------------------------------------------------------------------
# Watching promotions


@dataclass
class Promotion:
    """One promotion as the watcher saw it, with the generation it got from the new version."""

    version: int
    seen_unix: float
    text: str = ""
    served_by: int | None = None
    """The version the gateway's answer names (a newer one if it was promoted meanwhile)."""
    error: str = ""


class PromotionWatcher:
    """Polls the orchestrator; after each successful swap, asks the new version (greedy, via
    gRPC) to complete the fixed prompt and prints both. Also unblocks the client load once the
    first version serves on every replica."""

    def __init__(
        self, orchestrator: Any, address: str, config: UpConfig, say: Callable[[str], None]
    ) -> None:
        self.orchestrator, self.address, self.config, self.say = orchestrator, address, config, say
        self.serving = threading.Event()
        """Set once a promotion has completed on every replica (the load waits for it)."""
        self.promotions: list[Promotion] = []
        self.status: Any = None
        self._swaps_seen: set[int] = set()
        self._rejections_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-up-watcher", daemon=True)

    def start(self) -> PromotionWatcher:
        self._thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        self._stop.set()
        if wait:
            self._thread.join(30)

    def refresh(self) -> Any:
        """The orchestrator's status now (also kept as ``self.status``)."""
        import ray

        self.status = ray.get(self.orchestrator.status.remote(), timeout=30)
        return self.status

    def _run(self) -> None:
        from kilnlm.client import Client

        with Client(self.address, timeout=60) as client:
            while not self._stop.wait(self.config.status_poll_s):
                try:
                    self._check(client, self.refresh())
                except Exception as e:  # a slow or restarting orchestrator: try again next poll
                    self.say(f"[kiln up] status poll failed ({type(e).__name__}: {e}); retrying")

    def _check(self, client: Any, status: Any) -> None:
        for record in status.checkpoints:
            if record.status == "rejected" and record.version not in self._rejections_seen:
                self._rejections_seen.add(record.version)
                self.say(f"── version {record.version} rejected: {record.reason}")
        promoted = []
        for swap in status.swaps:
            if swap.swap_id in self._swaps_seen or swap.outcome == "running":
                continue
            self._swaps_seen.add(swap.swap_id)
            if swap.outcome == "ok" and swap.kind in ("promote", "rollback"):
                promoted.append(swap)
            elif swap.outcome != "ok":
                self.say(f"── swap to version {swap.version} {swap.outcome}: {swap.reason}")
        if promoted:
            self.serving.set()
        for i, swap in enumerate(promoted):  # several at once: only the last one still serves
            self._show(client, status, swap, ask=i == len(promoted) - 1)

    def _show(self, client: Any, status: Any, swap: Any, ask: bool) -> None:
        """Print the promotion and a greedy generation pinned to its version (a newer version
        promoted meanwhile answers FAILED_PRECONDITION: shown as superseded, never mislabelled)."""
        import grpc

        promotion = Promotion(swap.version, time.time())
        try:
            if not ask:
                raise LookupError("superseded before it could be asked")
            out = client.generate(
                self.config.prompt,
                temperature=0,
                max_tokens=self.config.prompt_tokens,
                pin_version=swap.version,
            )
            promotion.text, promotion.served_by = out.text, out.finish.model_version
        except LookupError as e:
            promotion.error = str(e)
        except grpc.RpcError as e:
            superseded = e.code() == grpc.StatusCode.FAILED_PRECONDITION
            promotion.error = "superseded before it answered" if superseded else e.code().name
        self.promotions.append(promotion)
        record = next(r for r in status.checkpoints if r.version == swap.version)
        self.say(promotion_banner(record, swap, promotion, self.config.prompt))


def promotion_banner(record: Any, swap: Any, promotion: Promotion, prompt: str) -> str:
    """The lines printed after a promotion: what was promoted, how good, how fast, and its text."""
    v = record.validation
    quality = (
        "" if v is None else f"held-out ppl {v.perplexity:.2f} ({v.bits_per_byte:.3f} bits/byte), "
    )
    step = "" if record.step is None else f" (step {record.step})"
    head = (
        f"── version {record.version}{step} {swap.kind}d: {quality}swap {swap.seconds:.2f} s, "
        f"registered → serving {swap.registered_to_serving_s:.1f} s"
    )
    if promotion.error:
        return f"{head}\n   (no generation: {promotion.error})"
    text = (prompt + promotion.text).rstrip()
    body = "\n".join("   │ " + line for line in text.split("\n"))
    return f"{head}\n   greedy, from version {promotion.served_by}:\n{body}"


# --------------------------------------------------------------------------------------------
# Background client load


@dataclass
class RequestRecord:
    """One streaming request of the background load."""

    start_unix: float
    end_unix: float = 0.0
    version: int | None = None
    tokens: int = 0
    error: str = ""
    """gRPC status name when it failed ("" when served)."""


class ClientLoad:
    """``clients`` threads, each streaming sampled generations back to back through the gateway
    once the first version serves, until stopped. Bounded: one request in flight per client."""

    def __init__(self, address: str, config: LoadConfig, serving: threading.Event) -> None:
        self.address, self.config, self.serving = address, config, serving
        self.requests: list[RequestRecord] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), name=f"kiln-up-load-{i}", daemon=True)
            for i in range(config.clients)
        ]

    def start(self) -> ClientLoad:
        for t in self._threads:
            t.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop sending; with ``wait``, let requests in flight finish (they are counted)."""
        self._stop.set()
        for t in self._threads if wait else ():
            t.join(self.config.timeout_s + 5)

    def _client(self, index: int) -> None:
        from kilnlm.client import Client

        while not self.serving.wait(0.5):
            if self._stop.is_set():
                return
        with Client(self.address, timeout=self.config.timeout_s) as client:
            n = 0
            while not self._stop.is_set():
                prompt = LOAD_PROMPTS[(index + n) % len(LOAD_PROMPTS)]
                self.requests.append(self._one(client, prompt, seed=index * 100_000 + n))
                n += 1
                self._stop.wait(self.config.pause_s)

    def _one(self, client: Any, prompt: str, seed: int) -> RequestRecord:
        import grpc

        record = RequestRecord(start_unix=time.time())
        c = self.config
        try:
            for delta in client.generate_stream(
                prompt, temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens, seed=seed
            ):
                record.tokens += len(delta.token_ids)
                if delta.finish is not None:
                    record.version = delta.finish.model_version
            if record.version is None:
                record.error = "NO_FINISH"
        except grpc.RpcError as e:
            record.error = e.code().name
        record.end_unix = time.time()
        return record


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class VersionRow:
    """One registered checkpoint in the summary."""

    version: int
    step: int | None
    tokens_seen: int | None
    status: str
    perplexity: float | None
    bits_per_byte: float | None
    reason: str
    swap_s: float | None
    """Stage sent → every replica committed (its promotion's swap)."""
    registered_to_serving_s: float | None


@dataclass
class UpSummary:
    """What ``kiln up`` reports at the end (and writes to ``<run>/up-summary.json``)."""

    run_dir: str
    address: str
    versions: list[VersionRow]
    promoted: list[int]
    """Versions promoted, in the order they were promoted."""
    rejected: list[int]
    requests_served: int
    requests_failed: int
    failures: dict[str, int]
    """Failed requests by gRPC status."""
    requests_by_version: dict[int, int]
    """Served requests by the version that produced them."""
    requests_across_swaps: int
    """Served requests that were in flight while a swap ran (started before it ended and
    ended after it started)."""
    generations: list[dict[str, Any]]
    train_s: float
    total_s: float
    settled: bool
    """Every checkpoint reached a final state before the summary (false: settle_timeout_s)."""
    training_error: str | None = None
    ngram: dict[str, Any] | None = None
    """The best Kneser-Ney baseline on the gate's held-out tokens: order, perplexity,
    bits_per_byte (None: not computed)."""

    @property
    def perplexity_falling(self) -> bool:
        """Each promotion's held-out perplexity is below the previous one's."""
        by_version = {r.version: r.perplexity for r in self.versions}
        ppl = [by_version[v] for v in self.promoted]
        return all(p is not None for p in ppl) and all(b < a for a, b in itertools.pairwise(ppl))

    @property
    def beats_ngram(self) -> bool | None:
        """The last promoted version's held-out perplexity is below the n-gram baseline's
        (None when there is no baseline or nothing was promoted)."""
        ppl = {r.version: r.perplexity for r in self.versions}
        final = ppl.get(self.promoted[-1]) if self.promoted else None
        if self.ngram is None or final is None:
            return None
        return final < self.ngram["perplexity"]

    @property
    def ok(self) -> bool:
        return self.training_error is None and bool(self.promoted) and self.requests_failed == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "perplexity_falling": self.perplexity_falling,
            "beats_ngram": self.beats_ngram,
        }

    def format(self) -> str:
        lines = [
            f"kiln up: summary ({self.total_s:.0f} s in all, training {self.train_s:.0f} s)",
            f"  run       {self.run_dir}",
            "  version  step   status     held-out ppl  bits/byte  swap s  registered→serving s",
        ]
        for r in self.versions:
            lines.append(
                f"  {r.version:>7}  {_num(r.step, 'd'):>5}  {r.status:<9}  {_num(r.perplexity, '.2f'):>12}"
                f"  {_num(r.bits_per_byte, '.3f'):>9}  {_num(r.swap_s, '.2f'):>6}"
                f"  {_num(r.registered_to_serving_s, '.1f'):>20}"
                + (f"  ({r.reason})" if r.status == "rejected" else "")
            )
        if self.ngram is not None:
            name = f"{self.ngram['order']}-gram KN"
            lines.append(
                f"  {'baseline':>7}  {'':>5}  {name:<9}  {self.ngram['perplexity']:>12.2f}"
                f"  {self.ngram['bits_per_byte']:>9.3f}  (count n-gram, same held-out tokens)"
            )
        trend = "falling" if self.perplexity_falling else "NOT falling"
        trend += " across them"
        if self.beats_ngram is not None:
            verdict = "beats" if self.beats_ngram else "does NOT beat"
            trend += f"; the last {verdict} the n-gram baseline"
        lines += [
            f"  promoted  {self.promoted or 'none'} (held-out perplexity {trend})",
            f"  rejected  {self.rejected or 'none'}",
            f"  requests  {self.requests_served} served, {self.requests_failed} failed"
            + (f" {dict(self.failures)}" if self.failures else "")
            + f"; in flight during a swap: {self.requests_across_swaps}; by version "
            + (", ".join(f"v{v}: {n}" for v, n in sorted(self.requests_by_version.items())) or "-"),
        ]
        if not self.settled:
            lines.append("  note      the last checkpoints were still being validated or swapped")
        if self.training_error:
            lines.append(f"  training  FAILED: {self.training_error}")
        return "\n".join(lines)


def _num(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(
    status: Any, load: ClientLoad | None, watcher: PromotionWatcher, **fields: Any
) -> UpSummary:
    """The summary from the orchestrator's final status and the load's request records."""
    promotions = [
        s for s in status.swaps if s.outcome == "ok" and s.kind in ("promote", "rollback")
    ]
    swap_of = {s.version: s for s in promotions}
    rows = [_row(r, swap_of.get(r.version)) for r in status.checkpoints]
    requests = [r for r in (load.requests if load else []) if r.end_unix]
    served = [r for r in requests if not r.error]
    windows = [(s.started_unix, s.finished_unix) for s in status.swaps if s.finished_unix]
    return UpSummary(
        versions=rows,
        promoted=[s.version for s in promotions],
        rejected=[r.version for r in rows if r.status == "rejected"],
        requests_served=len(served),
        requests_failed=len(requests) - len(served),
        failures=dict(Counter(r.error for r in requests if r.error)),
        requests_by_version=dict(sorted(Counter(r.version for r in served).items())),
        requests_across_swaps=sum(
            any(r.start_unix < end and r.end_unix > start for start, end in windows) for r in served
        ),
        generations=[asdict(p) for p in watcher.promotions],
        **fields,
    )


def _row(record: Any, swap: Any) -> VersionRow:
    v = record.validation
    return VersionRow(
        version=record.version,
        step=record.step,
        tokens_seen=record.tokens_seen,
        status=record.status,
        perplexity=None if v is None else v.perplexity,
        bits_per_byte=None if v is None else v.bits_per_byte,
        reason=record.reason,
        swap_s=None if swap is None else swap.seconds,
        registered_to_serving_s=None if swap is None else swap.registered_to_serving_s,
    )


def is_settled(status: Any) -> bool:
    """Nothing left to do: no checkpoint waits for the gate, no swap runs, and the newest
    checkpoint that passed is promoted (or its swap ended in failure, so nothing will follow)."""
    if status.swapping_version is not None:
        return False
    if any(r.status in ("registered", "validating") for r in status.checkpoints):
        return False
    passed = [
        r.version for r in status.checkpoints if r.validation is not None and r.status != "rejected"
    ]
    if not passed or max(passed) == status.promoted_version:
        return True
    newest = max(passed)
    return any(s.version == newest and s.outcome not in ("ok", "running") for s in status.swaps)


# --------------------------------------------------------------------------------------------
# The loop


class UpRun:
    """One run of the loop; ``run_up`` drives it. Each method is one stage."""

    def __init__(self, config: UpConfig, say: Callable[[str], None]) -> None:
        self.config, self.say = replace(config), say  # a copy: stages fill in data_dir
        self.started = time.perf_counter()
        self.started_ray = False
        self.orchestrator: Any = None
        self.deployed = False
        self.address = ""
        self.watcher: PromotionWatcher | None = None
        self.load: ClientLoad | None = None
        self.train_s = 0.0
        self.training_error: str | None = None
        self.ngram: dict[str, Any] | None = None

    def connect(self) -> None:
        self.started_ray = connect_ray(self.config)

    def prepare_data(self) -> None:
        """Build (or reuse) the corpus and tokenizer; training and the gate read the same one."""
        from kilnlm.cluster.launcher import prepare_data

        job = self.config.job
        t = time.perf_counter()
        data_dir, _ = prepare_data(job, progress=job.cluster.progress)
        self.config.job = replace(job, data_dir=os.path.abspath(data_dir))
        self.say(f"[kiln up] corpus and tokenizer: {data_dir} ({time.perf_counter() - t:.0f} s)")

    def baseline(self) -> None:
        """Fit the n-gram baseline on the training split and score it on the held-out tokens
        the gate scores every checkpoint on, so the summary compares like with like."""
        from kilnlm.actors.orchestrator import heldout_ids
        from kilnlm.data import TokenShards
        from kilnlm.ngram import best_baseline
        from kilnlm.tokenizer import Tokenizer

        orders = self.config.ngram_orders
        if not orders:
            return
        t = time.perf_counter()
        data_dir = str(self.config.job.data_dir)
        train = TokenShards(data_dir, "train")
        ids, n_bytes = heldout_ids(data_dir, Tokenizer.load(data_dir), self.config.heldout_tokens)
        base = best_baseline(train.read(0, len(train)), ids, n_bytes, train.vocab_size, orders)
        r = base.result
        self.ngram = {
            "order": base.order,
            "perplexity": r.perplexity,
            "bits_per_byte": r.bits_per_byte,
            "tokens": r.tokens,
        }
        self.say(
            f"[kiln up] baseline to beat: {base.name}, held-out ppl {r.perplexity:.2f} "
            f"({r.bits_per_byte:.3f} bits/byte) on {r.tokens:,} tokens, best of orders "
            f"{', '.join(map(str, base.by_order))} ({time.perf_counter() - t:.0f} s)"
        )

    def start_orchestrator(self) -> None:
        from kilnlm.actors.orchestrator import OrchestratorConfig, start_orchestrator

        config = OrchestratorConfig(
            storage_path=str(self.config.run_dir / "orchestrator"),
            heldout=str(self.config.job.data_dir),
            app_name=self.config.serve.app_name,
            policy="auto",
            max_ppl_increase=self.config.max_ppl_increase,
            heldout_max_tokens=self.config.heldout_tokens,
            smoke_prompt=self.config.prompt,
        )
        check_no_foreign_orchestrator(self.config)
        self.orchestrator = start_orchestrator(config)
        self.say(f"[kiln up] orchestrator: auto-promote, registry in {config.storage_path}")

    def deploy(self) -> None:
        from kilnlm.actors import serve_app

        serve = self.config.serve
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # its INFO lines bury ours
        self.deployed = True  # from here on, a failure still deletes what serve.run made
        self.address = serve_app.run(serve)
        self.say(
            f"[kiln up] serving on {self.address} (gRPC): {serve.num_replicas} replicas, empty "
            "until the first promotion"
        )
        self.watcher = PromotionWatcher(self.orchestrator, self.address, self.config, self.say)
        self.watcher.start()
        self.load = ClientLoad(self.address, self.config.load, self.watcher.serving).start()

    def train(self) -> None:
        from kilnlm.actors.swap_agent import ORCHESTRATOR_NAMESPACE, orchestrator_name
        from kilnlm.cluster.hooks import ActorHook
        from kilnlm.cluster.launcher import launch

        hook = ActorHook(orchestrator_name(self.config.serve.app_name), ORCHESTRATOR_NAMESPACE)
        job = self.config.job
        self.say(
            f"[kiln up] training {job.preset} on {job.cluster.workers} Ray Train workers (FSDP2), "
            f"{job.train.max_steps} steps, a checkpoint every {job.train.checkpoint_every}"
        )
        t = time.perf_counter()
        result = launch(job, hook=hook, raise_on_error=False)
        self.train_s = time.perf_counter() - t
        if result.error is not None:
            self.training_error = f"{type(result.error).__name__}: {result.error}"
        errors = (result.worker_result or {}).get("hook_errors") or []
        for e in errors:
            self.say(f"[kiln up] registration failed: {e}")

    def settle(self) -> bool:
        """Wait until the orchestrator has dealt with every registered checkpoint."""
        assert self.watcher is not None
        deadline = time.monotonic() + self.config.settle_timeout_s
        while time.monotonic() < deadline:
            if is_settled(self.watcher.refresh()):
                time.sleep(2 * self.config.status_poll_s)  # let the watcher show the last one
                return True
            time.sleep(self.config.status_poll_s)
        return False

    def summary(self, settled: bool) -> UpSummary:
        assert self.watcher is not None
        if self.load is not None:
            self.load.stop()
        self.watcher.stop()
        summary = summarize(
            self.watcher.refresh(),
            self.load,
            self.watcher,
            run_dir=str(self.config.run_dir),
            address=self.address,
            train_s=self.train_s,
            total_s=time.perf_counter() - self.started,
            settled=settled,
            training_error=self.training_error,
            ngram=self.ngram,
        )
        path = self.config.run_dir / "up-summary.json"
        path.write_text(json.dumps(summary.to_dict(), indent=2, default=str))
        return summary

    def serve_on(self) -> None:
        """Keep serving after the summary: ``exit_after`` seconds, or until Ctrl-C."""
        exit_after = self.config.exit_after
        if exit_after == 0:
            return
        how = "Ctrl-C to stop" if exit_after is None else f"stopping in {exit_after:.0f} s"
        self.say(
            f"[kiln up] still serving on {self.address} ({how}); try:\n"
            f"  kiln generate --address {self.address} 'def main():' --max-tokens 64 "
            "--temperature 0 --stream\n"
            f"  kiln status --address {self.address}      # needs $KILN_ADMIN_TOKEN"
        )
        deadline = float("inf") if exit_after is None else time.monotonic() + exit_after
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Remove what this run deployed; stop Ray if this run started it.

        Quick on purpose: on SIGTERM (``ray job stop``) Ray turns the signal into SystemExit and
        allows a few seconds before SIGKILL, so nothing here waits on a client or a generation.
        """
        import ray
        from ray import serve

        for part in (self.load, self.watcher):
            if part is not None:
                part.stop(wait=False)
        if self.orchestrator is not None:
            with contextlib.suppress(Exception):  # already gone with Ray
                ray.kill(self.orchestrator, no_restart=True)
        if self.deployed:
            try:
                serve.delete(self.config.serve.app_name)
            except Exception as e:  # best effort: Ray may be going down already
                self.say(f"[kiln up] could not delete the Serve application: {e}")
        if self.started_ray:  # Serve goes down with Ray (its app was deleted above)
            ray.shutdown()


def check_no_foreign_orchestrator(config: UpConfig) -> None:
    """Refuse to adopt a running orchestrator of the same application that holds another run's
    checkpoints (a detached actor outlives its job): its registry is not this run's."""
    import ray

    from kilnlm.actors.orchestrator import get_orchestrator

    try:
        existing = get_orchestrator(config.serve.app_name)
    except ValueError:
        return
    status = ray.get(existing.status.remote(), timeout=30)
    ours = str(config.run_dir)
    foreign = [r.path for r in status.checkpoints if not r.path.startswith(ours)]
    if foreign:
        raise ValueError(
            f"an orchestrator for the Serve application {config.serve.app_name!r} is already "
            f"running with checkpoints of another run ({foreign[0]}); resume that run (same "
            "--name and --storage-path), pick another --app-name, or stop it first "
            "(serve shutdown, then ray.kill on it)"
        )


def run_up(config: UpConfig, say: Callable[[str], None] | None = None) -> UpSummary:
    """The whole loop (module docstring): returns the summary it printed."""
    say = say or _say
    up = UpRun(config, say)
    try:
        up.connect()
        up.prepare_data()
        up.baseline()
        up.start_orchestrator()
        up.deploy()
        up.train()
        settled = up.settle()
        summary = up.summary(settled)
        say(summary.format())
        up.serve_on()
        return summary
    finally:
        up.close()


def _say(message: str) -> None:
    """Print above the training progress bar rather than through it."""
    from tqdm.auto import tqdm

    tqdm.write(message)


# --------------------------------------------------------------------------------------------
# kiln up --cluster: the same loop as a Ray job


REMOTE_CONFIG_FLAGS = ("--config", "--serve-config")
"""Flags whose files travel with the job (its working_dir) instead of being read on the head."""


def submit_up(
    address: str,
    argv: list[str],
    files: dict[str, str],
    token: str,
    follow: bool = True,
    say: Callable[[str], None] = print,
) -> int:
    """Submit ``kiln up --ray-address auto ARGV`` as a Ray job at ``address`` (the dashboard,
    e.g. http://127.0.0.1:8265) and follow its output; the job's exit code when followed.

    ``files`` (flag → local path) are copied into the job's working directory and passed by
    name, so the job reads the configs as they are here, not stale copies on the head. The admin
    token travels in the job's environment, never on its command line.
    """
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    with tempfile.TemporaryDirectory(prefix="kiln-up-job-") as work:
        entry = ["kiln", "up", "--ray-address", "auto", *argv]
        for flag, path in files.items():
            name = f"{flag.lstrip('-').replace('-', '_')}{Path(path).suffix}"
            shutil.copyfile(path, Path(work) / name)
            entry += [flag, name]
        env = {**ENV, "KILN_ADMIN_TOKEN": token}
        try:  # unreachable, refused, wrong token: the caller reports one ConnectionError
            client = JobSubmissionClient(address)
            job_id = client.submit_job(
                entrypoint=shlex.join(entry), runtime_env={"working_dir": work, "env_vars": env}
            )
        except RayError as e:
            raise ConnectionError(str(e)) from e
    say(f"kiln up: submitted {job_id} to {address}: {shlex.join(entry)}")
    if not follow:
        say(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    try:
        return follow_job(client, job_id, address, say)
    except RayError as e:
        raise ConnectionError(str(e)) from e


def follow_job(client: Any, job_id: str, address: str, say: Callable[[str], None]) -> int:
    """Print the job's output as it comes; 0 if it succeeded. Ctrl-C stops following only."""
    import asyncio

    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        say(
            f"kiln up: stopped following; the job runs on (ray job stop --address {address} {job_id})"
        )
        return 130
    status = client.get_job_status(job_id)
    say(f"kiln up: job {job_id} {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def admin_token(local: bool, say: Callable[[str], None]) -> str | None:
    """$KILN_ADMIN_TOKEN; for a local run without one, a fresh random token (printed, since
    the gateway only listens on loopback there and `kiln status` needs it)."""
    token = os.environ.get("KILN_ADMIN_TOKEN")
    if token:
        return token
    if not local:
        say("[kiln up] no $KILN_ADMIN_TOKEN: the gateway refuses admin calls (status, promote)")
        return None
    token = secrets.token_hex(16)
    say(f"[kiln up] admin token for this run: export KILN_ADMIN_TOKEN={token}")
    return token


__all__ = [
    "DEFAULT_PROMPT",
    "UP_TRAIN",
    "ClientLoad",
    "LoadConfig",
    "PromotionWatcher",
    "UpConfig",
    "UpSummary",
    "VersionRow",
    "admin_token",
    "default_job",
    "default_serve",
    "is_settled",
    "run_up",
    "submit_up",
    "summarize",
]
