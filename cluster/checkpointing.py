"""Sharded training checkpoints (torch.distributed.checkpoint) and their export for serving.

A training checkpoint is one folder that every rank writes a part of::

    checkpoint-00000040-00000000/   (step 40, written by the attempt that resumed from step 0)
      .metadata                     DCP's index of every tensor shard (rank 0)
      __0_0.distcp, __1_0.distcp    each rank's shard of the model and of AdamW's moments
      train_state-rank00000.json    step, tokens seen, data position, RNG state (one per rank)
      model_config.json             the ModelConfig (rank 0): lets a checkpoint be exported alone
      optimizer_settings.json       AdamW's param_groups (lr, betas, ...) as JSON (rank 0)
      manifest-rank00000.json       sha256 + size of each file that rank wrote, written last

Under Ray Train each rank writes its part into a local temporary folder and ``ray.train.report``
merges the parts into the run's storage folder. The per-rank manifests make the merged folder
checkable: ``verify_checkpoint`` wants one manifest per rank and every listed file intact, and
names the first file that is not. A checkpoint that fails is never resumed from or exported:
``find_resume_checkpoint`` falls back to the newest older one that passes.

Why the data position is just the step: ``kilnlm.shards.get_batch`` is a pure function of
(step, rank, seed), so restoring the step restores the sampler. The learning-rate schedule is a
pure function of the step too (``kilnlm.train.lr_at``). Only the RNG state needs storing; it is
kept as base64 JSON. The optimizer's tensors go through DCP and its settings (``param_groups``)
to JSON, since DCP pickles every non-tensor value: nothing in a checkpoint is ever unpickled.

An export (``model.safetensors`` + ``config.json`` + ``tokenizer.json`` + ``manifest.json``) is
written by ``kilnlm.checkpoint.export_content_addressed`` into ``exports/step-<step>-<content>/``:
beside the target, then renamed, so a half-written export is never visible, and under a name
that says what it holds, so a registered export is never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from kilnlm.checkpoint import (
    CheckpointError,
    FileEntry,
    IncompleteCheckpointError,
    Manifest,
    export_content_addressed,
    export_state_dict,
    parse_manifest,
    remote,
    sha256_file,
)
from kilnlm.cluster.optimizer_state import (
    from_json,
    merge_optimizer_state,
    split_optimizer_state,
    to_json,
)
from kilnlm.cluster.train_state import TrainState, capture_rng, restore_rng
from kilnlm.model import ModelConfig, Transformer

log = logging.getLogger(__name__)

METADATA = ".metadata"
MODEL_CONFIG = "model_config.json"
OPTIMIZER_SETTINGS = "optimizer_settings.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8})-(\d{8})$")
EXPORTS = "exports"


def checkpoint_dir_name(step: int, resumed_from: int) -> str:
    """Unique per (step, attempt): a restart that re-saves a step never overwrites a folder that
    Ray Train still tracks (and may delete when it rotates old checkpoints)."""
    return f"checkpoint-{step:08d}-{resumed_from:08d}"


def export_dir_name(step: int) -> str:
    """The prefix of a step's export folder; ``write_export`` appends the content hash."""
    return f"step-{step:08d}"


def train_state_name(rank: int) -> str:
    return f"train_state-rank{rank:05d}.json"


def rank_manifest_name(rank: int) -> str:
    return f"manifest-rank{rank:05d}.json"


# --------------------------------------------------------------------------------------------
# Save and load (collective: every rank calls these)


