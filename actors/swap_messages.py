"""The messages of the hot-swap protocol between the orchestrator and each replica's
``SwapAgent`` (``swap_agent.py``): ``attach`` sends a ``Hello`` and gets an ``Attachment``;
``poll`` sends a ``Heartbeat`` and gets ``Command``s; ``report`` sends a ``Result``.

Plain dataclasses, pickled across Ray, and the names both sides agree on (the orchestrator's
actor name and namespace, a checkpoint URI's local path): the orchestrator's side
(orchestrator, replica set, swap coordinator, Admin API) uses them without importing the
replica's model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from kilnlm.checkpoint import remote
from kilnlm.hotswap import FailureKind

ORCHESTRATOR_NAMESPACE = "kiln"
"""Ray namespace of every orchestrator (a detached actor outlives the job that made it)."""


def orchestrator_name(app_name: str) -> str:
    """The orchestrator of a Serve application: one per application, found by this name."""
    return f"kiln-orchestrator:{app_name}"


def local_path(uri: str) -> str:
    """Where a checkpoint URI is read from: the absolute local path of a path or file://path; an
    object-store URI (s3://, gs://) as it is (each replica fetches it into its node's cache)."""
    if remote.is_remote(uri):
        return uri
    return os.path.abspath(uri.removeprefix("file://"))


CommandKind = Literal["stage", "commit", "abort", "load", "evaluate"]


@dataclass
class Target:
    """A version and where to load it from."""

    version: int
    path: str


@dataclass
class Hello:
    """What a replica tells the orchestrator when it attaches."""

    replica_id: str
    actor_name: str | None
    """Its Ray actor name (Serve names replicas), so the orchestrator can tell it died."""
    namespace: str | None
    version: int
    """Version it serves now (0: none)."""
    checkpoint: str
    staged_version: int | None
    swap_mode: str


@dataclass
class Attachment:
    target: Target | None
    """The promoted version, to load before serving (None: nothing is promoted yet)."""
    poll_timeout_s: float


@dataclass
class Command:
    seq: int
    kind: CommandKind
    version: int = 0
    path: str = ""
    swap_id: int = 0
    token_ids: list[int] = field(default_factory=list)
    """``evaluate``: held-out ids to score."""


@dataclass
class Result:
    seq: int
    kind: CommandKind
    ok: bool
    version: int = 0
    seconds: float = 0.0
    swap_mode: str = ""
    error: str = ""
    fault: FailureKind | None = None
    """Whose fault a failure was (``failure_kind``): "checkpoint" (bad files, another
    architecture, another tokenizer: the orchestrator rejects it) or "environment" (a file
    missing on this node, a timeout, a dead engine: the swap fails, the version stays
    promotable)."""
    logprobs: list[float] = field(default_factory=list)
    skipped: bool = False
    """Nothing to do: the replica already served (stage) or had flipped to (commit) it."""


@dataclass
class Heartbeat:
    version: int
    staged_version: int | None
    executed: int
    """Last command seq the replica had finished when it sampled this: a heartbeat older than
    a report (the two race) must not overwrite what the report said."""
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    energy_joules: float = 0.0
    """This replica process's energy since it started (kilnlm/energy.py), for ``kiln status``."""
    energy_source: str = ""
    generated_tokens: int = 0


class UnknownReplica(RuntimeError):
    """The orchestrator does not know this replica (it restarted): attach again."""
