"""The orchestrator: checkpoint registry, validation gate, two-phase hot-swap, rollback, canary.

One named, detached Ray actor per Serve application (``start_orchestrator``): it outlives the
job that started it and Ray restarts it when it dies; a restarted one reads its registry back
from the storage path (registry.py) and the replicas re-attach on their own. The trainer's
checkpoint hook (``cluster.hooks.ActorHook``) calls ``register(uri)``; the gateway's Admin
service (``OrchestratorAdmin``) calls ``list_checkpoints``, ``promote``, ``rollback``, ``status``.

Hot-swap (DESIGN.md, "Hot-swap is two phases"). Every LLM server replica runs a ``SwapAgent``
(swap_agent.py) that attaches to this actor and long-polls it for commands, so the orchestrator
knows every live replica by name — including replicas Serve starts during a swap — and can
tell when one dies (its Ray actor name disappears). A swap:

1. stage: every live replica loads and checks the new weights beside the serving ones; a
   replica that attaches meanwhile is staged too. Any failure aborts the stage on all of them
   (the checkpoint is rejected when the failure is the checkpoint's: bad checksum, another
   architecture); a timeout aborts without rejecting.
2. commit: only when every live replica has staged — and Serve counts no running replica that
   is not attached — the registry records the new version (so a replica attaching from now on
   loads it) and every replica flips at its engine's next step boundary.

The validation gate (``run_gate``) runs off the actor's event loop — in a thread, or a Ray task
with its own resources — so Status and ListCheckpoints answer while a model is being checked.

No test doubles anywhere: in tests the same class runs in-process (``DirectLink``) with real
``ServingModel`` replicas, and as the real actor behind real Serve replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kilnlm import checkpoint
from kilnlm.actors.registry import (
    CheckpointRecord,
    Registry,
    RegistryError,
    ReplicaSwap,
    SwapKind,
    SwapRecord,
    TrainingProgress,
    Validation,
)
from kilnlm.actors.swap_agent import (
    ORCHESTRATOR_NAMESPACE,
    Attachment,
    Command,
    CommandKind,
    Heartbeat,
    Hello,
    Result,
    Target,
    local_path,
    orchestrator_name,
)
from kilnlm.checkpoint import CheckpointError
from kilnlm.eval import evaluate
from kilnlm.generate import generate
from kilnlm.sampling import SamplingParams
from kilnlm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

Policy = Literal["manual", "auto"]
MAX_RESULTS = 64
"""Unclaimed command results kept per replica (a swap that timed out never reads its own)."""


# --------------------------------------------------------------------------------------------
# Config


@dataclass
class OrchestratorConfig:
    """What the orchestrator checks, how it swaps, where it keeps its registry."""

    storage_path: str
    """Directory of the run's storage where ``registry.json`` lives (survives restarts)."""
    heldout: str
    """Held-out data for the gate: a corpus directory built by ``build_corpus`` (its heldout
    split, which must use the checkpoints' tokenizer) or a UTF-8 text file (encoded with each
    checkpoint's own tokenizer)."""
    app_name: str = "kiln"
    """The Serve application whose replicas this orchestrator drives (it names the actor)."""
    deployment: str = "LLMServer"
    policy: Policy = "manual"
    """"manual": promote on request; "auto": promote every checkpoint that passes the gate."""
    max_ppl_increase: float = 0.05
    """Gate: reject when held-out perplexity exceeds the promoted version's by more than this
    fraction (0.05: 5 % worse)."""
    heldout_max_tokens: int = 4096
    """Held-out tokens the gate scores (the first ones): bounds validation time."""
    heldout_stride: float = 0.5
    """Scoring windows of the model's context advance by this fraction of it: 1 is
    non-overlapping (cheapest, but a window's first tokens have almost no context); 0.5 gives
    every token after the first window at least half a context, at twice the cost (the strided
    perplexity of kilnlm.eval)."""
    smoke_prompt: str = "The"
    smoke_tokens: int = 16
    canary: bool = False
    """Promote through a canary replica by default (PromoteRequest.canary overrides)."""
    canary_tokens: int = 512
    """Held-out tokens each side of a canary comparison scores."""
    canary_max_ppl_increase: float = 0.02
    stage_timeout_s: float = 300.0
    """Phase 1 deadline: every live replica must have staged by then, or the swap aborts."""
    commit_timeout_s: float = 30.0
    poll_timeout_s: float = 2.0
    """Replicas' long-poll duration (also their heartbeat period)."""
    replica_timeout_s: float = 10.0
    """A replica without a Ray actor name (in-process tests) counts as dead after this silence."""
    keep_last: int | None = None
    """Retention: keep the files of the newest ``keep_last`` checkpoints (plus the promoted one
    and the rollback target, always); None keeps everything."""
    validate_in: Literal["thread", "task"] = "thread"
    """Run the gate in a thread of the actor, or as a Ray task (a GPU for a big model)."""
    validation_num_cpus: float = 1.0
    validation_num_gpus: float = 0.0
    num_cpus: float = 0.25
    """Logical CPUs of the actor: a fraction, so it fits beside trainers and replicas."""
    torch_threads: int = 1
    check_serve: bool = True
    """Before a commit, also require Serve to count no running replica that is not attached."""

    def __post_init__(self) -> None:
        if not self.storage_path:
            raise ValueError("storage_path must name a directory for the registry")
        if not self.heldout:
            raise ValueError("heldout must name a corpus directory or a text file")
        if self.policy not in ("manual", "auto"):
            raise ValueError(f"policy must be 'manual' or 'auto', got {self.policy!r}")
        if self.validate_in not in ("thread", "task"):
            raise ValueError(f"validate_in must be 'thread' or 'task', got {self.validate_in!r}")
        for name in ("max_ppl_increase", "canary_max_ppl_increase"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("heldout_max_tokens", "canary_tokens", "smoke_tokens", "torch_threads"):
            if getattr(self, name) < (2 if "tokens" in name else 1):
                raise ValueError(f"{name} must be >= 2, got {getattr(self, name)}")
        if not 0 < self.heldout_stride <= 1:
            raise ValueError(f"heldout_stride must be in (0, 1], got {self.heldout_stride}")
        for name in ("stage_timeout_s", "commit_timeout_s", "poll_timeout_s", "num_cpus"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.replica_timeout_s <= self.poll_timeout_s:
            raise ValueError(
                f"replica_timeout_s ({self.replica_timeout_s}) must exceed poll_timeout_s "
                f"({self.poll_timeout_s}), or live replicas look dead between polls"
            )
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError(f"keep_last must be >= 0 or None, got {self.keep_last}")


# --------------------------------------------------------------------------------------------
# Errors (the Admin API maps each to one gRPC status; plain one-argument classes so they
# cross Ray as themselves)


class OrchestratorError(RuntimeError):
    """Base of what the orchestrator refuses; the message says why and what to do."""


class NotFoundError(OrchestratorError):
    """No such version (NOT_FOUND)."""


class PreconditionError(OrchestratorError):
    """The request cannot be done in this state (FAILED_PRECONDITION)."""


class CheckpointRejected(PreconditionError):
    """The checkpoint failed the gate or a replica's stage; the registry says why."""


class SwapAborted(OrchestratorError):
    """The swap could not finish (a replica timed out); every replica kept the old version."""


class _StageFailed(Exception):
    def __init__(self, replica_id: str, result: Result) -> None:
        super().__init__(f"replica {replica_id} failed to stage: {result.error}")
        self.result = result


# --------------------------------------------------------------------------------------------
# The validation gate (no Ray, no actor state: runs in a thread or a Ray task)


@dataclass
class GateResult:
    ok: bool
    reason: str = ""
    validation: Validation | None = None


def heldout_ids(source: str, tokenizer: Tokenizer, max_tokens: int) -> tuple[list[int], int]:
    """Held-out ids (at most ``max_tokens``, spread over the data as ``kilnlm.data.spread_slices``
    says) and the UTF-8 bytes they encode.

    A corpus directory gives its heldout split as stored (it must have been encoded with this
    tokenizer); a text file is encoded with ``tokenizer`` after a BOS token.
    """
    from kilnlm.data import TokenShards, sample_split, spread_slices

    path = Path(source)
    if path.is_dir():
        corpus_tokenizer = Tokenizer.load(path)
        if corpus_tokenizer.to_json() != tokenizer.to_json():
            raise ValueError(
                f"the held-out corpus {path} was encoded with another tokenizer than the "
                "checkpoint's; give the corpus the model was trained on, or a text file"
            )
        ids = [int(t) for t in sample_split(TokenShards(path, "heldout"), max_tokens)]
    elif path.is_file():
        text = path.read_text(encoding="utf-8")
        all_ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        ids = [t for a, b in spread_slices(len(all_ids), max_tokens) for t in all_ids[a:b]]
    else:
        raise FileNotFoundError(f"held-out data {path} does not exist")
    if len(ids) < 2:
        raise ValueError(f"held-out data {path} has fewer than 2 tokens; give more text")
    return ids, max(1, tokenizer.count_bytes(ids))


def _device() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def run_gate(path: str, config: OrchestratorConfig) -> GateResult:
    """Checksums, load, held-out perplexity, smoke generation; the first failure is the reason.

    The perplexity margin against the promoted version is the caller's (it needs the registry).
    """
    start = time.perf_counter()
    torch.set_num_threads(config.torch_threads)
    try:
        checkpoint.verify_manifest(path)
    except (CheckpointError, OSError) as e:
        return GateResult(False, f"checksum: {e}")
    device, dtype = _device()
    try:
        model = checkpoint.load(path, device=device, dtype=dtype, verify=False)
        tokenizer = checkpoint.load_tokenizer(path, verify=False)
        if tokenizer is None:
            raise CheckpointError("it has no tokenizer.json, which serving needs")
    except (CheckpointError, ValueError, OSError) as e:
        return GateResult(False, f"load: {e}")
    try:
        ids, n_bytes = heldout_ids(config.heldout, tokenizer, config.heldout_max_tokens)
        context = model.config.block_size
        stride = max(1, int(context * config.heldout_stride))
        result = evaluate(model, ids, n_bytes, seq_len=context, stride=stride)
    except (ValueError, OSError, RuntimeError) as e:
        return GateResult(False, f"held-out evaluation: {e}")
    if not math.isfinite(result.perplexity):
        return GateResult(False, f"held-out perplexity is {result.perplexity} (weights diverged)")
    try:
        smoke = smoke_generation(model, tokenizer, config)
    except (ValueError, RuntimeError) as e:
        return GateResult(False, f"smoke generation: {e}")
    validation = Validation(
        perplexity=result.perplexity,
        bits_per_byte=result.bits_per_byte,
        tokens=result.tokens,
        smoke_text=smoke,
        seconds=time.perf_counter() - start,
    )
    return GateResult(True, validation=validation)


def smoke_generation(model: Any, tokenizer: Tokenizer, config: OrchestratorConfig) -> str:
    """Greedy text from the smoke prompt: the model runs end to end and emits valid ids."""
    prompt = tokenizer.encode(config.smoke_prompt) or [tokenizer.bos_id]
    room = model.config.block_size - len(prompt)
    if room < 1:
        raise ValueError("smoke_prompt fills the model's context; shorten it")
    params = SamplingParams(temperature=0, max_tokens=min(config.smoke_tokens, room))
    out = generate(model, prompt, params, eos_id=tokenizer.eos_id, decode=tokenizer.decode)
    bad = [t for t in out.token_ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise ValueError(f"generated id {bad[0]} outside the tokenizer's vocabulary")
    return out.text or ""


# --------------------------------------------------------------------------------------------
# Replicas as the orchestrator sees them


@dataclass
class ReplicaState:
    """One attached replica: identity, what it serves, and its command mailbox."""

    replica_id: str
    actor_name: str | None
    namespace: str | None
    version: int
    checkpoint: str
    staged_version: int | None
    swap_mode: str
    attached_unix: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat | None = None
    outbox: list[Command] = field(default_factory=list)
    results: dict[int, Result] = field(default_factory=dict)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    alive: bool = True
    probed: float = 0.0
    reported: int = 0
    """Highest command seq the replica has reported a result for."""

    def serves(self, target: Target) -> bool:
        return self.version == target.version and self.checkpoint == target.path


@dataclass
class ReplicaView:
    """A replica in ``status()``: picklable, no mailbox."""

    replica_id: str
    version: int
    staged_version: int | None
    swap_mode: str
    last_seen_s: float
    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0


@dataclass
class OrchestratorStatus:
    promoted_version: int | None
    rollback_version: int | None
    policy: Policy
    swapping_version: int | None
    replicas: list[ReplicaView]
    checkpoints: list[CheckpointRecord]
    swaps: list[SwapRecord]
    training: TrainingProgress


def _actor_exists(name: str, namespace: str | None) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The orchestrator


class Orchestrator:
    """Registry, gate and swap driver. Async methods; runs as a Ray actor or in-process."""

    def __init__(self, config: OrchestratorConfig) -> None:
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.registry = Registry.open(config.storage_path)
        self._requeue = self.registry.recover()
        self.replicas: dict[str, ReplicaState] = {}
        # Command numbers grow across restarts (microseconds since the epoch to start from), so
        # a result of a command sent by a previous life never matches one sent by this one.
        self._seq = time.time_ns() // 1000
        self._changed = asyncio.Event()
        self._swap_lock = asyncio.Lock()
        self._gate_lock = asyncio.Lock()
        self._validations: dict[int, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._started = False
        self._started_unix = time.time()
        self._swapping: int | None = None
        self._serve_count: tuple[float, int | None] = (0.0, None)

    def _start(self) -> None:
        """Background work needs the running loop: start it on the first call."""
        if self._started:
            return
        self._started = True
        self._spawn(self._reap_dead_replicas())
        if self.config.policy == "auto":
            for version in self._requeue:
                self._spawn(self._auto_promote(version))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def ping(self) -> dict[str, Any]:
        """Which life of the actor answers (a restart is a new pid) and since when."""
        self._start()
        return {"pid": os.getpid(), "started_unix": self._started_unix}

    # ---- registration ----------------------------------------------------------------------

    async def register(self, uri: str) -> int:
        """Record an export (the trainer's hook calls this); returns its version.

        Registering the same files again returns the same version. Under the "auto" policy the
        gate runs next and the checkpoint is promoted if it passes.
        """
        self._start()
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(
                f"uri {uri!r}: replicas load checkpoints from a filesystem path; export to a "
                "shared filesystem (or file://) for serving"
            )
        path = local_path(uri)
        manifest, sha = await asyncio.to_thread(_read_manifest, path)
        files = {n: e.sha256 for n, e in manifest.files.items()}
        record = self.registry.add(
            uri, path, sha, files, manifest.fields, version=self._served_unregistered(path)
        )
        log.info("registered %s as version %d", uri, record.version)
        if self.config.policy == "auto" and record.status == "registered":
            self._spawn(self._auto_promote(record.version))
        return record.version

    def _served_unregistered(self, path: str) -> int | None:
        """The version number replicas serve ``path`` under, if the registry does not know it
        (they were started with ``--checkpoint``): registering those files keeps that number."""
        for r in self.replicas.values():
            if r.checkpoint == path and r.version and r.version not in self.registry.checkpoints:
                return r.version
        return None

    async def report_progress(
        self,
        step: int,
        loss: float | None = None,
        tokens_seen: int | None = None,
        heldout_loss: float | None = None,
        **metrics: float,
    ) -> None:
        """Training progress for Status (the trainer may call this between checkpoints)."""
        self.registry.report_training(step, loss, tokens_seen, heldout_loss, metrics)

    # ---- queries ---------------------------------------------------------------------------

    async def list_checkpoints(self) -> list[CheckpointRecord]:
        self._start()
        return list(self.registry)

    async def status(self) -> OrchestratorStatus:
        self._start()
        return OrchestratorStatus(
            promoted_version=self.registry.promoted,
            rollback_version=self.registry.rollback_target,
            policy=self.config.policy,
            swapping_version=self._swapping,
            replicas=[self._view(r) for r in sorted(self.replicas.values(), key=_by_id)],
            checkpoints=list(self.registry),
            swaps=list(self.registry.swaps),
            training=self.registry.training,
        )

    def _view(self, r: ReplicaState) -> ReplicaView:
        hb = r.heartbeat
        return ReplicaView(
            replica_id=r.replica_id,
            version=r.version,
            staged_version=r.staged_version,
            swap_mode=r.swap_mode,
            last_seen_s=time.monotonic() - r.last_seen,
            running=hb.running if hb else 0,
            waiting=hb.waiting if hb else 0,
            kv_blocks_used=hb.blocks_used if hb else 0,
            kv_blocks_total=hb.blocks_total if hb else 0,
        )

    async def promoted(self) -> Target | None:
        return self._target(self.registry.promoted)

    def _target(self, version: int | None) -> Target | None:
        return None if version is None else Target(version, self.registry.get(version).path)

    # ---- validation ------------------------------------------------------------------------

    async def validate(self, version: int) -> CheckpointRecord:
        """Run the gate on ``version`` (once; later calls return the verdict)."""
        self._start()
        await self._ensure_validated(self._record(version))
        return self._record(version)

    def _record(self, version: int) -> CheckpointRecord:
        try:
            return self.registry.get(version)
        except KeyError as e:
            raise NotFoundError(e.args[0]) from None

    async def _ensure_validated(self, record: CheckpointRecord) -> None:
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")
        if record.validation is not None:
            return
        task = self._validations.get(record.version)
        if task is None:
            task = asyncio.ensure_future(self._validate(record.version))
            self._validations[record.version] = task
            task.add_done_callback(lambda _: self._validations.pop(record.version, None))
        await asyncio.shield(task)  # a caller that gives up does not stop the gate
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")

    async def _validate(self, version: int) -> None:
        async with self._gate_lock:  # one model at a time: the gate is CPU/GPU bound
            record = self.registry.get(version)
            if record.status != "registered":
                return
            self.registry.set_status(version, "validating")
            try:
                gate = await self._run_gate(record.path)
            except Exception as e:  # the gate itself broke (a Ray task lost): not the model's fault
                self.registry.set_status(version, "registered", f"validation failed to run: {e!r}")
                raise
            if not gate.ok:
                self.registry.set_status(version, "rejected", gate.reason)
                return
            assert gate.validation is not None
            reason = self._regression(gate.validation)
            if reason:
                self.registry.set_status(version, "rejected", reason)
                return
            self.registry.set_validation(version, gate.validation)

    async def _run_gate(self, path: str) -> GateResult:
        if self.config.validate_in == "thread":
            return await asyncio.to_thread(run_gate, path, self.config)
        import ray

        task = ray.remote(run_gate).options(
            num_cpus=self.config.validation_num_cpus, num_gpus=self.config.validation_num_gpus
        )
        return await task.remote(path, self.config)

    def _regression(self, validation: Validation) -> str:
        """Why ``validation`` is worse than the promoted version's beyond the margin ("" if not).

        Also records what it was compared with, so ListCheckpoints shows the reference."""
        current = self.registry.promoted
        reference = None if current is None else self.registry.get(current).validation
        if reference is None:
            return ""
        validation.reference_version = current
        validation.reference_perplexity = reference.perplexity
        limit = reference.perplexity * (1 + self.config.max_ppl_increase)
        if validation.perplexity <= limit:
            return ""
        return (
            f"held-out perplexity {validation.perplexity:.3f} is worse than version {current}'s "
            f"{reference.perplexity:.3f} by more than {self.config.max_ppl_increase:.0%}"
        )

    # ---- promote / rollback ----------------------------------------------------------------

    async def promote(self, version: int, canary: bool | None = None) -> SwapRecord:
        """Validate (if not yet) and hot-swap ``version`` into every replica, all or nothing."""
        self._start()
        record = self._record(version)
        self._check_loadable(record)
        await self._ensure_validated(record)
        async with self._swap_lock:
            if record.status != "promoted":
                assert record.validation is not None
                reason = self._regression(record.validation)
                if reason:
                    self.registry.set_status(version, "rejected", reason)
                    raise CheckpointRejected(f"version {version} was rejected: {reason}")
            use_canary = self.config.canary if canary is None else canary
            if use_canary and record.status != "promoted":
                return await self._canary_then_promote(record)
            return await self._swap_all(record, "promote")

    async def rollback(self, version: int | None = None) -> SwapRecord:
        """Promote an earlier version the same way (default: the one before the current one)."""
        self._start()
        async with self._swap_lock:
            current = self.registry.promoted
            target = self.registry.rollback_target if version is None else version
            if target is None:
                raise PreconditionError(
                    "there is no earlier promoted version to roll back to"
                    + ("" if current is None else f" (only version {current} was promoted)")
                )
            record = self._record(target)
            self._check_loadable(record)
            if record.validation is None:
                raise PreconditionError(
                    f"version {target} never passed validation; promote it instead of rolling back"
                )
            if target == current:
                raise PreconditionError(f"version {target} is already the promoted version")
            return await self._swap_all(record, "rollback")

    def _check_loadable(self, record: CheckpointRecord) -> None:
        if record.status == "rejected":
            raise CheckpointRejected(f"version {record.version} was rejected: {record.reason}")
        if record.deleted:
            raise PreconditionError(
                f"version {record.version}'s files were deleted by retention (keep_last)"
            )

    async def _auto_promote(self, version: int) -> None:
        """The "auto" policy: promote ``version`` once it passes, unless a newer one serves."""
        try:
            await self._ensure_validated(self.registry.get(version))
            async with self._swap_lock:
                newest = max(
                    (
                        r.version
                        for r in self.registry
                        if r.validation is not None and r.status != "rejected"
                    ),
                    default=version,
                )
                if version < newest or self.registry.get(version).status != "validated":
                    return  # a newer checkpoint passed too: promote that one instead
            await self.promote(version)
        except OrchestratorError as e:
            log.warning("auto-promotion of version %d stopped: %s", version, e)
        except Exception:
            log.exception("auto-promotion of version %d failed", version)

    # ---- the two-phase swap ----------------------------------------------------------------

    async def _swap_all(self, record: CheckpointRecord, kind: SwapKind) -> SwapRecord:
        """Stage on every live replica, then record the promotion and commit on all of them."""
        target = Target(record.version, record.path)
        swap = self.registry.start_swap(kind, record.version, self.registry.promoted)
        self._swapping = record.version

        def promote_in_registry() -> None:  # runs with no await before it: see _stage
            if kind == "rollback":
                self.registry.rollback(record.version)
            else:
                self.registry.promote(record.version, "hot-swapped into every replica")

        try:
            staged = await self._stage(swap, target, None, promote_in_registry)
            await self._commit(swap, target, staged)
        finally:
            self._swapping = None
        self._apply_retention()
        return swap

    async def _stage(
        self,
        swap: SwapRecord,
        target: Target,
        members: set[str] | None,
        on_all_staged: Any = None,
    ) -> dict[str, ReplicaState]:
        """Phase 1 over ``members`` (None: every live replica, joiners included).

        Returns the staged replicas. On a failure: aborts the stage everywhere, finishes the
        swap record, rejects the checkpoint when it is at fault, and raises.
        """
        sent: dict[str, tuple[ReplicaState, int]] = {}
        staged: dict[str, ReplicaState] = {}
        deadline = time.monotonic() + self.config.stage_timeout_s
        try:
            while True:
                live = await self._live(members)
                serve_count = await self._serve_running() if members is None else None
                live = self._members(members)  # no await from here to the decision
                self._send_stage(swap, target, live, sent, staged)
                self._collect_staged(swap, live, sent, staged)
                waiting = sorted(set(live) - set(staged))
                enough = serve_count is None or len(live) >= serve_count
                if not waiting and enough and (members is None or live):
                    if on_all_staged is not None:
                        on_all_staged()
                    return {rid: live[rid] for rid in staged}
                if time.monotonic() > deadline:
                    raise SwapAborted(self._stage_timeout_reason(waiting, live, serve_count))
                await self._wait_change(0.25)
        except (_StageFailed, SwapAborted, asyncio.CancelledError) as e:
            await self._abort(sent)
            self._fail_swap(swap, e)
            raise self._public_error(swap, e) from None

    def _send_stage(
        self,
        swap: SwapRecord,
        target: Target,
        live: dict[str, ReplicaState],
        sent: dict[str, tuple[ReplicaState, int]],
        staged: dict[str, ReplicaState],
    ) -> None:
        for rid, r in live.items():
            if rid in sent and sent[rid][0] is r:
                continue
            staged.pop(rid, None)  # a replica that re-attached lost what it had staged
            if r.serves(target) and r.staged_version is None:
                swap.replicas[rid] = ReplicaSwap(rid, swap_mode=r.swap_mode, skipped=True)
                staged[rid] = r
                sent[rid] = (r, 0)
            else:
                sent[rid] = (r, self._send(r, "stage", target, swap.swap_id))

    def _collect_staged(
        self,
        swap: SwapRecord,
        live: dict[str, ReplicaState],
        sent: dict[str, tuple[ReplicaState, int]],
        staged: dict[str, ReplicaState],
    ) -> None:
        for rid, (r, seq) in sent.items():
            if rid in staged or live.get(rid) is not r:
                continue
            result = r.results.pop(seq, None)
            if result is None:
                continue
            part = swap.replicas.setdefault(rid, ReplicaSwap(rid))
            part.swap_mode, part.stage_s = result.swap_mode, result.seconds
            if not result.ok:
                part.error = result.error
                raise _StageFailed(rid, result)
            staged[rid] = r

    def _stage_timeout_reason(
        self, waiting: list[str], live: dict[str, ReplicaState], serve_count: int | None
    ) -> str:
        if waiting:
            return (
                f"replica(s) {', '.join(waiting)} did not stage within "
                f"{self.config.stage_timeout_s:.0f} s; every replica kept the old version"
            )
        if serve_count is not None and len(live) < serve_count:
            return (
                f"Serve runs {serve_count} replicas but only {len(live)} attached to the "
                "orchestrator; the swap would miss some, so it was aborted"
            )
        return "no live replica to stage on"

    async def _commit(
        self, swap: SwapRecord, target: Target, staged: dict[str, ReplicaState]
    ) -> None:
        """Phase 2: every staged replica flips at its next step boundary."""
        pending = {
            rid: (r, self._send(r, "commit", target, swap.swap_id))
            for rid, r in staged.items()
            if not swap.replicas.get(rid, ReplicaSwap(rid)).skipped
        }
        deadline = time.monotonic() + self.config.commit_timeout_s
        problems = []
        while pending and time.monotonic() < deadline:
            await self._live(None)
            for rid, (r, seq) in list(pending.items()):
                result = r.results.pop(seq, None)
                if self.replicas.get(rid) is not r:
                    problems.append(f"replica {rid} went away before committing")
                elif result is None:
                    continue
                else:
                    part = swap.replicas.setdefault(rid, ReplicaSwap(rid))
                    part.commit_s = result.seconds
                    if result.ok:
                        r.version, r.checkpoint, r.staged_version = (
                            target.version,
                            target.path,
                            None,
                        )
                    else:
                        part.error = result.error
                        problems.append(f"replica {rid} failed to commit: {result.error}")
                del pending[rid]
            if pending:
                await self._wait_change(0.1)
        problems += [f"replica {rid} did not confirm its commit" for rid in pending]
        modes = sorted({p.swap_mode for p in swap.replicas.values() if p.swap_mode})
        swap.swap_mode = ",".join(modes)
        # The version is recorded as promoted already: a replica that did not flip reports
        # unhealthy (its agent) and Serve replaces it with one that loads the promoted version.
        self.registry.finish_swap(swap, "ok", "; ".join(problems))

    async def _abort(self, sent: dict[str, tuple[ReplicaState, int]]) -> None:
        """Drop staged weights wherever a stage was sent; wait (briefly) until they are gone."""
        aborts = {
            rid: (r, self._send(r, "abort"))
            for rid, (r, seq) in sent.items()
            if seq and self.replicas.get(rid) is r
        }
        deadline = time.monotonic() + self.config.commit_timeout_s
        while aborts and time.monotonic() < deadline:
            for rid, (r, seq) in list(aborts.items()):
                if r.results.pop(seq, None) is not None or self.replicas.get(rid) is not r:
                    r.staged_version = None
                    del aborts[rid]
            if aborts:
                await self._wait_change(0.1)
                await self._live(None)

    def _fail_swap(self, swap: SwapRecord, e: BaseException) -> None:
        if isinstance(e, _StageFailed):
            reason = str(e)
            if e.result.checkpoint_fault:
                record = self.registry.get(swap.version)
                if record.status in ("validated", "retired"):
                    self.registry.set_status(swap.version, "rejected", reason)
        elif isinstance(e, asyncio.CancelledError):
            reason = "the swap was cancelled"
        else:
            reason = str(e)
        self.registry.finish_swap(swap, "aborted", reason)

    def _public_error(self, swap: SwapRecord, e: BaseException) -> BaseException:
        if isinstance(e, _StageFailed) and self.registry.get(swap.version).status == "rejected":
            return CheckpointRejected(f"version {swap.version} was rejected: {e}")
        if isinstance(e, asyncio.CancelledError):
            return e
        return SwapAborted(f"swap to version {swap.version} aborted: {swap.reason}")

    # ---- canary ----------------------------------------------------------------------------

    async def _canary_then_promote(self, record: CheckpointRecord) -> SwapRecord:
        """One replica first; compare it with one still on the current version; go on or undo."""
        previous = self.registry.promoted
        live = sorted(await self._live(None))
        if previous is None or len(live) < 2:
            raise PreconditionError(
                "a canary needs a promoted version to compare with and at least 2 replicas "
                f"(promoted: {previous}, replicas: {len(live)}); promote without canary"
            )
        canary_id, reference_id = live[0], live[1]
        target = Target(record.version, record.path)
        swap = self.registry.start_swap("canary", record.version, previous)
        staged = await self._stage(swap, target, {canary_id})
        await self._commit(swap, target, staged)
        try:
            metrics = await self._compare(canary_id, reference_id, record, previous)
        except Exception as e:
            metrics = {"error": 1.0}
            reason = f"canary comparison failed: {e}"
            passed = False
        else:
            passed, reason = self._canary_verdict(metrics, previous)
        swap.canary = metrics
        self.registry.finish_swap(swap, "ok" if passed else "aborted", reason)
        if not passed:
            await self._undo_canary(canary_id, previous, record.version)
            self.registry.set_status(record.version, "rejected", reason)
            raise CheckpointRejected(f"version {record.version} was rejected: {reason}")
        full = await self._swap_all(record, "promote")
        full.canary = metrics
        self.registry.save()
        return full

    async def _compare(
        self, canary_id: str, reference_id: str, record: CheckpointRecord, previous: int
    ) -> dict[str, float]:
        tokenizer = await asyncio.to_thread(checkpoint.load_tokenizer, record.path, False)
        ids, _ = await asyncio.to_thread(
            heldout_ids, self.config.heldout, tokenizer, self.config.canary_tokens
        )
        results = await asyncio.gather(
            self._request(canary_id, "evaluate", token_ids=ids),
            self._request(reference_id, "evaluate", token_ids=ids),
        )
        (canary, reference) = results
        if canary.version != record.version or reference.version != previous:
            raise RuntimeError(
                f"replica versions changed during the canary (canary {canary.version}, "
                f"reference {reference.version})"
            )
        diffs = [abs(a - b) for a, b in zip(canary.logprobs, reference.logprobs, strict=True)]
        return {
            "canary_perplexity": math.exp(-sum(canary.logprobs) / len(canary.logprobs)),
            "reference_perplexity": math.exp(-sum(reference.logprobs) / len(reference.logprobs)),
            "mean_abs_logprob_diff": sum(diffs) / len(diffs),
            "tokens": float(len(diffs)),
        }

    def _canary_verdict(self, metrics: dict[str, float], previous: int) -> tuple[bool, str]:
        limit = metrics["reference_perplexity"] * (1 + self.config.canary_max_ppl_increase)
        if metrics["canary_perplexity"] <= limit:
            return True, ""
        return False, (
            f"canary: held-out perplexity {metrics['canary_perplexity']:.3f} on the canary "
            f"replica is worse than version {previous}'s {metrics['reference_perplexity']:.3f} "
            f"by more than {self.config.canary_max_ppl_increase:.0%}"
        )

    async def _undo_canary(self, canary_id: str, previous: int, version: int) -> None:
        target = Target(previous, self.registry.get(previous).path)
        swap = self.registry.start_swap("canary-rollback", previous, version)
        staged = await self._stage(swap, target, {canary_id})
        await self._commit(swap, target, staged)

    async def _request(self, replica_id: str, kind: CommandKind, **fields: Any) -> Result:
        """Send one command to one replica and wait for its result."""
        r = self.replicas.get(replica_id)
        if r is None:
            raise RuntimeError(f"replica {replica_id} is gone")
        seq = self._send(r, kind, **fields)
        deadline = time.monotonic() + self.config.stage_timeout_s
        while time.monotonic() < deadline:
            result = r.results.pop(seq, None)
            if result is not None:
                if not result.ok:
                    raise RuntimeError(f"replica {replica_id}: {result.error}")
                return result
            if self.replicas.get(replica_id) is not r:
                raise RuntimeError(f"replica {replica_id} went away")
            await self._wait_change(0.25)
            await self._live(None)
        raise TimeoutError(f"replica {replica_id} did not answer {kind} in time")

    # ---- the agents' side of the protocol --------------------------------------------------

    async def attach(self, hello: Hello) -> Attachment:
        """A replica introduces itself; it must serve the returned target before it is ready."""
        self._start()
        r = ReplicaState(
            replica_id=hello.replica_id,
            actor_name=hello.actor_name,
            namespace=hello.namespace,
            version=hello.version,
            checkpoint=hello.checkpoint,
            staged_version=None,  # the agent drops staged weights when it attaches
            swap_mode=hello.swap_mode,
        )
        self.replicas[hello.replica_id] = r
        if hello.version and not self._is_registered(hello.version, hello.checkpoint):
            self.registry.reserve_versions_above(hello.version)  # never hand its number out
        target = self._target(self.registry.promoted)
        if target is not None:
            r.version, r.checkpoint = target.version, target.path  # it loads it before polling
        self._notify()
        log.info("replica %s attached (serving version %d)", hello.replica_id, hello.version)
        return Attachment(target, self.config.poll_timeout_s)

    def _is_registered(self, version: int, path: str) -> bool:
        record = self.registry.checkpoints.get(version)
        return record is not None and record.path == path

    async def poll(self, replica_id: str, acked: int, heartbeat: Heartbeat) -> list[Command] | None:
        """Long poll: commands newer than ``acked``, or [] after poll_timeout_s; None: attach."""
        r = self.replicas.get(replica_id)
        if r is None:
            return None
        r.last_seen, r.heartbeat, r.alive = time.monotonic(), heartbeat, True
        if heartbeat.executed >= r.reported:  # else a report already said something newer
            r.version, r.staged_version = heartbeat.version, heartbeat.staged_version
        r.outbox = [c for c in r.outbox if c.seq > acked]
        if not r.outbox:
            r.wakeup.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(r.wakeup.wait(), self.config.poll_timeout_s)
        if self.replicas.get(replica_id) is not r:
            return None
        return list(r.outbox)  # last_seen stays the call's start: a dead caller ages out

    async def report(self, replica_id: str, result: Result) -> None:
        r = self.replicas.get(replica_id)
        if r is None:
            return
        r.results[result.seq] = result
        for stale in sorted(r.results)[:-MAX_RESULTS]:  # answers nobody waited for (timeouts)
            del r.results[stale]
        r.reported = max(r.reported, result.seq)
        r.last_seen = time.monotonic()
        if result.ok and result.kind == "stage":
            r.staged_version = result.version
        self._notify()

    def _send(
        self,
        r: ReplicaState,
        kind: CommandKind,
        target: Target | None = None,
        swap_id: int = 0,
        token_ids: list[int] | None = None,
    ) -> int:
        self._seq += 1
        r.outbox.append(
            Command(
                seq=self._seq,
                kind=kind,
                version=0 if target is None else target.version,
                path="" if target is None else target.path,
                swap_id=swap_id,
                token_ids=token_ids or [],
            )
        )
        r.wakeup.set()
        return self._seq

    # ---- liveness --------------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every coroutine waiting in ``_wait_change`` (a report, an attach, a death)."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _members(self, members: set[str] | None) -> dict[str, ReplicaState]:
        return {
            rid: r
            for rid, r in self.replicas.items()
            if r.alive and (members is None or rid in members)
        }

    async def _live(self, members: set[str] | None) -> dict[str, ReplicaState]:
        """Probe liveness (a Ray actor name that is gone means dead), drop the dead."""
        now = time.monotonic()
        for rid, r in list(self.replicas.items()):
            if r.actor_name is not None:
                if now - r.last_seen > self.config.poll_timeout_s + 0.5 and now - r.probed > 0.5:
                    r.probed = now
                    r.alive = await asyncio.to_thread(_actor_exists, r.actor_name, r.namespace)
            else:
                r.alive = now - r.last_seen < self.config.replica_timeout_s
            if not r.alive and self.replicas.get(rid) is r:
                log.info("replica %s is gone", rid)
                del self.replicas[rid]
                self._notify()
        return self._members(members)

    async def _reap_dead_replicas(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self._live(None)

    async def _serve_running(self) -> int | None:
        """RUNNING replicas of our deployment as Serve counts them (None: unknown / no Serve)."""
        if not self.config.check_serve:
            return None
        at, count = self._serve_count
        if time.monotonic() - at < 0.5:
            return count
        count = await asyncio.to_thread(_serve_running_count, self.config)
        self._serve_count = (time.monotonic(), count)
        return count

    # ---- retention -------------------------------------------------------------------------

    def _apply_retention(self) -> None:
        if self.config.keep_last is None:
            return
        for record in self.registry.retention_candidates(self.config.keep_last):
            path = Path(record.path)
            if (path / checkpoint.MANIFEST).is_file():  # only ever delete a checkpoint directory
                shutil.rmtree(path, ignore_errors=True)
            self.registry.mark_deleted(record.version)
            log.info("retention deleted version %d (%s)", record.version, record.path)


def _by_id(r: ReplicaState) -> str:
    return r.replica_id


def _read_manifest(path: str) -> tuple[checkpoint.Manifest, str]:
    """The manifest and its content identity (not its bytes: they carry the export's time)."""
    manifest = checkpoint.read_manifest(path)
    return manifest, manifest.content_sha256()


def _serve_running_count(config: OrchestratorConfig) -> int | None:
    import ray

    if not ray.is_initialized():
        return None
    from ray import serve

    try:
        app = serve.status().applications.get(config.app_name)
    except Exception:  # Serve not running or its controller restarting: no cross-check
        return None
    deployment = None if app is None else app.deployments.get(config.deployment)
    if deployment is None:
        return None
    return int(deployment.replica_states.get("RUNNING", 0))


# --------------------------------------------------------------------------------------------
# As a Ray actor


def start_orchestrator(config: OrchestratorConfig) -> Any:
    """Start (or find) the application's orchestrator actor and wait until it answers.

    Detached (it outlives the driver), restarted by Ray whenever it dies (``max_restarts=-1``;
    the registry is read back from ``storage_path``), in the ``kiln`` namespace, under
    ``orchestrator_name(app_name)`` — the name the replicas' agents and the gateway look up.
    """
    import ray

    actor = ray.remote(Orchestrator).options(
        name=orchestrator_name(config.app_name),
        namespace=ORCHESTRATOR_NAMESPACE,
        lifetime="detached",
        max_restarts=-1,
        max_concurrency=1000,
        num_cpus=config.num_cpus,
        get_if_exists=True,
    )
    handle = actor.remote(config)
    ray.get(handle.ping.remote())
    return handle


def get_orchestrator(app_name: str = "kiln") -> Any:
    """The running orchestrator of ``app_name``; ValueError if there is none."""
    import ray

    return ray.get_actor(orchestrator_name(app_name), namespace=ORCHESTRATOR_NAMESPACE)


# --------------------------------------------------------------------------------------------
# The Admin API backend: what the gateway's AdminServicer delegates to


READ_RETRY_S = 10.0
"""How long an Admin read waits for a restarting orchestrator (within the client's deadline)."""


class OrchestratorAdmin:
    """kiln.v1.Admin over the orchestrator actor: protobuf in, one actor call, protobuf out.

    The gateway authenticates first (AdminServicer); this converts, delegates and maps the
    orchestrator's errors to gRPC status codes (STYLE.md 6).
    """

    def __init__(self, app_name: str) -> None:
        from kilnlm.actors.swap_agent import ActorLink

        self.link = ActorLink(orchestrator_name(app_name))

    async def _call(self, context: Any, method: str, *args: Any, read: bool = False) -> Any:
        """One actor call. A read (Status, ListCheckpoints) that meets the actor restarting is
        retried while the client's deadline allows; a promotion never is (it may have run)."""
        import grpc
        from ray.exceptions import RayActorError

        give_up = time.monotonic() + min(READ_RETRY_S, context.time_remaining() or READ_RETRY_S)
        while True:
            try:
                return await self.link.call(method, *args)
            except ConnectionError as e:  # no actor by that name: nothing to wait for
                code, details = grpc.StatusCode.UNAVAILABLE, f"{e}; start it (kiln up) and retry"
            except RayActorError as e:
                self.link._handle = None  # look it up again next time (restarted or replaced)
                if read and time.monotonic() + 0.5 < give_up:
                    await asyncio.sleep(0.5)
                    continue
                code, details = grpc.StatusCode.UNAVAILABLE, f"the orchestrator is restarting: {e}"
            except Exception as e:
                code, details = admin_status(e)
            await context.abort(code, details)

    async def Register(self, request: Any, context: Any) -> Any:
        from kilnlm.proto import admin_pb2

        version = await self._call(context, "register", request.uri)
        records = await self._call(context, "list_checkpoints", read=True)
        record = next(r for r in records if r.version == version)
        return admin_pb2.RegisterResponse(version=version, checkpoint=checkpoint_pb(record))

    async def ListCheckpoints(self, request: Any, context: Any) -> Any:
        from kilnlm.proto import admin_pb2

        records = await self._call(context, "list_checkpoints", read=True)
        return admin_pb2.ListCheckpointsResponse(checkpoints=[checkpoint_pb(r) for r in records])

    async def Promote(self, request: Any, context: Any) -> Any:
        canary = request.canary if request.HasField("canary") else None
        swap = await self._call(context, "promote", int(request.version), canary)
        return promote_response_pb(swap)

    async def Rollback(self, request: Any, context: Any) -> Any:
        version = int(request.version) if request.HasField("version") else None
        swap = await self._call(context, "rollback", version)
        return promote_response_pb(swap)

    async def Status(self, request: Any, context: Any) -> Any:
        return status_pb(await self._call(context, "status", read=True))


def _cause(e: BaseException) -> BaseException:
    from ray.exceptions import RayTaskError

    while isinstance(e, RayTaskError) and e.cause is not None and e.cause is not e:
        e = e.cause
    return e


def admin_status(e: BaseException) -> tuple[Any, str]:
    """The gRPC status of an orchestrator error (raised here or inside the actor)."""
    import grpc

    e = _cause(e)
    codes: list[tuple[type[BaseException], Any]] = [
        (NotFoundError, grpc.StatusCode.NOT_FOUND),
        (PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
        (SwapAborted, grpc.StatusCode.ABORTED),
        (RegistryError, grpc.StatusCode.FAILED_PRECONDITION),
        (CheckpointError, grpc.StatusCode.INVALID_ARGUMENT),  # Register: no usable export there
        (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for cls, code in codes:
        if isinstance(e, cls):
            return code, str(e)
    log.exception("unexpected orchestrator error", exc_info=e)
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


_STATE_PB = {
    "registered": 1,
    "validated": 2,
    "promoted": 3,
    "rejected": 4,
    "validating": 5,
    "retired": 6,
}


def checkpoint_pb(r: CheckpointRecord) -> Any:
    from kilnlm.proto import admin_pb2

    v = r.validation
    return admin_pb2.Checkpoint(
        version=r.version,
        uri=r.uri,
        step=r.step or 0,
        tokens_seen=r.tokens_seen or 0,
        heldout_loss=r.heldout_loss or 0.0,
        state=_STATE_PB[r.status],
        reason=r.reason,
        registered_unix=r.registered_unix,
        updated_unix=r.updated_unix,
        heldout_perplexity=v.perplexity if v else 0.0,
        heldout_bits_per_byte=v.bits_per_byte if v else 0.0,
        manifest_sha256=r.manifest_sha256,
        deleted=r.deleted,
        smoke_text=v.smoke_text if v else "",
    )


def swap_pb(s: SwapRecord) -> Any:
    from kilnlm.proto import admin_pb2

    return admin_pb2.SwapRecord(
        swap_id=s.swap_id,
        kind=s.kind,
        version=s.version,
        previous_version=s.previous_version or 0,
        outcome=s.outcome,
        reason=s.reason,
        started_unix=s.started_unix,
        seconds=s.seconds or 0.0,
        registered_to_serving_seconds=s.registered_to_serving_s or 0.0,
        swap_mode=s.swap_mode,
        replicas=[
            admin_pb2.ReplicaSwap(
                replica_id=p.replica_id,
                stage_seconds=p.stage_s or 0.0,
                commit_seconds=p.commit_s or 0.0,
                swap_mode=p.swap_mode,
                error=p.error,
                skipped=p.skipped,
            )
            for p in s.replicas.values()
        ],
        canary=s.canary or {},
    )


def promote_response_pb(s: SwapRecord) -> Any:
    from kilnlm.proto import admin_pb2

    return admin_pb2.PromoteResponse(
        version=s.version,
        previous_version=s.previous_version or 0,
        swap_mode=s.swap_mode,
        swap_seconds=s.seconds or 0.0,
        swap=swap_pb(s),
    )


def status_pb(st: OrchestratorStatus) -> Any:
    from kilnlm.proto import admin_pb2

    t = st.training
    return admin_pb2.StatusResponse(
        promoted_version=st.promoted_version or 0,
        replicas=[
            admin_pb2.ReplicaStatus(
                replica_id=r.replica_id,
                version=r.version,
                running=r.running,
                waiting=r.waiting,
                kv_blocks_used=r.kv_blocks_used,
                kv_blocks_total=r.kv_blocks_total,
                staged_version=r.staged_version or 0,
                last_seen_seconds=r.last_seen_s,
                swap_mode=r.swap_mode,
            )
            for r in st.replicas
        ],
        checkpoints=[checkpoint_pb(r) for r in st.checkpoints],
        rollback_version=st.rollback_version or 0,
        training=admin_pb2.TrainingProgress(
            step=t.step or 0,
            tokens_seen=t.tokens_seen or 0,
            loss=t.loss or 0.0,
            heldout_loss=t.heldout_loss or 0.0,
            updated_unix=t.updated_unix,
        ),
        swaps=[swap_pb(s) for s in st.swaps],
        policy=st.policy,
        swapping_version=st.swapping_version or 0,
    )


__all__ = [
    "CheckpointRejected",
    "GateResult",
    "NotFoundError",
    "Orchestrator",
    "OrchestratorAdmin",
    "OrchestratorConfig",
    "OrchestratorError",
    "OrchestratorStatus",
    "PreconditionError",
    "ReplicaState",
    "ReplicaView",
    "SwapAborted",
    "admin_status",
    "get_orchestrator",
    "heldout_ids",
    "run_gate",
    "start_orchestrator",
]