def save_sharded(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    rank: int,
    model_config: ModelConfig | None = None,
) -> None:
    """Write this rank's part of a checkpoint into ``path``; the manifest goes last.

    Tensors go through DCP; the optimizer's other values (``param_groups``: lr, betas, eps, ...)
    go to JSON, because DCP would pickle them and load them back with
    ``torch.load(weights_only=False)``, and nothing in a checkpoint is ever unpickled.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    tensors, settings = split_optimizer_state(optim_sd)
    dcp.save({"model": model_sd, "optim": tensors}, checkpoint_id=str(path))
    (path / train_state_name(rank)).write_text(state.to_json())
    if rank == 0:  # the same on every rank: param_groups name parameters by FQN
        (path / OPTIMIZER_SETTINGS).write_text(json.dumps(to_json(settings), indent=2))
        if model_config is not None:
            (path / MODEL_CONFIG).write_text(json.dumps(model_config.to_dict(), indent=2))
    write_rank_manifest(path, rank, state)


def load_sharded(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int
) -> TrainState:
    """Load model and optimizer (resharding if the world size changed); return this rank's state.

    A rank that did not exist when the checkpoint was written takes rank 0's step and counters.
    """
    path = Path(path)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # allocates AdamW state to load into
    tensors, own_settings = split_optimizer_state(optim_sd)
    state = {"model": model_sd, "optim": tensors}
    dcp.load(state, checkpoint_id=str(path))
    settings = _optimizer_settings(path, own_settings)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=merge_optimizer_state(state["optim"], settings),
    )
    own = path / train_state_name(rank)
    return TrainState.from_json((own if own.is_file() else path / train_state_name(0)).read_text())


def _optimizer_settings(path: Path, own: dict[str, Any]) -> dict[str, Any]:
    """The saved optimizer settings; a checkpoint from before they were kept as JSON has them
    pickled inside DCP, which we never load: the optimizer keeps its own (from the TrainConfig)."""
    file = path / OPTIMIZER_SETTINGS
    if not file.is_file():
        log.warning("%s has no %s: keeping the optimizer's own settings", path, file.name)
        return own
    return from_json(json.loads(file.read_text()))


def rank_files(path: Path, rank: int) -> list[str]:
    """The files of ``path`` that ``rank`` wrote (the folder may be shared with other ranks)."""
    rank0 = {METADATA, MODEL_CONFIG, OPTIMIZER_SETTINGS}
    own = {train_state_name(rank)} | (rank0 if rank == 0 else set())
    return sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.name in own or p.name.startswith(f"__{rank}_"))
    )


def write_rank_manifest(path: Path, rank: int, state: TrainState) -> None:
    files = {
        name: FileEntry(sha256_file(path / name), (path / name).stat().st_size)
        for name in rank_files(path, rank)
    }
    fields = {"kind": "sharded", "rank": rank, "world_size": state.world_size, "step": state.step}
    manifest = Manifest(files=files, fields=fields)
    tmp = path / f".{rank_manifest_name(rank)}.tmp"
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2))
    os.replace(tmp, path / rank_manifest_name(rank))


# --------------------------------------------------------------------------------------------
# Verification and choosing what to resume from


def verify_checkpoint(path: str | Path) -> TrainState:
    """Check every rank's manifest and every file it lists; return rank 0's TrainState.

    Raises ``IncompleteCheckpointError`` when a manifest or a listed file is missing (a save or
    an upload that did not finish) and ``ChecksumError`` naming the first file whose size or
    sha256 differs; both are ``kilnlm.checkpoint.CheckpointError``.
    """
    path = Path(path)
    if not path.is_dir():
        raise IncompleteCheckpointError(f"checkpoint {path} does not exist")
    first = _rank_manifest(path, 0)
    world_size = int(first.fields["world_size"])
    for rank in range(world_size):
        manifest = first if rank == 0 else _rank_manifest(path, rank)
        for name in sorted(manifest.files):
            manifest.check(path, name)
    if METADATA not in first.files:
        raise IncompleteCheckpointError(f"{path / rank_manifest_name(0)} does not list {METADATA}")
    return TrainState.from_json((path / train_state_name(0)).read_text())


def _rank_manifest(path: Path, rank: int) -> Manifest:
    file = path / rank_manifest_name(rank)
    if not file.is_file():
        raise IncompleteCheckpointError(
            f"{file} is missing: rank {rank} did not finish saving or uploading this checkpoint; "
            "resume from an earlier one"
        )
    # Same format as an export's manifest.json (kilnlm.checkpoint.Manifest), under the rank's name.
    return parse_manifest(file, "resume from an earlier checkpoint")


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(step, resumed_from) of a checkpoint folder name, None for anything else."""
    m = CHECKPOINT_RE.match(name)
    return (int(m[1]), int(m[2])) if m else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(parse_checkpoint_name(p.name), p) for p in run_dir.iterdir() if p.is_dir()]
    return [p for key, p in sorted((k, p) for k, p in found if k is not None)[::-1]]


