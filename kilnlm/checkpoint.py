"""Checkpoints on disk: a Hugging Face Llama directory that kilnlm can trust.

An export is one directory::

    model.safetensors   weights under HF Llama names (tied embeddings stored once, as HF does)
    config.json         HF Llama keys, plus a "kilnlm" key with the full ModelConfig
    tokenizer.json      when a tokenizer was given
    manifest.json       written last: sha256 and size of every file, format version, and the
                        caller's fields (version, step, tokens_seen, heldout_loss, ...)

Why this shape: transformers (and everything built on it) loads the directory as it is, and
kilnlm loads any HF Llama directory back, so our logits can be checked against an independent
implementation. Options HF Llama cannot express (LayerNorm, GELU, sinusoidal positions, sliding
window, bidirectional attention) still round-trip through the "kilnlm" key; such exports say
``model_type: "kilnlm"`` so that transformers refuses them instead of computing something else.

Why the manifest and the atomic write: the orchestrator hot-swaps checkpoints into live replicas,
so a half-written or corrupted export must be refused, never served. An export is written into a
temporary directory beside the target and renamed into place, so the target is either absent or
complete; a copy of it is checked against the manifest's checksums before any weight is used.

Loading never unpickles: weights come from safetensors only, and ``pytorch_model.bin`` is refused.
Module names of ``kilnlm.model`` follow HF Llama and RoPE uses HF's rotate-half layout, so the
mapping to HF is a rename, never a permutation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from kilnlm.model import ModelConfig, RopeScaling, Transformer

if TYPE_CHECKING:  # imported where used: weights alone need no tokenizer module
    from kilnlm.tokenizer import Tokenizer

FORMAT = "kilnlm.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Pickle-based formats: loading one can run arbitrary code, so we refuse them outright.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")

# --------------------------------------------------------------------------------------------
# Errors: one base class, so a hot-swap can catch "this checkpoint is bad" in one clause.


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


class UnsafeFormatError(CheckpointError):
    """The weights are in a pickle-based format, which kilnlm never loads."""


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    """What an export holds, so a copy can be checked before it is trusted."""

    files: dict[str, FileEntry]
    """Every file of the export but the manifest itself, by name relative to the directory."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The caller's fields: version, step, tokens_seen, heldout_loss, ..."""
    hf_compatible: bool = True
    """False when the model uses options HF Llama cannot express (only kilnlm can load it)."""
    format_version: int = FORMAT_VERSION
    kilnlm_version: str = "unknown"
    created_unix: float = 0.0

    def __post_init__(self) -> None:
        self.files = {
            name: e if isinstance(e, FileEntry) else FileEntry(**e)
            for name, e in self.files.items()
        }
        for name in self.files:
            _check_relative_name(name, MANIFEST)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise CheckpointError(
                f"{MANIFEST} is not a kilnlm manifest (format={d.get('format')!r})"
            )
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:  # before unknown keys trip us
            raise CheckpointError(
                f"manifest format_version {version!r} is newer than this kilnlm understands "
                f"({FORMAT_VERSION}); upgrade kilnlm to load this checkpoint"
            )
        return cls(**{k: v for k, v in d.items() if k != "format"})

    def check(self, root: Path, name: str) -> None:
        """Raise unless ``root/name`` is listed and matches its size and sha256."""
        entry = self.files.get(name)
        if entry is None:
            raise CheckpointError(
                f"{name} is not listed in {root / MANIFEST}, so it cannot be verified; re-export "
                "the checkpoint"
            )
        path = root / name
        if not path.is_file():
            raise IncompleteCheckpointError(
                f"{name} is listed in the manifest but missing from {root}: the copy is "
                "incomplete; copy the checkpoint again"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise ChecksumError(
                name,
                f"{name} in {root} has {size} bytes, the manifest says {entry.size}: it is "
                "truncated or was modified after export; copy or export it again",
            )
        digest = _sha256(path)
        if digest != entry.sha256:
            raise ChecksumError(
                name,
                f"{name} in {root} has sha256 {digest[:16]}…, the manifest says "
                f"{entry.sha256[:16]}…: it is corrupted or was modified after export; copy or "
                "export it again",
            )


def verify_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Check every file listed in ``path/manifest.json``; return the manifest.

    Raises IncompleteCheckpointError when the manifest (written last) or a listed file is missing,
    ChecksumError naming the first file whose size or sha256 differs.
    """
    root = _existing_dir(path)
    manifest = read_manifest(root)
    for name in sorted(manifest.files):
        manifest.check(root, name)
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The manifest without checking any file (cheap: for listing versions, not for loading)."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise IncompleteCheckpointError(
            f"{Path(path)} has no {MANIFEST}: the export did not finish or the copy is "
            "incomplete (the manifest is written last); export or copy it again"
        )
    try:
        return Manifest.from_dict(json.loads(file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file} is not a valid manifest ({e}); export it again") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_relative_name(name: str, source: str) -> None:
    """Refuse names that would reach outside the checkpoint directory (``../``, absolute)."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or "\\" in name:
        raise CheckpointError(f"{source} names the file {name!r}, which is outside the checkpoint")


# --------------------------------------------------------------------------------------------
# Config: ModelConfig <-> HF LlamaConfig (config.json)


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """Why HF Llama cannot express ``cfg`` (empty when it can)."""
    reasons = []
    if cfg.norm != "rmsnorm":
        reasons.append(f"norm={cfg.norm!r} (HF Llama uses RMSNorm)")
    if cfg.mlp != "swiglu":
        reasons.append(f"mlp={cfg.mlp!r} (HF Llama uses SwiGLU)")
    if cfg.pos_emb != "rope":
        reasons.append(f"pos_emb={cfg.pos_emb!r} (HF Llama uses RoPE)")
    if cfg.sliding_window is not None:
        reasons.append(f"sliding_window={cfg.sliding_window} (HF Llama attends to every position)")
    if not cfg.causal:
        reasons.append("causal=False (HF Llama is causal)")
    return reasons


def hf_compatible(cfg: ModelConfig) -> bool:
    """True when transformers' LlamaForCausalLM computes exactly what Transformer(cfg) computes."""
    return not hf_incompatibilities(cfg)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """HF LlamaConfig keys (config.json) for ``cfg``; raises if HF Llama cannot express it."""
    reasons = hf_incompatibilities(cfg)
    if reasons:
        raise UnsupportedConfigError(
            "HF Llama cannot express this model: " + "; ".join(reasons) + ". save_pretrained "
            "still writes it for kilnlm (kilnlm.checkpoint.load reads it back)"
        )
    scaling = _rope_scaling_to_hf(cfg.rope_scaling)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_hf_sizes(cfg),
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "attention_dropout": 0.0,
        "use_cache": True,
        # transformers 5.x reads rope_parameters (theta inside); 4.x reads rope_theta and
        # rope_scaling and would silently fall back to theta 10000 / no scaling without them.
        # 5.x gives rope_scaling priority, so both must say the same thing (they do).
        "rope_parameters": {"rope_theta": cfg.rope_theta, **(scaling or {"rope_type": "default"})},
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
    }


