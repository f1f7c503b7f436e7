"""The engine's half of the two-phase hot-swap: stage new weights beside the serving ones,
commit, flip at a step boundary, retire the old weights once no request uses them.

``HotSwap`` is a mixin of ``LLMEngine`` (engine.py): the step calls ``_swap_boundary`` first and
``_retire_versions`` last; everything else here runs between steps (the async engine sends it
as a command). What it reads and writes of the engine is declared below.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from kilnlm.engine.config import EngineConfig
from kilnlm.engine.request import Request
from kilnlm.engine.serving import ServingState, Snapshot
from kilnlm.engine.weights import StagedWeights, SwapReport, prepare
from kilnlm.model import Transformer


class HotSwap:
    """Stage / commit / abort_stage, and the flip and retirement at step boundaries."""

    config: EngineConfig
    models: dict[int, Transformer]
    serving: ServingState
    requests: dict[str, Request]
    _staged: StagedWeights | None
    _commit: tuple[StagedWeights, float] | None
    _retiring: dict[int, float]
    last_swap: SwapReport | None

    @property
    def serving_version(self) -> int:
        return self.serving.current.version

    @property
    def committing_version(self) -> int | None:
        """The version committed and waiting to flip (drain mode: until the drain ends)."""
        commit = self._commit
        return None if commit is None else commit[0].version

    def check_stage_version(self, version: int) -> Transformer:
        """The serving model, to stage beside; ValueError if that version is already loaded."""
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"version must be an int, got {version!r}")
        if version in self.models or version == self.serving_version:
            raise ValueError(f"version {version} is already loaded; stage another version")
        return self.models[self.serving_version]

    def prepare_stage(
        self, source: Transformer | Mapping[str, Tensor], version: int, payload: Any = None
    ) -> StagedWeights:
        """Phase 1, the slow part: load and check weights. Changes nothing in the engine."""
        serving = self.check_stage_version(version)
        return prepare(serving, source, version, self.config.swap_mode, payload)

    def install_stage(self, staged: StagedWeights) -> None:
        """Phase 1, the quick part: keep the checked weights until commit or abort_stage."""
        if self._commit is not None:
            raise RuntimeError(
                f"version {self._commit[0].version} is committed and waiting to flip; stage after it"
            )
        self._staged = staged

    def stage(
        self, source: Transformer | Mapping[str, Tensor], version: int, payload: Any = None
    ) -> float:
        """Load and check new weights beside the serving ones; returns the seconds it took.
        ``payload`` serves beside them from the flip on (``Snapshot.payload``). Raises
        ValueError (naming the tensor) on a mismatch; serving is untouched either way."""
        staged = self.prepare_stage(source, version, payload)
        self.install_stage(staged)
        return staged.stage_s

    def commit(self, version: int) -> None:
        """Phase 2: flip to the staged version at the next step boundary (drain mode: the first
        boundary with no request and no reader of the old version left); ``serving`` says when."""
        if self._staged is None or self._staged.version != version:
            staged = None if self._staged is None else self._staged.version
            raise ValueError(f"version {version} is not staged (staged: {staged}); stage it first")
        self._commit, self._staged = (self._staged, time.monotonic()), None
        if self._commit[0].mode == "drain":
            self.serving.hold()  # new readers wait for the new weights, as new requests do

    def abort_stage(self) -> bool:
        """Drop staged weights (or a commit still waiting to flip); True if there was one."""
        dropped = self._staged is not None or self._commit is not None
        self._staged = self._commit = None
        self.serving.unhold()
        return dropped

    @property
    def _draining(self) -> bool:
        return self._commit is not None and self._commit[0].mode == "drain"

    def _swap_boundary(self, now: float) -> None:
        """At the start of a step: flip a committed version if its mode allows it now."""
        if self._commit is None:
            return
        staged, committed_at = self._commit
        old = self.serving_version
        if staged.mode == "drain":
            if any(r.version is not None for r in self.requests.values()):
                return  # old-version requests still running: new ones wait (scheduler)
            if not self.serving.quiet():
                return  # a score / evaluation still reads the old weights: they are copied over
            model = self.models.pop(old)
            model.load_state_dict(staged.state_dict)  # type: ignore[arg-type]  # copies in place
        else:
            model = staged.model  # type: ignore[assignment]
            self._retiring[old] = now
        self.models[staged.version] = model
        self._commit = None
        self.serving.publish(Snapshot(staged.version, model, staged.payload))
        self.last_swap = SwapReport(
            staged.mode, old, staged.version, staged.stage_s, now - committed_at
        )

    def _retire_versions(self) -> None:
        """Drop old weights (double mode) once no request uses them."""
        live = {r.version for r in self.requests.values()}
        for version in [v for v in self.models if v != self.serving_version and v not in live]:
            del self.models[version]
            since = self._retiring.pop(version, None)
            if since is not None and self.last_swap is not None:
                self.last_swap.overlap_s = time.monotonic() - since


__all__ = ["HotSwap"]
