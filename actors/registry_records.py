"""What the checkpoint registry records (DESIGN.md, "Versions"): one ``CheckpointRecord`` per
registered export with its status history, one ``SwapRecord`` per swap with every replica's
part, and the trainer's last ``TrainingProgress``.

Plain dataclasses that round-trip through JSON (``asdict`` / ``from_dict``): ``Registry``
(``registry.py``) owns them, changes them through its transition table and saves them; the
orchestrator, the swap coordinator and the Admin API read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from kilnlm.gate import Validation

Status = Literal["registered", "validating", "validated", "promoted", "rejected", "retired"]
STATUSES: tuple[Status, ...] = (
    "registered",
    "validating",
    "validated",
    "promoted",
    "rejected",
    "retired",
)
SwapKind = Literal["promote", "rollback", "canary", "canary-rollback"]
SwapOutcome = Literal["running", "ok", "aborted", "failed", "interrupted"]


@dataclass
class Transition:
    status: Status
    unix: float
    reason: str = ""


@dataclass
class CheckpointRecord:
    version: int
    uri: str
    """As registered (a path or a file:// URI)."""
    path: str
    """Where replicas load it from: ``uri`` without file://, absolute; an object-store URI as
    registered (the gate and every replica fetch it into their node's cache)."""
    manifest_sha256: str
    """The manifest's content identity (``Manifest.content_sha256``: files and fields, not the
    export's time): equal means the same files (the manifest lists their sha256)."""
    files: dict[str, str]
    """sha256 of every file, from the manifest."""
    step: int | None = None
    tokens_seen: int | None = None
    heldout_loss: float | None = None
    """The trainer's held-out loss from the manifest (the gate measures its own)."""
    status: Status = "registered"
    reason: str = ""
    registered_unix: float = 0.0
    history: list[Transition] = field(default_factory=list)
    validation: Validation | None = None
    deleted: bool = False
    """Retention removed its files: it can no longer be promoted."""

    @property
    def updated_unix(self) -> float:
        return self.history[-1].unix if self.history else self.registered_unix

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointRecord:
        d = dict(d)
        d["history"] = [Transition(**t) for t in d.get("history", [])]
        if d.get("validation") is not None:
            d["validation"] = Validation(**d["validation"])
        return cls(**d)


@dataclass
class ReplicaSwap:
    """One replica's part in a swap."""

    replica_id: str
    stage_s: float | None = None
    commit_s: float | None = None
    swap_mode: str = ""
    error: str = ""
    skipped: bool = False
    """It already served the version (nothing to load)."""


@dataclass
class SwapRecord:
    swap_id: int
    kind: SwapKind
    version: int
    previous_version: int | None
    started_unix: float
    registered_unix: float
    """When ``version`` was registered: registered → all replicas serving is the swap latency
    the product cares about (validation included)."""
    outcome: SwapOutcome = "running"
    reason: str = ""
    finished_unix: float | None = None
    swap_mode: str = ""
    replicas: dict[str, ReplicaSwap] = field(default_factory=dict)
    failed_replica: str = ""
    """The replica whose stage or commit failed ("" when none did, or a timeout)."""
    failure_kind: str = ""
    """"checkpoint" (the version is rejected) or "environment" (it stays promotable)."""
    canary: dict[str, Any] | None = None
    """Canary measurements: perplexities of both versions on the same tokens, logprob drift."""

    @property
    def seconds(self) -> float | None:
        """Swap start (stage sent) → every replica committed."""
        return None if self.finished_unix is None else self.finished_unix - self.started_unix

    @property
    def registered_to_serving_s(self) -> float | None:
        if self.finished_unix is None or self.outcome != "ok":
            return None
        return self.finished_unix - self.registered_unix

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SwapRecord:
        d = dict(d)
        d["replicas"] = {k: ReplicaSwap(**v) for k, v in d.get("replicas", {}).items()}
        return cls(**d)


@dataclass
class TrainingProgress:
    """The trainer's last report (through the hook, or ``Orchestrator.report_progress``)."""

    step: int | None = None
    tokens_seen: int | None = None
    loss: float | None = None
    heldout_loss: float | None = None
    updated_unix: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