def _hf_sizes(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.block_size,
    }


def _rope_scaling_to_hf(s: RopeScaling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    if s.type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    return {
        "rope_type": "yarn",
        "factor": s.factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
        "beta_fast": s.beta_fast,
        "beta_slow": s.beta_slow,
    }


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from a config.json dict: our "kilnlm" key when present, else HF Llama keys.

    Raises UnsupportedConfigError for what kilnlm does not implement (another architecture,
    another activation, RoPE types such as "llama3" or "dynamic", partial rotary, ...).
    """
    if "kilnlm" in d:
        return ModelConfig.from_dict(dict(d["kilnlm"]))
    _check_llama(d)
    heads = _required(d, "num_attention_heads")
    theta, scaling = _rope_from_hf(d)
    return ModelConfig(
        vocab_size=_required(d, "vocab_size"),
        block_size=d.get("max_position_embeddings", 2048),
        n_layer=_required(d, "num_hidden_layers"),
        n_head=heads,
        n_kv_head=d.get("num_key_value_heads") or heads,
        n_embd=_required(d, "hidden_size"),
        intermediate_size=_required(d, "intermediate_size"),
        norm="rmsnorm",
        norm_eps=d.get("rms_norm_eps", 1e-6),
        mlp="swiglu",
        pos_emb="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        bias=bool(d.get("attention_bias", False)),
        init_std=d.get("initializer_range", 0.02),
    )


def _required(d: Mapping[str, Any], key: str) -> Any:
    if d.get(key) is None:
        raise CheckpointError(f"config.json has no {key!r}; it is not a complete Llama config")
    return d[key]


def _check_llama(d: Mapping[str, Any]) -> None:
    """Refuse, naming the key, every Llama-family variation our model does not compute."""
    unsupported = "; load it with transformers instead, or convert it"
    if d.get("model_type") != "llama":
        raise UnsupportedConfigError(
            f"config.json has model_type={d.get('model_type')!r}; kilnlm loads 'llama' "
            f"checkpoints and its own exports only{unsupported}"
        )
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise UnsupportedConfigError(
            f"config.json has hidden_act={d['hidden_act']!r}; kilnlm's SwiGLU uses silu{unsupported}"
        )
    heads, width = _required(d, "num_attention_heads"), _required(d, "hidden_size")
    if d.get("head_dim") not in (None, width // heads):
        raise UnsupportedConfigError(
            f"config.json has head_dim={d['head_dim']}, but kilnlm needs hidden_size / "
            f"num_attention_heads = {width // heads}{unsupported}"
        )
    if bool(d.get("attention_bias", False)) != bool(d.get("mlp_bias", False)):
        raise UnsupportedConfigError(
            f"config.json has attention_bias={d.get('attention_bias')} but mlp_bias="
            f"{d.get('mlp_bias')}; kilnlm has one bias switch for every linear layer{unsupported}"
        )


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``.

    Follows transformers' own precedence: ``rope_scaling`` wins over ``rope_parameters``, a
    top-level ``original_max_position_embeddings`` wins over the one inside, and yarn's original
    length defaults to max_position_embeddings.
    """
    rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UnsupportedConfigError(
            f"config.json has partial_rotary_factor={partial}; kilnlm rotates the whole head"
        )
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"config.json uses RoPE type {kind!r}, which kilnlm does not implement (it supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); load it with transformers instead"
        )
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(type="linear", factor=float(_required(rope, "factor")))
    return theta, _yarn_from_hf(d, rope)


