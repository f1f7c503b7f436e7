"""Load: our exports and any HF Llama directory with safetensors, checked before use.

Loading never unpickles: weights come from safetensors only, and ``pytorch_model.bin`` is refused.
With ``verify`` (the default) every file is checked against the manifest before any weight is
used, and a file the manifest does not list is never read. ``load_state_dict_into`` is the
all-or-nothing copy a hot-swap uses: every name and shape is checked before the first write.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from kilnlm.checkpoint.errors import (
    CheckpointError,
    IncompleteCheckpointError,
    ShapeMismatchError,
    UnsafeFormatError,
)
from kilnlm.checkpoint.hf import config_from_hf, from_hf_state_dict
from kilnlm.checkpoint.manifest import (
    CONFIG,
    MANIFEST,
    PICKLE_SUFFIXES,
    TOKENIZER,
    WEIGHTS,
    WEIGHTS_INDEX,
    Manifest,
    check_relative_name,
    existing_dir,
    read_manifest,
    verify_manifest,
)
from kilnlm.model import ModelConfig, Transformer

if TYPE_CHECKING:  # imported where used: weights alone need no tokenizer module
    from kilnlm.hf_tokenizer import PretrainedTokenizer
    from kilnlm.tokenizer import Tokenizer


def read_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", verify: bool = True
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and the state dict (our names, stored dtypes) of an export or HF Llama directory.

    With ``verify`` the manifest's checksums are checked first; a kilnlm export without a manifest
    is refused as incomplete. A foreign HF directory has no manifest and nothing to verify: call
    ``verify_manifest`` yourself where a manifest must exist.
    """
    root = existing_dir(path)
    manifest = _integrity(root, verify)
    cfg = config_from_hf(_read_config(root, manifest))
    return cfg, from_hf_state_dict(_read_weights(root, device, manifest))


def load(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    verify: bool = True,
) -> Transformer:
    """A Transformer (eval mode) from our export or any HF Llama directory with safetensors.

    ``dtype`` None keeps the checkpoint's dtype. Position tables (RoPE frequencies) stay fp32
    whatever the weights' dtype, as in transformers.
    """
    cfg, state = read_state_dict(path, device=device, verify=verify)
    dtype = _resolve_dtype(dtype, state)
    with torch.device(device):  # build in place: no CPU copy of a GPU model
        model = Transformer(cfg, init_weights=False)  # every weight is loaded next
    for p in model.parameters():  # parameters only; .to(dtype) would also round inv_freq
        p.data = p.data.to(dtype)
    load_state_dict_into(model, state)
    return model.eval()


