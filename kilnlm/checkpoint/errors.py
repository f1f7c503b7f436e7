"""Checkpoint errors: one base class, so a hot-swap can catch "this checkpoint is bad" in one clause.

Everything here means the checkpoint itself is unusable (rejecting it is right); a missing mount
or a timeout is an environment problem (``kilnlm.errors.SwapEnvironmentError``), not one of these.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """The checkpoint cannot be used as it is; the message says why and what to do."""


class IncompleteCheckpointError(CheckpointError):
    """A file is missing: the export or the copy of it did not finish."""


class ChecksumError(CheckpointError):
    """A file does not match the manifest (corrupted, truncated or edited after export)."""

    def __init__(self, file: str, message: str):
        super().__init__(message)
        self.file = file


class ShapeMismatchError(CheckpointError):
    """A tensor's shape differs between the checkpoint and the model it is loaded into."""

    def __init__(self, tensor: str, message: str):
        super().__init__(message)
        self.tensor = tensor


class UnsupportedConfigError(CheckpointError):
    """A config uses something the other side (kilnlm or HF Llama) cannot express."""


class TokenizerMismatchError(CheckpointError, ValueError):
    """The checkpoint's tokenizer differs from the served one: in-flight prompts were encoded
    with the served one, so it cannot be hot-swapped (a ValueError too, for direct callers)."""


class IncompatibleWeightsError(ShapeMismatchError, ValueError):
    """New weights do not fit the serving model (a tensor or config field differs): hot-swap
    needs the same architecture (a ValueError too, for callers that stage by hand)."""


class UnsafeFormatError(CheckpointError):
    """The weights are in a pickle-based format, which kilnlm never loads."""