def _yarn_from_hf(d: Mapping[str, Any], rope: dict[str, Any]) -> RopeScaling:
    original = d.get("original_max_position_embeddings") or rope.get(
        "original_max_position_embeddings", d.get("max_position_embeddings", 2048)
    )
    factor = rope.get("factor") or d.get("max_position_embeddings", 2048) / original
    default_attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    attention = rope.get("attention_factor")
    if attention is not None and not math.isclose(attention, default_attention, rel_tol=1e-6):
        raise UnsupportedConfigError(
            f"config.json sets yarn attention_factor={attention}; kilnlm computes the paper's "
            f"0.1·ln(factor)+1 = {default_attention:.6f} only"
        )
    if rope.get("mscale") and rope.get("mscale_all_dim"):
        raise UnsupportedConfigError(
            "config.json sets yarn mscale/mscale_all_dim (DeepSeek style); kilnlm implements "
            "plain YaRN only"
        )
    if rope.get("truncate", True) is False:
        raise UnsupportedConfigError(
            "config.json sets yarn truncate=false; kilnlm always rounds the correction range "
            "(truncate=true)"
        )
    return RopeScaling(
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(rope.get("beta_fast") or 32.0),  # HF treats 0/None as the default too
        beta_slow=float(rope.get("beta_slow") or 1.0),
    )


# --------------------------------------------------------------------------------------------
# Tensor names: ours <-> HF Llama. {L} is a layer index, {P} a projection, {T} weight or bias.

_NAMES = (
    ("embed_tokens.{T}", "model.embed_tokens.{T}"),
    ("blocks.{L}.attn.{P}.{T}", "model.layers.{L}.self_attn.{P}.{T}"),
    ("blocks.{L}.mlp.{P}.{T}", "model.layers.{L}.mlp.{P}.{T}"),
    ("blocks.{L}.attn_norm.{T}", "model.layers.{L}.input_layernorm.{T}"),
    ("blocks.{L}.mlp_norm.{T}", "model.layers.{L}.post_attention_layernorm.{T}"),
    ("norm.{T}", "model.norm.{T}"),
    ("lm_head.{T}", "lm_head.{T}"),
)
_PLACEHOLDERS = {"L": r"\d+", "P": r"[a-z]+_proj", "T": r"weight|bias"}


@cache
def _pattern(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w)\}", template)  # literal, name, literal, name, ...
    return re.compile(
        "".join(
            re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_PLACEHOLDERS[p]})"
            for i, p in enumerate(parts)
        )
    )


def _rename(name: str, to_hf: bool) -> str | None:
    for ours, hf in _NAMES:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        m = _pattern(src).fullmatch(name)
        if m:
            return dst.format(**m.groupdict())
    return None