def load_tokenizer(
    path: str | os.PathLike[str], verify: bool = True
) -> Tokenizer | PretrainedTokenizer | None:
    """The tokenizer of a directory (checked against its manifest, if any), None if absent.

    kilnlm's own ``Tokenizer`` for our exports; a Hugging Face directory's own tokenizer, with
    its specials, chat template and generation defaults (``PretrainedTokenizer``), when the
    directory has a ``tokenizer_config.json`` or its ``tokenizer.json`` lacks kilnlm's specials.
    """
    from kilnlm.hf_tokenizer import PretrainedTokenizer, is_pretrained_dir, sidecar_files
    from kilnlm.tokenizer import Tokenizer

    root = existing_dir(path)
    if not (root / TOKENIZER).is_file():
        return None
    if verify and (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        for name in [TOKENIZER, *sidecar_files(root)]:
            manifest.check(root, name)
    if is_pretrained_dir(root):
        return PretrainedTokenizer.load(root)
    try:
        return Tokenizer.load(root)
    except ValueError:  # a foreign tokenizer.json with no kilnlm specials
        return PretrainedTokenizer.load(root)


def _integrity(root: Path, verify: bool) -> Manifest | None:
    if not verify:
        return None
    if (root / MANIFEST).is_file():
        return verify_manifest(root)
    if "kilnlm" in _read_json(root / CONFIG):  # ours, yet no manifest: the export is incomplete
        read_manifest(root)  # raises IncompleteCheckpointError
    return None


def _read_config(root: Path, manifest: Manifest | None) -> dict[str, Any]:
    _require_listed(manifest, root, CONFIG)
    return _read_json(root / CONFIG)


def _require_listed(manifest: Manifest | None, root: Path, name: str) -> None:
    """Everything we read must have been verified: refuse a file the manifest does not list."""
    if manifest is not None and name not in manifest.files:
        manifest.check(root, name)  # raises CheckpointError naming the file


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise IncompleteCheckpointError(
            f"{path.parent} has no {path.name}; it is not a checkpoint directory"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def _weight_files(root: Path) -> tuple[list[str], list[str]]:
    """(safetensors files to read, index files): the shards of the index, or the single file.
    Never a pickle."""
    if (root / WEIGHTS_INDEX).is_file():
        weight_map = _read_json(root / WEIGHTS_INDEX).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        for name in files:
            check_relative_name(name, WEIGHTS_INDEX)
        return files, [WEIGHTS_INDEX]
    if (root / WEIGHTS).is_file():
        return [WEIGHTS], []
    pickles = sorted(p.name for p in root.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeFormatError(
            f"{root} holds {pickles[0]}, a pickle-based PyTorch checkpoint: kilnlm never "
            "unpickles checkpoints (a pickle can run any code). Convert it to safetensors first, "
            "e.g. with transformers: LlamaForCausalLM.from_pretrained(src).save_pretrained(dst) "
            f"writes {WEIGHTS}"
        )
    raise IncompleteCheckpointError(f"{root} has no {WEIGHTS} (nor {WEIGHTS_INDEX})")


def _read_weights(
    root: Path, device: str | torch.device, manifest: Manifest | None
) -> dict[str, Tensor]:
    files, index = _weight_files(root)
    for name in index + files:
        _require_listed(manifest, root, name)
    state: dict[str, Tensor] = {}
    for name in files:
        if not (root / name).is_file():
            raise IncompleteCheckpointError(f"{root} lacks the weight shard {name}")
        part = load_file(str(root / name), device=str(device))
        duplicated = state.keys() & part.keys()
        if duplicated:
            raise CheckpointError(f"tensor {sorted(duplicated)[0]!r} is stored in two shards")
        state |= part
    return state


def _resolve_dtype(dtype: torch.dtype | str | None, state: Mapping[str, Tensor]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return dtype_of(state)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16'")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    return dtype


def dtype_of(weights: Mapping[str, Tensor]) -> torch.dtype:
    """The first floating-point dtype among the tensors (fp32 when there is none)."""
    return next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------------------------
# Loading a state dict into a live model (hot-swap uses this): check everything, then copy.


def load_state_dict_into(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Copy ``state_dict`` (our names) into ``model``'s parameters, in place, all or nothing.

    Every name and shape is checked before the first copy, so a bad checkpoint leaves the model
    exactly as it was: a hot-swap that fails keeps serving the old weights. Dtype and device are
    converted to the model's. Tied weights may be given once or twice (then they must agree).
    """
    model = getattr(model, "_orig_mod", model)
    targets = model.state_dict()  # views sharing storage with the parameters
    given = _resolve_aliases(targets, dict(state_dict))
    missing = sorted(targets.keys() - given.keys())
    unexpected = sorted(given.keys() - targets.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint and model disagree: missing {missing[:5]}, unexpected {unexpected[:5]}"
            f"{' …' if len(missing) > 5 or len(unexpected) > 5 else ''}; the checkpoint was "
            "written for a different model (see its config.json)"
        )
    for name, t in given.items():
        if t.shape != targets[name].shape:
            raise ShapeMismatchError(
                name,
                f"tensor {name!r} has shape {tuple(t.shape)} in the checkpoint but "
                f"{tuple(targets[name].shape)} in the model; the checkpoint was written for a "
                "different ModelConfig, load it with kilnlm.checkpoint.load() instead",
            )
    with torch.no_grad():
        for name, t in given.items():
            targets[name].copy_(t)


def _resolve_aliases(targets: dict[str, Tensor], given: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop names of the model that share storage with an earlier one (tied embeddings)."""
    first_by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, t in list(targets.items()):
        key = (t.data_ptr(), tuple(t.shape))
        source = first_by_storage.setdefault(key, name)
        if source == name or t.numel() == 0:
            continue
        del targets[name]
        alias = given.pop(name, None)
        if alias is None:
            continue
        if source not in given:
            given[source] = alias
        elif not torch.equal(alias.to(given[source].device), given[source]):
            raise CheckpointError(
                f"the model ties {name!r} to {source!r}, but the checkpoint holds different "
                "values for them; it was written for an untied model (tie_embeddings=False)"
            )
    return given
