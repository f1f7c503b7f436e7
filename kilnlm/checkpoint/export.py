"""Export: a model or a full state dict -> a directory transformers and kilnlm both load.

The directory appears complete or not at all: it is written into a temporary directory beside the
target, every file fsynced, the manifest written last, and renamed into place. Weights are
safetensors under HF Llama names; config.json holds HF Llama keys plus a "kilnlm" key with the
full ModelConfig (options HF Llama cannot express round-trip through it; such exports say
``model_type: "kilnlm"`` so that transformers refuses them instead of computing something else).
"""

from __future__ import annotations

import errno
import importlib.metadata
import json
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from kilnlm.checkpoint.errors import CheckpointError
from kilnlm.checkpoint.hf import (
    config_to_hf,
    hf_compatible,
    hf_incompatibilities,
    hf_sizes,
    to_hf_state_dict,
)
from kilnlm.checkpoint.load import dtype_of
from kilnlm.checkpoint.manifest import (
    CONFIG,
    MANIFEST,
    TOKENIZER,
    WEIGHTS,
    FileEntry,
    Manifest,
    read_manifest,
    sha256_file,
)
from kilnlm.model import ModelConfig


def save_pretrained(
    model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None, **manifest_fields: Any
) -> Path:
    """Export ``model`` (a Transformer) to ``path`` atomically; return the directory.

    ``manifest_fields`` (version, step, tokens_seen, heldout_loss, ...) go into manifest.json and
    must be JSON values. See ``export_state_dict``.
    """
    model = getattr(model, "_orig_mod", model)
    return _export(model.state_dict(), model.config, Path(path), tokenizer, manifest_fields)


def export_state_dict(
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    path: str | os.PathLike[str],
    tokenizer: Any = None,
    **manifest_fields: Any,
) -> Path:
    """Export a full (unsharded) state dict under our names, without building a model.

    Training gathers the FSDP state dict on one rank and calls this. The directory appears at
    ``path`` complete or not at all: it is written beside it, fsynced, and renamed into place.
    An export is immutable, because a registered version may point at it: an existing export at
    ``path`` is never rewritten (exporting the same content again returns it untouched; other
    content raises FileExistsError), and any other non-empty directory is refused.
    A model HF Llama cannot express is still exported (with a warning) for kilnlm to load.
    """
    return _export(state_dict, config, Path(path), tokenizer, manifest_fields)


def export_content_addressed(
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    parent: str | os.PathLike[str],
    prefix: str,
    tokenizer: Any = None,
    **manifest_fields: Any,
) -> Path:
    """Export into ``parent/<prefix>-<content sha256, 12 hex>`` and return that directory.

    Why: a name that says what the folder holds can never be reused for other weights, so a
    retried or resumed trainer that re-exports a step writes a new folder beside the old one
    (other weights) or finds its own (the same content: nothing is written).
    """
    return _export(
        state_dict, config, Path(parent) / prefix, tokenizer, manifest_fields, by_content=True
    )


def _export(
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    path: Path,
    tokenizer: Any,
    manifest_fields: dict[str, Any],
    by_content: bool = False,
) -> Path:
    if not by_content:
        _check_target(path.absolute())
    fields = {name: _json_value(name, value) for name, value in manifest_fields.items()}
    reasons = hf_incompatibilities(config)
    if reasons:
        warnings.warn(
            "transformers cannot load this export as Llama (" + "; ".join(reasons) + "); kilnlm "
            "can, with kilnlm.checkpoint.load",
            stacklevel=3,  # the caller of save_pretrained / export_state_dict
        )
    path = path.absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # mode from the umask, unlike tempfile.mkdtemp's 0700: replicas must read it
    try:
        manifest = _write_export(tmp, state_dict, config, tokenizer, fields)
        if by_content:
            path = path.with_name(f"{path.name}-{manifest.content_sha256()[:12]}")
            _check_target(path)
        return _move_into_place(tmp, path, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless it was not needed


def _write_export(
    tmp: Path,
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    tokenizer: Any,
    fields: dict[str, Any],
) -> Manifest:
    weights = to_hf_state_dict(state_dict, config)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})  # HF requires "pt"
    if tokenizer is not None:
        _save_tokenizer(tokenizer, tmp)
    _write_json(tmp / CONFIG, _config_json(config, dtype_of(weights), tokenizer))
    manifest = Manifest(
        files=_file_entries(tmp),
        fields=fields,
        hf_compatible=hf_compatible(config),
        kilnlm_version=_kilnlm_version(),
        created_unix=time.time(),
    )
    _write_json(tmp / MANIFEST, manifest.to_dict())  # last: its presence means complete
    _fsync(tmp)
    return manifest