def to_hf_state_dict(state_dict: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict under HF names, contiguous on CPU; a tied lm_head is left out (HF's way)."""
    out = {}
    for name, t in state_dict.items():
        name = name.replace("_orig_mod.", "")  # torch.compile's wrapper prefix
        if cfg.tie_embeddings and name == "lm_head.weight":
            continue
        hf = _rename(name, to_hf=True)
        if hf is None:
            raise CheckpointError(f"tensor {name!r} has no HF Llama name; is it a kilnlm model?")
        out[hf] = t.detach().to("cpu").contiguous()
    return out


def from_hf_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF Llama state dict under our names (rotary inv_freq buffers, which are derived, dropped)."""
    out = {}
    for name, t in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # old HF exports stored this derived buffer
            continue
        ours = _rename(name, to_hf=False)
        if ours is None:
            raise CheckpointError(
                f"checkpoint tensor {name!r} is not part of a Llama model; kilnlm cannot load it"
            )
        out[ours] = t
    return out


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


# --------------------------------------------------------------------------------------------
# Save


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
    ``path`` complete or not at all: it is written beside it, fsynced, and renamed into place. An
    existing export at ``path`` is replaced; any other existing non-empty directory is refused.
    A model HF Llama cannot express is still exported (with a warning) for kilnlm to load.
    """
    return _export(state_dict, config, Path(path), tokenizer, manifest_fields)


def _export(
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    path: Path,
    tokenizer: Any,
    manifest_fields: dict[str, Any],
) -> Path:
    target = path.absolute()
    _check_replaceable(target)
    fields = {name: _json_value(name, value) for name, value in manifest_fields.items()}
    reasons = hf_incompatibilities(config)
    if reasons:
        warnings.warn(
            "transformers cannot load this export as Llama (" + "; ".join(reasons) + "); kilnlm "
            "can, with kilnlm.checkpoint.load",
            stacklevel=3,  # the caller of save_pretrained / export_state_dict
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # mode from the umask, unlike tempfile.mkdtemp's 0700: replicas must read it
    try:
        _write_export(tmp, state_dict, config, tokenizer, fields)
        _move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_export(
    tmp: Path,
    state_dict: Mapping[str, Tensor],
    config: ModelConfig,
    tokenizer: Any,
    fields: dict[str, Any],
) -> None:
    weights = to_hf_state_dict(state_dict, config)
    save_file(weights, str(tmp / WEIGHTS), metadata={"format": "pt"})  # HF requires "pt"
    if tokenizer is not None:
        _save_tokenizer(tokenizer, tmp)
    _write_json(tmp / CONFIG, _config_json(config, _dtype_of(weights), tokenizer))
    manifest = Manifest(
        files=_file_entries(tmp),
        fields=fields,
        hf_compatible=hf_compatible(config),
        kilnlm_version=_kilnlm_version(),
        created_unix=time.time(),
    )
    _write_json(tmp / MANIFEST, manifest.to_dict())  # last: its presence means complete
    _fsync(tmp)


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path")
    if any(target.iterdir()) and not (target / MANIFEST).is_file():
        raise FileExistsError(
            f"refusing to replace {target}: it is not a kilnlm export (no {MANIFEST}); choose "
            "another path or remove it"
        )


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is moved aside first, then deleted."""
    if not target.exists():
        os.replace(tmp, target)
    else:
        old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(target.parent)


def _config_json(cfg: ModelConfig, dtype: torch.dtype, tokenizer: Any) -> dict[str, Any]:
    reasons = hf_incompatibilities(cfg)
    if reasons:
        # model_type "kilnlm" makes transformers' Auto classes refuse it instead of computing
        # something else; the sizes keep a forced LlamaForCausalLM from building a 7B default.
        d: dict[str, Any] = {
            "architectures": ["KilnlmTransformer"],
            "model_type": "kilnlm",
            "hf_incompatible": reasons,
            **_hf_sizes(cfg),
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


def _dtype_of(weights: Mapping[str, Tensor]) -> torch.dtype:
    return next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)


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
        entries[path.relative_to(root).as_posix()] = FileEntry(_sha256(path), path.stat().st_size)
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


# --------------------------------------------------------------------------------------------
# Load


def read_state_dict(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", verify: bool = True
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The config and the state dict (our names, stored dtypes) of an export or HF Llama directory.

    With ``verify`` the manifest's checksums are checked first; a kilnlm export without a manifest
    is refused as incomplete. A foreign HF directory has no manifest and nothing to verify: call
    ``verify_manifest`` yourself where a manifest must exist.
    """
    root = _existing_dir(path)
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


def load_tokenizer(path: str | os.PathLike[str], verify: bool = True) -> Tokenizer | None:
    """The kilnlm Tokenizer saved with an export (checked against the manifest), None if absent."""
    from kilnlm.tokenizer import Tokenizer

    root = _existing_dir(path)
    if not (root / TOKENIZER).is_file():
        return None
    if verify and (root / MANIFEST).is_file():
        read_manifest(root).check(root, TOKENIZER)
    return Tokenizer.load(root)


def _existing_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    return root


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
            _check_relative_name(name, WEIGHTS_INDEX)
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
        return _dtype_of(state)
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16'")
        dtype = resolved
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point type, got {dtype}")
    return dtype


__all__ = [
    "CheckpointError",
    "ChecksumError",
    "FileEntry",
    "IncompleteCheckpointError",
    "Manifest",
    "ShapeMismatchError",
    "UnsafeFormatError",
    "UnsupportedConfigError",
    "config_from_hf",
    "config_to_hf",
    "export_state_dict",
    "from_hf_state_dict",
    "hf_compatible",
    "hf_incompatibilities",
    "load",
    "load_state_dict_into",
    "load_tokenizer",
    "read_manifest",
    "read_state_dict",
    "save_pretrained",
    "to_hf_state_dict",
    "verify_manifest",
]
