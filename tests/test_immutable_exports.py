"""A registered export never changes: re-exports of a step land beside it or find it unchanged.

The two ways a trainer re-exports a step (DESIGN.md, "Versions"): a resume that falls back to an
older checkpoint trains the step again with other weights, and a worker that exported but died
before reporting exports the same weights again. Both go through the real ``Exporter`` into real
folders, and are registered with the real orchestrator (in-process, no Ray needed to register).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from kilnlm.actors.orchestrator import Orchestrator, OrchestratorConfig
from kilnlm.cluster.checkpointing import Exporter
from kilnlm.model import ModelConfig, Transformer

CFG = ModelConfig.from_preset("test-1m", vocab_size=128, block_size=32)
FIELDS = {"tokens_seen": 4 * 64, "heldout_loss": 2.0}


def weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return Transformer(CFG).state_dict()


def export_step(exports: Path, state_dict: dict[str, torch.Tensor], step: int = 4) -> str:
    """One trainer attempt's export of ``step``, as rank 0 does it; returns the URI it reported."""
    reported: list[str] = []
    exporter = Exporter(str(exports), CFG, hook=reported.append)
    exporter.submit(state_dict, step, **FIELDS)
    exporter.close()
    assert reported == exporter.exported and len(reported) == 1
    return reported[0]


def snapshot(path: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


async def register_all(tmp_path: Path, uris: list[str]) -> list[int]:
    orchestrator = Orchestrator(
        OrchestratorConfig(
            storage_path=str(tmp_path / "registry"), heldout="unused", check_serve=False
        )
    )
    return [await orchestrator.register(uri) for uri in uris]


def test_reexporting_a_step_never_rewrites_a_registered_path(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    first = export_step(exports, weights(seed=1))
    before = snapshot(first)
    # A resume that fell back to an older checkpoint: step 4 again, other weights.
    other = export_step(exports, weights(seed=2))
    assert other != first
    assert snapshot(first) == before  # the first path's files, manifest included, are unchanged
    # A worker that exported and died before reporting: the same weights again.
    retried = export_step(exports, weights(seed=1))
    assert retried == first and snapshot(first) == before
    assert sorted(p.name for p in exports.iterdir()) == sorted({Path(first).name, Path(other).name})
    versions = asyncio.run(register_all(tmp_path, [first, other, retried, first]))
    assert versions == [1, 2, 1, 1]  # the same content registered again is one version


def test_an_existing_export_of_other_content_is_never_replaced(tmp_path: Path) -> None:
    from kilnlm.checkpoint import export_state_dict

    path = export_state_dict(weights(seed=1), CFG, tmp_path / "export", step=4)
    before = snapshot(str(path))
    with pytest.raises(FileExistsError, match="immutable"):
        export_state_dict(weights(seed=2), CFG, path, step=4)
    assert snapshot(str(path)) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left behind
