"""Error classes that cross module boundaries, each with one meaning and one gRPC/HTTP status.

Why a module of its own: the gateway maps exceptions to statuses and the orchestrator decides
whether a failed swap rejects a checkpoint for good or may be retried. Both decisions must rest
on *what kind* of error it is, never on a built-in class that internal bugs raise too (a stray
``ValueError`` from a bug must come out as INTERNAL, not as the client's INVALID_ARGUMENT).

- ``InvalidArgumentError``: the client's request is wrong (INVALID_ARGUMENT, naming the field).
- ``kilnlm.checkpoint.CheckpointError`` (and subclasses): the checkpoint itself is bad
  (checksum, shape, config, tokenizer): the orchestrator rejects it, finally.
- ``SwapEnvironmentError``: the checkpoint may be fine but this place cannot use it now (the file
  is not on this node, a timeout, a replica died): the swap fails, the checkpoint stays
  ``validated`` and can be promoted again.
"""

from __future__ import annotations


class InvalidArgumentError(ValueError):
    """A request field is out of range or malformed; the message names the field.

    Subclasses ``ValueError`` so library callers that catch ``ValueError`` keep working; the
    gateway maps only this class (not every ``ValueError``) to INVALID_ARGUMENT.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SwapEnvironmentError(RuntimeError):
    """A swap failed for a reason outside the checkpoint: retryable, never a rejection."""


__all__ = ["InvalidArgumentError", "SwapEnvironmentError"]
