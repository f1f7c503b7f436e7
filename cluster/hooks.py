"""What the trainer calls after each exported checkpoint: the registration hook.

The interface is deliberately tiny: a picklable callable that takes the export's URI. The
export's ``manifest.json`` carries everything else (version, step, tokens seen, held-out loss,
sha256 of every file), so a registry needs nothing more to check and list the checkpoint.

``ActorHook`` is the implementation the system uses: it calls ``register(uri)`` on a named Ray
actor (the orchestrator of DESIGN.md). It holds only the actor's *name*, so it pickles into the
training workers and looks the actor up when it fires: an orchestrator restarted by Ray under
the same name is found again. The call runs on rank 0's export thread, off the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class CheckpointHook(Protocol):
    """Called once per export, after the export is complete and verified-by-construction."""

    def __call__(self, uri: str) -> None: ...


@dataclass(frozen=True)
class ActorHook:
    """``ray.get_actor(name).register(uri)``, waiting for the actor to accept the checkpoint."""

    actor_name: str
    namespace: str | None = None
    """Ray namespace of the actor; None: the namespace of the job (where the driver made it)."""
    method: str = "register"
    timeout_s: float = 60.0

    def __call__(self, uri: str) -> None:
        import ray

        try:
            actor = ray.get_actor(self.actor_name, namespace=self.namespace)
        except ValueError as e:
            raise LookupError(
                f"no Ray actor named {self.actor_name!r} (namespace {self.namespace!r}) to register "
                f"{uri} with; start it first or drop ClusterConfig.hook_actor"
            ) from e
        ray.get(getattr(actor, self.method).remote(uri), timeout=self.timeout_s)


def hook_from_config(actor_name: str | None, namespace: str | None = None) -> CheckpointHook | None:
    return ActorHook(actor_name, namespace) if actor_name else None


__all__ = ["ActorHook", "CheckpointHook", "hook_from_config"]