def _check_target(target: Path) -> None:
    """Refuse early what can never be written: a file, or a non-empty folder that is no export."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"refusing to write into {target}: it is not a kilnlm export (no {MANIFEST}); choose "
            "another path or remove it"
        )


def _move_into_place(tmp: Path, target: Path, manifest: Manifest) -> Path:
    """Rename ``tmp`` to ``target`` unless ``target`` already holds files, which stay untouched.

    rename(2) replaces an empty directory but fails on a non-empty one, so two writers racing for
    one path cannot overwrite each other either.
    """
    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _require_same_content(target, manifest)
        return target
    _fsync(target.parent)
    return target


def _require_same_content(target: Path, manifest: Manifest) -> None:
    """Accept an existing export of the same content (a retry); refuse anything else."""
    try:
        same = read_manifest(target).content_sha256() == manifest.content_sha256()
    except CheckpointError:
        same = False
    if not same:
        raise FileExistsError(
            f"refusing to overwrite {target}: it holds another export, and exports are "
            "immutable (a registered version may point at it); export to a new path, e.g. with "
            "kilnlm.checkpoint.export_content_addressed"
        )


def _config_json(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> dict[str, Any]:
    reasons = hf_incompatibilities(cfg)
    if reasons:
        # model_type "kilnlm" makes transformers' Auto classes refuse it instead of computing
        # something else; the sizes keep a forced LlamaForCausalLM from building a 7B default.
        d: dict[str, Any] = {
            "architectures": ["KilnlmTransformer"],
            "model_type": "kilnlm",
            "hf_incompatible": reasons,
            **hf_sizes(cfg),
        }
    else:
        # Explicit nulls without a tokenizer: LlamaConfig would otherwise assume bos=1, eos=2.
        d = config_to_hf(cfg) | {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
        if tokenizer is not None:
            d |= _special_token_ids(tokenizer)
    name = str(dtype).removeprefix("torch.")
    d |= {"dtype": name, "torch_dtype": name}  # 5.x reads dtype, 4.x torch_dtype
    d["kilnlm"] = cfg.to_dict()
    return d


def _special_token_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids from the tokenizer's ``bos_id``-style properties (kilnlm's Tokenizer),
    ``bos_token_id``-style attributes (HF's), or its ``<|bos|>``-style tokens."""
    ids: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad"):
        value = next(
            (
                v
                for v in (
                    getattr(tokenizer, f"{role}_token_id", None),
                    getattr(tokenizer, f"{role}_id", None),
                )
                if isinstance(v, int)
            ),
            None,
        )
        if value is None and hasattr(tokenizer, "token_to_id"):
            value = tokenizer.token_to_id(f"<|{role}|>")
        ids[f"{role}_token_id"] = value
    return ids


def _save_tokenizer(tokenizer: Any, directory: Path) -> None:
    tokenizer.save(str(directory))  # kilnlm's Tokenizer.save(dir) writes dir/tokenizer.json
    if not (directory / TOKENIZER).is_file():
        raise CheckpointError(
            f"{type(tokenizer).__name__}.save(dir) wrote no {TOKENIZER}; pass a "
            "kilnlm.tokenizer.Tokenizer"
        )


def _json_value(name: str, value: Any) -> Any:
    """A manifest field as JSON; 0-d tensors and numpy scalars (a loss, a step) become numbers."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"manifest field {name!r} = {value!r} is not a JSON value; pass numbers, strings, "
            "lists or dicts"
        ) from e
    return value


def _file_entries(root: Path) -> dict[str, FileEntry]:
    """Size and sha256 of every file under root; each is fsynced, so the manifest never
    describes data still sitting in the page cache."""
    entries = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        entries[path.relative_to(root).as_posix()] = FileEntry(
            sha256_file(path), path.stat().st_size
        )
        _fsync(path)
    return entries


def _write_json(path: Path, obj: Any) -> None:
    with path.open("w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """Flush a file or directory entry to disk; some platforms cannot open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _kilnlm_version() -> str:
    try:
        return importlib.metadata.version("kilnlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
