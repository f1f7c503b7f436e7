"""The orchestrator's checkpoint registry: every checkpoint, what the gate said, what serves.

Plain Python, no Ray: the orchestrator actor owns one ``Registry``; tests drive it directly.

What it holds (DESIGN.md, "Versions"): one ``CheckpointRecord`` per registered export — version
(assigned here, monotonically increasing), URI, step, tokens seen and held-out loss from the
export's manifest, the sha256 of ``manifest.json`` (which pins the sha256 of every file), a
status with its reason and the time of every transition — plus the promotion ``lineage`` (the
stack that ``rollback`` pops), the swap history and the trainer's last reported progress. The
record dataclasses themselves are in ``registry_records.py``.

Persistence. The whole registry is one JSON document, ``registry.json`` in the orchestrator's
storage path, rewritten on every change through a temporary file, fsync and ``os.replace``: a
reader (a restarted orchestrator) sees the previous document or the new one, never half of
either. A registry is small (one record per checkpoint, the last ``MAX_SWAPS`` swaps), so a
rewrite costs microseconds next to the swaps it records, and recovery is "read one file". What
was in flight when the actor died is settled by ``recover``: a validation becomes
``registered`` again, a swap ``interrupted``.

Statuses::

    registered ──► validating ──► validated ──► promoted ──► retired ──► promoted (rollback)
        ▲              │               │            │
        └──(recover)───┤               ▼            ▼
                       └────────► rejected     (retired on the next promotion or a rollback)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kilnlm.actors.registry_records import (
    CheckpointRecord,
    Status,
    SwapKind,
    SwapOutcome,
    SwapRecord,
    TrainingProgress,
    Transition,
)
from kilnlm.checkpoint import remote
from kilnlm.gate import Validation

ALLOWED: dict[Status, tuple[Status, ...]] = {
    "registered": ("validating", "rejected"),
    "validating": ("validated", "rejected", "registered"),
    "validated": ("promoted", "rejected", "validating"),
    "promoted": ("retired",),
    "retired": ("promoted", "rejected"),
    "rejected": (),
}
"""Legal transitions. ``rejected`` is final: a bad checkpoint is re-exported, not re-tried."""

FORMAT = "kilnlm.registry"
FORMAT_VERSION = 1
FILE_NAME = "registry.json"
MAX_SWAPS = 200
"""Swap records kept (oldest dropped first): history for Status, bounded so the file stays small."""


class RegistryError(RuntimeError):
    """The registry file cannot be read, or a transition is not allowed."""


# --------------------------------------------------------------------------------------------
# The registry


class Registry:
    """Checkpoint records, promotion lineage, swap history; saved atomically on every change."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.uri = str(path) if remote.is_remote(path) else None
        """The registry's object-store URI (s3://.../registry.json), or None on a filesystem."""
        self.path = Path(path)
        self.next_version = 1
        self.checkpoints: dict[int, CheckpointRecord] = {}
        self.lineage: list[int] = []
        """Promoted versions, oldest first; the last one serves, the one before is the rollback
        target. A promotion pushes, a rollback pops."""
        self.swaps: list[SwapRecord] = []
        self.next_swap_id = 1
        self.training = TrainingProgress()

    # ---- persistence -----------------------------------------------------------------------

    @classmethod
    def open(cls, storage_path: str | os.PathLike[str]) -> Registry:
        """The registry stored under ``storage_path`` (created empty if there is none yet); an
        object-store URI (s3://, gs://) keeps it as one object there."""
        if remote.is_remote(storage_path):
            registry = cls(f"{str(storage_path).rstrip('/')}/{FILE_NAME}")
            data = remote.read_bytes(registry.uri or "")
            if data is not None:
                registry._load(data)
            return registry
        root = Path(storage_path)
        root.mkdir(parents=True, exist_ok=True)
        registry = cls(root / FILE_NAME)
        if registry.path.is_file():
            registry._load(registry.path.read_bytes())
        return registry

    def _load(self, data: bytes) -> None:
        try:
            d = json.loads(data.decode("utf-8"))
        except ValueError as e:
            raise RegistryError(
                f"{self.uri or self.path} is not valid JSON ({e}); restore it from a backup or move it away "
                "to start an empty registry"
            ) from e
        if d.get("format") != FORMAT or d.get("format_version", 0) > FORMAT_VERSION:
            raise RegistryError(
                f"{self.uri or self.path} is not a kilnlm registry this version understands "
                f"(format {d.get('format')!r}, version {d.get('format_version')!r})"
            )
        self.next_version = d["next_version"]
        self.next_swap_id = d["next_swap_id"]
        self.checkpoints = {
            int(c["version"]): CheckpointRecord.from_dict(c) for c in d["checkpoints"]
        }
        self.lineage = list(d["lineage"])
        self.swaps = [SwapRecord.from_dict(s) for s in d["swaps"]]
        self.training = TrainingProgress(**d["training"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "next_version": self.next_version,
            "next_swap_id": self.next_swap_id,
            "checkpoints": [asdict(c) for c in self.checkpoints.values()],
            "lineage": self.lineage,
            "swaps": [asdict(s) for s in self.swaps],
            "training": asdict(self.training),
        }

    def save(self) -> None:
        """Write the registry atomically: temp file in the same directory, fsync, rename; in
        object storage one PUT of the whole document (atomic there: no reader sees a part)."""
        data = json.dumps(self.to_dict(), indent=1, sort_keys=True).encode("utf-8")
        if self.uri is not None:
            remote.write_bytes(self.uri, data)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{FILE_NAME}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:  # the rename itself must survive a crash
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def recover(self) -> list[int]:
        """Settle what a dead orchestrator left in flight; returns versions to validate again."""
        requeue = []
        for record in self.checkpoints.values():
            if record.status == "validating":
                self._transition(record, "registered", "validation interrupted (restart)")
                requeue.append(record.version)
            elif record.status == "registered":
                requeue.append(record.version)
        for swap in self.swaps:
            if swap.outcome == "running":
                swap.outcome, swap.reason = "interrupted", "the orchestrator restarted mid-swap"
                swap.finished_unix = time.time()
        self.save()
        return sorted(requeue)

    # ---- checkpoints -----------------------------------------------------------------------

    def find(self, path: str, manifest_sha256: str) -> CheckpointRecord | None:
        """The record of these exact files at this path (registering twice is a no-op)."""
        for record in self.checkpoints.values():
            if record.path == path and record.manifest_sha256 == manifest_sha256:
                return record
        return None

    def add(
        self,
        uri: str,
        path: str,
        manifest_sha256: str,
        files: dict[str, str],
        fields: dict[str, Any],
        version: int | None = None,
    ) -> CheckpointRecord:
        """Register an export under the next version (idempotent for the same files).

        ``version``: keep a number replicas already serve these files under (if still free).
        """
        existing = self.find(path, manifest_sha256)
        if existing is not None:
            return existing
        for record in self.checkpoints.values():
            if record.path == path and not record.deleted:
                raise RegistryError(
                    f"{path} was rewritten after it was registered as version {record.version}; "
                    "a registered checkpoint never changes: export to a new directory"
                )
        if version is None or version in self.checkpoints:
            version = self.next_version
        now = time.time()
        record = CheckpointRecord(
            version=version,
            uri=uri,
            path=path,
            manifest_sha256=manifest_sha256,
            files=files,
            step=_int_or_none(fields.get("step")),
            tokens_seen=_int_or_none(fields.get("tokens_seen")),
            heldout_loss=_float_or_none(fields.get("heldout_loss")),
            registered_unix=now,
            history=[Transition("registered", now)],
        )
        self.checkpoints[record.version] = record
        self.next_version = max(self.next_version, version + 1)
        self._note_training(record)
        self.save()
        return record

    def reserve_versions_above(self, version: int) -> None:
        """Never hand out ``version`` or below again (a replica already serves that number)."""
        if version >= self.next_version:
            self.next_version = version + 1
            self.save()

    def get(self, version: int) -> CheckpointRecord:
        """The record of ``version``; KeyError naming the known versions if there is none."""
        record = self.checkpoints.get(version)
        if record is None:
            known = sorted(self.checkpoints)
            raise KeyError(
                f"version {version} is not registered (known: {known or 'none'}); "
                "list them with `kiln status`"
            )
        return record

    def set_status(self, version: int, status: Status, reason: str = "") -> CheckpointRecord:
        record = self.get(version)
        self._transition(record, status, reason)
        self.save()
        return record

    def set_validation(self, version: int, validation: Validation) -> CheckpointRecord:
        record = self.get(version)
        record.validation = validation
        self._transition(record, "validated")
        self.save()
        return record

    def _transition(self, record: CheckpointRecord, status: Status, reason: str = "") -> None:
        if status not in ALLOWED[record.status]:
            raise RegistryError(
                f"version {record.version} is {record.status}; it cannot become {status}"
            )
        record.status, record.reason = status, reason
        record.history.append(Transition(status, time.time(), reason))

    def _note_training(self, record: CheckpointRecord) -> None:
        t = self.training
        if record.step is not None and (t.step is None or record.step >= t.step):
            t.step, t.updated_unix = record.step, time.time()
            t.tokens_seen = record.tokens_seen if record.tokens_seen is not None else t.tokens_seen
            t.heldout_loss = (
                record.heldout_loss if record.heldout_loss is not None else t.heldout_loss
            )

    def report_training(
        self,
        step: int,
        loss: float | None,
        tokens_seen: int | None,
        heldout_loss: float | None,
        metrics: dict[str, float],
    ) -> None:
        self.training = TrainingProgress(
            step=step,
            tokens_seen=tokens_seen if tokens_seen is not None else self.training.tokens_seen,
            loss=loss,
            heldout_loss=heldout_loss if heldout_loss is not None else self.training.heldout_loss,
            updated_unix=time.time(),
            metrics=dict(metrics),
        )
        self.save()

    # ---- promotion lineage -----------------------------------------------------------------

    @property
    def promoted(self) -> int | None:
        return self.lineage[-1] if self.lineage else None

    @property
    def rollback_target(self) -> int | None:
        """The version promoted before the current one (what ``rollback`` returns to)."""
        return self.lineage[-2] if len(self.lineage) >= 2 else None

    def promote(self, version: int, reason: str = "") -> None:
        """``version`` serves now; the previous one is retired (and becomes the rollback target)."""
        record = self.get(version)
        if self.promoted == version:
            return
        if self.promoted is not None:
            self._transition(self.get(self.promoted), "retired", f"replaced by version {version}")
        self._transition(record, "promoted", reason)
        self.lineage.append(version)
        self.save()

    def rollback(self, version: int) -> None:
        """Serve ``version`` again: pop the lineage down to it (push it if it is not there)."""
        current = self.promoted
        if current == version:
            return
        if version in self.lineage:
            while self.lineage[-1] != version:
                self.lineage.pop()
        else:
            self.lineage.append(version)
        if current is not None:
            self._transition(self.get(current), "retired", f"rolled back to version {version}")
        self._transition(self.get(version), "promoted", "rollback")
        self.save()

    # ---- swaps -----------------------------------------------------------------------------

    def start_swap(self, kind: SwapKind, version: int, previous: int | None) -> SwapRecord:
        swap = SwapRecord(
            swap_id=self.next_swap_id,
            kind=kind,
            version=version,
            previous_version=previous,
            started_unix=time.time(),
            registered_unix=self.get(version).registered_unix,
        )
        self.next_swap_id += 1
        self.swaps.append(swap)
        del self.swaps[:-MAX_SWAPS]
        self.save()
        return swap

    def finish_swap(self, swap: SwapRecord, outcome: SwapOutcome, reason: str = "") -> None:
        """Settle a swap record, once: its outcome is what happened, never rewritten."""
        if swap.outcome != "running":
            raise RegistryError(f"swap {swap.swap_id} already finished ({swap.outcome})")
        swap.outcome, swap.reason, swap.finished_unix = outcome, reason, time.time()
        self.save()

    # ---- retention -------------------------------------------------------------------------

    def protected(self) -> set[int]:
        """Versions retention must keep: the promoted one and the rollback target."""
        return {v for v in (self.promoted, self.rollback_target) if v is not None}

    def retention_candidates(
        self, keep_last: int, in_use: set[int] | frozenset[int] = frozenset()
    ) -> list[CheckpointRecord]:
        """Records whose files may be deleted: beyond the newest ``keep_last`` with files, never
        the promoted version, the rollback target or ``in_use`` (canary, swapping, served by a
        replica), never one still being checked, never a path a kept version points at."""
        live = sorted(
            (r for r in self.checkpoints.values() if not r.deleted),
            key=lambda r: r.version,
            reverse=True,
        )
        keep = self.protected() | set(in_use) | {r.version for r in live[:keep_last]}
        kept_paths = {r.path for r in live if r.version in keep}
        return [
            r
            for r in live
            if r.version not in keep
            and r.path not in kept_paths
            and r.status not in ("registered", "validating")
        ]

    def mark_deleted(self, version: int) -> None:
        self.get(version).deleted = True
        self.save()

    def __iter__(self) -> Iterator[CheckpointRecord]:
        return iter(sorted(self.checkpoints.values(), key=lambda r: r.version))


def _int_or_none(x: Any) -> int | None:
    return None if x is None else int(x)


def _float_or_none(x: Any) -> float | None:
    return None if x is None else float(x)


__all__ = ["ALLOWED", "Registry", "RegistryError"]