@dataclass
class ResumePoint:
    path: Path
    state: TrainState
    skipped: list[str]
    """Why each newer checkpoint was refused (each message names the bad file)."""


def find_resume_checkpoint(latest: str | Path, run_dir: str | Path | None = None) -> ResumePoint:
    """``latest`` if it verifies, else the newest intact checkpoint at or before its step.

    Raises CheckpointError (listing every refusal) when no checkpoint of the run is intact:
    starting over silently would waste the run, so the user must decide.
    """
    latest = Path(latest)
    run_dir = Path(run_dir) if run_dir is not None else latest.parent
    key = parse_checkpoint_name(latest.name)
    older = [p for p in list_checkpoints(run_dir) if p != latest]
    if key is not None:
        older = [p for p in older if (parse_checkpoint_name(p.name) or (0, 0))[0] <= key[0]]
    skipped: list[str] = []
    for candidate in [latest, *older]:
        try:
            return ResumePoint(candidate, verify_checkpoint(candidate), skipped)
        except CheckpointError as e:
            log.warning("not resuming from %s: %s", candidate, e)
            skipped.append(f"{candidate.name}: {e}")
    raise CheckpointError(
        f"no intact checkpoint in {run_dir} (" + "; ".join(skipped) + "); delete the run folder "
        "or launch under a new ClusterConfig.name to start over"
    )


def choose_resume(tracked: str | Path | None, run_dir: str | Path) -> ResumePoint | None:
    """Where a (re)started worker group resumes: the newest intact checkpoint among the one Ray
    Train tracks and those in the run folder; None when there is neither (a fresh run).

    Ray Train knows a checkpoint only once the controller has collected every rank's report of
    it. On a loaded machine a worker group can die after writing (and uploading, in sync mode)
    a checkpoint but before that report is collected; Ray then offers the one before, or none,
    and the run would silently redo those steps (CI saw an SFT run resume from step 0 with an
    intact step-10 checkpoint on disk). Every checkpoint of the run is a state of the same
    deterministic run, so the newest one that verifies is the right place to continue.
    """
    run_dir = Path(run_dir)
    newest = next(iter(list_checkpoints(run_dir)), None)
    if tracked is None and newest is None:
        return None
    latest = Path(tracked) if tracked is not None else newest
    assert latest is not None
    if newest is not None and (parse_checkpoint_name(newest.name) or (0, 0)) > (
        parse_checkpoint_name(latest.name) or (0, 0)
    ):
        log.warning("resuming from %s, newer than the checkpoint Ray Train tracks", newest.name)
        latest = newest
    return find_resume_checkpoint(latest, run_dir)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[Path]:
    """A local folder with the contents of ``uri``: the folder itself when it is local, else a
    temporary download (pyarrow understands s3://, gs://, ...)."""
    if "://" not in uri or uri.startswith("file://"):
        yield Path(uri.removeprefix("file://"))
        return
    import pyarrow.fs

    tmp = Path(tempfile.mkdtemp(prefix="kilnlm-ckpt-"))
    try:
        pyarrow.fs.copy_files(uri, str(tmp))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Export for serving


def gather_full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict on rank 0 (CPU), empty on other ranks. Collective: all ranks call."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


