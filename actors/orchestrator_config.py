"""The orchestrator's configuration, its errors and its status: what its parts share.

A module of its own so the actor shell (orchestrator.py), the swap coordinator and the Admin
adapter (admin.py) import these without importing each other. The errors are plain
one-argument classes so they cross Ray as themselves; the Admin adapter maps each to one gRPC
status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kilnlm.actors.registry_records import CheckpointRecord, SwapRecord, TrainingProgress
from kilnlm.actors.replica_set import ReplicaView

Policy = Literal["manual", "auto"]


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


__all__ = [
    "CheckpointRejected",
    "NotFoundError",
    "OrchestratorConfig",
    "OrchestratorError",
    "OrchestratorStatus",
    "Policy",
    "PreconditionError",
    "SwapAborted",
]