class Exporter:
    """Writes exports on a background thread of rank 0, one at a time, then calls the hook.

    Training goes on while the safetensors file is written and hashed; the next ``submit`` (or
    ``close``) waits for the previous export, so at most one full copy of the weights is held.
    """

    def __init__(
        self,
        exports_uri: str,
        model_config: ModelConfig,
        tokenizer: Any = None,
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.exports_uri, self.model_config = exports_uri, model_config
        self.tokenizer, self.hook = tokenizer, hook
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kilnlm-export")
        self._pending: Future[str] | None = None
        self.exported: list[str] = []
        self.hook_errors: list[str] = []

    def submit(self, state_dict: dict[str, Tensor], step: int, **fields: Any) -> None:
        self.wait()
        self._pending = self._pool.submit(self._export, state_dict, step, fields)

    def wait(self) -> None:
        if self._pending is not None:
            self.exported.append(self._pending.result())
            self._pending = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

    def _export(self, state_dict: dict[str, Tensor], step: int, fields: dict[str, Any]) -> str:
        uri = write_export(
            self.exports_uri,
            export_dir_name(step),
            state_dict,
            self.model_config,
            self.tokenizer,
            version=step,
            step=step,
            **fields,
        )
        if self.hook is not None:
            try:
                self.hook(uri)
            except Exception as e:  # registration is best effort: training must go on
                log.warning("checkpoint hook failed for %s: %s", uri, e)
                self.hook_errors.append(f"{uri}: {e}")
        return uri


def write_export(
    exports_uri: str,
    prefix: str,
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    tokenizer: Any,
    **fields: Any,
) -> str:
    """Export into ``exports_uri/<prefix>-<content hash>``; return that URI.

    Content-addressed, because a registered export must never change: a resumed run that
    re-exports a step with other weights (it fell back to an older checkpoint) gets a new
    folder, and a worker that exported but died before reporting finds its own folder again.
    Local folders are written atomically; a remote URI gets the manifest uploaded last, and an
    existing remote folder of that name (the same content) is left as it is.
    """
    if "://" not in exports_uri or exports_uri.startswith("file://"):
        local = exports_uri.removeprefix("file://")
        path = export_content_addressed(state_dict, config, local, prefix, tokenizer, **fields)
        return str(path) if "://" not in exports_uri else f"file://{path}"
    return _upload_export(exports_uri, prefix, state_dict, config, tokenizer, fields)


def _upload_export(
    exports_uri: str,
    prefix: str,
    state_dict: dict[str, Tensor],
    config: ModelConfig,
    tokenizer: Any,
    fields: dict[str, Any],
) -> str:
    with tempfile.TemporaryDirectory(prefix="kilnlm-export-") as tmp:
        local = export_content_addressed(state_dict, config, tmp, prefix, tokenizer, **fields)
        uri = f"{exports_uri.rstrip('/')}/{local.name}"
        # Manifest last; a folder of that name with a manifest is the same content: left as is.
        remote.upload_export(local, uri)
    return uri


def export_checkpoint(
    checkpoint_dir: str | Path, out_dir: str | Path, tokenizer: Any = None, **fields: Any
) -> Path:
    """Consolidate a sharded checkpoint into an export, in one process, after verifying it.

    A checkpoint that fails verification raises (naming the file) and nothing is written.
    """
    checkpoint_dir = Path(checkpoint_dir)
    state = verify_checkpoint(checkpoint_dir)
    config_file = checkpoint_dir / MODEL_CONFIG
    if not config_file.is_file():
        raise IncompleteCheckpointError(
            f"{checkpoint_dir} has no {MODEL_CONFIG}; cannot rebuild the model"
        )
    config = ModelConfig.from_dict(json.loads(config_file.read_text()))
    model_sd = Transformer(config).state_dict()
    with warnings.catch_warnings():  # one process reading every shard is the point here
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load({"model": model_sd}, checkpoint_id=str(checkpoint_dir))
    defaults = {
        "version": state.step,
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "heldout_loss": state.heldout_loss,
    }
    return export_state_dict(model_sd, config, out_dir, tokenizer, **{**defaults, **fields})


__all__ = [
    "Exporter",
    "ResumePoint",
    "TrainState",
    "capture_rng",
    "checkpoint_dir_name",
    "export_checkpoint",
    "find_resume_checkpoint",
    "gather_full_state_dict",
    "list_checkpoints",
    "load_sharded",
    "local_copy",
    "restore_rng",
    "save_sharded",
    "verify_checkpoint",
    "write_export",
]
